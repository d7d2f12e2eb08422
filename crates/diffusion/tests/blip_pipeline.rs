//! The BLIP-Diffusion generation entry point on the tiny fixture model: DreamBench prompt
//! handling, token positions in the context embedding, and an end-to-end generation.

mod pipeline_support;

use candle_core::{DType, Device};
use diffusion::blip::{blip_text_prompt, BlipDiffusionPipeline, BlipRequest};
use pipeline_support::{fixture, max_abs_diff};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    fixture("blip")
}

fn pipeline() -> BlipDiffusionPipeline {
    let model = fixtures().join("model");
    BlipDiffusionPipeline::load(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn dreambench_prompts_lose_their_leading_subject() {
    assert_eq!(
        blip_text_prompt("a dog in the jungle", "dog"),
        "in the jungle"
    );
    assert_eq!(
        blip_text_prompt("A Dog wearing a red hat ", "dog"),
        "wearing a red hat"
    );
    assert_eq!(
        blip_text_prompt("a stuffed animal on the beach", "stuffed animal"),
        "on the beach"
    );
    // Attribute prompts keep the whole text; a bare subject gives an empty prompt.
    assert_eq!(blip_text_prompt("a red dog", "dog"), "a red dog");
    assert_eq!(blip_text_prompt("a dog", "dog"), "");
    // "a dogfish ..." does not start with the word "dog".
    assert_eq!(
        blip_text_prompt("a dogfish swimming", "dog"),
        "a dogfish swimming"
    );
}

#[test]
fn generation_end_to_end_and_token_positions() {
    let pipe = pipeline();
    let req = BlipRequest {
        reference: fixtures().join("pattern.png"),
        subject_category: "dog".into(),
        prompt: "in the jungle".into(),
        height: 64,
        width: 96,
        steps: 3,
        seed: 7,
        ..Default::default()
    };
    let mut steps = Vec::new();
    let out = pipe.generate(&req, &mut |i, n| steps.push((i, n))).unwrap();
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
    assert_eq!((out.image.width(), out.image.height()), (96, 64));
    assert_eq!(out.latents.dims(), &[1, 4, 8, 12]);

    // Deterministic: the same request gives the same latents through the step API.
    let c = &out.conditioning;
    let init = pipe.initial_latents(&req).unwrap();
    let again = pipe.sample(c, &init, 3, 7.5, &mut |_, _| {}).unwrap();
    assert_eq!(max_abs_diff(&again, &out.latents), 0.0);

    // "a dog in the jungle, …": BOS, a, [4 queries], dog, …
    assert_eq!(c.built_prompt.split(", ").count(), 20);
    assert_eq!(c.query_positions(), 2..6);
    assert_eq!(c.cond_position(1), 1);
    assert_eq!(c.cond_position(2), 6);
    let tok = &pipe.blip.tokenizer;
    assert_eq!(c.word_positions(tok, "dog").unwrap(), vec![6]);
    assert_eq!(c.word_positions(tok, "jungle").unwrap(), vec![9]);
    assert_eq!(c.prompt_ids[2], tok.token_to_id("dog</w>").unwrap());
    let emb = c.prompt_embeddings();
    assert_eq!(emb.cond.dims(), &[1, 77, 16]);
    assert_eq!(emb.uncond.dims(), &[1, 77, 16]);
    assert!(c.word_positions(tok, "beach").is_err());
    assert_eq!(c.single_prompt, "a dog in the jungle");
    // a, dog, in, the, jungle: "a" before the queries, the rest after them.
    assert_eq!(c.single_prompt_positions(tok).unwrap(), vec![1, 6, 7, 8, 9]);
}

/// Real weights, not run by default (minutes on CPU):
/// `BLIP_DIFFUSION_MODEL=Salesforce/blipdiffusion cargo test -p diffusion --test blip_pipeline -- --ignored`
/// (a local diffusers folder works too; the Q-Former's BERT vocabulary comes from
/// `google-bert/bert-base-uncased` unless its config names another tokenizer folder).
#[test]
#[ignore = "needs the real BLIP-Diffusion weights (BLIP_DIFFUSION_MODEL) and minutes of CPU"]
fn real_model_generates_a_dreambench_dog() {
    let model = std::env::var("BLIP_DIFFUSION_MODEL").expect("set BLIP_DIFFUSION_MODEL");
    let pipe = BlipDiffusionPipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    let req = BlipRequest {
        reference: testdata::dreambench().join("dog/00.jpg"),
        subject_category: "dog".into(),
        prompt: blip_text_prompt("a dog on the beach", "dog"),
        steps: 10,
        ..Default::default()
    };
    let out = pipe
        .generate(&req, &mut |i, n| eprintln!("step {i}/{n}"))
        .unwrap();
    assert_eq!(out.conditioning.cond.dims(), &[1, 77, 768]);
    let px = out.image.as_raw();
    let mean = px.iter().map(|&v| v as f64).sum::<f64>() / px.len() as f64;
    let var = px.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / px.len() as f64;
    assert!(var > 100.0, "a flat image (variance {var})");
    out.image
        .save(std::env::temp_dir().join("blip_diffusion_real.png"))
        .unwrap();
}

#[test]
fn tiny_blip_model_is_deterministic_loads_and_generates() {
    use tiny::blip::{write_tiny_blip_model, TinyBlipSpec};
    let tokenizer = testdata::clip_tokenizer();
    let tokenizer = if tokenizer.is_dir() {
        tokenizer
    } else {
        fixtures().join("model/tokenizer")
    };
    let spec = TinyBlipSpec::default();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_tiny_blip_model(a.path(), 5, &tokenizer, &spec).unwrap();
    write_tiny_blip_model(b.path(), 5, &tokenizer, &spec).unwrap();
    let read = |d: &std::path::Path| std::fs::read(d.join("qformer/model.safetensors")).unwrap();
    assert_eq!(read(a.path()), read(b.path()));

    let pipe =
        BlipDiffusionPipeline::load(a.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        pipe.blip.qformer_tokenizer.encode("dog").unwrap(),
        vec![2, 23, 3]
    );
    let req = BlipRequest {
        reference: fixtures().join("pattern.png"),
        subject_category: "stuffed animal".into(),
        prompt: blip_text_prompt("a stuffed animal on the beach", "stuffed animal"),
        height: 64,
        width: 64,
        steps: 2,
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!((out.image.width(), out.image.height()), (64, 64));
    assert_eq!(
        out.conditioning.cond.dims(),
        &[1, 77, spec.sd.text_hidden_size]
    );
    // Another reference image gives other query embeddings.
    let other = image::RgbImage::from_pixel(50, 40, image::Rgb([200, 30, 90]));
    let pixels = pipe.blip.reference_pixels(&other).unwrap();
    let q = pipe
        .blip
        .query_embeddings(&pixels, "stuffed animal")
        .unwrap();
    let d = max_abs_diff(&q, &out.conditioning.query_embeds);
    assert!(d > 1e-3, "queries ignore the reference image ({d})");
}

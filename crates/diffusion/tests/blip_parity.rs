//! BLIP-Diffusion against diffusers 0.32.2 + transformers 4.51.3 on the tiny random pipeline of
//! `tools/fixtures/blip_diffusion.py` (fixtures in `tests/fixtures/blip/`).

mod pipeline_support;

use candle_core::{DType, Device, Tensor};
use diffusion::blip::pipeline::{read_reference, BlipDiffusionPipeline, PromptSettings};
use diffusion::blip::{BlipDiffusion, BlipImageProcessor, BlipImageProcessorConfig};
use pipeline_support::{fixture, max_abs_diff};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    fixture("blip")
}

fn expected() -> &'static HashMap<String, Tensor> {
    static E: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    E.get_or_init(|| {
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap()
    })
}

fn facts() -> &'static serde_json::Value {
    static F: OnceLock<serde_json::Value> = OnceLock::new();
    F.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap()
    })
}

fn exp(key: &str) -> Tensor {
    expected()[key].to_dtype(DType::F32).unwrap()
}

fn blip() -> &'static BlipDiffusion {
    static B: OnceLock<BlipDiffusion> = OnceLock::new();
    B.get_or_init(|| {
        let src = weights::ModelSource::Local(fixtures().join("model"));
        BlipDiffusion::load(&src, DType::F32, &Device::Cpu).unwrap()
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn image_processor_matches_pil_bit_for_bit_on_a_png() {
    let img = read_reference(&fixtures().join("pattern.png")).unwrap();
    let default =
        BlipImageProcessor::new(&BlipImageProcessorConfig::default(), None, None).unwrap();
    let got = default.preprocess(&img, &Device::Cpu).unwrap();
    let d = max_abs_diff(&got, &exp("pixels_pattern_224"));
    assert!(d <= 1e-6, "224 (upsampling): max abs diff {d}");
    let got = blip()
        .image_processor
        .preprocess(&img, &Device::Cpu)
        .unwrap();
    let d = max_abs_diff(&got, &exp("pixels_pattern_32"));
    assert!(d <= 1e-6, "32 (downsampling): max abs diff {d}");
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn image_processor_on_the_dreambench_jpeg() {
    let path = testdata::dreambench().join("dog/00.jpg");
    let img = read_reference(&path).unwrap();
    let s = &facts()["dog_size"];
    assert_eq!(
        [img.width() as u64, img.height() as u64],
        [s[0].as_u64().unwrap(), s[1].as_u64().unwrap()]
    );
    let default =
        BlipImageProcessor::new(&BlipImageProcessorConfig::default(), None, None).unwrap();
    for (key, proc) in [
        ("pixels_dog_224", &default),
        ("pixels_dog_32", &blip().image_processor),
    ] {
        let got = proc.preprocess(&img, &Device::Cpu).unwrap();
        let want = exp(key);
        let d = max_abs_diff(&got, &want);
        let mean = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{key}: max abs diff {d:e}, mean abs diff {mean:e}");
        // The JPEG is decoded as libjpeg-turbo does and the resize is Pillow's, both bit-exact, so
        // the pixels equal PIL's as on the PNG (one 8-bit level would be 1/255/std ≈ 0.015).
        assert!(d <= 1e-6, "{key}: max abs diff {d}");
        assert!(mean <= 1e-7, "{key}: mean abs diff {mean}");
    }
}

#[test]
fn qformer_tokenizer_matches_bert_tokenizer() {
    let tok = &blip().qformer_tokenizer;
    assert_eq!(tok.encode("dog").unwrap(), ids(&facts()["qformer_ids_dog"]));
    assert_eq!(
        tok.encode(facts()["sneaker_subject"].as_str().unwrap())
            .unwrap(),
        ids(&facts()["qformer_ids_sneaker"])
    );
}

#[test]
fn vision_encoder_matches() {
    let got = blip()
        .qformer
        .visual_encoder()
        .forward(&exp("pixels_dog_32"))
        .unwrap();
    let d = max_abs_diff(&got, &exp("vision_last_hidden_state"));
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn query_embeddings_match() {
    let pixels = exp("pixels_dog_32");
    for (subject, key) in [
        ("dog", "query_embeds"),
        (
            facts()["sneaker_subject"].as_str().unwrap(),
            "query_embeds_sneaker",
        ),
    ] {
        let got = blip().query_embeddings(&pixels, subject).unwrap();
        let d = max_abs_diff(&got, &exp(key));
        eprintln!("{key}: max abs diff {d:e}");
        assert!(d <= 1e-4, "{key}: max abs diff {d}");
    }
    // The subject text matters: different categories give different queries.
    assert!(max_abs_diff(&exp("query_embeds"), &exp("query_embeds_sneaker")) > 1e-2);
}

#[test]
fn prompt_is_built_and_tokenized_like_the_pipeline() {
    let f = facts();
    let built = BlipDiffusion::build_prompt(
        f["prompt"].as_str().unwrap(),
        f["tgt_subject"].as_str().unwrap(),
        PromptSettings::default(),
    );
    assert_eq!(built, f["built_prompt"].as_str().unwrap());
    let short = BlipDiffusion::build_prompt(
        f["prompt"].as_str().unwrap(),
        f["tgt_subject"].as_str().unwrap(),
        PromptSettings {
            prompt_strength: 0.1,
            prompt_reps: 20,
        },
    );
    assert_eq!(short, f["built_prompt_short"].as_str().unwrap());
    assert_eq!(blip().prompt_ids(&built).unwrap(), ids(&f["cond_ids"]));
    assert_eq!(
        blip().tokenizer.encode("").unwrap().ids,
        ids(&f["uncond_ids"])
    );
}

#[test]
fn context_text_embeddings_match() {
    let f = facts();
    let query = exp("query_embeds");
    for (key, built) in [
        ("cond_embeddings", "built_prompt"),
        ("cond_embeddings_short", "built_prompt_short"),
    ] {
        let got = blip()
            .encode_prompt(&query, f[built].as_str().unwrap())
            .unwrap();
        let d = max_abs_diff(&got, &exp(key));
        eprintln!("{key}: max abs diff {d:e}");
        assert!(d <= 1e-4, "{key}: max abs diff {d}");
    }
    let got = blip().encode_negative("").unwrap();
    let d = max_abs_diff(&got, &exp("uncond_embeddings"));
    assert!(d <= 1e-4, "uncond: max abs diff {d}");
}

#[test]
fn queries_are_inserted_not_substituted() {
    // Inserting shifts the prompt tokens after ctx_begin_pos by num_query_tokens positions; with a
    // causal mask the positions before ctx_begin_pos see only the prompt's first tokens, so they
    // equal the plain (no-context) encoding of the same ids.
    let b = blip();
    let f = facts();
    let ids = ids(&f["cond_ids"]);
    let n = ids.len();
    let pos = b.config.ctx_begin_pos;
    let t = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let query = exp("query_embeds");
    let with = b.text_encoder.forward(&t, Some((&query, pos))).unwrap();
    let without = b.text_encoder.forward(&t, None).unwrap();
    assert_eq!(with.dims(), &[1, n + query.dim(1).unwrap(), 16]);
    let d = max_abs_diff(
        &with.narrow(1, 0, pos).unwrap(),
        &without.narrow(1, 0, pos).unwrap(),
    );
    assert!(d <= 1e-6, "prefix differs by {d}");
    let d = max_abs_diff(
        &with.narrow(1, pos, 1).unwrap(),
        &without.narrow(1, pos, 1).unwrap(),
    );
    assert!(
        d > 1e-3,
        "the first query position looks like the prompt token"
    );
}

#[test]
fn ten_step_ddim_latent_matches() {
    let model = fixtures().join("model");
    let pipe =
        BlipDiffusionPipeline::load(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let f = facts();
    let ddim = BlipDiffusionPipeline::scheduler(10).unwrap();
    assert_eq!(
        ddim.timesteps()
            .iter()
            .map(|&t| t as u64)
            .collect::<Vec<_>>(),
        ids(&f["timesteps"])
            .iter()
            .map(|&t| t as u64)
            .collect::<Vec<_>>()
    );
    // The whole chain from the processed reference pixels (so that JPEG decoding is not tested here).
    let query = pipe
        .blip
        .query_embeddings(&exp("pixels_dog_32"), "dog")
        .unwrap();
    let built = f["built_prompt"].as_str().unwrap();
    let cond = diffusion::blip::BlipConditioning {
        cond: pipe.blip.encode_prompt(&query, built).unwrap(),
        uncond: pipe.blip.encode_negative("").unwrap(),
        prompt_ids: pipe.blip.prompt_ids(built).unwrap(),
        built_prompt: built.to_string(),
        query_embeds: query,
        ctx_begin_pos: 2,
        single_prompt: "a dog in the jungle".into(),
    };
    let ehs = Tensor::cat(&[&cond.uncond, &cond.cond], 0).unwrap();
    let init = exp("init_latents");
    let first = pipe
        .sd
        .unet
        .forward(
            &Tensor::cat(&[&init, &init], 0).unwrap(),
            ddim.timesteps()[0] as f64,
            &ehs,
        )
        .unwrap();
    let d = max_abs_diff(&first, &exp("first_step_noise_pred"));
    assert!(d <= 1e-4, "first noise prediction: max abs diff {d}");
    let latents = pipe.sample(&cond, &init, 10, 7.5, &mut |_, _| {}).unwrap();
    let d = max_abs_diff(&latents, &exp("final_latents"));
    eprintln!("final latents: max abs diff {d:e}");
    assert!(d <= 1e-3, "final latents: max abs diff {d}");
}

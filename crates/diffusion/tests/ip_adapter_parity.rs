//! IP-Adapter (plain and Plus) against diffusers' `StableDiffusionPipeline.load_ip_adapter` on the
//! tiny fixture pipeline (fixture: tools/fixtures/ip_adapter.py): the image processor, the image
//! encoder's embeddings, the projected tokens, one UNet forward (global and per-block scales) and a
//! 10-step CFG sample; the `.bin` and `.safetensors` files give the same adapter; the capture hooks
//! see the text attention alone.

mod pipeline_support;

use candle_core::{Device, Tensor};
use diffusion::hooks::Recorder;
use diffusion::ip_adapter::{with_image_tokens, IpAdapter, IpAdapterKind, IpAdapterSource};
use diffusion::pipeline::{LoadOptions, PromptEmbeddings, StableDiffusion};
use diffusion::unet::IpAdapterScale;
use pipeline_support::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixture("ip_adapter")
}

fn exp() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn facts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn source(kind: IpAdapterKind) -> IpAdapterSource {
    IpAdapterSource {
        repo: dir().join("h94").to_str().unwrap().into(),
        kind,
    }
}

/// The tiny pipeline with `kind` attached at `scale`.
fn load(kind: IpAdapterKind, scale: &IpAdapterScale) -> (StableDiffusion, IpAdapter) {
    let mut sd =
        StableDiffusion::load(model_dir().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ip = IpAdapter::load_source(&source(kind), None, &mut sd.unet, scale).unwrap();
    (sd, ip)
}

fn name(kind: IpAdapterKind) -> &'static str {
    match kind {
        IpAdapterKind::Plain => "plain",
        IpAdapterKind::Plus => "plus",
    }
}

fn check(what: &str, got: &Tensor, want: &Tensor, bound: f32) {
    let err = max_abs_diff(got, want);
    eprintln!("{what}: max abs diff {err:e}");
    assert!(err <= bound, "{what}: max abs diff {err} > {bound}");
}

fn reference() -> image::RgbImage {
    imaging::load_rgb(&dir().join("reference.png")).unwrap()
}

#[test]
fn image_processor_matches_clip_image_processor() {
    let (_, ip) = load(IpAdapterKind::Plain, &IpAdapterScale::All(1.0));
    let got = ip.encoder.pixels(&reference()).unwrap();
    check("pixel_values", &got, &exp()["pixel_values"], 1e-6);
}

#[test]
fn image_encoder_embeddings_match() {
    let e = exp();
    let (_, plain) = load(IpAdapterKind::Plain, &IpAdapterScale::All(1.0));
    let pixels = &e["pixel_values"];
    check(
        "image_embeds",
        &plain.encode(pixels).unwrap(),
        &e["plain_image_embeds"],
        1e-4,
    );
    let (_, plus) = load(IpAdapterKind::Plus, &IpAdapterScale::All(1.0));
    check(
        "hidden_states[-2]",
        &plus.encode(pixels).unwrap(),
        &e["plus_hidden_states"],
        1e-4,
    );
    check(
        "hidden_states[-2] of zero pixels",
        &plus.encode(&pixels.zeros_like().unwrap()).unwrap(),
        &e["plus_negative_hidden_states"],
        1e-4,
    );
}

#[test]
fn projected_tokens_match_for_both_adapters() {
    let e = exp();
    for kind in [IpAdapterKind::Plain, IpAdapterKind::Plus] {
        let (_, ip) = load(kind, &IpAdapterScale::All(1.0));
        assert_eq!(ip.kind, kind);
        let tokens = ip.image_tokens(&reference()).unwrap();
        let k = name(kind);
        assert_eq!(
            tokens.cond.dims(),
            &[1, if k == "plain" { 4 } else { 16 }, 16]
        );
        check(
            &format!("{k} tokens"),
            &tokens.cond,
            &e[&format!("{k}_tokens")],
            1e-4,
        );
        check(
            &format!("{k} negative tokens"),
            &tokens.uncond,
            &e[&format!("{k}_negative_tokens")],
            1e-4,
        );
    }
}

fn embeddings(sd: &StableDiffusion, ip: &IpAdapter) -> PromptEmbeddings {
    let text = sd
        .encode_prompts(facts()["prompt"].as_str().unwrap(), "")
        .unwrap();
    with_image_tokens(&text, &ip.image_tokens(&reference()).unwrap()).unwrap()
}

fn first_noise_pred(sd: &StableDiffusion, ip: &IpAdapter) -> Tensor {
    let init = &pipeline_support::expected()["init_latents"];
    let t = sd.ddim(10).unwrap().timesteps()[0] as f64;
    let input = Tensor::cat(&[init, init], 0).unwrap();
    let emb = embeddings(sd, ip);
    sd.unet.forward(&input, t, &emb.batched().unwrap()).unwrap()
}

#[test]
fn one_unet_forward_matches_with_global_and_per_block_scales() {
    let e = exp();
    for kind in [IpAdapterKind::Plain, IpAdapterKind::Plus] {
        let (sd, ip) = load(kind, &IpAdapterScale::All(1.0));
        let k = name(kind);
        check(
            &format!("{k} noise prediction"),
            &first_noise_pred(&sd, &ip),
            &e[&format!("{k}_noise_pred")],
            1e-4,
        );
    }
    let blocks: IpAdapterScale = serde_json::from_value(facts()["block_scale"].clone()).unwrap();
    let (mut sd, ip) = load(IpAdapterKind::Plus, &blocks);
    let with_blocks = first_noise_pred(&sd, &ip);
    check(
        "plus per-block noise prediction",
        &with_blocks,
        &e["plus_blocks_noise_pred"],
        1e-4,
    );
    // The per-block scales matter: the same call at scale 1 everywhere is far from it.
    sd.unet
        .set_ip_adapter_scale(&IpAdapterScale::All(1.0))
        .unwrap();
    assert!(max_abs_diff(&first_noise_pred(&sd, &ip), &with_blocks) > 1e-3);
}

#[test]
fn ten_step_cfg_samples_match_for_both_adapters() {
    let e = exp();
    let f = facts();
    for (kind, scale) in [
        (IpAdapterKind::Plain, f["plain_scale"].as_f64().unwrap()),
        (IpAdapterKind::Plus, 1.0),
    ] {
        let (sd, ip) = load(kind, &IpAdapterScale::All(scale));
        let mut req = fixture_request();
        req.init_latents = Some(pipeline_support::expected()["init_latents"].clone());
        let emb = embeddings(&sd, &ip);
        let latents = sd.sample_embeddings(&emb, &req, &mut |_, _| {}).unwrap();
        let k = name(kind);
        check(
            &format!("{k} 10-step final latents"),
            &latents,
            &e[&format!("{k}_final_latents")],
            1e-3,
        );
        // The image prompt matters: the plain pipeline's final latents are far from these.
        let plain_sd = max_abs_diff(&latents, &pipeline_support::expected()["final_latents"]);
        assert!(
            plain_sd > 1e-2,
            "{k}: the adapter changed nothing ({plain_sd})"
        );
    }
}

#[test]
fn bin_and_safetensors_files_give_the_same_adapter() {
    let (_, from_st) = load(IpAdapterKind::Plain, &IpAdapterScale::All(1.0));
    let mut sd =
        StableDiffusion::load(model_dir().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let enc = dir().join("h94/models/image_encoder");
    let from_bin = IpAdapter::load(
        &dir().join("bin/ip-adapter_sd15.bin"),
        &enc.join("config.json"),
        &[enc.join("model.safetensors")],
        None,
        &mut sd.unet,
        &IpAdapterScale::All(1.0),
    )
    .unwrap();
    let a = from_st.image_tokens(&reference()).unwrap();
    let b = from_bin.image_tokens(&reference()).unwrap();
    assert_eq!(max_abs_diff(&a.cond, &b.cond), 0.0);
    let e = exp();
    check(
        "plain noise prediction from the .bin",
        &first_noise_pred(&sd, &from_bin),
        &e["plain_noise_pred"],
        1e-4,
    );
}

#[test]
fn hooks_see_the_text_attention_only() {
    let (sd, ip) = load(IpAdapterKind::Plus, &IpAdapterScale::All(1.0));
    let plain =
        StableDiffusion::load(model_dir().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let init = &pipeline_support::expected()["init_latents"];
    let emb = embeddings(&sd, &ip);
    assert_eq!(emb.cond.dim(1).unwrap(), 77 + 16);
    let mut with_ip = Recorder::all();
    sd.unet
        .forward_with(init, 981.0, &emb.cond, &mut with_ip)
        .unwrap();
    let text = emb.cond.narrow(1, 0, 77).unwrap();
    let mut without = Recorder::all();
    plain
        .unet
        .forward_with(init, 981.0, &text, &mut without)
        .unwrap();
    assert_eq!(with_ip.attention.len(), 16);
    for (site, probs) in &with_ip.attention {
        assert_eq!(probs.dim(3).unwrap(), 77, "{site}: {:?}", probs.dims());
        // Each row is a distribution over the 77 text tokens.
        let sums = probs.sum(3).unwrap();
        let ones = sums.ones_like().unwrap();
        assert!(max_abs_diff(&sums, &ones) < 1e-5, "{site}");
    }
    // Before the first image branch adds anything, the text maps are plain SD's, bit for bit.
    let (site, first) = &with_ip.attention[0];
    let (site0, first0) = &without.attention[0];
    assert_eq!(site, site0);
    assert_eq!(max_abs_diff(first, first0), 0.0, "{site}");
    // After it, the image branch changes the maps (it is in the residual stream).
    let (_, last) = with_ip.attention.last().unwrap();
    let (_, last0) = without.attention.last().unwrap();
    assert!(max_abs_diff(last, last0) > 1e-4);
}

//! Parity of the protocol profiles' metric models against transformers on tiny random weights
//! (`tools/fixtures/metric_profiles.py`, part 1): DINOv2 (position interpolation, layer scale, the
//! SwiGLU variant), DINO ViT-S/8 (the ViT at patch 8) and CLIP of ViT-L/14's kind.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use metrics::clip::{ClipConfig, ClipText, ClipVision};
use metrics::dinov2::{Dinov2, Dinov2Config};
use metrics::DinoModel;

/// `lcg_pixels(n, seed)` of the fixture scripts, bit for bit.
fn lcg(shape: (usize, usize, usize, usize), seed: u32) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("models.safetensors"), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn dinov2(name: &str) -> Dinov2 {
    let dir = fixtures().join(name);
    let cfg: Dinov2Config = weights::read_json(&dir.join("config.json")).unwrap();
    let vb =
        weights::var_builder(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    Dinov2::new(&cfg, vb).unwrap()
}

fn check(what: &str, ours: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(ours.dims(), want.dims(), "{what}: shape");
    let d = max_abs_diff(&flat(ours), &flat(want));
    let scale = flat(want).iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("{what}: max |Δ| = {d:.3e} (max |value| {scale:.2})");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

#[test]
fn dinov2_matches_transformers_with_and_without_position_interpolation() {
    let t = expected();
    let m = dinov2("dinov2_tiny");
    assert!(!m.config().use_swiglu_ffn);
    assert_eq!(m.config().image_size, 518);
    // 37×37 trained grid → 16×16: the interpolated table itself.
    check(
        "DINOv2 position table 37² → 16²",
        &m.position_embeddings_for(224, 224).unwrap(),
        &t["dinov2_pos_224"],
        1e-5,
    );
    let x = lcg((2, 3, 224, 224), 12345);
    check(
        "DINOv2 embedding, 224 input",
        &m.embed(&x).unwrap(),
        &t["dinov2_224"],
        1e-4,
    );
    let x = lcg((1, 3, 518, 518), 777);
    check(
        "DINOv2 embedding, 518 input (trained grid)",
        &m.embed(&x).unwrap(),
        &t["dinov2_518"],
        1e-4,
    );
    let x = lcg((1, 3, 224, 280), 99);
    check(
        "DINOv2 embedding, 224×280 input",
        &m.embed(&x).unwrap(),
        &t["dinov2_224x280"],
        1e-4,
    );
    // The embedding is the CLS row of the full last_hidden_state.
    let x = lcg((2, 3, 224, 224), 12345);
    let full = m.forward(&x).unwrap();
    assert_eq!(full.dims(), &[2, 1 + 16 * 16, 32]);
    let cls = full.narrow(1, 0, 1).unwrap();
    assert!(max_abs_diff(&flat(&cls), &flat(&m.embed(&x).unwrap())) < 1e-6);
}

#[test]
fn dinov2_swiglu_variant_matches_transformers() {
    let t = expected();
    let m = dinov2("dinov2_swiglu_tiny");
    assert!(m.config().use_swiglu_ffn);
    assert_eq!(m.config().ffn_width(), 88); // int(128·2/3) = 85 → 88
    let x = lcg((2, 3, 224, 224), 12345);
    check(
        "DINOv2 SwiGLU embedding, 224 input (9² → 16²)",
        &m.embed(&x).unwrap(),
        &t["swiglu_224"],
        1e-4,
    );
}

#[test]
fn dinov2_current_key_names_load_to_the_same_model() {
    // The fixture ships the published names; rename into transformers ≥ 5 names (split
    // `weights_in` into gate/up, with a `dinov2.` prefix) and compare.
    let dir = fixtures().join("dinov2_swiglu_tiny");
    let legacy =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut renamed = std::collections::HashMap::new();
    for (k, v) in legacy {
        if k.contains("mlp.weights_in.") {
            let half = v.dim(0).unwrap() / 2;
            renamed.insert(
                format!("dinov2.{}", k.replace("weights_in", "gate_proj")),
                v.narrow(0, 0, half).unwrap(),
            );
            renamed.insert(
                format!("dinov2.{}", k.replace("weights_in", "up_proj")),
                v.narrow(0, half, half).unwrap(),
            );
            continue;
        }
        let k = k
            .replace("attention.attention.query", "attention.q_proj")
            .replace("attention.attention.key", "attention.k_proj")
            .replace("attention.attention.value", "attention.v_proj")
            .replace("attention.output.dense", "attention.o_proj")
            .replace("mlp.weights_out", "mlp.down_proj");
        renamed.insert(format!("dinov2.{k}"), v);
    }
    let tmp = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let cfg: Dinov2Config = weights::read_json(&dir.join("config.json")).unwrap();
    let vb = weights::var_builder(
        &[tmp.path().join("model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let b = Dinov2::new(&cfg, vb).unwrap();
    let x = lcg((1, 3, 224, 224), 12345);
    assert_eq!(
        flat(&dinov2("dinov2_swiglu_tiny").embed(&x).unwrap()),
        flat(&b.embed(&x).unwrap())
    );
}

#[test]
fn dino_vits8_is_the_vit_at_patch_8() {
    let t = expected();
    let m = DinoModel::load(&fixture("dino_s8_tiny"), &Device::Cpu).unwrap();
    assert_eq!(m.vit.config().patch_size, 8);
    let x = lcg((2, 3, 224, 224), 12345);
    check(
        "DINO ViT-S/8-kind embedding",
        &m.vit.embed(&x).unwrap(),
        &t["dino_s8"],
        1e-4,
    );
}

#[test]
fn clip_of_vit_l14_kind_is_built_from_its_config() {
    let t = expected();
    let dir = fixtures().join("clip_l14_tiny");
    let cfg: ClipConfig = weights::read_json(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.vision_config.patch_size, 14);
    assert_eq!(
        cfg.vision_config.hidden_act,
        metrics::nn::Activation::QuickGelu
    );
    assert_eq!(
        cfg.text_config.hidden_act,
        metrics::nn::Activation::QuickGelu
    );
    assert_eq!(cfg.text_config.eos_token_id, 2);
    assert_eq!(
        (
            cfg.vision_config.hidden_size,
            cfg.text_config.hidden_size,
            cfg.projection_dim
        ),
        (48, 16, 24)
    );
    let vb =
        weights::var_builder(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    let vision = ClipVision::new(&cfg, vb.clone()).unwrap();
    let text = ClipText::new(&cfg, vb).unwrap();
    let x = lcg((2, 3, 224, 224), 12345);
    check(
        "CLIP ViT-L/14-kind image embedding",
        &vision.embed(&x).unwrap(),
        &t["clip_l14_image"],
        1e-4,
    );
    let ids: Vec<Vec<u32>> = t["clip_l14_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    check(
        "CLIP ViT-L/14-kind text embedding",
        &text.embed(&ids).unwrap(),
        &t["clip_l14_text"],
        1e-4,
    );
}

#[test]
fn dinov2_device_generic_path_matches_transformers() {
    // What CUDA runs (`layers::kernels::force_generic`: LayerNorm as candle ops), on the CPU.
    let t = expected();
    let m = dinov2("dinov2_tiny");
    let x = lcg((2, 3, 224, 224), 12345);
    let host = m.embed(&x).unwrap();
    let generic = {
        let _guard = layers::kernels::force_generic();
        m.embed(&x).unwrap()
    };
    let d = max_abs_diff(&flat(&host), &flat(&generic));
    assert!(
        d <= 1e-5,
        "generic path differs from the CPU kernels by {d}"
    );
    check(
        "DINOv2 embedding, device-generic path",
        &generic,
        &t["dinov2_224"],
        1e-4,
    );
}

//! Shared helpers of the diffusion crate's integration tests: fixture paths (the pipeline's from
//! `tools/fixtures/sd_pipeline.py`, the UNet's from `sd_unet.py`, BLIP's from `blip_diffusion.py`),
//! the fixture UNets, deterministic random tensors and tensor distances.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use diffusion::unet::UNet2DConditionModel;
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/{name}` of this crate.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The pipeline fixtures.
pub fn fixtures() -> PathBuf {
    fixture("pipeline")
}

/// The UNet fixture model `tests/fixtures/unet/{name}` (`model`: SD 1.5-shaped; `model_v2`: SD 2.x-style).
pub fn unet_fixture(name: &str, dtype: DType) -> UNet2DConditionModel {
    let src = weights::ModelSource::parse(fixture("unet").join(name).to_str().unwrap()).unwrap();
    UNet2DConditionModel::load(&src, "", dtype, &Device::Cpu).unwrap()
}

/// Deterministic N(0, 1) samples in f64 (a seeded LCG and Box-Muller), so that the tests do not
/// depend on candle's RNG.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-300), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn model_dir() -> PathBuf {
    fixtures().join("model")
}

pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

pub fn facts() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `max |a - b|` with both converted to f32 first.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    max_abs_diff_f64(&f32(a), &f32(b)) as f32
}

/// `max |a - b|` computed in the tensors' own dtype (f64 for the finite-difference tests), as f64.
pub fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The pipeline fixture's request: its prompt, steps, CFG scale and size, from its initial latents.
pub fn fixture_request() -> diffusion::pipeline::SampleRequest {
    let f = facts();
    diffusion::pipeline::SampleRequest {
        prompt: f["prompt"].as_str().unwrap().into(),
        negative_prompt: String::new(),
        steps: f["steps"].as_u64().unwrap() as usize,
        cfg_scale: f["cfg"].as_f64().unwrap(),
        height: f["height"].as_u64().unwrap() as usize,
        width: f["width"].as_u64().unwrap() as usize,
        seed: 0,
        init_latents: Some(expected()["init_latents"].clone()),
    }
}

//! Half-precision generation on the CPU against f32, on the diffusers fixture model: the 10-step
//! CFG sample from the fixture's initial latents, and its decoded PNG.
//!
//! Measured: the final latents' max |half - f32| relative to max |f32|, and the PNG's max and mean
//! absolute difference in 8-bit values. Each is bounded by a multiple of diffusers' own deviation
//! on the same fixture (`tools/fixtures/sd_half.py` → `half_precision.json`): precision loss is the
//! reference's too, and ours must stay of its size. bf16 runs on the CPU as well: candle 0.11.1's
//! CPU matmul widens bf16 to f32 and rounds the product, and `diffusion::ops::conv2d` does the same
//! for convolutions (candle's CPU conv has no bf16 GEMM).

mod pipeline_support;

use candle_core::DType;
use diffusion::pipeline::{LoadOptions, StableDiffusion};
use pipeline_support::{max_abs_diff, model_dir};

fn sample(dtype: DType) -> (candle_core::Tensor, image::RgbImage) {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    let sd = StableDiffusion::load(model_dir().to_str().unwrap(), &opts).unwrap();
    let req = pipeline_support::fixture_request();
    let latents = sd.sample(&req, &mut |_, _| {}).unwrap();
    assert_eq!(latents.dtype(), dtype, "sampling left the model's dtype");
    let img = sd.decode_images(&latents).unwrap().remove(0);
    (latents.to_dtype(DType::F32).unwrap(), img)
}

/// Ours against f32 must stay within `factor` × diffusers' deviation against f32 (the PNG's max
/// with 2 levels of slack).
fn check(dtype: DType, factor: f64) {
    let name = if dtype == DType::F16 {
        "float16"
    } else {
        "bfloat16"
    };
    let text = std::fs::read_to_string(pipeline_support::fixtures().join("half_precision.json"));
    let reference: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
    let r = |k: &str| reference[name][k].as_f64().unwrap();
    let (latent_bound, max_bound, mean_bound) = (
        factor * r("latents_max_rel"),
        factor * r("png_max") + 2.0,
        factor * r("png_mean"),
    );
    let (want, want_img) = sample(DType::F32);
    let (got, img) = sample(dtype);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rel = (max_abs_diff(&got, &want) / scale) as f64;
    let diffs: Vec<u8> = img
        .as_raw()
        .iter()
        .zip(want_img.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let worst = *diffs.iter().max().unwrap();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    eprintln!(
        "{dtype:?} vs f32: final latents max rel {rel:.2e}; PNG max {worst}/255, mean {mean:.3}/255 \
         (diffusers: {:.2e}, {}/255, {:.3}/255)",
        r("latents_max_rel"),
        r("png_max"),
        r("png_mean")
    );
    let finite = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        finite.iter().all(|v| v.is_finite()),
        "{dtype:?}: non-finite latents"
    );
    assert!(
        rel <= latent_bound,
        "{dtype:?}: latents differ by {rel} (bound {latent_bound})"
    );
    assert!(
        worst as f64 <= max_bound,
        "{dtype:?}: PNG differs by {worst}/255 (bound {max_bound})"
    );
    assert!(
        mean <= mean_bound,
        "{dtype:?}: PNG mean difference {mean} (bound {mean_bound})"
    );
}

#[test]
fn f16_sampling_stays_close_to_f32() {
    // Measured: latents max rel 4.3e-3, PNG max 2/255, mean 0.20/255 (diffusers: 4.3e-3, 2, 0.17).
    check(DType::F16, 2.0);
}

#[test]
fn bf16_sampling_stays_close_to_f32() {
    // Measured: latents max rel 5.0e-2, PNG max 19/255, mean 2.12/255 (diffusers: 3.0e-2, 13, 1.41).
    check(DType::BF16, 2.5);
}

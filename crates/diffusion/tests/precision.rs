//! Half-precision generation on the CPU against f32, on the diffusers fixture model: the 10-step
//! CFG sample from the fixture's initial latents, and its decoded PNG.
//!
//! Measured: the final latents' max |f16 - f32| relative to max |f32|, and the PNG's max and mean
//! absolute difference in 8-bit values. Bounds are the measured values with head-room. bf16 cannot
//! run on the CPU (candle 0.11.1's CPU matmul has no bf16), which is one clear error.

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

fn check(dtype: DType, latent_bound: f32, max_bound: u8, mean_bound: f64) {
    let (want, want_img) = sample(DType::F32);
    let (got, img) = sample(dtype);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rel = max_abs_diff(&got, &want) / scale;
    let diffs: Vec<u8> = img
        .as_raw()
        .iter()
        .zip(want_img.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let worst = *diffs.iter().max().unwrap();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    eprintln!(
        "{dtype:?} vs f32: final latents max rel {rel:.2e}; PNG max {worst}/255, mean {mean:.3}/255"
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
        worst <= max_bound,
        "{dtype:?}: PNG differs by {worst}/255 (bound {max_bound})"
    );
    assert!(
        mean <= mean_bound,
        "{dtype:?}: PNG mean difference {mean} (bound {mean_bound})"
    );
}

#[test]
fn f16_sampling_stays_close_to_f32() {
    // Measured: latents max rel 4.3e-3, PNG max 2/255, mean 0.20/255.
    check(DType::F16, 2e-2, 8, 1.0);
}

#[test]
fn bf16_on_the_cpu_is_one_clear_error() {
    // candle 0.11.1's CPU matmul takes f16, f32 and f64 only; bf16 is for CUDA.
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let err = StableDiffusion::load(model_dir().to_str().unwrap(), &opts)
        .err()
        .expect("bf16 on the CPU must be refused")
        .to_string();
    assert!(err.contains("bf16 runs on CUDA only"), "{err}");
}

//! Batched sampling (issue 12 item 5): N seeds in one UNet call per step give each seed's batch-1
//! result, from the tiny model of the `tiny` crate.

mod pipeline_support;

use candle_core::Tensor;
use diffusion::pipeline::{SampleRequest, StableDiffusion};
use pipeline_support::*;
use tiny::{write_tiny_model, TinySpec};

const SEEDS: [u64; 3] = [0, 1, 7];

fn tiny_sd(dir: &std::path::Path) -> StableDiffusion {
    write_tiny_model(dir, 3, &model_dir().join("tokenizer"), &TinySpec::default()).unwrap();
    StableDiffusion::load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

fn request(cfg_scale: f64, init: Tensor) -> SampleRequest {
    SampleRequest {
        prompt: "a photo of a dog on the beach".into(),
        negative_prompt: "blurry".into(),
        steps: 4,
        cfg_scale,
        height: 64,
        width: 64,
        init_latents: Some(init),
        ..Default::default()
    }
}

/// The largest |value| of `t`.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn seeded_latents_of_a_batch_are_each_seeds_own_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny_sd(tmp.path());
    let batch = sd.seeded_latents(64, 64, &SEEDS).unwrap();
    assert_eq!(batch.dims(), &[3, 4, 8, 8]);
    for (i, &s) in SEEDS.iter().enumerate() {
        let one = sd.initial_latents(64, 64, s).unwrap();
        assert_eq!(max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &one), 0.0);
    }
    assert!(sd.seeded_latents(64, 64, &[]).is_err());
}

#[test]
fn a_batch_of_three_seeds_equals_three_batch_one_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny_sd(tmp.path());
    // With CFG (one UNet call on 2N) and without (one call on N).
    for cfg in [7.5, 1.0] {
        let init = sd.seeded_latents(64, 64, &SEEDS).unwrap();
        let mut steps = 0;
        let batch = sd
            .sample(&request(cfg, init), &mut |_, _| steps += 1)
            .unwrap();
        assert_eq!(steps, 4);
        assert_eq!(batch.dims(), &[3, 4, 8, 8]);
        let images = sd.decode_images(&batch).unwrap();
        assert_eq!(images.len(), 3);
        for (i, &s) in SEEDS.iter().enumerate() {
            let init = sd.initial_latents(64, 64, s).unwrap();
            let single = sd.sample(&request(cfg, init), &mut |_, _| {}).unwrap();
            let scale = max_abs(&single);
            let err = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &single);
            eprintln!(
                "cfg {cfg}, seed {s}: max |batch − single| {err:e} (latents' max |z| {scale})"
            );
            assert!(err <= 1e-4 * scale, "seed {s}: {err} > 1e-4 × {scale}");
            let img = sd.decode_images(&single).unwrap().remove(0);
            let worst = img
                .as_raw()
                .iter()
                .zip(images[i].as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 1, "seed {s}: PNG differs by {worst}/255");
        }
    }
}

#[test]
fn init_latents_of_the_wrong_shape_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny_sd(tmp.path());
    let init = sd.seeded_latents(64, 64, &SEEDS).unwrap();
    let path = tmp.path().join("init.safetensors");
    diffusion::pipeline::write_latents(&path, &init).unwrap();
    assert_eq!(
        sd.read_init_latents(&path, 64, 64, 3).unwrap().dims(),
        &[3, 4, 8, 8]
    );
    let err = sd
        .read_init_latents(&path, 64, 64, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("init.safetensors")
            && err.contains("[2, 4, 8, 8]")
            && err.contains("[3, 4, 8, 8]"),
        "{err}"
    );
    let bad = sd.seeded_latents(64, 128, &SEEDS).unwrap();
    let err = sd
        .sample(&request(7.5, bad), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[3, 4, 8, 8]") && err.contains("[3, 4, 8, 16]"),
        "{err}"
    );
}

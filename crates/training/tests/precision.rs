//! Half-precision compute (`--dtype f16|bf16`): the frozen models (and the cast copies of the
//! trained weights) in f16 or bf16, the trained weights f32, the loss in f32. Measured on the tiny
//! pipeline model against f32 on the same inputs: the loss, and the direction of the gradient of
//! the trained parameters. Then a few steps stay finite: f16 with loss scaling (as the CLI runs
//! it), bf16 without (its range is f32's).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, model};
use training::adamw::AdamW;
use training::dreambooth::{DbSettings, DreamBooth};
use training::textual_inversion::{TextualInversion, TiSettings};
use training::train_loop::{self, LoopSettings, MicroBatch, Objective};

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn mb() -> MicroBatch {
    MicroBatch {
        micro: 7,
        indices: vec![1],
        positions: vec![7],
    }
}

fn settings(dir: &std::path::Path, dtype: DType) -> LoopSettings {
    LoopSettings {
        steps: 3,
        grad_accum: 1,
        batch: 1,
        dataset_len: 2,
        seed: 1,
        max_grad_norm: Some(1.0),
        checkpoint_every: None,
        checkpoint_dir: dir.join("ckpt"),
        trace: Some(dir.join("trace.jsonl")),
        fingerprint: String::new(),
        stop_after: None,
        loss_scaling: dtype == DType::F16,
    }
}

/// Three optimizer steps of `objective` in `dtype` (see [`settings`]); their trace checked.
fn three_steps_stay_finite(opt: &mut AdamW, objective: &mut dyn Objective, dtype: DType) {
    let dir = tempfile::tempdir().unwrap();
    train_loop::run(opt, objective, &settings(dir.path(), dtype), &mut |_| {}).unwrap();
    check_trace(dir.path(), dtype);
}

fn check_trace(dir: &std::path::Path, dtype: DType) {
    let text = std::fs::read_to_string(dir.join("trace.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    let scale = (dtype == DType::F16).then_some(65536.0);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["loss"].as_f64().unwrap().is_finite(), "{l}");
        assert_eq!(v["loss_scale"].as_f64(), scale, "{l}");
        assert!(v.get("skipped").is_none(), "{l}");
    }
}

/// Textual Inversion in `dtype` against f32: the loss within `rel_bound`, the embedding row's
/// gradient at cosine ≥ `cos_bound`.
fn textual_inversion_follows_f32(dtype: DType, rel_bound: f32, cos_bound: f64) {
    let mut s = TiSettings::new("<cat-toy>", "toy");
    s.resolution = 64;
    s.grad_accum = 1;
    s.repeats = 1;
    let f32 = TextualInversion::new(
        &model(),
        &fixtures().join("images"),
        s.clone(),
        &Device::Cpu,
    )
    .unwrap();
    let mut half = TextualInversion::with_precision(
        &model(),
        &fixtures().join("images"),
        s,
        &Device::Cpu,
        dtype,
    )
    .unwrap();
    let x = f32.inputs(&mb()).unwrap();
    let (l32, l16) = (f32.loss_of(&x).unwrap(), half.loss_of(&x).unwrap());
    let (a, b) = (
        l32.to_scalar::<f32>().unwrap(),
        l16.to_scalar::<f32>().unwrap(),
    );
    let g32 = flat(&[f32.row_grad(&l32).unwrap()]);
    let g16 = flat(&[half.row_grad(&l16).unwrap()]);
    let rel = ((a - b) / a).abs();
    let cos = cosine(&g32, &g16);
    eprintln!(
        "textual inversion {dtype:?}: loss {b} vs f32 {a} (relative {rel:.1e}), gradient cosine {cos:.5}"
    );
    assert!(rel < rel_bound, "{rel}");
    assert!(cos > cos_bound, "{cos}");
    let mut opt = half.optimizer().unwrap();
    three_steps_stay_finite(&mut opt, &mut half, dtype);
}

#[test]
fn textual_inversion_in_f16_follows_f32() {
    textual_inversion_follows_f32(DType::F16, 1e-2, 0.99);
}

#[test]
fn textual_inversion_in_bf16_follows_f32() {
    textual_inversion_follows_f32(DType::BF16, 2e-2, 0.995);
}

/// DreamBooth (prior preservation, text encoder trained) in `dtype` against f32: the loss within
/// `rel_bound`, the gradient of every trained weight at cosine ≥ `cos_bound`.
fn dreambooth_follows_f32(dtype: DType, rel_bound: f32, cos_bound: f64) {
    let mut s = DbSettings::new("a photo of sks toy");
    s.resolution = 64;
    s.prior_preservation = true;
    s.class_prompt = Some("a photo of toy".into());
    s.train_text_encoder = true;
    let class = fixtures().join("class");
    let make = |dtype| {
        DreamBooth::with_precision(
            &model(),
            &fixtures().join("images"),
            Some(class.as_path()),
            s.clone(),
            &Device::Cpu,
            dtype,
        )
        .unwrap()
    };
    let (f32, mut half) = (make(DType::F32), make(dtype));
    let x = f32.inputs(&mb()).unwrap();
    let grads = |d: &DreamBooth, l: &Tensor| -> Vec<f64> {
        let g = l.backward().unwrap();
        let ts: Vec<Tensor> = d
            .params()
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        flat(&ts)
    };
    let (l32, l16) = (f32.loss_of(&x).unwrap(), half.loss_of(&x).unwrap());
    let (a, b) = (
        l32.to_scalar::<f32>().unwrap(),
        l16.to_scalar::<f32>().unwrap(),
    );
    let cos = cosine(&grads(&f32, &l32), &grads(&half, &l16));
    let rel = ((a - b) / a).abs();
    eprintln!("dreambooth {dtype:?} (prior, text encoder): loss {b} vs f32 {a} (relative {rel:.1e}), gradient cosine {cos:.5}");
    assert!(rel < rel_bound, "{rel}");
    assert!(cos > cos_bound, "{cos}");
    assert!(half.params().iter().all(|(_, v)| v.dtype() == DType::F32));
    let mut opt = half.optimizer().unwrap();
    three_steps_stay_finite(&mut opt, &mut half, dtype);
}

#[test]
fn dreambooth_in_f16_follows_f32() {
    dreambooth_follows_f32(DType::F16, 1e-2, 0.99);
}

#[test]
fn dreambooth_in_bf16_follows_f32() {
    dreambooth_follows_f32(DType::BF16, 2e-2, 0.995);
}

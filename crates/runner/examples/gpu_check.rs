//! The device half of `tools/gpu-check.sh` (issues 12 and 24) in one executable: the GPU
//! machine takes at most 64 MiB of tracked tree plus bundle, and one binary holding `pnd` and the
//! checks is about half the size of three (they share candle, its CUDA kernels and the models).
//!
//! - `gpu_check parity [--device cuda|cuda:N|cpu]`: the committed tiny fixtures on the device
//!   against the CPU in the same process, and against diffusers/transformers where the fixture
//!   holds their result. Prints one JSON object; exits non-zero when a check fails its bound. With
//!   `--device cpu` (the CPU rehearsal) the "device" side runs the device-generic path that CUDA
//!   runs (`layers::kernels::force_generic`) against our CPU kernels.
//! - `gpu_check bench-unet ARGS`: the UNet benchmark, `crates/diffusion/examples/bench_unet.rs`
//!   (that very file, included below).
//! - anything else: `pnd` itself, `src/main.rs` included below, so `gpu_check generate ...` is
//!   `pnd generate ...` (the check runs it under the name `pnd`, a link to this file).
//!
//! Run from the repository root (the fixtures are read from `crates/*/tests/fixtures`, relative to
//! the working directory, else to the source tree). Build: `cargo build --release --features
//! cudnn -p runner --example gpu_check` (`tools/gpu-bundle.sh` does).
//!
//! Parity checks (run the f32 ones with TF32 off: `NVIDIA_TF32_OVERRIDE=0`; candle's cuDNN
//! convolutions set no math type, so Hopper may compute f32 in TF32, about 1e-3 relative):
//! - `unet_forward`: the SD-1.5-shaped fixture UNet's fused no-grad forward, max |dev - cpu|;
//! - `unet_gradient`: the gradient w.r.t. the latent of `sum(U·eps) + Σ_s sum(W_s·A_s)` over every
//!   attention map and block output (the differentiable path the guidance takes), max relative
//!   |dev - cpu|;
//! - `sample_f32`: the 10-step CFG sample of the pipeline fixture against diffusers' final latents;
//! - `sample_f16`, `sample_bf16`: the same in half precision against our f32 device sample;
//! - `dino`, `clip_image`: the metric fixtures' embeddings against transformers'.

use candle_core::{DType, Device, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use diffusion::unet::UNet2DConditionModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

mod pnd_cli {
    // The `pnd` binary's own main, verbatim.
    include!("../src/main.rs");

    pub fn run() -> ExitCode {
        main()
    }
}

#[path = "../../diffusion/examples/bench_unet.rs"]
mod bench_unet;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(rel: &str) -> PathBuf {
    // The checkout the check runs in first (the binary copied to another machine, or a clean
    // checkout beside the build's), else the source tree this binary was built from.
    let p = PathBuf::from(rel);
    if p.exists() {
        p
    } else {
        root().join(rel)
    }
}

/// Runs `f` on the side under test: with `generic`, on the device-generic path (the CPU rehearsal).
fn on_device<T>(generic: bool, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let _guard = generic.then(layers::kernels::force_generic);
    f()
}

fn max_abs(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn max_rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let scale = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    Ok(max_abs(a, b)? / scale.max(1e-30))
}

/// Deterministic N(0, 1) on the CPU in f32 (seeded, independent of any device's RNG).
fn randn(shape: &[usize], seed: u64) -> anyhow::Result<Tensor> {
    Ok(diffusion::noise::seeded_normal(seed, shape, &Device::Cpu)?)
}

fn unet(device: &Device, dtype: DType) -> anyhow::Result<UNet2DConditionModel> {
    let dir = fixture("crates/diffusion/tests/fixtures/unet/model");
    let src = weights::ModelSource::parse(dir.to_str().unwrap_or_default())?;
    Ok(UNet2DConditionModel::load(&src, "", dtype, device)?)
}

fn unet_gradient(device: &Device) -> anyhow::Result<Tensor> {
    let model = unet(device, DType::F32)?;
    let z = Var::from_tensor(&randn(&[1, 4, 16, 16], 11)?.to_device(device)?)?;
    let ctx = randn(&[1, 77, 32], 12)?.to_device(device)?;
    let mut rec = Recorder::all();
    let eps = model.forward_with(z.as_tensor(), 601.0, &ctx, &mut rec)?;
    let mut loss = (&eps * randn(eps.dims(), 3000)?.to_device(device)?)?.sum_all()?;
    for (i, (_, a)) in rec.attention.iter().chain(rec.blocks.iter()).enumerate() {
        let w = randn(a.dims(), 1000 + i as u64)?.to_device(device)?;
        loss = (loss + (a * w)?.sum_all()?)?;
    }
    let grads = loss.backward()?;
    Ok(grads
        .get(z.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient reached the latent"))?
        .clone())
}

fn sample(device: &Device, dtype: DType) -> anyhow::Result<Tensor> {
    let dir = fixture("crates/diffusion/tests/fixtures/pipeline");
    let facts: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), device)?;
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        ..Default::default()
    };
    let sd = StableDiffusion::load(dir.join("model").to_str().unwrap_or_default(), &opts)?;
    let req = SampleRequest {
        prompt: facts["prompt"].as_str().unwrap_or_default().into(),
        negative_prompt: String::new(),
        steps: facts["steps"].as_u64().unwrap_or(10) as usize,
        cfg_scale: facts["cfg"].as_f64().unwrap_or(7.5),
        height: facts["height"].as_u64().unwrap_or(64) as usize,
        width: facts["width"].as_u64().unwrap_or(64) as usize,
        seed: 0,
        init_latents: expected.get("init_latents").cloned(),
    };
    Ok(sd.sample(&req, &mut |_, _| {})?)
}

fn diffusers_final_latents() -> anyhow::Result<Tensor> {
    let dir = fixture("crates/diffusion/tests/fixtures/pipeline");
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    expected
        .get("final_latents")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("fixture lacks final_latents"))
}

/// The metric fixtures' pixels (`tools/fixtures/metrics.py`'s `lcg_pixels`).
fn lcg_pixels(device: &Device) -> anyhow::Result<Tensor> {
    let n = 2 * 3 * 224 * 224;
    let mut s: u32 = 12345;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Ok(Tensor::from_vec(v, (2, 3, 224, 224), device)?)
}

struct Checks {
    results: serde_json::Map<String, Value>,
    failed: Vec<String>,
    started: Instant,
}

impl Checks {
    /// Records a check that took the time since the previous one.
    fn record(&mut self, name: &str, value: anyhow::Result<f64>, bound: f64) {
        let secs = (self.started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        self.started = Instant::now();
        let entry = match value {
            Ok(v) => {
                if v.is_nan() || v > bound {
                    self.failed.push(name.into());
                }
                json!({"value": v, "bound": bound, "ok": v <= bound, "s": secs})
            }
            Err(e) => {
                self.failed.push(name.into());
                json!({"error": format!("{e:#}"), "ok": false, "s": secs})
            }
        };
        eprintln!("{name}: {entry}");
        self.results.insert(name.into(), entry);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("parity") => {
            layers::allocator::tune_for_tensors();
            layers::threads::single_elementwise_pool();
            parity(&args[1..])
        }
        Some("bench-unet") => {
            layers::allocator::tune_for_tensors();
            layers::threads::single_elementwise_pool();
            bench_unet::run(args[1..].iter().cloned())
        }
        _ => return pnd_cli::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The device named by `--device` (default `cuda`), and whether it is the CPU standing in for one.
fn parity_device(args: &[String]) -> anyhow::Result<(Device, String, bool)> {
    let name = match args {
        [] => "cuda".to_string(),
        [flag, v] if flag == "--device" => v.clone(),
        other => anyhow::bail!("parity takes [--device cuda|cuda:N|cpu], not {other:?}"),
    };
    let ordinal = match name.as_str() {
        "cpu" => return Ok((Device::Cpu, "cpu (device-generic path)".into(), true)),
        "cuda" => 0,
        n => n
            .strip_prefix("cuda:")
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unknown device '{n}' (cuda | cuda:N | cpu)"))?,
    };
    let cuda = Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("no CUDA GPU {ordinal} answers: {e}"))?;
    Ok((cuda, format!("cuda:{ordinal}"), false))
}

fn parity(args: &[String]) -> anyhow::Result<()> {
    let (dev, dev_name, generic) = parity_device(args)?;
    let cpu = Device::Cpu;
    let mut c = Checks {
        results: serde_json::Map::new(),
        failed: Vec::new(),
        started: Instant::now(),
    };

    c.record(
        "unet_forward",
        (|| {
            let z = randn(&[2, 4, 16, 16], 1)?;
            let ctx = randn(&[2, 77, 32], 2)?;
            let a = unet(&cpu, DType::F32)?.forward(&z, 421.0, &ctx)?;
            let b = on_device(generic, || {
                Ok(unet(&dev, DType::F32)?.forward(
                    &z.to_device(&dev)?,
                    421.0,
                    &ctx.to_device(&dev)?,
                )?)
            })?;
            max_rel(&b, &a)
        })(),
        1e-4,
    );
    c.record(
        "unet_gradient",
        (|| {
            let g = on_device(generic, || unet_gradient(&dev))?;
            max_rel(&g, &unet_gradient(&cpu)?)
        })(),
        1e-4,
    );
    let f32_dev = on_device(generic, || sample(&dev, DType::F32));
    c.record(
        "sample_f32_vs_diffusers",
        f32_dev
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|s| max_abs(s, &diffusers_final_latents()?)),
        1e-3,
    );
    for (name, dtype, bound) in [
        ("sample_f16", DType::F16, 2e-2),
        ("sample_bf16", DType::BF16, 1e-1),
    ] {
        c.record(
            name,
            (|| {
                let reference = f32_dev.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                max_rel(&on_device(generic, || sample(&dev, dtype))?, reference)
            })(),
            bound,
        );
    }
    let embeddings = fixture("crates/metrics/tests/fixtures/embeddings.safetensors");
    let dino_dir = fixture("crates/metrics/tests/fixtures/dino_tiny");
    let clip_dir = fixture("crates/metrics/tests/fixtures/clip_tiny");
    let want = |key: &str| -> anyhow::Result<Tensor> {
        let t = candle_core::safetensors::load(&embeddings, &cpu)?;
        t.get(key)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("fixture lacks {key}"))
    };
    let path = |p: &Path| p.to_str().unwrap_or_default().to_string();
    c.record(
        "dino_vs_transformers",
        (|| {
            let e = on_device(generic, || {
                let m = metrics::DinoModel::load(&path(&dino_dir), &dev)?;
                Ok(m.vit.embed(&lcg_pixels(&dev)?)?)
            })?;
            max_abs(&e, &want("dino")?)
        })(),
        1e-4,
    );
    c.record(
        "clip_image_vs_transformers",
        (|| {
            let e = on_device(generic, || {
                let m = metrics::ClipModel::load(&path(&clip_dir), &dev)?;
                Ok(m.vision.embed(&lcg_pixels(&dev)?)?)
            })?;
            max_abs(&e, &want("clip_image")?)
        })(),
        1e-4,
    );

    let report = json!({
        "device": dev_name,
        "tf32_override": std::env::var("NVIDIA_TF32_OVERRIDE").ok(),
        "checks": c.results,
        "failed": c.failed,
    });
    println!("{}", serde_json::to_string(&report)?);
    if !c.failed.is_empty() {
        anyhow::bail!("failed: {}", c.failed.join(", "));
    }
    Ok(())
}

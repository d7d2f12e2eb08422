//! UNet benchmark, candle side (issues 4 and 24, SPEC §10): the real SD 1.5 UNet configuration,
//! by default 256×256 (latent 32×32), batch 1, f32, CPU.
//!
//! `bench_unet fwd|fwdbwd|fwd,fwdbwd [iters] [warmup] [--device cpu|cuda[:N]] [--dtype
//! f32|f16|bf16] [--size PIXELS] [--batch N] [--model DIR]` prints one JSON line per mode with the
//! wall times, the mode's start and end (UNIX seconds, so a parent sampling GPU memory can take the
//! peak of each mode's window) and the process's peak resident memory (VmHWM). `fwd` is a no-grad
//! forward (fused kernels); `fwdbwd` is a forward on a latent `Var` (differentiable kernels)
//! capturing one `up_blocks.2` cross-attention map and one block output, loss = sum(map[..., 5]) +
//! mean(block), backward to the latent.
//!
//! Weights: `--model DIR` loads `DIR/unet` (a diffusers folder, e.g. the one
//! `tools/bench/sd_folder.py` writes once for both sides); without it, the `tiny` crate's seeded
//! random weights in this configuration (drawn on the CPU in f32: slow at SD size).
//! `tools/bench/unet.py` runs this and the PyTorch + diffusers side and prints the ratios.
//! Build: `cargo build --release -p diffusion --example bench_unet`. The GPU check runs the same
//! code inside `gpu_check` (`gpu_check bench-unet ...`), which includes this file.

use candle_core::{DType, Device, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use rand::{Rng, SeedableRng};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// diffusers' `runwayml/stable-diffusion-v1-5` `unet/config.json`.
const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

const ATTN_SITE: &str = "up_blocks.2.attentions.0.transformer_blocks.0.attn2";
const BLOCK_SITE: &str = "up_blocks.2.attentions.0.transformer_blocks.0";

fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn randn(shape: &[usize], rng: &mut rand::rngs::StdRng) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn device_of(name: &str) -> anyhow::Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)?,
            _ => anyhow::bail!("unknown device '{other}' (cpu | cuda | cuda:N)"),
        },
    })
}

/// One timed run of `mode`.
fn run_once(
    unet: &UNet2DConditionModel,
    mode: &str,
    sample: &Tensor,
    context: &Tensor,
) -> anyhow::Result<()> {
    match mode {
        "fwd" => {
            let eps = unet.forward(sample, 500.0, context)?;
            // Reading a scalar back waits for the device.
            eps.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        }
        "fwdbwd" => {
            let start = Instant::now();
            let z = Var::from_tensor(sample)?;
            let mut rec = Recorder::sites(&[ATTN_SITE.into()], &[BLOCK_SITE.into()]);
            unet.forward_with(z.as_tensor(), 500.0, context, &mut rec)?;
            let map = rec.attention_map(ATTN_SITE).expect("captured map");
            let block = rec.block_output(BLOCK_SITE).expect("captured block");
            let loss = (map.narrow(3, 5, 1)?.to_dtype(DType::F32)?.sum_all()?
                + block.to_dtype(DType::F32)?.mean_all()?)?;
            let forward_secs = start.elapsed().as_secs_f64();
            let grads = loss.backward()?;
            let g = grads.get(z.as_tensor()).expect("latent gradient");
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?;
            eprintln!(
                "candle fwdbwd: forward {forward_secs:.3} s (queued), forward+backward {:.3} s",
                start.elapsed().as_secs_f64()
            );
        }
        other => anyhow::bail!("unknown mode '{other}' (fwd | fwdbwd)"),
    }
    Ok(())
}

/// The benchmark on the command-line arguments after the program name.
pub fn run(all: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let mut args = Vec::new();
    let (mut device, mut dtype, mut size, mut batch) =
        ("cpu".to_string(), "f32".to_string(), 256, 1);
    let mut model: Option<String> = None;
    let mut it = all.into_iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--device" => device = value()?,
            "--dtype" => dtype = value()?,
            "--size" => size = value()?.parse()?,
            "--batch" => batch = value()?.parse()?,
            "--model" => model = Some(value()?),
            _ => args.push(a),
        }
    }
    let modes: Vec<String> = args
        .first()
        .map(String::as_str)
        .unwrap_or("fwd")
        .split(',')
        .map(str::to_string)
        .collect();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let warmup: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    anyhow::ensure!(iters > 0, "iters must be at least 1");
    let dev = device_of(&device)?;
    let dt = match dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("unknown dtype '{other}' (f32 | f16 | bf16)"),
    };

    let load_start = Instant::now();
    let unet = match &model {
        Some(dir) => {
            let src = weights::ModelSource::parse(dir)?;
            UNet2DConditionModel::load(&src, "unet", dt, &dev)
                .map_err(|e| anyhow::anyhow!("loading the UNet of '{dir}': {e}"))?
        }
        None => {
            let cfg = UNet2DConditionConfig::from_json(SD15_UNET_CONFIG)?;
            tiny::random_model_on(0, dt, &dev, |vb| UNet2DConditionModel::new(&cfg, vb))?
        }
    };
    let load_secs = load_start.elapsed().as_secs_f64();
    let after_load_kb = vm_hwm_kb();
    let cross_dim = match &unet.config().cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(d) => *d
            .first()
            .ok_or_else(|| anyhow::anyhow!("empty cross_attention_dim"))?,
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let lat = size / 8;
    let sample = randn(&[batch, 4, lat, lat], &mut rng)?
        .to_dtype(dt)?
        .to_device(&dev)?;
    let context = randn(&[batch, 77, cross_dim], &mut rng)?
        .to_dtype(dt)?
        .to_device(&dev)?;

    for mode in &modes {
        let t0 = unix_now();
        let mut times = Vec::new();
        for i in 0..warmup + iters {
            let start = Instant::now();
            run_once(&unet, mode, &sample, &context)?;
            let secs = start.elapsed().as_secs_f64();
            if i >= warmup {
                times.push(secs);
            }
            eprintln!("candle {mode} run {i}: {secs:.3} s");
        }
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted[sorted.len() / 2];
        let line = serde_json::json!({
            "side": "candle",
            "mode": mode,
            "device": device,
            "dtype": dtype,
            "size": size,
            "batch": batch,
            "model": model,
            "threads": candle_core::utils::get_num_threads(),
            "load_s": load_secs,
            "times": times,
            "median": median,
            "t0": t0,
            "t1": unix_now(),
            "vm_hwm_after_load_kb": after_load_kb,
            "vm_hwm_kb": vm_hwm_kb(),
        });
        println!("{line}");
    }
    Ok(())
}

#[allow(dead_code)] // unused where `gpu_check` includes this file as a module
fn main() -> anyhow::Result<()> {
    // As `pnd` does (`layers::allocator`, `layers::threads`).
    layers::allocator::tune_for_tensors();
    layers::threads::single_elementwise_pool();
    run(std::env::args().skip(1))
}

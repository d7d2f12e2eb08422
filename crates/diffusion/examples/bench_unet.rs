//! UNet benchmark, candle side (issue 4, SPEC §10): the real SD 1.5 UNet configuration with the
//! `tiny` crate's seeded random weights; by default 256×256 (latent 32×32), batch 1, f32, CPU.
//!
//! `bench_unet fwd|fwdbwd [iters] [warmup] [--device cpu|cuda] [--dtype f32|f16|bf16]
//! [--size PIXELS] [--batch N]` prints one JSON line with the wall times and the
//! process's peak resident memory (VmHWM). `fwd` is a no-grad forward (fused kernels); `fwdbwd` is
//! a forward on a latent `Var` (differentiable kernels) capturing one `up_blocks.2` cross-attention
//! map and one block output, loss = sum(map[..., 5]) + mean(block), backward to the latent.
//! `tools/bench/unet.py` runs this and the PyTorch + diffusers side with the same thread count and
//! prints the ratios. Build: `cargo build --release -p diffusion --example bench_unet`.

use candle_core::{DType, Device, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use rand::{Rng, SeedableRng};
use std::time::Instant;

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

fn main() -> anyhow::Result<()> {
    // As `pnd` does (`layers::allocator`, `layers::threads`).
    layers::allocator::tune_for_tensors();
    layers::threads::single_elementwise_pool();
    let all: Vec<String> = std::env::args().collect();
    let mut args = Vec::new();
    let (mut device, mut dtype, mut size, mut batch) =
        ("cpu".to_string(), "f32".to_string(), 256, 1);
    let mut it = all.into_iter().skip(1);
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
            _ => args.push(a),
        }
    }
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("fwd")
        .to_string();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let warmup: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let dev = match device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device '{other}' (cpu | cuda)"),
    };
    let dt = match dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("unknown dtype '{other}' (f32 | f16 | bf16)"),
    };

    let cfg = UNet2DConditionConfig::from_json(SD15_UNET_CONFIG)?;
    let unet = tiny::random_model_on(0, dt, &dev, |vb| UNet2DConditionModel::new(&cfg, vb))?;
    let after_load_kb = vm_hwm_kb();

    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let lat = size / 8;
    let sample = randn(&[batch, 4, lat, lat], &mut rng)?
        .to_dtype(dt)?
        .to_device(&dev)?;
    let context = randn(&[batch, 77, 768], &mut rng)?
        .to_dtype(dt)?
        .to_device(&dev)?;

    let mut times = Vec::new();
    for i in 0..warmup + iters {
        let start = Instant::now();
        match mode.as_str() {
            "fwd" => {
                let eps = unet.forward(&sample, 500.0, &context)?;
                eps.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            }
            "fwdbwd" => {
                let z = Var::from_tensor(&sample)?;
                let mut rec = Recorder::sites(&[ATTN_SITE.into()], &[BLOCK_SITE.into()]);
                unet.forward_with(z.as_tensor(), 500.0, &context, &mut rec)?;
                let map = rec.attention_map(ATTN_SITE).expect("captured map");
                let block = rec.block_output(BLOCK_SITE).expect("captured block");
                let loss = (map.narrow(3, 5, 1)?.to_dtype(DType::F32)?.sum_all()?
                    + block.to_dtype(DType::F32)?.mean_all()?)?;
                let forward_secs = start.elapsed().as_secs_f64();
                let grads = loss.backward()?;
                eprintln!(
                    "candle fwdbwd: forward {forward_secs:.3} s, backward {:.3} s",
                    start.elapsed().as_secs_f64() - forward_secs
                );
                let g = grads.get(z.as_tensor()).expect("latent gradient");
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
            }
            other => anyhow::bail!("unknown mode '{other}' (fwd | fwdbwd)"),
        }
        let secs = start.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(secs);
        }
        eprintln!("candle {mode} run {i}: {secs:.3} s");
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{{\"side\": \"candle\", \"mode\": \"{mode}\", \"device\": \"{device}\", \"dtype\": \"{dtype}\", \"size\": {size}, \"batch\": {batch}, \"threads\": {}, \"times\": {times:?}, \"median\": {median}, \"vm_hwm_after_load_kb\": {after_load_kb}, \"vm_hwm_kb\": {}}}",
        candle_core::utils::get_num_threads(),
        vm_hwm_kb()
    );
    Ok(())
}

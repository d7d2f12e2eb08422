//! Pick-and-Draw overhead benchmark (issue 5 item 7, SPEC §10): the real SD 1.5 UNet
//! configuration with random weights, 256×256 (latent 32×32), f32, CPU, the paper's schedule
//! (50 DDIM steps, CFG 7.5, layout guidance in steps [0, 10), appearance in [10, 20), 3 updates
//! per guided step).
//!
//! Measured per call (median of `iters` after one warm-up): the CFG step (batch 2, fused
//! kernels), the layout gradient pass and the appearance gradient pass (batch 1, differentiable
//! kernels, forward + backward to the latent), and the template's CFG step with map capture. The
//! per-image times are assembled from these counts; the inversion is cached (once per subject)
//! and the template is shared work, both reported apart:
//! - unguided = 50 · cfg
//! - guided   = 50 · cfg + 30 · layout + 30 · appearance
//! - template = 10 · template step (+ nothing after step 10: only the needed steps run)
//!
//! `cargo run --release -p guidance --example bench_guidance [iters]`; `… bench_guidance emd` times
//! the exact EMD solver on 1024-point sets; `… bench_guidance mem layout|appearance` runs one
//! gradient pass of that kind and prints its memory (no timing): the process's resident memory
//! before the pass and its peak during it (VmHWM, reset through `/proc/self/clear_refs` once the
//! model and the targets are built), with `PND_GENERIC_OPS=1` the device-generic path's.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffusion::ddim::{Ddim, DdimConfig};
use diffusion::hooks::NoHook;
use diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use guidance::capture::{attn2_site, SiteCapture};
use guidance::guide::{step_gradient, PromptTokens, ReferenceLayer, StepTargets};
use guidance::maps::{mask_indices, min_max_normalize};
use guidance::GuidanceConfig;
use rand::{Rng, SeedableRng};
use std::sync::Mutex;
use std::time::Instant;

/// diffusers' `runwayml/stable-diffusion-v1-5` `unet/config.json`.
const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// Seeded uniform weights with std ~ 1/sqrt(fan_in); norm scales 1.
struct RandomWeights(Mutex<rand::rngs::StdRng>);

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let n = s.elem_count();
        if dims.len() == 1 && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        let fan_in = if dims.len() >= 2 { n / dims[0] } else { 100 };
        let a = (3.0 / fan_in as f32).sqrt();
        let mut rng = self.0.lock().unwrap();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for '{name}'")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.7f32..1.7)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A `/proc/self/status` field in kB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn median(f: &mut dyn FnMut(), iters: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Exact EMD solve times at the 32×32 appearance resolution's worst case (every position masked).
fn bench_emd() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for (n, m) in [(1024usize, 1024usize), (1024, 700), (600, 900)] {
        let cost: Vec<f64> = (0..n * m).map(|_| rng.random_range(0.0..2.0)).collect();
        let s = Instant::now();
        let plan = guidance::ot::transport_uniform(&cost, n, m).unwrap();
        println!(
            "{}",
            serde_json::json!({"emd": format!("{n}x{m}"), "seconds": s.elapsed().as_secs_f64(), "cost": plan.cost})
        );
    }
}

fn main() {
    // As `pnd` does (`layers::allocator`, `layers::threads`).
    layers::allocator::tune_for_tensors();
    layers::threads::single_elementwise_pool();
    if std::env::args().nth(1).as_deref() == Some("emd") {
        return bench_emd();
    }
    let mem_pass = (std::env::args().nth(1).as_deref() == Some("mem"))
        .then(|| std::env::args().nth(2).unwrap_or_else(|| "layout".into()));
    let iters: usize = std::env::args()
        .filter(|_| mem_pass.is_none())
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(3);
    let cfg_json: UNet2DConditionConfig =
        UNet2DConditionConfig::from_json(SD15_UNET_CONFIG).unwrap();
    let vb = VarBuilder::from_backend(
        Box::new(RandomWeights(Mutex::new(
            rand::rngs::StdRng::seed_from_u64(0),
        ))),
        DType::F32,
        Device::Cpu,
    );
    let unet = UNet2DConditionModel::new(&cfg_json, vb).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let z = randn(&mut rng, &[1, 4, 32, 32]);
    let cond = (randn(&mut rng, &[1, 77, 768]) * 0.5).unwrap();
    let uncond = (randn(&mut rng, &[1, 77, 768]) * 0.5).unwrap();
    let ddim = Ddim::new(&DdimConfig::stable_diffusion(), 50).unwrap();
    let t = ddim.timesteps()[12];
    let g = GuidanceConfig::default();
    let tokens = PromptTokens {
        subject: 3,
        layout: vec![1, 2, 3, 4, 5],
    };

    // Targets from other latents (their content does not change the cost).
    let sites = g.appearance_sites(3).unwrap();
    let attn: Vec<String> = sites.iter().map(|s| attn2_site(s)).collect();
    let mut cap = SiteCapture::new(0, vec![3], attn, sites.clone());
    unet.forward_with(&randn(&mut rng, &[1, 4, 32, 32]), t as f64, &cond, &mut cap)
        .unwrap();
    let reference: Vec<ReferenceLayer> = sites
        .iter()
        .map(|s| ReferenceLayer {
            site: s.clone(),
            features: cap.block(s).unwrap().detach(),
            mask: mask_indices(
                &min_max_normalize(cap.map(&attn2_site(s)).unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
                0.1,
            )
            .unwrap(),
        })
        .collect();
    let mut tcap = SiteCapture::new(
        0,
        tokens.layout.clone(),
        unet.cross_attention_sites(),
        vec![],
    );
    unet.forward_with(
        &randn(&mut rng, &[1, 4, 32, 32]),
        t as f64,
        &cond,
        &mut tcap,
    )
    .unwrap();
    let template: Vec<(String, Tensor)> = tcap
        .maps
        .into_iter()
        .map(|(s, m)| (s, m.detach()))
        .collect();

    if let Some(kind) = mem_pass {
        let lay = StepTargets {
            appearance: None,
            layout: Some(&template),
        };
        let app = StepTargets {
            appearance: Some(&reference),
            layout: None,
        };
        let targets = match kind.as_str() {
            "layout" => lay,
            "appearance" => app,
            other => panic!("mem: unknown pass '{other}' (layout or appearance)"),
        };
        // Resets VmHWM to the current resident size (Linux >= 4.0).
        std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
        let before = status_kb("VmRSS:");
        let start_hwm = status_kb("VmHWM:");
        let g = step_gradient(&unet, &g, &z, t, &cond, &tokens, &targets).unwrap();
        let peak = status_kb("VmHWM:");
        println!(
            "{}",
            serde_json::json!({
                "pass": kind, "generic": layers::kernels::generic_forced(),
                "rss_before_mib": before as f64 / 1024.0,
                "hwm_after_reset_mib": start_hwm as f64 / 1024.0,
                "peak_mib": peak as f64 / 1024.0,
                "pass_peak_over_before_mib": (peak - before) as f64 / 1024.0,
                "loss_app": g.loss.loss_app, "loss_lay": g.loss.loss_lay,
            })
        );
        return;
    }
    let batched = Tensor::cat(&[&uncond, &cond], 0).unwrap();
    let cfg_step = |hook: &mut dyn diffusion::hooks::Hook| {
        let x = Tensor::cat(&[&z, &z], 0).unwrap();
        let e = unet.forward_with(&x, t as f64, &batched, hook).unwrap();
        let (u, c) = (e.narrow(0, 0, 1).unwrap(), e.narrow(0, 1, 1).unwrap());
        let eps = (&u + ((c - &u).unwrap() * 7.5).unwrap()).unwrap();
        ddim.step(&eps, t, &z).unwrap();
    };
    let t_cfg = median(&mut || cfg_step(&mut NoHook), iters);
    eprintln!("cfg step {t_cfg:.3}s");
    let t_template = median(
        &mut || {
            let mut c = SiteCapture::new(
                1,
                tokens.layout.clone(),
                unet.cross_attention_sites(),
                vec![],
            );
            cfg_step(&mut c)
        },
        iters,
    );
    eprintln!("template step {t_template:.3}s");
    let lay = StepTargets {
        appearance: None,
        layout: Some(&template),
    };
    let t_lay = median(
        &mut || drop(step_gradient(&unet, &g, &z, t, &cond, &tokens, &lay).unwrap()),
        iters,
    );
    eprintln!("layout gradient pass {t_lay:.3}s");
    let app = StepTargets {
        appearance: Some(&reference),
        layout: None,
    };
    let t_app = median(
        &mut || drop(step_gradient(&unet, &g, &z, t, &cond, &tokens, &app).unwrap()),
        iters,
    );
    eprintln!("appearance gradient pass {t_app:.3}s");

    let unguided = 50.0 * t_cfg;
    let guided = unguided + 30.0 * t_lay + 30.0 * t_app;
    let template_total = 10.0 * t_template;
    println!(
        "{}",
        serde_json::json!({
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "cfg_step_s": t_cfg, "template_step_s": t_template,
            "layout_pass_s": t_lay, "appearance_pass_s": t_app,
            "unguided_image_s": unguided, "guided_image_s": guided, "template_s": template_total,
            "ratio": guided / unguided,
            "ratio_with_template": (guided + template_total) / unguided,
            "paper_ratio": 28.9 / 7.9,
        })
    );
}

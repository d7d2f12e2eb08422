//! Image-embedding throughput of DINO ViT-S/16 and CLIP ViT-B/32 at real size (random weights),
//! ours against PyTorch + transformers (`tools/bench/metrics.py`), same batch size and threads.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p metrics --example bench_embed -- [batch] [iters]`
//! runs `~/.venvs/ref/bin/python tools/bench/metrics.py` itself (same threads) and prints the ratio;
//! set `PND_BENCH_PYTHON=` (empty) to skip the Python side.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use metrics::clip::{ClipConfig, ClipVision};
use metrics::vit::{Vit, VitConfig};
use std::time::Instant;

/// Real-size weights created on demand by a `VarMap`, then redrawn from N(0, 0.02²) (as
/// transformers initializes them) so both sides time the same kind of numbers.
fn random_vb() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

fn randomize(vm: &VarMap) {
    for var in vm.all_vars() {
        let r = Tensor::randn(0f32, 0.02, var.shape(), &Device::Cpu).unwrap();
        var.set(&r).unwrap();
    }
}

fn time(
    name: &str,
    batch: usize,
    iters: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> f64 {
    let x = Tensor::randn(0f32, 1f32, (batch, 3, 224, 224), &Device::Cpu).unwrap();
    f(&x).unwrap(); // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        f(&x).unwrap();
    }
    let ips = (batch * iters) as f64 / t.elapsed().as_secs_f64();
    println!("ours  {name:<22} {ips:8.2} images/s (batch {batch}, {iters} iterations)");
    ips
}

fn main() {
    // As `pnd` does (`layers::allocator`, `layers::threads`).
    layers::allocator::tune_for_tensors();
    layers::threads::single_elementwise_pool();
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let iters: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let threads = rayon::current_num_threads();
    println!("threads {threads}");

    // The models copy what they need at construction (fused QKV, transposed weights, LayerNorm
    // parameters), so the variables are randomized first: build once to create them, randomize,
    // build again from the same map.
    let (vm, vb) = random_vb();
    Vit::new(&VitConfig::dino_vits16(), vb.clone()).unwrap();
    randomize(&vm);
    let dino = Vit::new(&VitConfig::dino_vits16(), vb).unwrap();
    let (vm2, vb2) = random_vb();
    ClipVision::new(&ClipConfig::vit_base_patch32(), vb2.clone()).unwrap();
    randomize(&vm2);
    let clip = ClipVision::new(&ClipConfig::vit_base_patch32(), vb2).unwrap();
    let ours_dino = time("DINO ViT-S/16", batch, iters, |x| dino.embed(x));
    let ours_clip = time("CLIP ViT-B/32 image", batch, iters, |x| clip.embed(x));

    let python = std::env::var("PND_BENCH_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.venvs/ref/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    if python.is_empty() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/bench/metrics.py");
    let out = std::process::Command::new(&python)
        .args([
            script,
            &batch.to_string(),
            &iters.to_string(),
            &threads.to_string(),
        ])
        .output()
        .expect("running the PyTorch side");
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let get = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    if let (Some(pd), Some(pc)) = (get("torch_dino"), get("torch_clip")) {
        println!("ratio DINO  ours/torch = {:.2}x", ours_dino / pd);
        println!("ratio CLIP  ours/torch = {:.2}x", ours_clip / pc);
    }
}

//! The fused (no-grad) and differentiable kernel paths compute the same UNet, and `Auto` picks the
//! differentiable one exactly when an input is in an autograd graph.

mod pipeline_support;

use candle_core::{DType, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::unet::{ComputePath, UNet2DConditionModel};
use pipeline_support::{max_abs_diff, unet_fixture};

fn model() -> UNet2DConditionModel {
    unet_fixture("model", DType::F32)
}

/// Deterministic N(0, 1) samples, as f32.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    pipeline_support::randn(shape, seed)
        .to_dtype(DType::F32)
        .unwrap()
}

fn run(
    unet: &mut UNet2DConditionModel,
    path: ComputePath,
    z: &Tensor,
    ctx: &Tensor,
) -> (Tensor, Recorder) {
    unet.set_compute_path(path);
    let mut rec = Recorder::all();
    let eps = unet.forward_with(z, 421.0, ctx, &mut rec).unwrap();
    (eps, rec)
}

#[test]
fn fused_and_differentiable_paths_agree() {
    let mut unet = model();
    // The fixture size and an odd size (up blocks resize to the skip connections).
    for (h, w) in [(16, 16), (12, 10)] {
        let z = randn(&[2, 4, h, w], 1);
        let ctx = randn(&[2, 77, 32], 2);
        let (ef, rf) = run(&mut unet, ComputePath::Fused, &z, &ctx);
        let (ed, rd) = run(&mut unet, ComputePath::Differentiable, &z, &ctx);
        let d = max_abs_diff(&ef, &ed);
        println!("{h}x{w}: noise_pred fused vs differentiable {d:.2e}");
        assert!(d <= 1e-5, "{d}");
        assert_eq!(rf.attention.len(), 16);
        for ((s, a), (_, b)) in rf.attention.iter().zip(&rd.attention) {
            let d = max_abs_diff(a, b);
            assert!(d <= 1e-5, "{s}: {d}");
        }
        // Block outputs reach |x| ~ 30 here: f32 rounding of the two orders of summation.
        for ((s, a), (_, b)) in rf.blocks.iter().zip(&rd.blocks) {
            let d = max_abs_diff(a, b);
            assert!(d <= 1e-4, "{s}: {d}");
        }
    }
}

#[test]
fn auto_path_keeps_gradients_through_attention_maps() {
    let unet = model();
    assert_eq!(unet.compute_path(), ComputePath::Auto);
    let z = Var::from_tensor(&randn(&[1, 4, 8, 8], 3)).unwrap();
    let ctx = randn(&[1, 77, 32], 4);
    let site = "up_blocks.2.attentions.0.transformer_blocks.0.attn2".to_string();
    let mut rec = Recorder::sites(std::slice::from_ref(&site), &[]);
    unet.forward_with(z.as_tensor(), 421.0, &ctx, &mut rec)
        .unwrap();
    assert_eq!(rec.attention.len(), 1);
    assert!(rec.blocks.is_empty());
    // Token 5's map: its gradient flows only through softmax and upsampling, which the fused
    // kernels would drop or corrupt.
    let loss = rec.attention[0]
        .1
        .narrow(3, 5, 1)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(z.as_tensor())
        .expect("gradient reaches the latent");
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0 && norm.is_finite(), "{norm}");
}

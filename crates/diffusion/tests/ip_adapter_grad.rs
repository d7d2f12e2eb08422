//! f64 finite-difference gradients through IP-Adapter's decoupled cross-attention, on the CPU
//! kernels and on the device-generic path (`force_generic`, what CUDA runs), for both adapters of
//! the fixture (tools/fixtures/ip_adapter.py) attached to the tiny pipeline's UNet.
//!
//! Loss `L = sum(U * eps) + sum over the 16 cross-attention sites of sum(W_s * A_s)` (A_s the text
//! attention probabilities the hooks see). Directional derivatives along unit `u`, h = 1e-4:
//! `|<grad L, u> - fd| / |fd| ≤ 1e-4`, for `u` on the latent and for `u` on the image tokens only
//! (the gradient that reaches the tokens goes through `to_k_ip` / `to_v_ip` alone); the two paths'
//! gradients agree to 1e-10 relative.

mod pipeline_support;

use candle_core::{DType, Device, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::ip_adapter::{IpAdapter, IpAdapterKind, IpAdapterSource};
use diffusion::unet::{IpAdapterScale, UNet2DConditionModel};
use layers::kernels::force_generic;
use pipeline_support::*;

fn unet_with(kind: IpAdapterKind) -> (UNet2DConditionModel, Tensor) {
    let src = weights::ModelSource::parse(model_dir().to_str().unwrap()).unwrap();
    let mut unet = UNet2DConditionModel::load(&src, "unet", DType::F64, &Device::Cpu).unwrap();
    let source = IpAdapterSource {
        repo: fixture("ip_adapter").join("h94").to_str().unwrap().into(),
        kind,
    };
    let ip = IpAdapter::load_source(&source, None, &mut unet, &IpAdapterScale::All(0.8)).unwrap();
    let img = imaging::load_rgb(&fixture("ip_adapter").join("reference.png")).unwrap();
    let tokens = ip
        .image_tokens(&img)
        .unwrap()
        .cond
        .to_dtype(DType::F64)
        .unwrap();
    let text = randn(&[1, 77, 16], 21);
    (unet, Tensor::cat(&[&text, &tokens], 1).unwrap())
}

fn loss(unet: &UNet2DConditionModel, z: &Tensor, ctx: &Tensor) -> Tensor {
    let mut rec = Recorder::all();
    let eps = unet.forward_with(z, 601.0, ctx, &mut rec).unwrap();
    assert_eq!(rec.attention.len(), 16);
    let mut l = (&eps * randn(eps.dims(), 3000)).unwrap().sum_all().unwrap();
    for (i, (_, a)) in rec.attention.iter().enumerate() {
        assert_eq!(a.dim(3).unwrap(), 77);
        let w = randn(a.dims(), 1000 + i as u64);
        l = (l + (a * w).unwrap().sum_all().unwrap()).unwrap();
    }
    l
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Gradients of the loss w.r.t. the latent and the context, on the host or the generic path.
fn grads(unet: &UNet2DConditionModel, z: &Tensor, ctx: &Tensor, generic: bool) -> (Tensor, Tensor) {
    let _guard = generic.then(force_generic);
    let zv = Var::from_tensor(z).unwrap();
    let cv = Var::from_tensor(ctx).unwrap();
    let g = loss(unet, zv.as_tensor(), cv.as_tensor())
        .backward()
        .unwrap();
    (
        g.get(zv.as_tensor()).unwrap().clone(),
        g.get(cv.as_tensor()).unwrap().clone(),
    )
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = scalar(&a.abs().unwrap().max_all().unwrap()).max(1e-300);
    max_abs_diff_f64(a, b) / scale
}

fn unit(t: Tensor) -> Tensor {
    let n = scalar(&t.sqr().unwrap().sum_all().unwrap()).sqrt();
    (t / n).unwrap()
}

fn check(kind: IpAdapterKind) {
    let (unet, ctx) = unet_with(kind);
    let z = (randn(&[1, 4, 8, 16], 31) * 0.8).unwrap();
    let (gz_host, gc_host) = grads(&unet, &z, &ctx, false);
    let (gz_gen, gc_gen) = grads(&unet, &z, &ctx, true);
    let path_err = rel(&gz_host, &gz_gen).max(rel(&gc_host, &gc_gen));
    let tokens = ctx.dim(1).unwrap() - 77;
    // Directions: two on the latent, one on the image tokens only.
    let on_tokens = {
        let u = randn(&[1, tokens, 16], 41);
        let zeros = Tensor::zeros((1, 77, 16), DType::F64, &Device::Cpu).unwrap();
        unit(Tensor::cat(&[&zeros, &u], 1).unwrap())
    };
    let h = 1e-4;
    let mut worst = 0f64;
    for generic in [false, true] {
        let _guard = generic.then(force_generic);
        let (gz, gc) = if generic {
            (&gz_gen, &gc_gen)
        } else {
            (&gz_host, &gc_host)
        };
        for seed in [7u64, 8] {
            let u = unit(randn(z.dims(), seed));
            let analytic = scalar(&(gz * &u).unwrap().sum_all().unwrap());
            let fd = (scalar(&loss(&unet, &(&z + (&u * h).unwrap()).unwrap(), &ctx))
                - scalar(&loss(&unet, &(&z - (&u * h).unwrap()).unwrap(), &ctx)))
                / (2.0 * h);
            assert!(
                fd.abs() > 1e-8,
                "directional derivative {fd} too small to test"
            );
            worst = worst.max((analytic - fd).abs() / fd.abs());
        }
        let analytic = scalar(&(gc * &on_tokens).unwrap().sum_all().unwrap());
        let fd = (scalar(&loss(
            &unet,
            &z,
            &(&ctx + (&on_tokens * h).unwrap()).unwrap(),
        )) - scalar(&loss(
            &unet,
            &z,
            &(&ctx - (&on_tokens * h).unwrap()).unwrap(),
        ))) / (2.0 * h);
        assert!(
            fd.abs() > 1e-8,
            "image-token derivative {fd} too small to test"
        );
        worst = worst.max((analytic - fd).abs() / fd.abs());
    }
    println!(
        "{kind} IP-Adapter: gradient host vs generic rel {path_err:.1e}; autograd vs FD (latent \
         ×2, image tokens ×1, both paths) worst rel {worst:.1e}"
    );
    assert!(
        path_err <= 1e-10,
        "host and generic gradients differ by {path_err}"
    );
    assert!(worst <= 1e-4, "autograd vs finite differences {worst}");
}

#[test]
fn plain_adapter_gradients_match_finite_differences() {
    check(IpAdapterKind::Plain);
}

#[test]
fn plus_adapter_gradients_match_finite_differences() {
    check(IpAdapterKind::Plus);
}

//! Exact gradients through the whole UNet (SPEC §6 "Gradients"): finite differences in f64 on the
//! tiny SD-1.5-shaped fixture model.
//!
//! For every cross-attention site `s` (16) and every transformer-block site `b` (16, the 9 decoder
//! ones included) a separate scalar loss is built from the captured tensors of ONE forward pass:
//! `L_s = sum(W_s * A_s)` and `L_b = sum(V_b * H_b)`, with fixed random `W_s`, `V_b` (a plain sum of
//! an attention map would have zero gradient, softmax rows sum to 1). Plus `L_eps = sum(U * eps)`.
//! Each loss is differentiated by autograd with respect to the latent `z` (a `Var`; the UNet picks
//! its differentiable path automatically), and compared with the central difference along a random
//! unit direction `u`: `fd = (L(z + h u) - L(z - h u)) / 2h`, h = 1e-4.
//! Measured: `|<grad L, u> - fd| / |fd|`, asserted ≤ 1e-4 for every loss and direction.

mod pipeline_support;

use candle_core::{DType, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::unet::UNet2DConditionModel;
use pipeline_support::{randn, unet_fixture};

/// Named scalar losses of one forward pass: one per attention site, one per block site, one on eps.
fn losses(unet: &UNet2DConditionModel, z: &Tensor, ctx: &Tensor) -> Vec<(String, Tensor)> {
    let mut rec = Recorder::all();
    let eps = unet.forward_with(z, 601.0, ctx, &mut rec).unwrap();
    let mut out = Vec::new();
    for (i, (site, a)) in rec.attention.iter().enumerate() {
        let w = randn(a.dims(), 1000 + i as u64);
        out.push((site.clone(), (a * w).unwrap().sum_all().unwrap()));
    }
    for (i, (site, h)) in rec.blocks.iter().enumerate() {
        let v = randn(h.dims(), 2000 + i as u64);
        out.push((site.clone(), (h * v).unwrap().sum_all().unwrap()));
    }
    let u = randn(eps.dims(), 3000);
    out.push(("noise_pred".into(), (eps * u).unwrap().sum_all().unwrap()));
    out
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn unit(shape: &[usize], seed: u64) -> Tensor {
    let u = randn(shape, seed);
    let norm = scalar(&u.sqr().unwrap().sum_all().unwrap()).sqrt();
    (u / norm).unwrap()
}

fn check_latent_gradients(z: Tensor, ctx: Tensor) {
    let unet = unet_fixture("model", DType::F64);
    let var = Var::from_tensor(&z).unwrap();
    let graph = losses(&unet, var.as_tensor(), &ctx);
    assert_eq!(graph.len(), 16 + 16 + 1);
    // One backward per loss; each gradient is then projected on every direction.
    let grads: Vec<Tensor> = graph
        .iter()
        .map(|(site, l)| {
            l.backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{site}: no gradient reached the latent"))
                .clone()
        })
        .collect();
    let h = 1e-4;
    let mut worst = (0f64, String::new());
    for dir_seed in [7u64, 8] {
        let u = unit(z.dims(), dir_seed);
        let plus = losses(&unet, &(&z + (&u * h).unwrap()).unwrap(), &ctx);
        let minus = losses(&unet, &(&z - (&u * h).unwrap()).unwrap(), &ctx);
        for (k, (site, _)) in graph.iter().enumerate() {
            let analytic = scalar(&(&grads[k] * &u).unwrap().sum_all().unwrap());
            let fd = (scalar(&plus[k].1) - scalar(&minus[k].1)) / (2.0 * h);
            let rel = (analytic - fd).abs() / fd.abs().max(1e-300);
            assert!(
                fd.abs() > 1e-8,
                "{site}: directional derivative {fd} too small to test"
            );
            assert!(
                rel <= 1e-4,
                "{site}: autograd {analytic} vs finite difference {fd} (rel {rel:.2e})"
            );
            if rel > worst.0 {
                worst = (rel, site.clone());
            }
        }
    }
    println!(
        "max relative error over {} losses x 2 directions: {:.2e} ({})",
        graph.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn latent_gradients_of_every_site_match_finite_differences() {
    // Batch 1, 16x16 latent (the guidance pass runs the conditional branch alone).
    check_latent_gradients(
        (randn(&[1, 4, 16, 16], 11) * 0.8).unwrap(),
        randn(&[1, 77, 32], 12),
    );
}

#[test]
fn latent_gradients_match_finite_differences_at_an_odd_latent_size() {
    // 12x10 is not a multiple of 8: up blocks resize to the skip connections' sizes.
    check_latent_gradients(randn(&[1, 4, 12, 10], 13), randn(&[1, 77, 32], 14));
}

#[test]
fn encoder_hidden_states_gradient_matches_finite_differences() {
    // Null-text inversion optimizes the unconditional embedding through the UNet.
    let unet = unet_fixture("model", DType::F64);
    let z = randn(&[1, 4, 8, 8], 15);
    let ctx = randn(&[1, 77, 32], 16);
    let var = Var::from_tensor(&ctx).unwrap();
    let loss = |c: &Tensor| {
        let eps = unet.forward(&z, 301.0, c).unwrap();
        (eps * randn(&[1, 4, 8, 8], 17)).unwrap().sum_all().unwrap()
    };
    let l = loss(var.as_tensor());
    let g = l.backward().unwrap();
    let g = g
        .get(var.as_tensor())
        .expect("no gradient reached the embedding");
    let u = unit(ctx.dims(), 18);
    let h = 1e-4;
    let analytic = scalar(&(g * &u).unwrap().sum_all().unwrap());
    let fd = (scalar(&loss(&(&ctx + (&u * h).unwrap()).unwrap()))
        - scalar(&loss(&(&ctx - (&u * h).unwrap()).unwrap())))
        / (2.0 * h);
    let rel = (analytic - fd).abs() / fd.abs();
    println!("encoder_hidden_states: autograd {analytic} fd {fd} rel {rel:.2e}");
    assert!(rel <= 1e-4, "rel {rel}");
}

#[test]
fn linear_projection_model_gradients_match_finite_differences() {
    // The SD 2.x-style fixture (use_linear_projection) at its odd 12x10 latent size.
    let unet = unet_fixture("model_v2", DType::F64);
    let z = randn(&[1, 4, 12, 10], 21);
    let ctx = randn(&[1, 77, 16], 22);
    let loss = |t: &Tensor| {
        let mut rec = Recorder::all();
        let eps = unet.forward_with(t, 301.0, &ctx, &mut rec).unwrap();
        let mut l = (eps * randn(&[1, 4, 12, 10], 23))
            .unwrap()
            .sum_all()
            .unwrap();
        for (i, (_, a)) in rec.attention.iter().chain(&rec.blocks).enumerate() {
            let w = randn(a.dims(), 100 + i as u64);
            l = (l + (a * w).unwrap().sum_all().unwrap()).unwrap();
        }
        l
    };
    let var = Var::from_tensor(&z).unwrap();
    let g = loss(var.as_tensor()).backward().unwrap();
    let g = g.get(var.as_tensor()).unwrap().clone();
    let u = unit(z.dims(), 24);
    let h = 1e-4;
    let analytic = scalar(&(&g * &u).unwrap().sum_all().unwrap());
    let fd = (scalar(&loss(&(&z + (&u * h).unwrap()).unwrap()))
        - scalar(&loss(&(&z - (&u * h).unwrap()).unwrap())))
        / (2.0 * h);
    let rel = (analytic - fd).abs() / fd.abs();
    println!("linear projection: autograd {analytic} fd {fd} rel {rel:.2e}");
    assert!(rel <= 1e-4, "rel {rel}");
}

//! Finite-difference tests (f64) of the differentiable primitives in `diffusion::ops`, and their
//! agreement with candle's fused kernels (the no-grad path).
//!
//! Measure: for `L(x) = sum(W * f(x))` with a fixed random `W`, the autograd gradient `g` is
//! compared with the central difference `(L(x + h e_i) - L(x - h e_i)) / 2h` at every coordinate
//! `i` (h = 1e-6); the error is `max_i |g_i - fd_i| / max(max_i |fd_i|, 1e-12)`, i.e. relative to
//! the largest gradient entry, which stays well-conditioned where single entries are near zero.

mod pipeline_support;

use candle_core::{DType, Device, Tensor, Var};
use diffusion::ops;
use pipeline_support::{max_abs_diff_f64, randn};

/// Max relative (to the largest entry) error of the autograd gradient against central differences.
fn fd_error(x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> f64 {
    let y0 = f(x).unwrap();
    let w = randn(y0.dims(), 99);
    let loss = |t: &Tensor| -> f64 {
        (f(t).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let var = Var::from_tensor(x).unwrap();
    let l = (f(var.as_tensor()).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = l.backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("no gradient reached the input")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let mut fd = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let tp = Tensor::from_vec(p, x.dims(), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(m, x.dims(), &Device::Cpu).unwrap();
        fd.push((loss(&tp) - loss(&tm)) / (2.0 * h));
    }
    let scale = fd.iter().fold(0f64, |a, v| a.max(v.abs())).max(1e-12);
    assert!(scale > 1e-3, "degenerate test: gradient scale {scale}");
    g.iter()
        .zip(&fd)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max)
        / scale
}

#[test]
fn softmax_gradient_matches_finite_differences_and_fused_kernel() {
    let x = (randn(&[2, 3, 7], 1) * 3.0).unwrap();
    let err = fd_error(&x, ops::softmax_last_dim);
    println!("softmax fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
    assert!(max_abs_diff_f64(&ops::softmax_last_dim(&x).unwrap(), &fused) < 1e-14);
}

#[test]
fn layer_norm_gradient_matches_finite_differences_and_fused_kernel() {
    let x = randn(&[2, 5, 6], 2);
    let w = (randn(&[6], 3) + 1.0).unwrap();
    let b = randn(&[6], 4);
    let err = fd_error(&x, |t| ops::layer_norm(t, &w, &b, 1e-5));
    println!("layer_norm fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let x32 = x.to_dtype(DType::F32).unwrap();
    let fused = candle_nn::ops::layer_norm(
        &x32,
        &w.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
        1e-5,
    )
    .unwrap();
    let ours = ops::layer_norm(
        &x32,
        &w.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
        1e-5,
    )
    .unwrap();
    assert!(max_abs_diff_f64(&ours, &fused) < 1e-5);
}

#[test]
fn group_norm_gradient_matches_finite_differences_and_candle_nn() {
    let x = randn(&[2, 6, 3, 3], 5);
    let w = (randn(&[6], 6) + 1.0).unwrap();
    let b = randn(&[6], 7);
    let err = fd_error(&x, |t| ops::group_norm(t, 3, &w, &b, 1e-6));
    println!("group_norm fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), 6, 3, 1e-6).unwrap();
    let reference = candle_core::Module::forward(&gn, &x).unwrap();
    assert!(max_abs_diff_f64(&ops::group_norm(&x, 3, &w, &b, 1e-6).unwrap(), &reference) < 1e-12);
}

#[test]
fn gelu_erf_gradient_matches_finite_differences_and_fused_kernel() {
    let x = (randn(&[3, 8], 8) * 2.0).unwrap();
    let err = fd_error(&x, ops::gelu_erf);
    println!("gelu_erf fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    assert!(max_abs_diff_f64(&ops::gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-12);
}

#[test]
fn upsample_nearest2x_gradient_accumulates_and_matches_candle_forward() {
    let x = randn(&[1, 2, 3, 4], 9);
    let err = fd_error(&x, ops::upsample_nearest2x);
    println!("upsample2x fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let reference = x.upsample_nearest2d(6, 8).unwrap();
    assert_eq!(
        max_abs_diff_f64(&ops::upsample_nearest2x(&x).unwrap(), &reference),
        0.0
    );
    // Each input pixel feeds a 2×2 block: d sum(up(x)) / dx = 4 everywhere.
    let var = Var::from_tensor(&x).unwrap();
    let g = ops::upsample_nearest2x(var.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g.get(var.as_tensor()).unwrap();
    assert_eq!(
        max_abs_diff_f64(g, &(x.ones_like().unwrap() * 4.0).unwrap()),
        0.0
    );
}

#[test]
fn upsample_nearest_to_odd_size_gradient_matches_finite_differences() {
    // 3x3 -> 5x7: the non-integer-ratio case diffusers uses when the latent size is not a
    // multiple of the UNet's total upsampling factor.
    let x = randn(&[1, 2, 3, 3], 10);
    let err = fd_error(&x, |t| ops::upsample_nearest_to(t, 5, 7));
    println!("upsample_to fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let up = ops::upsample_nearest_to(&x, 5, 7).unwrap();
    assert_eq!(up.dims(), &[1, 2, 5, 7]);
    // torch nearest: src = floor(dst * in / out): rows [0,0,1,1,2], cols [0,0,0,1,1,2,2].
    let row: Vec<f64> = up
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(4)
        .unwrap()
        .to_vec1()
        .unwrap();
    let src: Vec<f64> = x
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        row,
        vec![src[0], src[0], src[0], src[1], src[1], src[2], src[2]]
    );
}

#[test]
fn timestep_embedding_matches_diffusers_layout() {
    // flip_sin_to_cos=True: [cos(t f_0..f_{h-1}), sin(t f_0..)], f_i = exp(-ln(1e4) i / (h - shift)).
    let e = ops::timestep_embedding(10.0, 2, 8, true, 0.0, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(e.dims(), &[2, 8]);
    let row: Vec<f64> = e.get(1).unwrap().to_vec1().unwrap();
    for i in 0..4 {
        let f = (-(10000f64).ln() * i as f64 / 4.0).exp();
        assert!((row[i] - (10.0 * f).cos()).abs() < 1e-5);
        assert!((row[4 + i] - (10.0 * f).sin()).abs() < 1e-5);
    }
}

#[test]
fn conv2d_input_gradient_matches_finite_differences_for_every_stride_and_parity() {
    // (input h, w, kernel, padding, stride): 3x3 same-conv, 1x1, the stride-2 downsampler on
    // odd/even sizes (where candle's own conv2d backward fails), and stride 2 without padding.
    for (i, &(h, w, k, p, s)) in [
        (5, 4, 3, 1, 1),
        (4, 3, 1, 0, 1),
        (5, 6, 3, 1, 2),
        (6, 5, 3, 1, 2),
        (7, 4, 3, 0, 2),
    ]
    .iter()
    .enumerate()
    {
        let x = randn(&[2, 3, h, w], 20 + i as u64);
        let kernel = randn(&[4, 3, k, k], 30 + i as u64);
        let err = fd_error(&x, |t| ops::conv2d(t, &kernel, None, p, s));
        println!("conv2d {h}x{w} k{k} p{p} s{s}: fd rel err {err:.2e}");
        assert!(err < 1e-7, "{err}");
        let reference = x.conv2d(&kernel, p, s, 1, 1).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let ours = ops::conv2d(var.as_tensor(), &kernel, None, p, s).unwrap();
        assert!(max_abs_diff_f64(&ours, &reference) < 1e-12);
    }
}

#[test]
fn composite_fallbacks_match_finite_differences() {
    // The compositions used off the CPU or with trainable weights.
    let x = randn(&[2, 6, 3, 2], 40);
    let w = (randn(&[6], 41) + 1.0).unwrap();
    let b = randn(&[6], 42);
    let wl = (randn(&[2], 43) + 1.0).unwrap();
    let bl = randn(&[2], 44);
    let cases: Vec<(&str, f64, Tensor)> = vec![
        (
            "softmax",
            fd_error(&x, ops::softmax_last_dim_composite),
            x.clone(),
        ),
        (
            "layer_norm",
            fd_error(&x, |t| ops::layer_norm_composite(t, &wl, &bl, 1e-5)),
            ops::layer_norm(&x, &wl, &bl, 1e-5).unwrap(),
        ),
        (
            "group_norm",
            fd_error(&x, |t| ops::group_norm_composite(t, 2, &w, &b, 1e-6)),
            ops::group_norm(&x, 2, &w, &b, 1e-6).unwrap(),
        ),
        ("gelu", fd_error(&x, ops::gelu_erf_composite), x.clone()),
    ];
    for (name, err, _) in &cases {
        println!("{name} composite fd rel err {err:.2e}");
        assert!(*err < 1e-7, "{name}: {err}");
    }
    // Values: composite == op.
    assert!(
        max_abs_diff_f64(
            &ops::layer_norm_composite(&x, &wl, &bl, 1e-5).unwrap(),
            &cases[1].2
        ) < 1e-12
    );
    assert!(
        max_abs_diff_f64(
            &ops::group_norm_composite(&x, 2, &w, &b, 1e-6).unwrap(),
            &cases[2].2
        ) < 1e-12
    );
}

#[test]
fn linear_constant_add_and_constant_matmul_gradients_match_finite_differences() {
    let x = randn(&[2, 3, 5], 50);
    let w = randn(&[4, 5], 51);
    let b = randn(&[4], 52);
    let err = fd_error(&x, |t| ops::linear(t, &w, Some(&b)));
    println!("linear fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let reference = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(max_abs_diff_f64(&ops::linear(&x, &w, Some(&b)).unwrap(), &reference) < 1e-12);

    let c = randn(&[2, 1, 5], 53);
    let err = fd_error(&x, |t| ops::add_constant(t, &c));
    assert!(err < 1e-7, "add_constant {err}");

    let r = randn(&[2, 5, 4], 54);
    let err = fd_error(&x, |t| ops::matmul_constant(t, &r));
    println!("matmul_constant fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");

    let xi = randn(&[1, 3, 5, 4], 55);
    let k = randn(&[2, 3, 3, 3], 56);
    let kb = randn(&[2], 57);
    let err = fd_error(&xi, |t| ops::conv2d(t, &k, Some(&kb), 1, 2));
    println!("conv2d+bias fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
}

#[test]
fn silu_and_geglu_gradients_match_finite_differences() {
    let x = (randn(&[2, 3, 6], 60) * 2.0).unwrap();
    let err = fd_error(&x, ops::silu);
    println!("silu fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    assert!(max_abs_diff_f64(&ops::silu(&x).unwrap(), &x.silu().unwrap()) < 1e-14);
    let err = fd_error(&x, ops::geglu);
    println!("geglu fd rel err {err:.2e}");
    assert!(err < 1e-7, "{err}");
    let reference =
        (x.narrow(2, 0, 3).unwrap() * x.narrow(2, 3, 3).unwrap().gelu_erf().unwrap()).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    assert!(max_abs_diff_f64(&ops::geglu(var.as_tensor()).unwrap(), &reference) < 1e-14);
}

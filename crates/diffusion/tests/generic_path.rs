//! The device-generic path, which CUDA runs, against our CPU kernels, on the CPU (issue: the GPU
//! path is proven without a GPU). [`layers::kernels::force_generic`] makes every primitive take the
//! composition of candle ops it takes off the CPU.
//!
//! Measured, op by op and through the whole tiny UNet:
//! - values in f32: max |generic - host| ≤ 1e-5 per op, and relative to each tensor's largest
//!   entry through the UNet;
//! - gradients in f64 of `L = sum(W * f(x))`: max |g_generic - g_host| ≤ 1e-10 relative to the
//!   largest entry, and the generic gradient against central differences (h = 1e-6 per op,
//!   h = 1e-4 along random directions through the UNet).

mod pipeline_support;

use candle_core::{DType, Tensor, Var};
use diffusion::hooks::Recorder;
use diffusion::ops;
use layers::kernels::force_generic;
use pipeline_support::{max_abs_diff_f64, randn, unet_fixture};

type Op<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;

/// Value and input gradient of `sum(W * f(x))` with `x` in a graph (so the ops take their
/// differentiable paths), on the host kernels or the generic path.
fn value_and_grad(x: &Tensor, f: &Op<'_>, generic: bool) -> (Tensor, Tensor) {
    let _guard = generic.then(force_generic);
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let w = randn(y.dims(), 77).to_dtype(x.dtype()).unwrap();
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("no gradient reached the input")
        .clone();
    (y.detach(), g)
}

/// Max relative (to the largest central difference) error of the generic gradient.
fn generic_fd_error(x: &Tensor, f: &Op<'_>) -> f64 {
    let (_, g) = value_and_grad(x, f, true);
    let _guard = force_generic();
    let w = randn(f(x).unwrap().dims(), 77);
    let loss = |t: &Tensor| -> f64 {
        // The forward on a tensor outside any graph must agree with the tracked one; evaluate it
        // through a Var so the same (generic, differentiable) path runs.
        let v = Var::from_tensor(t).unwrap();
        let y = f(v.as_tensor()).unwrap();
        (y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    let mut scale = 0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let tp = Tensor::from_vec(p, x.dims(), x.device()).unwrap();
        let tm = Tensor::from_vec(m, x.dims(), x.device()).unwrap();
        let fd = (loss(&tp) - loss(&tm)) / (2.0 * h);
        worst = worst.max((g[i] - fd).abs());
        scale = scale.max(fd.abs());
    }
    assert!(scale > 1e-3, "degenerate test: gradient scale {scale}");
    worst / scale
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-300);
    max_abs_diff_f64(
        &a.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
    ) / scale
}

/// Every primitive of `diffusion::ops` with its constants in `dtype`, and its input shape.
fn primitives(dtype: DType) -> Vec<(&'static str, Op<'static>, Vec<usize>)> {
    let t = |shape: &[usize], seed: u64| randn(shape, seed).to_dtype(dtype).unwrap();
    let (w6, b6) = ((t(&[6], 1) + 1.0).unwrap(), t(&[6], 2));
    let (wl, bl) = ((t(&[4], 3) + 1.0).unwrap(), t(&[4], 4));
    let (lin_w, lin_b) = (t(&[5, 4], 5), t(&[5], 6));
    let (c, r) = (t(&[1, 1, 4], 7), t(&[2, 4, 3], 8));
    let (k3, kb) = (t(&[5, 6, 3, 3], 9), t(&[5], 10));
    let (k3b, kbb) = (k3.clone(), kb.clone());
    let (k3c, kbc) = (k3.clone(), kb.clone());
    let (ck, cv) = (t(&[2, 5, 6], 11), t(&[2, 5, 6], 12));
    let (ck2, cv2) = (ck.clone(), cv.clone());
    let k3s: Vec<Tensor> = (0..4).map(|_| k3.clone()).collect();
    let (k1, kb1) = (t(&[5, 6, 1, 1], 13), kb.clone());
    let kbs: Vec<Tensor> = (0..4).map(|_| kb.clone()).collect();
    // Budgets that split 5 queries into chunks of 2 rows (2 · 2 heads · keys entries each).
    let chunk = |keys: usize| 2 * 2 * 2 * keys * dtype.size_in_bytes().max(4);
    let (self_chunk, cross_chunk) = (chunk(5), chunk(5) * 3 / 2);
    vec![
        (
            // Self-attention over chunks of 2 query rows (5 queries: chunks 2, 2, 1).
            "attention (self, chunked)",
            Box::new(move |x| {
                let _budget = ops::with_attention_chunk_bytes(self_chunk);
                let q = x.narrow(2, 0, 6)?;
                let k = x.narrow(2, 6, 6)?;
                let v = x.narrow(2, 12, 6)?;
                ops::attention(&q, &k, &v, 2, 0.6)
            }),
            vec![2, 5, 18],
        ),
        (
            // 3 heads, constant keys: 5 queries in chunks of 2 rows.
            "attention (constant keys, chunked)",
            Box::new(move |x| {
                let _budget = ops::with_attention_chunk_bytes(cross_chunk);
                ops::attention(x, &ck2, &cv2, 3, 0.8)
            }),
            vec![2, 5, 6],
        ),
        (
            // Self-attention: q, k and v all from the input, 2 heads of 3.
            "attention (self)",
            Box::new(|x| {
                let q = x.narrow(2, 0, 6)?;
                let k = x.narrow(2, 6, 6)?;
                let v = x.narrow(2, 12, 6)?;
                ops::attention(&q, &k, &v, 2, 0.6)
            }),
            vec![2, 4, 18],
        ),
        (
            // Cross-attention over a constant context: no key/value gradients.
            "attention (constant keys)",
            Box::new(move |x| ops::attention(x, &ck, &cv, 3, 0.8)),
            vec![2, 4, 6],
        ),
        ("softmax", Box::new(ops::softmax_last_dim), vec![2, 3, 4]),
        (
            "layer_norm",
            Box::new(move |x| ops::layer_norm(x, &wl, &bl, 1e-5)),
            vec![2, 3, 4],
        ),
        (
            "group_norm",
            Box::new(move |x| ops::group_norm(x, 3, &w6, &b6, 1e-6)),
            vec![2, 6, 3, 2],
        ),
        ("gelu_erf", Box::new(ops::gelu_erf), vec![2, 3, 4]),
        ("silu", Box::new(ops::silu), vec![2, 3, 4]),
        ("geglu", Box::new(ops::geglu), vec![2, 3, 4]),
        (
            "add_constant",
            Box::new(move |x| ops::add_constant(x, &c)),
            vec![2, 3, 4],
        ),
        (
            "matmul_constant",
            Box::new(move |x| ops::matmul_constant(x, &r)),
            vec![2, 3, 4],
        ),
        (
            "linear",
            Box::new(move |x| ops::linear(x, &lin_w, Some(&lin_b))),
            vec![2, 3, 4],
        ),
        (
            "conv2d s1",
            Box::new(move |x| ops::conv2d(x, &k3, Some(&kb), 1, 1)),
            vec![2, 6, 5, 4],
        ),
        (
            "conv2d s2 even",
            Box::new(move |x| ops::conv2d(x, &k3b, Some(&kbb), 1, 2)),
            vec![2, 6, 6, 4],
        ),
        (
            "conv2d s2 odd/even",
            Box::new(move |x| ops::conv2d(x, &k3c, Some(&kbc), 1, 2)),
            vec![2, 6, 5, 6],
        ),
        (
            "conv2d s2 p0 odd/odd",
            Box::new({
                let (k, b) = (k3s[0].clone(), kbs[0].clone());
                move |x| ops::conv2d(x, &k, Some(&b), 0, 2)
            }),
            vec![2, 6, 7, 5],
        ),
        (
            // Padding k - 1: the output gradient needs no padding before the correlation.
            "conv2d s1 p2",
            Box::new({
                let (k, b) = (k3s[1].clone(), kbs[1].clone());
                move |x| ops::conv2d(x, &k, Some(&b), 2, 1)
            }),
            vec![2, 6, 4, 3],
        ),
        (
            // Padding beyond k - 1: the correlation's input is cropped instead.
            "conv2d s2 p3",
            Box::new({
                let (k, b) = (k3s[2].clone(), kbs[2].clone());
                move |x| ops::conv2d(x, &k, Some(&b), 3, 2)
            }),
            vec![2, 6, 5, 4],
        ),
        (
            "conv2d 1x1 s2 (no bias)",
            Box::new({
                let k = k1.clone();
                move |x| ops::conv2d(x, &k, None, 0, 2)
            }),
            vec![2, 6, 5, 4],
        ),
        (
            "conv2d 1x1 s1",
            Box::new(move |x| ops::conv2d(x, &k1, Some(&kb1), 0, 1)),
            vec![2, 6, 3, 4],
        ),
        (
            "conv2d s2 p1 on 3x3",
            Box::new({
                let (k, b) = (k3s[3].clone(), kbs[3].clone());
                move |x| ops::conv2d(x, &k, Some(&b), 1, 2)
            }),
            vec![1, 6, 3, 3],
        ),
        (
            "upsample_nearest_to",
            Box::new(|x| ops::upsample_nearest_to(x, 5, 3)),
            vec![2, 6, 3, 2],
        ),
    ]
}

#[test]
fn every_primitive_matches_the_host_kernels_in_value_and_gradient() {
    let ops32 = primitives(DType::F32);
    for (i, (name, f, shape)) in primitives(DType::F64).iter().enumerate() {
        let x = (randn(shape, 100 + i as u64) * 1.5).unwrap();
        let (host_v, host_g) = value_and_grad(&x, f, false);
        let (gen_v, gen_g) = value_and_grad(&x, f, true);
        let value_err = rel_diff(&host_v, &gen_v);
        let grad_err = rel_diff(&host_g, &gen_g);
        let fd = generic_fd_error(&x, f);
        // f32, the precision a GPU runs: absolute value difference.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let (h32, _) = value_and_grad(&x32, &ops32[i].1, false);
        let (g32, _) = value_and_grad(&x32, &ops32[i].1, true);
        let value32 = max_abs_diff_f64(
            &h32.to_dtype(DType::F64).unwrap(),
            &g32.to_dtype(DType::F64).unwrap(),
        );
        println!(
            "{name}: f32 value |diff| {value32:.1e}; f64 value rel {value_err:.1e}, gradient rel \
             {grad_err:.1e}, generic gradient vs FD {fd:.1e}"
        );
        assert!(value32 <= 1e-5, "{name}: f32 values differ by {value32}");
        assert!(
            value_err <= 1e-12,
            "{name}: f64 values differ by {value_err}"
        );
        assert!(grad_err <= 1e-10, "{name}: gradients differ by {grad_err}");
        assert!(
            fd <= 1e-7,
            "{name}: generic gradient vs finite differences {fd}"
        );
    }
}

/// Noise prediction and every captured attention map and block output of one forward pass with
/// `z` in a graph, and the gradient of `sum(U * eps) + sum over sites of sum(W_s * A_s)` w.r.t. `z`.
fn unet_pass(dtype: DType, z: &Tensor, ctx: &Tensor, generic: bool) -> (Vec<Tensor>, Tensor) {
    let _guard = generic.then(force_generic);
    let unet = unet_fixture("model", dtype);
    let var = Var::from_tensor(&z.to_dtype(dtype).unwrap()).unwrap();
    let mut rec = Recorder::all();
    let eps = unet
        .forward_with(
            var.as_tensor(),
            601.0,
            &ctx.to_dtype(dtype).unwrap(),
            &mut rec,
        )
        .unwrap();
    let mut loss = (&eps * randn(eps.dims(), 3000).to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let mut outputs = vec![eps.detach()];
    for (i, (_, a)) in rec.attention.iter().chain(rec.blocks.iter()).enumerate() {
        let w = randn(a.dims(), 1000 + i as u64).to_dtype(dtype).unwrap();
        loss = (loss + (a * w).unwrap().sum_all().unwrap()).unwrap();
        outputs.push(a.detach());
    }
    let g = loss
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    (outputs, g)
}

fn check_unet(z: Tensor, ctx: Tensor) {
    // f32: values of the noise prediction and of all 32 captured tensors.
    let (host32, _) = unet_pass(DType::F32, &z, &ctx, false);
    let (gen32, _) = unet_pass(DType::F32, &z, &ctx, true);
    assert_eq!(host32.len(), 1 + 16 + 16);
    // Each tensor's max |generic - host| relative to its own max |host| (block outputs reach ~10).
    let worst32 = host32
        .iter()
        .zip(&gen32)
        .map(|(a, b)| rel_diff(a, b))
        .fold(0f64, f64::max);
    // f64: gradients of the two paths, and the generic one against central differences.
    let (_, host_g) = unet_pass(DType::F64, &z, &ctx, false);
    let (_, gen_g) = unet_pass(DType::F64, &z, &ctx, true);
    let grad_err = rel_diff(&host_g, &gen_g);
    let loss = |zz: &Tensor| -> f64 {
        let _guard = force_generic();
        let unet = unet_fixture("model", DType::F64);
        let mut rec = Recorder::all();
        let eps = unet.forward_with(zz, 601.0, &ctx, &mut rec).unwrap();
        let mut l = (&eps * randn(eps.dims(), 3000)).unwrap().sum_all().unwrap();
        for (i, (_, a)) in rec.attention.iter().chain(rec.blocks.iter()).enumerate() {
            l = (l
                + (a * randn(a.dims(), 1000 + i as u64))
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
        }
        l.to_scalar::<f64>().unwrap()
    };
    let h = 1e-4;
    let mut fd_worst = 0f64;
    for seed in [7u64, 8] {
        let u = randn(z.dims(), seed);
        let norm = u
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        let u = (u / norm).unwrap();
        let analytic = (&gen_g * &u)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let fd = (loss(&(&z + (&u * h).unwrap()).unwrap())
            - loss(&(&z - (&u * h).unwrap()).unwrap()))
            / (2.0 * h);
        assert!(
            fd.abs() > 1e-8,
            "directional derivative {fd} too small to test"
        );
        fd_worst = fd_worst.max((analytic - fd).abs() / fd.abs());
    }
    println!(
        "tiny UNet {:?}: f32 max |generic - host| / max |host| {worst32:.1e} over eps + 32 captures; f64 \
         gradient rel {grad_err:.1e}; generic gradient vs FD {fd_worst:.1e}",
        z.dims()
    );
    assert!(worst32 <= 1e-5, "f32 values differ by {worst32}");
    assert!(grad_err <= 1e-10, "gradients differ by {grad_err}");
    assert!(
        fd_worst <= 1e-4,
        "generic gradient vs finite differences {fd_worst}"
    );
}

#[test]
fn the_tiny_unet_matches_the_host_kernels_on_the_generic_path() {
    check_unet(
        (randn(&[1, 4, 16, 16], 11) * 0.8).unwrap(),
        randn(&[1, 77, 32], 12),
    );
}

#[test]
fn the_tiny_unet_matches_on_the_generic_path_at_an_odd_latent_size() {
    // 12x10: the stride-2 downsamplers see one odd and one even side.
    check_unet(randn(&[1, 4, 12, 10], 13), randn(&[1, 77, 32], 14));
}

/// The backward of a UNet pass on the generic path (what CUDA runs) computes gradients for the
/// latent alone. candle's built-in backward adds an entry to the gradient store for every operand
/// of every op it differentiates, constants included: its `Conv2D` backward runs
/// `conv_transpose2d` for the input and inserts the kernel's gradient, matmul and broadcast ops
/// insert the weights' (or their views'). The store of a loss built from the latent alone
/// (squares of the outputs, no constant factors) therefore holds exactly one entry, the latent's,
/// only when no weight got a gradient buffer and no `Conv2D` backward (no `conv_transpose2d`) ran.
#[test]
fn a_generic_unet_backward_computes_no_weight_gradient() {
    for (z, label) in [
        (randn(&[1, 4, 16, 16], 21), "16x16"),
        (randn(&[1, 4, 12, 10], 22), "12x10"),
    ] {
        let _guard = force_generic();
        let unet = unet_fixture("model", DType::F32);
        let ctx = randn(&[1, 77, 32], 23).to_dtype(DType::F32).unwrap();
        let var = Var::from_tensor(&z.to_dtype(DType::F32).unwrap()).unwrap();
        let mut rec = Recorder::all();
        let eps = unet
            .forward_with(var.as_tensor(), 601.0, &ctx, &mut rec)
            .unwrap();
        let mut loss = eps.sqr().unwrap().sum_all().unwrap();
        for (_, a) in rec.attention.iter().chain(rec.blocks.iter()) {
            loss = (loss + a.sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let entries: Vec<_> = grads.get_ids().collect();
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{label}: no latent gradient"
        );
        assert_eq!(
            entries.len(),
            1,
            "{label}: the gradient store holds {} entries besides the latent's (constants' \
             gradients)",
            entries.len() - 1
        );
    }
}

/// A half-precision convolution on the generic path (CUDA's) accumulates in f32 and rounds its
/// output to f16, as PyTorch's f16 convolutions do: every output is within one f16 ulp of the
/// exact (f64) convolution of the same f16 values. The gradient passes back through the casts.
/// (On the CPU candle's f16 GEMM may itself widen, so this shows the path's precision, not that
/// CUDA's f16 cuDNN call would have lost it.)
#[test]
fn a_half_precision_convolution_on_the_generic_path_accumulates_in_f32() {
    let _guard = force_generic();
    // 3·3·64 products per output: enough terms for f16 accumulation to lose digits.
    let x = randn(&[1, 64, 6, 5], 31).to_dtype(DType::F16).unwrap();
    let k = (randn(&[8, 64, 3, 3], 32) * 0.2)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let b = randn(&[8], 33).to_dtype(DType::F16).unwrap();
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    for stride in [1, 2] {
        let got = ops::conv2d(&x, &k, Some(&b), 1, stride).unwrap();
        assert_eq!(got.dtype(), DType::F16);
        let exact = f64(&x).conv2d(&f64(&k), 1, stride, 1, 1).unwrap();
        let exact = exact
            .broadcast_add(&f64(&b).reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let got: Vec<f64> = f64(&got).flatten_all().unwrap().to_vec1().unwrap();
        let exact: Vec<f64> = exact.flatten_all().unwrap().to_vec1().unwrap();
        let worst_ulps = got
            .iter()
            .zip(&exact)
            .map(|(g, e)| {
                // One f16 ulp at |e| (normal range): 2^(floor(log2 |e|) - 10).
                let ulp = 2f64.powi(e.abs().max(6.2e-5).log2().floor() as i32 - 10);
                (g - e).abs() / ulp
            })
            .fold(0f64, f64::max);
        println!("f16 conv stride {stride}: worst error {worst_ulps:.2} f16 ulps");
        assert!(worst_ulps <= 1.0, "stride {stride}: {worst_ulps} ulps");
        // The gradient reaches an f16 input through the casts.
        let var = Var::from_tensor(&x).unwrap();
        let y = ops::conv2d(var.as_tensor(), &k, Some(&b), 1, stride).unwrap();
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(var.as_tensor()).expect("no input gradient");
        assert_eq!((g.dtype(), g.dims()), (DType::F16, x.dims()));
    }
}

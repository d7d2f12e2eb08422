//! Differentiable primitives for the UNet (SPEC §6, "Gradients").
//!
//! candle 0.11.1 records no backward for `candle_nn::ops::softmax_last_dim` and the fused
//! `candle_nn::ops::layer_norm`, `upsample_nearest2d`'s backward overwrites the incoming gradient
//! instead of accumulating it, and `conv2d`'s backward fails for stride 2 on one odd and one even
//! spatial size. Every function here has an exact backward, and each has a finite-difference test in
//! f64 (`tests/unet_ops.rs`).
//!
//! With constant weights (not in a graph) every primitive that takes a weight (conv2d, linear,
//! layer/group norm, adding or multiplying by a constant) and attention is a *precomputed* op on
//! every device: the value is computed outside the graph and handed back as one node whose
//! backward is the analytic input gradient. Weights get no gradient and no gradient buffers (candle's
//! built-in backward computes and allocates one for every operand, constant or not), which is what
//! makes the backward fast and small. The value and the backward come from:
//! - on the CPU, our kernels (`layers::host`, `layers::attention`) and candle's fused ones;
//! - elsewhere (CUDA; on the CPU with `PND_GENERIC_OPS=1`), candle tensor ops that exist on every
//!   device: the input gradient of a convolution is itself a forward convolution
//!   ([`conv2d_input_grad`], which cuDNN runs), attention's backward recomputes the probabilities
//!   ([`attention_backward_generic`]) and both are chunked over queries ([`attention_chunk_bytes`]).
//!
//! Weightless primitives (softmax, GELU/GEGLU, SiLU) and trainable weights off the CPU kernels
//! take a composition of candle ops whose built-in backward is exact (`*_composite`, also
//! FD-tested).
//!
//! [`ComputePath`] chooses, per forward call, whether the UNet builds a graph through these at all.

use candle_core::{DType, Result, Storage, Tensor, D};
use rayon::prelude::*;

/// Whether our CPU kernels may run for `xs`: f32 or f64 on the CPU, and the generic path not
/// forced by [`layers::kernels::force_generic`] or `PND_GENERIC_OPS=1`. Half precision takes the
/// generic path everywhere.
fn host(xs: &Tensor) -> bool {
    layers::kernels::host_kernels(xs.device()) && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// Which kernels a forward pass uses.
///
/// - `Differentiable`: only ops with an exact backward (this module's functions); required
///   whenever a gradient is taken.
/// - `Fused`: candle's fused softmax, layer norm, erf-GELU and nearest upsampling, which record no
///   (or a wrong) backward; for no-grad sampling only.
/// - `Auto` (the default): `Differentiable` for the whole pass when an input of the forward call is
///   in an autograd graph (a `Var`, or computed from one: [`Tensor::track_op`]); otherwise each
///   kernel takes the differentiable path when one of its own operands is in a graph (trainable
///   weights, [`crate::trainable`], or a value computed from them) and the fused one when not. So
///   training needs no setting: a model built from `Var`s gets weight gradients under `Auto`,
///   and sampling with constant weights keeps the fused kernels.
///
/// Both paths compute the same function; `tests/unet_paths.rs` checks they agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputePath {
    #[default]
    Auto,
    Differentiable,
    Fused,
}

impl ComputePath {
    /// Resolves `Auto` against the inputs of a forward call: `true` means the differentiable path
    /// for the whole pass (under `Auto`, `false` still leaves kernels fed by trainable weights on
    /// the differentiable path).
    pub fn differentiable(self, inputs: &[&Tensor]) -> bool {
        match self {
            ComputePath::Differentiable => true,
            ComputePath::Fused => false,
            ComputePath::Auto => inputs.iter().any(|t| t.track_op()),
        }
    }
}

/// Softmax over the last dimension.
///
/// When `xs` is in a graph, one node: the value is candle's fused kernel (f32 accumulation for half
/// precision, [`softmax_value`]) and the backward is the exact `y * (g - sum(g * y))` (one pass
/// per row on the CPU, candle ops elsewhere). No constant (such as a detached row max) gets a
/// gradient entry.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    let host = host(xs);
    let value = softmax_value(&xs.detach())?;
    precomputed(xs, value, "softmax", move |_, y, g| {
        if host {
            softmax_backward(y, g)
        } else {
            in_f32(y, |y| {
                let g = g.to_dtype(y.dtype())?;
                y * g.broadcast_sub(&(&g * y)?.sum_keepdim(D::Minus1)?)?
            })
        }
    })
}

/// `y * (g - sum(g * y))` over the last dim, one pass per row on f32/f64.
fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    fn go<T: candle_core::WithDType>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (y, g) = (y.contiguous()?, g.contiguous()?);
        let n = y.elem_count();
        let m = y.dim(D::Minus1)?;
        let (sy, ly) = y.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(cy), candle_core::Storage::Cpu(cg)) = (&*sy, &*sg) else {
            candle_core::bail!("softmax backward: tensors not on the CPU");
        };
        let vy = &cy.as_slice::<T>()?[ly.start_offset()..ly.start_offset() + n];
        let vg = &cg.as_slice::<T>()?[lg.start_offset()..lg.start_offset() + n];
        let mut out = vec![T::zero(); n];
        out.par_chunks_mut(m)
            .zip(vy.par_chunks(m).zip(vg.par_chunks(m)))
            .for_each(|(dst, (ry, rg))| {
                let dot: f64 = ry
                    .iter()
                    .zip(rg)
                    .map(|(a, b)| a.to_f64() * b.to_f64())
                    .sum();
                for (d, (a, b)) in dst.iter_mut().zip(ry.iter().zip(rg)) {
                    *d = T::from_f64(a.to_f64() * (b.to_f64() - dot));
                }
            });
        Tensor::from_vec(out, y.shape(), y.device())
    }
    match y.dtype() {
        DType::F32 => go::<f32>(y, g),
        DType::F64 => go::<f64>(y, g),
        _ => y * g.broadcast_sub(&(g * y)?.sum_keepdim(D::Minus1)?)?,
    }
}

/// Softmax as a composition: `exp(x - max) / sum(exp(x - max))`.
///
/// The max is detached: softmax is invariant to the shift, so its exact derivative through the max
/// is zero, and detaching keeps the (rounding-only) contribution of `max`'s backward out.
pub fn softmax_last_dim_composite(xs: &Tensor) -> Result<Tensor> {
    in_f32(xs, |xs| {
        let max = xs.max_keepdim(D::Minus1)?.detach();
        let num = xs.broadcast_sub(&max)?.exp()?;
        let den = num.sum_keepdim(D::Minus1)?;
        num.broadcast_div(&den)
    })
}

/// `f(xs)` computed in f32 when `xs` is f16 or bf16 and cast back (as PyTorch's half-precision
/// softmax and norms accumulate in f32); `f(xs)` otherwise. The casts pass gradients through.
fn in_f32(xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => f(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype()),
        _ => f(xs),
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dim of a `[rows, n]`-like tensor, and `1/sqrt(..)`.
fn normalize_last(xs: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let n = xs.dim(D::Minus1)? as f64;
    let mean = (xs.sum_keepdim(D::Minus1)? / n)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((centered.broadcast_mul(&rstd)?, rstd))
}

/// Layer norm over the last dimension with biased variance, as `torch.nn.LayerNorm`.
///
/// With constant `weight`/`bias` and `xs` in a graph, one node with the exact analytic input
/// gradient (on the CPU our kernel, elsewhere [`layer_norm_input_grad`]); trainable weights take
/// [`layer_norm_composite`].
///
/// # Shapes
/// - `xs`: `[..., n]`; `weight`, `bias`: `[n]`; result: like `xs`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !xs.track_op() || weight.track_op() || bias.track_op() {
        return layer_norm_composite(xs, weight, bias, eps);
    }
    let host = host(xs);
    let x = xs.detach();
    let value = if !host || x.dtype() == DType::F64 {
        layer_norm_composite(&x, weight, bias, eps)?
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)?
    };
    let w = weight.clone();
    precomputed(xs, value, "layer-norm", move |x, _, g| {
        if host {
            layers::host::layer_norm_input_grad(x, g, &w, eps)
        } else {
            layer_norm_input_grad(x, g, &w, eps)
        }
    })
}

/// dL/dx of [`layer_norm`] for a constant `weight`, from candle ops (every device):
/// `rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ weight`, in f32 for half precision.
pub fn layer_norm_input_grad(x: &Tensor, g: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    in_f32(x, |x| {
        let g = g.to_dtype(x.dtype())?;
        let gw = g.broadcast_mul(&weight.to_dtype(x.dtype())?)?;
        normalized_input_grad(x, &gw, eps)
    })
}

/// The input gradient of `(x - mean) / sqrt(var + eps)` over the last dim, given the gradient
/// `gw` of the normalized value.
fn normalized_input_grad(x: &Tensor, gw: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let (xhat, rstd) = normalize_last(x, eps)?;
    let mean_g = (gw.sum_keepdim(D::Minus1)? / n)?;
    let mean_gx = ((gw * &xhat)?.sum_keepdim(D::Minus1)? / n)?;
    gw.broadcast_sub(&mean_g)?
        .sub(&xhat.broadcast_mul(&mean_gx)?)?
        .broadcast_mul(&rstd)
}

/// Layer norm as a composition of differentiable ops.
pub fn layer_norm_composite(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let normed = in_f32(xs, |x| Ok(normalize_last(x, eps)?.0))?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Group norm with biased variance and per-channel affine, as `torch.nn.GroupNorm`.
///
/// With constant `weight`/`bias` and `xs` in a graph, one node with the exact analytic input
/// gradient (on the CPU our kernel, elsewhere [`group_norm_input_grad`]); trainable weights take
/// [`group_norm_composite`].
///
/// # Shapes
/// - `xs`: `[b, c, ...]` with `c % groups == 0`; `weight`, `bias`: `[c]`; result: like `xs`.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if weight.track_op() || bias.track_op() {
        return group_norm_composite(xs, groups, weight, bias, eps);
    }
    let host = host(xs);
    let value = |x: &Tensor| {
        if host {
            layers::host::group_norm(x, groups, weight, bias, eps, false)
        } else {
            group_norm_composite(x, groups, weight, bias, eps)
        }
    };
    if !xs.track_op() {
        return value(xs);
    }
    let value = value(&xs.detach())?;
    let w = weight.clone();
    precomputed(xs, value, "group-norm", move |x, _, g| {
        if host {
            layers::host::group_norm_input_grad(x, g, groups, &w, eps)
        } else {
            group_norm_input_grad(x, g, groups, &w, eps)
        }
    })
}

/// dL/dx of [`group_norm`] for a constant `weight`, from candle ops (every device), in f32 for
/// half precision.
///
/// # Shapes
/// - `x`, `g`: `[b, c, ...]`; `weight`: `[c]`; result: like `x`.
pub fn group_norm_input_grad(
    x: &Tensor,
    g: &Tensor,
    groups: usize,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let shape = affine_shape(&dims);
    let grouped = (b, groups, x.elem_count() / (b * groups));
    in_f32(x, |x| {
        let w = weight.to_dtype(x.dtype())?.reshape(shape.as_slice())?;
        let gw = g.to_dtype(x.dtype())?.broadcast_mul(&w)?.reshape(grouped)?;
        normalized_input_grad(&x.reshape(grouped)?, &gw, eps)?.reshape(dims.as_slice())
    })
}

/// `silu(group_norm(xs))`: one fused pass on the CPU when no gradient is taken (ResNet blocks,
/// the UNet's output norm); otherwise [`group_norm`] then [`silu`].
pub fn group_norm_silu(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if !xs.track_op() && !weight.track_op() && !bias.track_op() && host(xs) {
        return layers::host::group_norm(xs, groups, weight, bias, eps, true);
    }
    silu(&group_norm(xs, groups, weight, bias, eps)?)
}

fn affine_shape(dims: &[usize]) -> Vec<usize> {
    let mut shape = vec![1; dims.len()];
    shape[1] = dims[1];
    shape
}

/// Group norm as a composition of differentiable ops.
pub fn group_norm_composite(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let grouped = xs.reshape((b, groups, xs.elem_count() / (b * groups)))?;
    let normed = in_f32(&grouped, |x| Ok(normalize_last(x, eps)?.0))?;
    let shape = affine_shape(&dims);
    normed
        .reshape(dims.as_slice())?
        .broadcast_mul(&weight.reshape(shape.as_slice())?)?
        .broadcast_add(&bias.reshape(shape.as_slice())?)
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.functional.gelu`.
///
/// candle's `gelu_erf` backward uses a 6-digit constant for `1/sqrt(2 pi)`; here the backward is
/// `Phi(x) + x phi(x)` in full precision (on the CPU; elsewhere [`gelu_erf_composite`]).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() {
        return xs.gelu_erf();
    }
    if !host(xs) {
        return gelu_erf_composite(xs);
    }
    let value = xs.detach().gelu_erf()?;
    precomputed(xs, value, "gelu-erf", |x, _, g| {
        zip_map(&g.contiguous()?, &x.contiguous()?, |g, x| {
            g * gelu_and_grad(x).1
        })
    })
}

/// GELU as a composition (`erf`'s backward is exact).
pub fn gelu_erf_composite(xs: &Tensor) -> Result<Tensor> {
    let inner = (xs * std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
    ((inner + 1.0)? * 0.5)?.mul(xs)
}

/// `xs + c` (broadcast) for a constant `c`: the backward passes the gradient to `xs` only (on
/// every device).
pub fn add_constant(xs: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !xs.track_op() || c.track_op() {
        return xs.broadcast_add(c);
    }
    let value = xs.detach().broadcast_add(c)?;
    precomputed(xs, value, "add-constant", |_, _, g| Ok(g.clone()))
}

/// `xs @ rhs` (batched) for a constant `rhs`: the backward is `g @ rhs^T` to `xs` only (on every
/// device).
pub fn matmul_constant(xs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() || rhs.track_op() {
        return xs.matmul(rhs);
    }
    let value = xs.detach().matmul(rhs)?;
    let r = rhs.clone();
    precomputed(xs, value, "matmul-constant", move |_, _, g| {
        g.matmul(&r.t()?)
    })
}

/// `xs @ weight^T + bias` (torch `Linear`) over the last dim; with constant weights and `xs` in a
/// graph, one node whose backward is `g @ weight` to `xs` only (on every device).
///
/// # Shapes
/// - `xs`: `[..., in]`; `weight`: `[out, in]`; `bias`: `[out]`; result: `[..., out]`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_dim;
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = weight.dim(0)?;
    let compute = |x: &Tensor| -> Result<Tensor> {
        // One GEMM over all leading dims: [rows, in] x [in, out].
        let ys = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        let ys = match bias {
            // Outside autograd on the CPU: one parallel pass.
            Some(b) if host(&ys) && !ys.track_op() && !b.track_op() && b.dtype() == ys.dtype() => {
                layers::host::add(&ys, b)?
            }
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        ys.reshape(out_dims.as_slice())
    };
    let constant = !weight.track_op() && !bias.is_some_and(|b| b.track_op());
    if !xs.track_op() || !constant {
        return compute(xs);
    }
    let value = compute(&xs.detach())?;
    let w = weight.clone();
    let out = weight.dim(0)?;
    precomputed(xs, value, "linear", move |_, _, g| {
        g.reshape((rows, out))?.matmul(&w)?.reshape(dims.as_slice())
    })
}

/// Nearest-neighbour upsampling by 2 in both spatial dims, as
/// `F.interpolate(x, scale_factor=2.0, mode="nearest")`: each pixel is repeated into a 2×2 block
/// by a broadcast, whose backward sums the block's gradients.
///
/// # Shapes
/// - `xs`: `[b, c, h, w]`; result: `[b, c, 2h, 2w]`.
pub fn upsample_nearest2x(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Nearest-neighbour resize to `(out_h, out_w)`, as `F.interpolate(x, size=.., mode="nearest")`
/// (source index `floor(dst * in / out)`), by `index_select`, whose backward accumulates.
///
/// # Shapes
/// - `xs`: `[b, c, h, w]`; result: `[b, c, out_h, out_w]`.
pub fn upsample_nearest_to(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return upsample_nearest2x(xs);
    }
    let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
        // torch "nearest": src = floor(dst * (in / out)) computed in f32.
        let scale = n_in as f32 / n_out as f32;
        let idx: Vec<u32> = (0..n_out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(n_in - 1) as u32)
            .collect();
        Tensor::new(idx.as_slice(), xs.device())
    };
    xs.index_select(&index(h, out_h)?, 2)?
        .index_select(&index(w, out_w)?, 3)
}

/// diffusers `get_timestep_embedding` (diffusers 0.42.1 `models/embeddings.py`), computed in f32
/// as diffusers does and returned in `dtype`.
///
/// # Shapes
/// - result: `[batch, dim]` (the same timestep for every row).
pub fn timestep_embedding(
    timestep: f64,
    batch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let t = timestep as f32;
    let denom = half as f32 - downscale_freq_shift as f32;
    let mut sin = Vec::with_capacity(half);
    let mut cos = Vec::with_capacity(half);
    for i in 0..half {
        let exponent = (-(10000f64).ln()) as f32 * i as f32 / denom;
        let arg = t * exponent.exp();
        sin.push(arg.sin());
        cos.push(arg.cos());
    }
    let mut row = if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    };
    if dim % 2 == 1 {
        row.push(0.0);
    }
    Tensor::new(row.as_slice(), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .repeat((batch, 1))
}

/// 2-D convolution (groups 1, dilation 1) whose backward to the input is exact for every size and
/// stride, and fast on every device.
///
/// candle 0.11.1's `conv2d` backward applies the height's output padding to the width too (a shape
/// error when a stride-2 conv sees one odd and one even spatial size), runs a naive
/// `conv_transpose2d` (no cuDNN on CUDA), and always computes and allocates the kernel gradient.
/// Here, when the kernel and bias are constants (not in an autograd graph), the value is computed
/// outside the graph (on the CPU [`layers::host::conv2d`], parallel im2col + GEMM; elsewhere
/// candle's `conv2d`, cuDNN on CUDA) and the node's backward is the input gradient alone (on the
/// CPU [`layers::host::conv2d_input_grad`], GEMM + parallel col2im; elsewhere
/// [`conv2d_input_grad`], one forward convolution). A trainable kernel takes candle's `conv2d`,
/// whose backward gives the kernel gradient it needs.
///
/// In half precision on CUDA (and on the generic path, which stands for it on the CPU) the
/// convolution runs in f32 and rounds its output, as PyTorch's f16 convolutions accumulate in
/// f32: candle's cuDNN call computes f16 in f16.
///
/// # Shapes
/// - `xs`: `[b, c_in, h, w]`; `kernel`: `[c_out, c_in, k, k]`;
///   result: `[b, c_out, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]`.
pub fn conv2d(
    xs: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let widen = match xs.dtype() {
        // candle 0.11.1's CPU conv2d has no bf16 GEMM (its matmul widens bf16 to f32, its conv
        // does not): convolve in f32 and round the result to bf16, as a bf16 GPU convolution
        // accumulates in f32 and rounds its output.
        DType::BF16 => xs.device().is_cpu(),
        DType::F16 => f16_conv_in_f32(xs.device()),
        _ => false,
    };
    if widen {
        // The casts pass gradients through.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let bias = bias.map(f32).transpose()?;
        return conv2d(&f32(xs)?, &f32(kernel)?, bias.as_ref(), padding, stride)?
            .to_dtype(xs.dtype());
    }
    let constant = !kernel.track_op() && !bias.is_some_and(|b| b.track_op());
    if constant {
        let host = host(xs);
        let value = |x: &Tensor| -> Result<Tensor> {
            if host {
                return layers::host::conv2d(x, kernel, bias, padding, stride);
            }
            let ys = x.conv2d(kernel, padding, stride, 1, 1)?;
            match bias {
                Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
                None => Ok(ys),
            }
        };
        if !xs.track_op() {
            return value(xs);
        }
        let value = value(&xs.detach())?;
        let k = kernel.clone();
        return precomputed(xs, value, "conv2d", move |x, _, g| {
            if host {
                layers::host::conv2d_input_grad(g, &k, x.dims4()?, padding, stride)
            } else {
                conv2d_input_grad(g, &k, x.dims4()?, padding, stride)
            }
        });
    }
    let with_bias = |ys: Tensor| match bias {
        Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(ys),
    };
    if stride > 1 {
        let (_, _, h, w) = xs.dims4()?;
        let k = kernel.dim(2)?;
        if (h + 2 * padding - k) % stride != (w + 2 * padding - k) % stride {
            // candle's conv2d backward uses one output padding for both dims and fails here:
            // convolve with stride 1 and keep every stride-th row and column, whose backward
            // (an index_add) is exact on every device.
            let full = xs.conv2d(kernel, padding, 1, 1, 1)?;
            let (_, _, fh, fw) = full.dims4()?;
            let every = |n: usize| {
                let idx: Vec<u32> = (0..n as u32).step_by(stride).collect();
                Tensor::new(idx.as_slice(), xs.device())
            };
            let ys = full
                .index_select(&every(fh)?, 2)?
                .index_select(&every(fw)?, 3)?;
            return with_bias(ys);
        }
    }
    with_bias(xs.conv2d(kernel, padding, stride, 1, 1)?)
}

/// Whether an f16 convolution on `device` runs in f32 (see [`conv2d`]): on CUDA, and wherever the
/// generic path is forced (the CPU standing in for CUDA).
fn f16_conv_in_f32(device: &candle_core::Device) -> bool {
    device.is_cuda() || layers::kernels::generic_forced()
}

/// dL/dx of `conv2d(x, kernel, padding, stride)` (groups 1, dilation 1) as one forward
/// convolution, from candle ops that exist on every device (cuDNN runs it on CUDA):
/// the output gradient `g`, with `stride - 1` zeros inserted between its entries, padded by
/// `k - 1 - padding` before and by whatever makes the output `x_dims` after (rows of `x` the
/// strided convolution never read get 0), correlated with the kernel flipped in both spatial dims
/// and with its channel axes swapped. No transposed convolution, no kernel gradient.
///
/// # Shapes
/// - `g`: `[b, c_out, h_out, w_out]`; `kernel`: `[c_out, c_in, kh, kw]`;
///   `x_dims`: `(b, c_in, h, w)`; result: `[b, c_in, h, w]`.
pub fn conv2d_input_grad(
    g: &Tensor,
    kernel: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, h, w) = x_dims;
    let (_, _, kh, kw) = kernel.dims4()?;
    let reversed = |n: usize| {
        let idx: Vec<u32> = (0..n as u32).rev().collect();
        Tensor::new(idx.as_slice(), kernel.device())
    };
    let flipped = kernel
        .index_select(&reversed(kh)?, 2)?
        .index_select(&reversed(kw)?, 3)?
        .transpose(0, 1)?
        .contiguous()?;
    let mut g = g.clone();
    for (dim, k, n) in [(2, kh, h), (3, kw, w)] {
        g = dilate(&g, dim, stride)?;
        // x[u] = Σ_a gd[u + p - a] k[a]: left pad k - 1 - p; the right pad makes the length n.
        let before = k as isize - 1 - padding as isize;
        let after = n as isize + padding as isize - g.dim(dim)? as isize;
        g = pad_or_crop(&g, dim, before, after)?;
    }
    g.contiguous()?.conv2d(&flipped, 0, 1, 1, 1)
}

/// `t` with `stride - 1` zeros between consecutive entries along `dim` (length `(n-1)·s + 1`).
fn dilate(t: &Tensor, dim: usize, stride: usize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    if stride <= 1 || n == 0 {
        return Ok(t.clone());
    }
    let mut zeros = t.dims().to_vec();
    zeros.insert(dim + 1, stride - 1);
    let mut merged = t.dims().to_vec();
    merged[dim] = n * stride;
    let zeros = Tensor::zeros(zeros, t.dtype(), t.device())?;
    Tensor::cat(&[&t.unsqueeze(dim + 1)?, &zeros], dim + 1)?
        .reshape(merged)?
        .narrow(dim, 0, (n - 1) * stride + 1)
}

/// `t` with `before`/`after` zeros added along `dim` (entries dropped where negative).
fn pad_or_crop(t: &Tensor, dim: usize, before: isize, after: isize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    let (drop_front, drop_back) = ((-before).max(0) as usize, (-after).max(0) as usize);
    if drop_front + drop_back > n {
        candle_core::bail!("conv2d input gradient: cannot crop {drop_front}+{drop_back} of {n}");
    }
    let t = t.narrow(dim, drop_front, n - drop_front - drop_back)?;
    t.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)
}

type GradFn = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Hands `value` (computed from `xs` outside the graph) back as a node whose only argument is
/// `xs` and whose backward is `grad(xs, value, dL/dvalue)`. Constants the value depends on
/// (weights) get no gradient and, unlike candle's built-in backward, no gradient buffers either.
/// Works on every device ([`take_storage`]).
fn precomputed(
    xs: &Tensor,
    value: Tensor,
    name: &'static str,
    grad: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    xs.apply_op1(Precomputed {
        value: std::sync::Mutex::new(Some(value)),
        name,
        grad: Box::new(grad),
    })
}

struct Precomputed {
    value: std::sync::Mutex<Option<Tensor>>,
    name: &'static str,
    grad: GradFn,
}

impl candle_core::CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: value not on the CPU", self.name),
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: value not on the CUDA device", self.name),
        }
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::MetalStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name)? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: value not on the Metal device", self.name),
        }
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached, so the gradient holds no graph of its own (and no backward temporaries).
        (self.grad)(&arg.detach(), &res.detach(), grad).map(Some)
    }
}

/// The value a precomputed node hands back, as the op's output storage on the value's own device
/// (a copy: candle gives no way to move a tensor's storage out). The same code runs on every
/// device, so the CPU tests of the generic path exercise what CUDA runs.
fn take_storage(
    value: &std::sync::Mutex<Option<Tensor>>,
    name: &str,
) -> Result<(Storage, candle_core::Shape)> {
    let value = value
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name} value lock poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name} op applied twice")))?;
    // `try_clone` copies the whole buffer: give it one that starts at the value and is dense.
    let value = if value.is_contiguous() && value.layout().start_offset() == 0 {
        value
    } else {
        value.force_contiguous()?
    };
    let (storage, layout) = value.storage_and_layout();
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

/// Multi-head attention `softmax(q kᵀ · scale) v` over `[b, n, heads·d]` projections, as
/// diffusers' `AttnProcessor` computes it; result `[b, n, heads·d]`.
///
/// In a graph it is one node whose backward recomputes the probabilities, so the graph keeps q, k
/// and v, not the scores and probabilities of every head (at 512×512 the SD 1.5 UNet's
/// 4096-token self-attentions would keep 512 MiB of probabilities per image per layer, and
/// candle's softmax composition four such tensors). The key and value gradients are computed only
/// when k or v is in the graph.
/// - On the CPU (f32/f64) one task per (batch, head) ([`layers::attention`],
///   [`layers::attention::attention_backward`]).
/// - Elsewhere candle's ops, over chunks of queries whose score matrix stays within
///   [`attention_chunk_bytes`] ([`attention_chunked`], [`attention_backward_generic`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let host = host(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    let chunk_bytes = attention_chunk_bytes();
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let value = if host {
        layers::attention::attention(&qd, &kd, &vd, heads, scale, None)?
    } else {
        attention_chunked(&qd, &kd, &vd, heads, scale, chunk_bytes)?
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(value);
    }
    q.apply_op3(
        k,
        v,
        AttentionNode {
            value: std::sync::Mutex::new(Some(value)),
            heads,
            scale,
            host,
            chunk_bytes,
        },
    )
}

/// Bytes one chunk's score matrix (`batch · heads · rows · keys` entries, at least 4 bytes each: the
/// softmax runs in f32) may take on the generic path: 128 MiB. At 512×512 the SD 1.5 UNet's
/// 4096-token self-attention (8 heads) has 512 MiB of scores per image, so one image runs in 4
/// chunks of 1024 query rows, each GEMM still large enough to fill a GPU, and the backward's
/// three score-sized temporaries (probabilities, their gradient, the scores' gradient) stay under
/// 512 MiB whatever the batch. `PND_ATTENTION_CHUNK_BYTES` overrides it (read once);
/// [`with_attention_chunk_bytes`] per thread, for tests.
pub const ATTENTION_CHUNK_BYTES: usize = 128 << 20;

thread_local! {
    static CHUNK_BYTES: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The score-matrix budget of one attention chunk on the generic path (see
/// [`ATTENTION_CHUNK_BYTES`]).
pub fn attention_chunk_bytes() -> usize {
    static ENV: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    CHUNK_BYTES.with(std::cell::Cell::get).unwrap_or_else(|| {
        *ENV.get_or_init(|| {
            std::env::var("PND_ATTENTION_CHUNK_BYTES")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&b| b > 0)
                .unwrap_or(ATTENTION_CHUNK_BYTES)
        })
    })
}

/// Sets this thread's attention chunk budget until the guard drops (tests: chunking at toy sizes).
pub fn with_attention_chunk_bytes(bytes: usize) -> ChunkBytesGuard {
    let previous = CHUNK_BYTES.with(|c| c.replace(Some(bytes.max(1))));
    ChunkBytesGuard { previous }
}

/// Restores the previous budget on drop ([`with_attention_chunk_bytes`]).
#[must_use = "the budget holds only while the guard lives"]
pub struct ChunkBytesGuard {
    previous: Option<usize>,
}

impl Drop for ChunkBytesGuard {
    fn drop(&mut self) {
        CHUNK_BYTES.with(|c| c.set(self.previous));
    }
}

/// Query rows per chunk so that `batch_heads · rows · keys` scores fit in `budget` bytes (at
/// least one row).
fn chunk_rows(batch_heads: usize, keys: usize, dtype: DType, budget: usize) -> usize {
    let row = batch_heads * keys * dtype.size_in_bytes().max(4);
    (budget / row.max(1)).max(1)
}

/// `[b, n, heads·d]` -> `[b, heads, n, d]`, contiguous.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, width) = t.dims3()?;
    t.reshape((b, n, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, n, d]` -> `[b, n, heads·d]`.
fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (b, _, n, _) = t.dims4()?;
    t.transpose(1, 2)?.reshape((b, n, ()))
}

/// The query ranges of the chunks: `rows` at a time over `n`.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(rows.max(1))
        .map(move |s| (s, rows.min(n - s)))
}

/// candle's fused softmax over the last dim (no graph), accumulating half precision in f32: its
/// CUDA kernel does so itself, its CPU kernel would sum in f16, so there the input is widened.
fn softmax_value(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 if xs.device().is_cpu() => {
            candle_nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())
        }
        _ => candle_nn::ops::softmax_last_dim(xs),
    }
}

/// [`attention`]'s value (no graph) from candle ops, over chunks of queries whose score matrix
/// fits in `chunk_bytes`: `softmax(q·scale kᵀ) v` per chunk ([`softmax_value`]).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let q = split_heads(&(q * scale)?, heads)?;
    let kt = split_heads(k, heads)?.t()?;
    let v = split_heads(v, heads)?;
    let rows = chunk_rows(b * heads, m, q.dtype(), chunk_bytes);
    let outs = chunks(n, rows)
        .map(|(start, len)| {
            let qc = q.narrow(2, start, len)?.contiguous()?;
            softmax_value(&qc.matmul(&kt)?)?.matmul(&v)
        })
        .collect::<Result<Vec<_>>>()?;
    let out = if outs.len() == 1 {
        outs.into_iter().next().expect("one chunk")
    } else {
        Tensor::cat(&outs, 2)?
    };
    merge_heads(&out)
}

/// The gradients of `sum(g ⊙ attention(q, k, v))` from candle ops (every device), recomputing the
/// probabilities chunk by chunk ([`attention_chunked`]'s chunks): per chunk `P = softmax(q·s kᵀ)`,
/// `dV += Pᵀ g`, `dS = P ⊙ (g vᵀ − rowsum(g vᵀ ⊙ P))`, `dq = s · dS k`, `dK += dSᵀ (q·s)`. Half
/// precision is computed in f32. Returns `dq` and, when `key_grads`, `(dk, dv)`.
#[allow(clippy::too_many_arguments)]
///
/// # Shapes
/// - `q`, `g`: `[b, n, heads·d]`; `k`, `v`: `[b, m, heads·d]`; results like their operands.
pub fn attention_backward_generic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    heads: usize,
    scale: f64,
    key_grads: bool,
    chunk_bytes: usize,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dtype = q.dtype();
    let up = |t: &Tensor| match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    let (b, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let qs = split_heads(&(up(q)? * scale)?, heads)?;
    let ks = split_heads(&up(k)?, heads)?;
    let vs = split_heads(&up(v)?, heads)?;
    let gs = split_heads(&up(g)?, heads)?;
    let (kt, vt) = (ks.t()?, vs.t()?);
    let rows = chunk_rows(b * heads, m, qs.dtype(), chunk_bytes);
    let mut dq = Vec::new();
    let mut kv: Option<(Tensor, Tensor)> = None;
    for (start, len) in chunks(n, rows) {
        let qc = qs.narrow(2, start, len)?.contiguous()?;
        let gc = gs.narrow(2, start, len)?.contiguous()?;
        let p = candle_nn::ops::softmax_last_dim(&qc.matmul(&kt)?)?;
        let dp = gc.matmul(&vt)?;
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        drop(dp);
        dq.push((ds.matmul(&ks)? * scale)?);
        if key_grads {
            let dk = ds.t()?.matmul(&qc)?;
            let dv = p.t()?.matmul(&gc)?;
            kv = Some(match kv {
                Some((ak, av)) => ((ak + dk)?, (av + dv)?),
                None => (dk, dv),
            });
        }
    }
    let dq = if dq.len() == 1 {
        dq.pop().expect("one chunk")
    } else {
        Tensor::cat(&dq, 2)?
    };
    let dq = merge_heads(&dq)?.to_dtype(dtype)?;
    let kv = kv
        .map(|(dk, dv)| -> Result<(Tensor, Tensor)> {
            Ok((
                merge_heads(&dk)?.to_dtype(k.dtype())?,
                merge_heads(&dv)?.to_dtype(v.dtype())?,
            ))
        })
        .transpose()?;
    Ok((dq, kv))
}

/// [`attention`] composed of candle ops, every head's scores and probabilities at once in the
/// graph: the reference the node's backward is tested against.
pub fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    // Scaling q ([n, d]) rather than the scores ([n, m]) saves a pass over the larger tensor.
    let q = split_heads(&(q * scale)?, heads)?;
    let scores = q.matmul(&split_heads(k, heads)?.t()?)?;
    let probs = softmax_last_dim_composite(&scores)?;
    let out = probs.matmul(&split_heads(v, heads)?)?;
    out.transpose(1, 2)?.reshape((b, n, ()))
}

struct AttentionNode {
    value: std::sync::Mutex<Option<Tensor>>,
    heads: usize,
    scale: f64,
    /// The backward runs our CPU kernel (else candle's ops), as the forward did.
    host: bool,
    chunk_bytes: usize,
}

impl candle_core::CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name())? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("attention: value not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name())? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("attention: value not on the CUDA device"),
        }
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::MetalStorage, candle_core::Shape)> {
        match take_storage(&self.value, self.name())? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("attention: value not on the Metal device"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let key_grads = k.track_op() || v.track_op();
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        let grad = grad.contiguous()?;
        let (dq, kv) = if self.host {
            layers::attention::attention_backward(
                &qd, &kd, &vd, &grad, self.heads, self.scale, key_grads,
            )?
        } else {
            attention_backward_generic(
                &qd,
                &kd,
                &vd,
                &grad,
                self.heads,
                self.scale,
                key_grads,
                self.chunk_bytes,
            )?
        };
        let (dk, dv) = match kv {
            Some((dk, dv)) => (k.track_op().then_some(dk), v.track_op().then_some(dv)),
            None => (None, None),
        };
        Ok((q.track_op().then_some(dq), dk, dv))
    }
}

/// Elementwise `f(a, b)` over two same-shaped CPU tensors in one pass (f32 or f64; computed in
/// f64). Backward kernels use it to avoid a chain of full-size temporaries.
fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64 + Sync) -> Result<Tensor> {
    fn go<T: candle_core::WithDType>(
        a: &Tensor,
        b: &Tensor,
        f: impl Fn(f64, f64) -> f64 + Sync,
    ) -> Result<Tensor> {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let n = a.elem_count();
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (candle_core::Storage::Cpu(ca), candle_core::Storage::Cpu(cb)) = (&*sa, &*sb) else {
            candle_core::bail!("zip_map: tensors not on the CPU");
        };
        let va = &ca.as_slice::<T>()?[la.start_offset()..la.start_offset() + n];
        let vb = &cb.as_slice::<T>()?[lb.start_offset()..lb.start_offset() + n];
        let out: Vec<T> = va
            .par_iter()
            .zip(vb)
            .map(|(x, y)| T::from_f64(f(x.to_f64(), y.to_f64())))
            .collect();
        Tensor::from_vec(out, a.shape(), a.device())
    }
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "zip_map: {:?} {:?} vs {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    match a.dtype() {
        DType::F32 => go::<f32>(a, b, f),
        DType::F64 => go::<f64>(a, b, f),
        dt => candle_core::bail!("zip_map: unsupported dtype {dt:?}"),
    }
}

/// SiLU `x * sigmoid(x)`; backward `g * s * (1 + x (1 - s))` in one pass on the CPU.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() || !host(xs) {
        return xs.silu();
    }
    let value = xs.detach().silu()?;
    precomputed(xs, value, "silu", |x, _, g| {
        zip_map(&g.contiguous()?, &x.contiguous()?, |g, x| {
            let s = 1.0 / (1.0 + (-x).exp());
            g * s * (1.0 + x * (1.0 - s))
        })
    })
}

/// GEGLU of a projection `p = [hidden, gate]` (last dim `2n`): `hidden * gelu_erf(gate)`, as
/// diffusers' `GEGLU.forward`; on the CPU one op whose backward builds `dL/dp` directly.
///
/// # Shapes
/// - `proj`: `[..., 2n]`; result: `[..., n]`.
pub fn geglu(proj: &Tensor) -> Result<Tensor> {
    if host(proj) {
        if !proj.track_op() {
            return layers::host::geglu(proj);
        }
        let value = layers::host::geglu(&proj.detach())?;
        return precomputed(proj, value, "geglu", |p, _, g| {
            layers::host::geglu_input_grad(p, g)
        });
    }
    let n = proj.dim(D::Minus1)? / 2;
    let (hidden, gate) = (proj.narrow(D::Minus1, 0, n)?, proj.narrow(D::Minus1, n, n)?);
    hidden * gelu_erf(&gate)?
}

/// `(gelu_erf(x), d gelu_erf / dx)` in f64: `(x Phi(x), Phi(x) + x phi(x))`.
fn gelu_and_grad(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp()
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (x * cdf, cdf + x * pdf)
}

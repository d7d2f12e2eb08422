//! Differentiable primitives for the UNet (SPEC §6, "Gradients").
//!
//! candle 0.11.1 records no backward for `candle_nn::ops::softmax_last_dim` and the fused
//! `candle_nn::ops::layer_norm`, `upsample_nearest2d`'s backward overwrites the incoming gradient
//! instead of accumulating it, and `conv2d`'s backward fails for stride 2 on one odd and one even
//! spatial size. Every function here has an exact backward, and each has a finite-difference test in
//! f64 (`tests/unet_ops.rs`).
//!
//! Two implementations per primitive:
//! - on the CPU, with constant weights (not in a graph), a *precomputed* op: the value comes from
//!   candle's fast (fused) kernels outside the graph and is handed back as one node whose backward
//!   is the analytic input gradient (softmax, layer/group norm, GELU/GEGLU, SiLU, linear, conv2d,
//!   adding or multiplying by a constant). Weights get no gradient and no zero-filled gradient
//!   buffers, which is what makes the backward fast and small;
//! - elsewhere (other devices, trainable weights), a composition of candle ops whose built-in
//!   backward is exact (`*_composite`, also FD-tested).
//!
//! [`ComputePath`] chooses, per forward call, whether the UNet builds a graph through these at all.

use candle_core::{DType, Result, Tensor, D};
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
/// On the CPU, when `xs` is in a graph, the value is candle's fused kernel and the backward is the
/// exact `y * (g - sum(g * y))`; elsewhere [`softmax_last_dim_composite`].
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    if !host(xs) {
        return softmax_last_dim_composite(xs);
    }
    let value = candle_nn::ops::softmax_last_dim(&xs.detach())?;
    precomputed(xs, value, "softmax", |_, y, g| softmax_backward(y, g))
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
/// On the CPU with constant `weight`/`bias` and `xs` in a graph, one op with the exact analytic
/// backward; otherwise [`layer_norm_composite`].
///
/// # Shapes
/// - `xs`: `[..., n]`; `weight`, `bias`: `[n]`; result: like `xs`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !xs.track_op() || weight.track_op() || bias.track_op() || !host(xs) {
        return layer_norm_composite(xs, weight, bias, eps);
    }
    let x = xs.detach();
    let value = if x.dtype() == DType::F64 {
        layer_norm_composite(&x, weight, bias, eps)?
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)?
    };
    let w = weight.clone();
    precomputed(xs, value, "layer-norm", move |x, _, g| {
        layers::host::layer_norm_input_grad(x, g, &w, eps)
    })
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
/// On the CPU with constant `weight`/`bias` and `xs` in a graph, one op with the exact analytic
/// backward; otherwise [`group_norm_composite`].
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
    if weight.track_op() || bias.track_op() || !host(xs) {
        return group_norm_composite(xs, groups, weight, bias, eps);
    }
    if !xs.track_op() {
        return layers::host::group_norm(xs, groups, weight, bias, eps, false);
    }
    let value = layers::host::group_norm(&xs.detach(), groups, weight, bias, eps, false)?;
    let w = weight.clone();
    precomputed(xs, value, "group-norm", move |x, _, g| {
        layers::host::group_norm_input_grad(x, g, groups, &w, eps)
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

/// `xs + c` (broadcast) for a constant `c`: the backward passes the gradient to `xs` only.
pub fn add_constant(xs: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !xs.track_op() || c.track_op() || !host(xs) {
        return xs.broadcast_add(c);
    }
    let value = xs.detach().broadcast_add(c)?;
    precomputed(xs, value, "add-constant", |_, _, g| Ok(g.clone()))
}

/// `xs @ rhs` (batched) for a constant `rhs`: the backward is `g @ rhs^T` to `xs` only.
pub fn matmul_constant(xs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if !xs.track_op() || rhs.track_op() || !host(xs) {
        return xs.matmul(rhs);
    }
    let value = xs.detach().matmul(rhs)?;
    let r = rhs.clone();
    precomputed(xs, value, "matmul-constant", move |_, _, g| {
        g.matmul(&r.t()?)
    })
}

/// `xs @ weight^T + bias` (torch `Linear`) over the last dim for constant weights.
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
    if !xs.track_op() || !constant || !host(xs) {
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
/// stride, and fast on CPU.
///
/// candle 0.11.1's `conv2d` backward applies the height's output padding to the width too (a shape
/// error when a stride-2 conv sees one odd and one even spatial size), runs a naive
/// `conv_transpose2d`, and always computes the kernel gradient. Here, when the kernel is a constant
/// (not in an autograd graph) and the tensors live on the CPU, the forward is
/// [`layers::host::conv2d`] (parallel im2col + GEMM) and the backward is the input gradient alone
/// ([`layers::host::conv2d_input_grad`]: GEMM + parallel col2im). Otherwise this is candle's `conv2d`
/// (whose kernel gradient a trainable kernel needs).
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
    if xs.dtype() == DType::BF16 && xs.device().is_cpu() {
        // candle 0.11.1's CPU conv2d has no bf16 GEMM (its matmul widens bf16 to f32, its conv
        // does not): convolve in f32 and round the result to bf16, as a bf16 GPU convolution
        // accumulates in f32 and rounds its output. The casts pass gradients through.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let bias = bias.map(f32).transpose()?;
        return conv2d(&f32(xs)?, &f32(kernel)?, bias.as_ref(), padding, stride)?
            .to_dtype(DType::BF16);
    }
    let constant = !kernel.track_op() && !bias.is_some_and(|b| b.track_op());
    let fast = constant && host(xs);
    let compute = |x: &Tensor| -> Result<Tensor> {
        if fast {
            return layers::host::conv2d(x, kernel, bias, padding, stride);
        }
        let ys = x.conv2d(kernel, padding, stride, 1, 1)?;
        match bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
    };
    if xs.track_op() && (!constant || !host(xs)) && stride > 1 {
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
            return match bias {
                Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
                None => Ok(ys),
            };
        }
    }
    if !xs.track_op() || !fast {
        return compute(xs);
    }
    let value = compute(&xs.detach())?;
    let k = kernel.clone();
    precomputed(xs, value, "conv2d", move |x, _, g| {
        layers::host::conv2d_input_grad(g, &k, x.dims4()?, padding, stride)
    })
}

type GradFn = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Hands `value` (computed from `xs` outside the graph, by fast kernels) back as a node whose
/// only argument is `xs` and whose backward is `grad(xs, value, dL/dvalue)`. Constants the value
/// depends on (weights) get no gradient and, unlike candle's built-in backward, no zero-filled
/// gradient buffers either.
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
        _storage: &candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        take_value(&self.value, self.name)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.grad)(arg, res, grad).map(Some)
    }
}

/// The value a precomputed node hands back, as the op's output storage (a copy: candle gives no
/// way to move a tensor's storage out).
fn take_value(
    value: &std::sync::Mutex<Option<Tensor>>,
    name: &str,
) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let value = value
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name} value lock poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name} op applied twice")))?;
    let value = value.contiguous()?;
    let (storage, layout) = value.storage_and_layout();
    let cpu = match &*storage {
        candle_core::Storage::Cpu(s) => s,
        _ => candle_core::bail!("{name}: value not on the CPU"),
    };
    let n = layout.shape().elem_count();
    let start = layout.start_offset();
    let out = match cpu {
        candle_core::CpuStorage::F32(v) => {
            candle_core::CpuStorage::F32(v[start..start + n].to_vec())
        }
        candle_core::CpuStorage::F64(v) => {
            candle_core::CpuStorage::F64(v[start..start + n].to_vec())
        }
        candle_core::CpuStorage::F16(v) => {
            candle_core::CpuStorage::F16(v[start..start + n].to_vec())
        }
        candle_core::CpuStorage::BF16(v) => {
            candle_core::CpuStorage::BF16(v[start..start + n].to_vec())
        }
        _ => candle_core::bail!("{name}: unsupported dtype {:?}", value.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

/// Multi-head attention `softmax(q kᵀ · scale) v` over `[b, n, heads·d]` projections, as
/// diffusers' `AttnProcessor` computes it; result `[b, n, heads·d]`.
///
/// On the CPU (f32/f64) one task per (batch, head) ([`layers::attention`]); in a graph it is one
/// node whose backward recomputes the probabilities
/// ([`layers::attention::attention_backward`]), so the graph keeps q, k and v, not the scores and
/// probabilities of every head (at 256×256 the SD 1.5 UNet's five 1024-token self-attentions kept
/// 64 MiB each). The key and value gradients are computed only when k or v is in the graph.
/// Elsewhere candle's ops: heads split, `q·scale` times `kᵀ`, [`softmax_last_dim`], times `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if !host(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return attention_composite(q, k, v, heads, scale);
    }
    let value =
        layers::attention::attention(&q.detach(), &k.detach(), &v.detach(), heads, scale, None)?;
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
        },
    )
}

/// [`attention`] composed of candle ops (the device-generic path).
pub fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, width) = t.dims3()?;
        t.reshape((b, n, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (b, n, _) = q.dims3()?;
    // Scaling q ([n, d]) rather than the scores ([n, m]) saves a pass over the larger tensor.
    let q = split(&(q * scale)?)?;
    let scores = matmul_constant(&q, &split(k)?.t()?)?;
    let probs = softmax_last_dim(&scores)?;
    let out = matmul_constant(&probs, &split(v)?)?;
    out.transpose(1, 2)?.reshape((b, n, ()))
}

struct AttentionNode {
    value: std::sync::Mutex<Option<Tensor>>,
    heads: usize,
    scale: f64,
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
        take_value(&self.value, self.name())
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
        let (dq, kv) = layers::attention::attention_backward(
            q,
            k,
            v,
            &grad.contiguous()?,
            self.heads,
            self.scale,
            key_grads,
        )?;
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

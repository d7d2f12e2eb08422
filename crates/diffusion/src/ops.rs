//! Differentiable primitives for the UNet (SPEC §6, "Gradients").
//!
//! candle 0.11.1 records no backward for `candle_nn::ops::softmax_last_dim` and the fused
//! `candle_nn::ops::layer_norm`, and `upsample_nearest2d`'s backward overwrites the incoming gradient
//! instead of accumulating it. Everything here is built from ops whose backward candle implements
//! exactly (add/mul/div, sum, exp, sqrt, erf, broadcast, reshape, matmul, conv2d), and each one has a
//! finite-difference test in f64 (`tests/unet_ops.rs`).
//!
//! [`ComputePath`] chooses, per forward call, between these compositions and candle's fused kernels.

use candle_core::{DType, Result, Tensor, D};

/// Which kernels a forward pass uses.
///
/// - `Differentiable`: only ops with an exact backward in candle (this module's compositions);
///   required whenever a gradient is taken.
/// - `Fused`: candle's fused softmax, layer norm, erf-GELU and nearest upsampling, which record no
///   (or a wrong) backward; for no-grad sampling only.
/// - `Auto` (the default): `Differentiable` when an input of the forward call is in an autograd graph
///   (a `Var`, or computed from one: [`Tensor::track_op`]), else `Fused`.
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
    /// Resolves `Auto` against the inputs of a forward call: `true` means the differentiable path.
    pub fn differentiable(self, inputs: &[&Tensor]) -> bool {
        match self {
            ComputePath::Differentiable => true,
            ComputePath::Fused => false,
            ComputePath::Auto => inputs.iter().any(|t| t.track_op()),
        }
    }
}

/// Softmax over the last dimension: `exp(x - max) / sum(exp(x - max))`.
///
/// The max is detached: softmax is invariant to the shift, so its exact derivative through the max
/// is zero, and detaching keeps the (rounding-only) contribution of `max`'s backward out.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Layer norm over the last dimension with biased variance, as `torch.nn.LayerNorm`.
///
/// # Shapes
/// - `xs`: `[..., n]`; `weight`, `bias`: `[n]`; result: like `xs`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = xs.dim(D::Minus1)? as f64;
    let mean = (xs.sum_keepdim(D::Minus1)? / n)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Group norm with biased variance and per-channel affine, as `torch.nn.GroupNorm`.
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
    let dims = xs.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let per_group = xs.elem_count() / (b * groups);
    let grouped = xs.reshape((b, groups, per_group))?;
    let mean = (grouped.sum_keepdim(2)? / per_group as f64)?;
    let centered = grouped.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(2)? / per_group as f64)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut affine_shape = vec![1; dims.len()];
    affine_shape[1] = c;
    normed
        .broadcast_mul(&weight.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&bias.reshape(affine_shape.as_slice())?)
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.functional.gelu`.
///
/// Written out because candle's `gelu_erf` backward uses a 6-digit constant for `1/sqrt(2 pi)`;
/// `erf`'s backward is exact.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    let inner = (xs * std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
    ((inner + 1.0)? * 0.5)?.mul(xs)
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

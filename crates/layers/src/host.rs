//! CPU kernels for f32/f64 tensors, parallel over both cores (issue 13): 2-D convolution as a
//! parallel im2col straight from NCHW plus one GEMM per image (and its input gradient as a GEMM
//! plus a parallel col2im), and GroupNorm with an optional fused SiLU in one pass.
//!
//! candle 0.11.1's CPU `conv2d` transposes the input to NHWC and re-flattens the whole kernel on
//! every call, both on one thread, gathers its im2col tiles element by element and scatters the
//! result back to NCHW; at the UNet's 32×32 and smaller latents it also runs a single tile, so a
//! single thread does all of that. Here the kernel `[c_out, c_in, kh, kw]` already is the GEMM's
//! `[c_out, c_in·kh·kw]` left operand (no copy), im2col writes rows of the column matrix in the
//! `(c_in, kh, kw)` order with whole-row copies for stride 1, and the GEMM's `[c_out, pixels]`
//! result is already NCHW.
//!
//! The callers decide when these run (CPU, f32/f64, [`crate::kernels::host_kernels`]); the
//! device-generic path is candle's own ops. Tests compare the two (`tests/host.rs`, and the
//! diffusion crate's op-by-op and whole-UNet checks).

use candle_core::{bail, DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::Add as _;

/// At most this many elements in one im2col (or col2im) buffer: larger images are done in bands
/// of output rows (the VAE's 512×512 layers would need gigabytes at once).
const MAX_COLUMN_ELEMS: usize = 1 << 23;

/// Calls `f` with the values of a CPU tensor of element type `T` (made contiguous first).
fn with_values<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("host kernel: tensor not on the CPU");
    };
    let n = t.elem_count();
    let values = &cpu.as_slice::<T>()?[layout.start_offset()..layout.start_offset() + n];
    f(values)
}

fn check_dtype(op: &str, tensors: &[&Tensor]) -> Result<DType> {
    let dtype = tensors[0].dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        bail!("{op}: host kernel runs f32 or f64, not {dtype:?}");
    }
    for t in tensors {
        if t.dtype() != dtype || !t.device().is_cpu() {
            bail!("{op}: every tensor must be {dtype:?} on the CPU");
        }
    }
    Ok(dtype)
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
    /// At most this many elements in one column matrix ([`MAX_COLUMN_ELEMS`]; tests lower it).
    max_column: usize,
}

impl Geometry {
    fn new(
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (_, c_in, h, w) = input;
        let (_, k_in, kh, kw) = kernel;
        if k_in != c_in {
            bail!("conv2d: input has {c_in} channels, kernel expects {k_in}");
        }
        if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            bail!("conv2d: kernel {kh}x{kw} (stride {stride}, padding {padding}) does not fit {h}x{w}");
        }
        Ok(Self {
            c_in,
            h,
            w,
            kh,
            kw,
            stride,
            padding,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
            max_column: MAX_COLUMN_ELEMS,
        })
    }

    fn k_size(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Bands of output rows `[start, end)` whose column matrix fits `max_column`.
    fn bands(&self) -> Vec<(usize, usize)> {
        let rows = (self.max_column / (self.k_size() * self.ow).max(1)).clamp(1, self.oh);
        (0..self.oh)
            .step_by(rows)
            .map(|s| (s, (s + rows).min(self.oh)))
            .collect()
    }

    /// Input column `x = ox·stride + j − padding` for output column `ox`, when inside the image.
    fn source_x(&self, ox: usize, j: usize) -> Option<usize> {
        (ox * self.stride + j)
            .checked_sub(self.padding)
            .filter(|&x| x < self.w)
    }

    fn source_y(&self, oy: usize, i: usize) -> Option<usize> {
        (oy * self.stride + i)
            .checked_sub(self.padding)
            .filter(|&y| y < self.h)
    }

    /// For stride 1: the output columns `[lo, hi)` whose source column for kernel offset `j` is
    /// inside the image.
    fn valid_columns(&self, j: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(j).min(self.ow);
        let hi = (self.w + self.padding).saturating_sub(j).min(self.ow);
        (lo, hi.max(lo))
    }
}

/// The column matrix `[c_in·kh·kw, rows·ow]` of output rows `band` of one image `x` (`[c_in, h, w]`).
fn im2col<T: WithDType>(x: &[T], g: &Geometry, band: (usize, usize), col: &mut [T]) {
    let tile = (band.1 - band.0) * g.ow;
    col.par_chunks_mut(g.kh * g.kw * tile)
        .enumerate()
        .for_each(|(ci, block)| {
            let plane = &x[ci * g.h * g.w..][..g.h * g.w];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &mut block[(i * g.kw + j) * tile..][..tile];
                    for oy in band.0..band.1 {
                        let dst = &mut row[(oy - band.0) * g.ow..][..g.ow];
                        let Some(y) = g.source_y(oy, i) else {
                            dst.fill(T::zero());
                            continue;
                        };
                        let src = &plane[y * g.w..][..g.w];
                        if g.stride == 1 {
                            let (lo, hi) = g.valid_columns(j);
                            dst[..lo].fill(T::zero());
                            dst[hi..].fill(T::zero());
                            let shift = lo + j - g.padding;
                            dst[lo..hi].copy_from_slice(&src[shift..shift + (hi - lo)]);
                        } else {
                            for (ox, d) in dst.iter_mut().enumerate() {
                                *d = g.source_x(ox, j).map_or(T::zero(), |x| src[x]);
                            }
                        }
                    }
                }
            }
        });
}

/// Adds the column matrix of output rows `band` back into the image gradient `dx` (`[c_in, h, w]`).
fn col2im_add<T: WithDType>(cols: &[T], g: &Geometry, band: (usize, usize), dx: &mut [T]) {
    let tile = (band.1 - band.0) * g.ow;
    dx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &cols[((ci * g.kh + i) * g.kw + j) * tile..][..tile];
                    for oy in band.0..band.1 {
                        let Some(y) = g.source_y(oy, i) else {
                            continue;
                        };
                        let src = &row[(oy - band.0) * g.ow..][..g.ow];
                        let dst = &mut plane[y * g.w..][..g.w];
                        if g.stride == 1 {
                            let (lo, hi) = g.valid_columns(j);
                            let shift = lo + j - g.padding;
                            for (d, s) in dst[shift..shift + (hi - lo)].iter_mut().zip(&src[lo..hi])
                            {
                                *d += *s;
                            }
                        } else {
                            for (ox, s) in src.iter().enumerate() {
                                if let Some(x) = g.source_x(ox, j) {
                                    dst[x] += *s;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// `torch.nn.functional.conv2d(xs, kernel, bias, stride, padding)` (groups 1, dilation 1) on the
/// CPU: per image and band of output rows, a parallel im2col and one GEMM with the kernel as it is
/// stored.
///
/// # Shapes
/// - `xs`: `[b, c_in, h, w]`; `kernel`: `[c_out, c_in, kh, kw]`; `bias`: `[c_out]`;
///   result: `[b, c_out, (h + 2p − kh) / s + 1, (w + 2p − kw) / s + 1]`.
pub fn conv2d(
    xs: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    conv2d_banded(xs, kernel, bias, padding, stride, MAX_COLUMN_ELEMS)
}

fn conv2d_banded(
    xs: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    max_column: usize,
) -> Result<Tensor> {
    let dtype = check_dtype("conv2d", &[xs, kernel])?;
    let g = Geometry {
        max_column,
        ..Geometry::new(xs.dims4()?, kernel.dims4()?, padding, stride)?
    };
    let (b, c_out) = (xs.dim(0)?, kernel.dim(0)?);
    let kflat = kernel.contiguous()?.reshape((c_out, g.k_size()))?;
    let images = match dtype {
        DType::F32 => conv_images::<f32>(xs, &kflat, &g)?,
        _ => conv_images::<f64>(xs, &kflat, &g)?,
    };
    let out = if b == 1 {
        images[0].unsqueeze(0)?
    } else {
        Tensor::stack(&images, 0)?
    }
    .reshape((b, c_out, g.oh, g.ow))?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
        None => Ok(out),
    }
}

/// One `[c_out, oh·ow]` tensor per image.
fn conv_images<T: WithDType>(xs: &Tensor, kflat: &Tensor, g: &Geometry) -> Result<Vec<Tensor>> {
    let image_len = g.c_in * g.h * g.w;
    with_values::<T, _>(xs, |values| {
        values
            .chunks(image_len)
            .map(|x| {
                let parts = g
                    .bands()
                    .into_iter()
                    .map(|band| {
                        let tile = (band.1 - band.0) * g.ow;
                        let mut col = vec![T::zero(); g.k_size() * tile];
                        im2col(x, g, band, &mut col);
                        let col = Tensor::from_vec(col, (g.k_size(), tile), &Device::Cpu)?;
                        kflat.matmul(&col)
                    })
                    .collect::<Result<Vec<_>>>()?;
                if parts.len() == 1 {
                    Ok(parts.into_iter().next().expect("one band"))
                } else {
                    Tensor::cat(&parts, 1)
                }
            })
            .collect()
    })
}

/// The gradient of [`conv2d`] with respect to its input, for a constant kernel: per image and band,
/// one GEMM `kernelᵀ · grad` and a parallel col2im. Exact for every size, stride and padding.
///
/// # Shapes
/// - `grad`: `[b, c_out, oh, ow]`; `kernel`: `[c_out, c_in, kh, kw]`; `input_dims`: the input's
///   `[b, c_in, h, w]`; result: `[b, c_in, h, w]`.
pub fn conv2d_input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    input_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    conv2d_input_grad_banded(grad, kernel, input_dims, padding, stride, MAX_COLUMN_ELEMS)
}

fn conv2d_input_grad_banded(
    grad: &Tensor,
    kernel: &Tensor,
    input_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
    max_column: usize,
) -> Result<Tensor> {
    let dtype = check_dtype("conv2d input gradient", &[grad, kernel])?;
    let g = Geometry {
        max_column,
        ..Geometry::new(input_dims, kernel.dims4()?, padding, stride)?
    };
    let (b, c_out, oh, ow) = grad.dims4()?;
    if (b, oh, ow) != (input_dims.0, g.oh, g.ow) || c_out != kernel.dim(0)? {
        bail!(
            "conv2d input gradient: gradient {:?} does not match input {input_dims:?} and kernel {:?}",
            grad.dims(),
            kernel.dims()
        );
    }
    let kt = kernel.contiguous()?.reshape((c_out, g.k_size()))?.t()?;
    let grad = grad.contiguous()?.reshape((b, c_out, oh * ow))?;
    match dtype {
        DType::F32 => input_grad::<f32>(&grad, &kt, &g, b),
        _ => input_grad::<f64>(&grad, &kt, &g, b),
    }
}

fn input_grad<T: WithDType>(grad: &Tensor, kt: &Tensor, g: &Geometry, b: usize) -> Result<Tensor> {
    let image_len = g.c_in * g.h * g.w;
    let mut dx = vec![T::zero(); b * image_len];
    for (n, dx) in dx.chunks_mut(image_len).enumerate() {
        let gn = grad.get(n)?;
        for band in g.bands() {
            let part = gn.narrow(1, band.0 * g.ow, (band.1 - band.0) * g.ow)?;
            let cols = kt.matmul(&part.contiguous()?)?;
            with_values::<T, _>(&cols, |cols| {
                col2im_add(cols, g, band, dx);
                Ok(())
            })?;
        }
    }
    Tensor::from_vec(dx, (b, g.c_in, g.h, g.w), &Device::Cpu)
}

/// `torch.nn.GroupNorm` (affine) on the CPU in one parallel pass per group (mean and variance
/// accumulated in f64, biased variance as torch), then `silu` when asked: `y · σ(y)`.
///
/// # Shapes
/// - `xs`: `[b, c, ...]`, `c % groups == 0`; `weight`, `bias`: `[c]`; result: like `xs`.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dtype = check_dtype("group_norm", &[xs, weight, bias])?;
    let dims = xs.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        bail!("group_norm: {dims:?} does not split into {groups} groups over dim 1");
    }
    if weight.elem_count() != dims[1] || bias.elem_count() != dims[1] {
        bail!("group_norm: weight and bias must have {} values", dims[1]);
    }
    let spatial = xs.elem_count() / (dims[0] * dims[1]);
    let shape = GroupShape {
        channels: dims[1] / groups,
        spatial,
        groups,
        eps,
        silu,
    };
    match dtype {
        DType::F32 => {
            let values = group_norm_values::<f32>(xs, weight, bias, &shape)?;
            Tensor::from_vec(values, dims, &Device::Cpu)
        }
        _ => {
            let values = group_norm_values::<f64>(xs, weight, bias, &shape)?;
            Tensor::from_vec(values, dims, &Device::Cpu)
        }
    }
}

struct GroupShape {
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The element types the host kernels run.
trait Real: WithDType {
    /// `v · σ(v)`, as candle computes it.
    fn silu(self) -> Self;
    /// Exact GELU `v · Φ(v)`, as candle's `gelu_erf` computes it.
    fn gelu_erf(self) -> Self;
    /// tanh-approximated GELU, as candle's `gelu` computes it.
    fn gelu_tanh(self) -> Self;
    /// `v · σ(1.702 v)`, as `v * candle_nn::ops::sigmoid(v * 1.702)` computes it.
    fn quick_gelu(self) -> Self;
}

impl Real for f32 {
    fn silu(self) -> f32 {
        self / (1.0 + (-self).exp())
    }
    fn gelu_erf(self) -> f32 {
        (candle_core::cpu::erf::erf_f32(self * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * self
    }
    fn gelu_tanh(self) -> f32 {
        let c: f32 = 0.797_884_6; // sqrt(2/pi), candle's f32 constant
        0.5 * self * (1.0 + f32::tanh(c * self * (1.0 + 0.044715 * self * self)))
    }
    fn quick_gelu(self) -> f32 {
        self * (-(self * 1.702)).exp().add(1.0).recip()
    }
}

impl Real for f64 {
    fn silu(self) -> f64 {
        self / (1.0 + (-self).exp())
    }
    fn gelu_erf(self) -> f64 {
        (candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * self
    }
    fn gelu_tanh(self) -> f64 {
        let c: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi), candle's f64 constant
        0.5 * self * (1.0 + f64::tanh(c * self * (1.0 + 0.044715 * self * self)))
    }
    fn quick_gelu(self) -> f64 {
        self * (-(self * 1.702)).exp().add(1.0).recip()
    }
}

/// `f` over every value of `xs` in parallel chunks.
fn map_values<T: Real>(xs: &Tensor, f: impl Fn(T) -> T + Sync) -> Result<Tensor> {
    let out = with_values::<T, _>(xs, |v| {
        let mut out = vec![T::zero(); v.len()];
        out.par_chunks_mut(1 << 14)
            .zip(v.par_chunks(1 << 14))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = f(*s);
                }
            });
        Ok(out)
    })?;
    Tensor::from_vec(out, xs.dims(), &Device::Cpu)
}

/// An activation over every value, in parallel; the same values as candle's ops for it.
pub fn activation(xs: &Tensor, act: crate::Activation) -> Result<Tensor> {
    use crate::Activation as A;
    fn go<T: Real>(xs: &Tensor, act: crate::Activation) -> Result<Tensor> {
        match act {
            A::Gelu => map_values::<T>(xs, T::gelu_erf),
            A::GeluTanh => map_values::<T>(xs, T::gelu_tanh),
            A::QuickGelu => map_values::<T>(xs, T::quick_gelu),
            A::Silu => map_values::<T>(xs, T::silu),
            A::Relu => map_values::<T>(xs, |v| if v > T::zero() { v } else { T::zero() }),
        }
    }
    match check_dtype("activation", &[xs])? {
        DType::F32 => go::<f32>(xs, act),
        _ => go::<f64>(xs, act),
    }
}

/// `a + b` for two tensors of one shape, or `a + bias` with `bias` of `a`'s last dim (broadcast
/// over the rows), in parallel.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dtype = check_dtype("add", &[a, b])?;
    let last = *a.dims().last().unwrap_or(&1);
    let row_bias = b.dims() != a.dims();
    if row_bias && (b.elem_count() != last || b.dims().iter().rev().skip(1).any(|&d| d != 1)) {
        bail!(
            "add: {:?} + {:?} is neither same-shape nor a row bias",
            a.dims(),
            b.dims()
        );
    }
    fn go<T: Real>(a: &Tensor, b: &Tensor, row_bias: bool, last: usize) -> Result<Tensor> {
        let out = with_values::<T, _>(a, |va| {
            with_values::<T, _>(b, |vb| {
                let mut out = vec![T::zero(); va.len()];
                let chunk = if row_bias {
                    last.max(1) * (1 + (1 << 14) / last.max(1))
                } else {
                    1 << 14
                };
                out.par_chunks_mut(chunk)
                    .zip(va.par_chunks(chunk))
                    .enumerate()
                    .for_each(|(i, (d, s))| {
                        if row_bias {
                            for (d, (s, b)) in d.iter_mut().zip(s.iter().zip(vb.iter().cycle())) {
                                *d = *s + *b;
                            }
                        } else {
                            let o = &vb[i * chunk..i * chunk + s.len()];
                            for (d, (s, b)) in d.iter_mut().zip(s.iter().zip(o)) {
                                *d = *s + *b;
                            }
                        }
                    });
                Ok(out)
            })
        })?;
        Tensor::from_vec(out, a.dims(), &Device::Cpu)
    }
    match dtype {
        DType::F32 => go::<f32>(a, b, row_bias, last),
        _ => go::<f64>(a, b, row_bias, last),
    }
}

/// `(Φ(x), φ(x))` of the standard normal in f64.
fn normal_cdf_pdf(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf, pdf)
}

/// GEGLU of a projection `p = [hidden, gate]` (last dim `2n`): `hidden · gelu_erf(gate)` in one
/// parallel pass, as diffusers' `GEGLU.forward`.
///
/// # Shapes
/// - `proj`: `[..., 2n]`; result: `[..., n]`.
pub fn geglu(proj: &Tensor) -> Result<Tensor> {
    let dtype = check_dtype("geglu", &[proj])?;
    let (rows, n) = halves("geglu", proj)?;
    let mut dims = proj.dims().to_vec();
    *dims.last_mut().expect("rank checked") = n;
    fn go<T: Real>(proj: &Tensor, n: usize) -> Result<Vec<T>> {
        with_values::<T, _>(proj, |p| {
            let mut out = vec![T::zero(); p.len() / 2];
            out.par_chunks_mut(n)
                .zip(p.par_chunks(2 * n))
                .for_each(|(dst, row)| {
                    let (hidden, gate) = row.split_at(n);
                    for (d, (h, g)) in dst.iter_mut().zip(hidden.iter().zip(gate)) {
                        *d = *h * g.gelu_erf();
                    }
                });
            Ok(out)
        })
    }
    debug_assert_eq!(rows * n * 2, proj.elem_count());
    match dtype {
        DType::F32 => Tensor::from_vec(go::<f32>(proj, n)?, dims, &Device::Cpu),
        _ => Tensor::from_vec(go::<f64>(proj, n)?, dims, &Device::Cpu),
    }
}

/// The gradient of [`geglu`] with respect to the projection, `[g·gelu(gate), g·hidden·gelu′(gate)]`
/// in one parallel pass (derivatives in f64).
///
/// # Shapes
/// - `proj`: `[..., 2n]`; `grad`: `[..., n]`; result: like `proj`.
pub fn geglu_input_grad(proj: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let dtype = check_dtype("geglu input gradient", &[proj, grad])?;
    let (rows, n) = halves("geglu input gradient", proj)?;
    if grad.elem_count() != rows * n {
        bail!(
            "geglu input gradient: gradient {:?} does not match projection {:?}",
            grad.dims(),
            proj.dims()
        );
    }
    fn go<T: Real>(proj: &Tensor, grad: &Tensor, n: usize) -> Result<Vec<T>> {
        with_values::<T, _>(proj, |p| {
            with_values::<T, _>(grad, |g| {
                let mut out = vec![T::zero(); p.len()];
                out.par_chunks_mut(2 * n)
                    .zip(p.par_chunks(2 * n).zip(g.par_chunks(n)))
                    .for_each(|(dst, (row, g))| {
                        let (d_hidden, d_gate) = dst.split_at_mut(n);
                        for j in 0..n {
                            let (h, x, gj) = (row[j].to_f64(), row[n + j].to_f64(), g[j].to_f64());
                            let (cdf, pdf) = normal_cdf_pdf(x);
                            d_hidden[j] = T::from_f64(gj * x * cdf);
                            d_gate[j] = T::from_f64(gj * h * (cdf + x * pdf));
                        }
                    });
                Ok(out)
            })
        })
    }
    match dtype {
        DType::F32 => Tensor::from_vec(go::<f32>(proj, grad, n)?, proj.dims(), &Device::Cpu),
        _ => Tensor::from_vec(go::<f64>(proj, grad, n)?, proj.dims(), &Device::Cpu),
    }
}

/// `(rows, n)` of a `[..., 2n]` tensor.
fn halves(op: &str, proj: &Tensor) -> Result<(usize, usize)> {
    let last = *proj.dims().last().unwrap_or(&0);
    if last == 0 || last % 2 != 0 {
        bail!("{op}: last dim of {:?} must be even", proj.dims());
    }
    Ok((proj.elem_count() / last, last / 2))
}

fn group_norm_values<T: Real>(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    s: &GroupShape,
) -> Result<Vec<T>> {
    let weight: Vec<T> = with_values(weight, |v| Ok(v.to_vec()))?;
    let bias: Vec<T> = with_values(bias, |v| Ok(v.to_vec()))?;
    with_values::<T, _>(xs, |x| {
        let mut out = vec![T::zero(); x.len()];
        let len = s.channels * s.spatial;
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(index, (dst, src))| {
                let n = len as f64;
                let mean = src.iter().map(|v| v.to_f64()).sum::<f64>() / n;
                let var = src
                    .iter()
                    .map(|v| {
                        let d = v.to_f64() - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / n;
                let rstd = 1.0 / (var + s.eps).sqrt();
                let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                let first = (index % s.groups) * s.channels;
                for c in 0..s.channels {
                    let (w, b) = (weight[first + c], bias[first + c]);
                    let range = c * s.spatial..(c + 1) * s.spatial;
                    for (d, v) in dst[range.clone()].iter_mut().zip(&src[range]) {
                        let y = (*v - mean) * rstd * w + b;
                        *d = if s.silu { y.silu() } else { y };
                    }
                }
            });
        Ok(out)
    })
}

/// The input gradient of an affine normalization `y = x̂·w + b`, `x̂ = (x − mean)·rstd` over each
/// run of `len` consecutive values (biased variance): `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`
/// with `ĝ = g·w`; `weight(i, run)` is the weight of the run's `i`-th value. One parallel pass
/// per run, sums in f64.
fn normalize_backward<T: Real>(
    x: &[T],
    g: &[T],
    len: usize,
    eps: f64,
    weight: impl Fn(usize, usize) -> f64 + Sync,
) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(len)
        .zip(x.par_chunks(len).zip(g.par_chunks(len)))
        .enumerate()
        .for_each(|(run, (dst, (x, g)))| {
            let n = len as f64;
            let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / n;
            let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps).sqrt();
            let (mut m1, mut m2) = (0.0, 0.0);
            for (i, (xv, gv)) in x.iter().zip(g).enumerate() {
                let gh = gv.to_f64() * weight(i, run);
                m1 += gh;
                m2 += gh * (xv.to_f64() - mean) * rstd;
            }
            let (m1, m2) = (m1 / n, m2 / n);
            for (i, (d, (xv, gv))) in dst.iter_mut().zip(x.iter().zip(g)).enumerate() {
                let xhat = (xv.to_f64() - mean) * rstd;
                let gh = gv.to_f64() * weight(i, run);
                *d = T::from_f64(rstd * (gh - m1 - xhat * m2));
            }
        });
    dx
}

/// The input gradient of [`group_norm`] (without SiLU) for constant `weight`.
///
/// # Shapes
/// - `xs`, `grad`: `[b, c, ...]`; `weight`: `[c]`; result: like `xs`.
pub fn group_norm_input_grad(
    xs: &Tensor,
    grad: &Tensor,
    groups: usize,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = check_dtype("group_norm input gradient", &[xs, grad, weight])?;
    let dims = xs.dims();
    if grad.dims() != dims || dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        bail!(
            "group_norm input gradient: {dims:?} / gradient {:?} in {groups} groups",
            grad.dims()
        );
    }
    let channels = dims[1] / groups;
    let spatial = xs.elem_count() / (dims[0] * dims[1]);
    fn go<T: Real>(
        xs: &Tensor,
        grad: &Tensor,
        weight: &Tensor,
        groups: usize,
        (channels, spatial): (usize, usize),
        eps: f64,
    ) -> Result<Tensor> {
        let w: Vec<f64> =
            with_values::<T, _>(weight, |v| Ok(v.iter().map(|w| w.to_f64()).collect()))?;
        let dx = with_values::<T, _>(xs, |x| {
            with_values::<T, _>(grad, |g| {
                Ok(normalize_backward(
                    x,
                    g,
                    channels * spatial,
                    eps,
                    |i, run| w[(run % groups) * channels + i / spatial],
                ))
            })
        })?;
        Tensor::from_vec(dx, xs.dims(), &Device::Cpu)
    }
    match dtype {
        DType::F32 => go::<f32>(xs, grad, weight, groups, (channels, spatial), eps),
        _ => go::<f64>(xs, grad, weight, groups, (channels, spatial), eps),
    }
}

/// The input gradient of a layer norm over the last dim (`torch.nn.LayerNorm`, biased variance)
/// for constant `weight`.
///
/// # Shapes
/// - `xs`, `grad`: `[..., n]`; `weight`: `[n]`; result: like `xs`.
pub fn layer_norm_input_grad(
    xs: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = check_dtype("layer_norm input gradient", &[xs, grad, weight])?;
    let n = *xs.dims().last().unwrap_or(&0);
    if grad.dims() != xs.dims() || n == 0 || weight.elem_count() != n {
        bail!(
            "layer_norm input gradient: {:?} / gradient {:?} / weight {:?}",
            xs.dims(),
            grad.dims(),
            weight.dims()
        );
    }
    fn go<T: Real>(
        xs: &Tensor,
        grad: &Tensor,
        weight: &Tensor,
        n: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let w: Vec<f64> =
            with_values::<T, _>(weight, |v| Ok(v.iter().map(|w| w.to_f64()).collect()))?;
        let dx = with_values::<T, _>(xs, |x| {
            with_values::<T, _>(grad, |g| Ok(normalize_backward(x, g, n, eps, |i, _| w[i])))
        })?;
        Tensor::from_vec(dx, xs.dims(), &Device::Cpu)
    }
    match dtype {
        DType::F32 => go::<f32>(xs, grad, weight, n, eps),
        _ => go::<f64>(xs, grad, weight, n, eps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
        // A fixed LCG: the tests need no rand crate and are reproducible.
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    use crate::test_util::max_abs_diff as max_diff;

    /// (batch, c_in, h, w, c_out, k, padding, stride): odd and even sizes, 1×1, stride 2, no padding.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
    const CASES: [Case; 7] = [
        (1, 3, 8, 8, 5, 3, 1, 1),
        (2, 4, 7, 6, 3, 3, 1, 2),
        (1, 4, 9, 8, 2, 3, 0, 2),
        (1, 6, 5, 7, 4, 1, 0, 1),
        (2, 2, 6, 6, 3, 3, 2, 1),
        (1, 3, 10, 5, 2, 3, 1, 3),
        (1, 2, 3, 3, 2, 3, 1, 1),
    ];

    #[test]
    fn conv2d_matches_candle_for_every_geometry_and_band_size() {
        for (case, &(b, ci, h, w, co, k, p, s)) in CASES.iter().enumerate() {
            for dtype in [DType::F32, DType::F64] {
                let x = rand(&[b, ci, h, w], dtype, case as u64);
                let kernel = rand(&[co, ci, k, k], dtype, 100 + case as u64);
                let bias = rand(&[co], dtype, 200 + case as u64);
                let want = x
                    .conv2d(&kernel, p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                    .unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                // One band, and bands of a single output row.
                for limit in [MAX_COLUMN_ELEMS, 1] {
                    let got = conv2d_banded(&x, &kernel, Some(&bias), p, s, limit).unwrap();
                    let d = max_diff(&got, &want);
                    assert!(d < tol, "case {case} {dtype:?} limit {limit}: {d:e}");
                }
            }
        }
    }

    /// The input gradient is the adjoint of the convolution: `<conv(x), r> = <x, grad(r)>` for
    /// every x and r, which pins it down exactly (also where candle's own backward fails).
    #[test]
    fn conv2d_input_grad_is_the_adjoint_of_conv2d() {
        for (case, &(b, ci, h, w, co, k, p, s)) in CASES.iter().enumerate() {
            let x = rand(&[b, ci, h, w], DType::F64, case as u64);
            let kernel = rand(&[co, ci, k, k], DType::F64, 100 + case as u64);
            let y = conv2d(&x, &kernel, None, p, s).unwrap();
            let r = rand(y.dims(), DType::F64, 300 + case as u64);
            let lhs = (&y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            for limit in [MAX_COLUMN_ELEMS, 1] {
                let gx =
                    conv2d_input_grad_banded(&r, &kernel, x.dims4().unwrap(), p, s, limit).unwrap();
                let rhs = (&x * &gx)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    (lhs - rhs).abs() < 1e-10 * lhs.abs().max(1.0),
                    "case {case} limit {limit}: {lhs} vs {rhs}"
                );
            }
            // And candle's autograd agrees where its backward works (stride 1).
            if s == 1 {
                let var = candle_core::Var::from_tensor(&x).unwrap();
                let loss = (var.as_tensor().conv2d(&kernel, p, 1, 1, 1).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let want = loss
                    .backward()
                    .unwrap()
                    .get(var.as_tensor())
                    .unwrap()
                    .clone();
                let got = conv2d_input_grad(&r, &kernel, x.dims4().unwrap(), p, s).unwrap();
                assert!(max_diff(&got, &want) < 1e-12, "case {case}");
            }
        }
    }

    /// Both normalization gradients against candle's autograd through the composition, in f64.
    #[test]
    fn normalization_input_gradients_match_autograd() {
        let (b, c, h, w, groups) = (2, 6, 3, 4, 3);
        let x = rand(&[b, c, h, w], DType::F64, 11)
            .affine(2.0, 0.3)
            .unwrap();
        let r = rand(&[b, c, h, w], DType::F64, 12);
        let weight = rand(&[c], DType::F64, 13);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let grouped = var
            .as_tensor()
            .reshape((b, groups, c / groups * h * w))
            .unwrap();
        let mean = grouped.mean_keepdim(2).unwrap();
        let centered = grouped.broadcast_sub(&mean).unwrap();
        let v = centered.sqr().unwrap().mean_keepdim(2).unwrap();
        let y = centered
            .broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((b, c, h, w))
            .unwrap()
            .broadcast_mul(&weight.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        let want = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = want.get(var.as_tensor()).unwrap();
        let got = group_norm_input_grad(&x, &r, groups, &weight, 1e-5).unwrap();
        assert!(
            max_diff(&got, want) < 1e-12,
            "group norm {:e}",
            max_diff(&got, want)
        );

        let x = rand(&[3, 5, 8], DType::F64, 14).affine(2.0, -0.4).unwrap();
        let r = rand(&[3, 5, 8], DType::F64, 15);
        let weight = rand(&[8], DType::F64, 16);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let xs = var.as_tensor();
        let mean = xs.mean_keepdim(2).unwrap();
        let centered = xs.broadcast_sub(&mean).unwrap();
        let v = centered.sqr().unwrap().mean_keepdim(2).unwrap();
        let y = centered
            .broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&weight)
            .unwrap();
        let want = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = want.get(var.as_tensor()).unwrap();
        let got = layer_norm_input_grad(&x, &r, &weight, 1e-5).unwrap();
        assert!(
            max_diff(&got, want) < 1e-12,
            "layer norm {:e}",
            max_diff(&got, want)
        );
        let err = layer_norm_input_grad(&x, &r.narrow(2, 0, 4).unwrap(), &weight, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient"), "{err}");
    }

    #[test]
    fn geglu_and_its_gradient_match_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            let p = rand(&[2, 3, 10], dtype, 21).affine(3.0, 0.0).unwrap();
            let want = (p.narrow(2, 0, 5).unwrap()
                * p.narrow(2, 5, 5).unwrap().gelu_erf().unwrap())
            .unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
            assert!(max_diff(&geglu(&p).unwrap(), &want) < tol, "{dtype:?}");
        }
        // Gradient: against central finite differences of sum(geglu(p) * r), in f64.
        let p = rand(&[3, 8], DType::F64, 22).affine(3.0, 0.0).unwrap();
        let r = rand(&[3, 4], DType::F64, 23);
        let got: Vec<f64> = geglu_input_grad(&p, &r)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let f = |p: &Tensor| {
            (geglu(p).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let base: Vec<f64> = p.flatten_all().unwrap().to_vec1().unwrap();
        for (i, g) in got.iter().enumerate() {
            let h = 1e-6;
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (3, 8), &Device::Cpu).unwrap();
            let fd = (f(&t(plus)) - f(&t(minus))) / (2.0 * h);
            assert!((fd - g).abs() < 1e-8, "entry {i}: {g} vs {fd}");
        }
        let odd = rand(&[2, 5], DType::F32, 1);
        assert!(geglu(&odd).unwrap_err().to_string().contains("even"));
    }

    #[test]
    fn activations_and_adds_match_candles_ops() {
        use crate::Activation as A;
        use candle_core::Module;
        for dtype in [DType::F32, DType::F64] {
            let x = rand(&[3, 7, 50], dtype, 31).affine(4.0, 0.0).unwrap();
            for act in [A::Gelu, A::GeluTanh, A::QuickGelu, A::Silu, A::Relu] {
                let d = max_diff(&activation(&x, act).unwrap(), &act.forward(&x).unwrap());
                assert!(d == 0.0, "{act:?} {dtype:?}: {d:e}");
            }
            let y = rand(&[3, 7, 50], dtype, 32);
            let bias = rand(&[50], dtype, 33);
            assert_eq!(max_diff(&add(&x, &y).unwrap(), &(&x + &y).unwrap()), 0.0);
            let want = x.broadcast_add(&bias).unwrap();
            assert_eq!(max_diff(&add(&x, &bias).unwrap(), &want), 0.0);
        }
        let x = rand(&[4, 6], DType::F32, 1);
        let err = add(&x, &rand(&[4], DType::F32, 2)).unwrap_err().to_string();
        assert!(err.contains("row bias"), "{err}");
    }

    #[test]
    fn group_norm_matches_its_definition_with_and_without_silu() {
        for dtype in [DType::F32, DType::F64] {
            let (b, c, h, w, groups) = (2, 6, 5, 4, 3);
            let x = (rand(&[b, c, h, w], dtype, 7).affine(3.0, 0.5)).unwrap();
            let weight = rand(&[c], dtype, 8);
            let bias = rand(&[c], dtype, 9);
            let grouped = x.reshape((b, groups, c / groups * h * w)).unwrap();
            let mean = grouped.mean_keepdim(2).unwrap();
            let centered = grouped.broadcast_sub(&mean).unwrap();
            let var = centered.sqr().unwrap().mean_keepdim(2).unwrap();
            let normed = centered
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .reshape((b, c, h, w))
                .unwrap()
                .broadcast_mul(&weight.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
                .unwrap();
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-13 };
            let got = group_norm(&x, groups, &weight, &bias, 1e-5, false).unwrap();
            assert!(max_diff(&got, &normed) < tol, "{dtype:?}");
            let got = group_norm(&x, groups, &weight, &bias, 1e-5, true).unwrap();
            assert!(
                max_diff(&got, &normed.silu().unwrap()) < tol,
                "{dtype:?} silu"
            );
        }
        let x = rand(&[1, 6, 2, 2], DType::F32, 1);
        let w = rand(&[6], DType::F32, 2);
        let err = group_norm(&x, 4, &w, &w, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 groups"), "{err}");
        let half = x.to_dtype(DType::F16).unwrap();
        let err = conv2d(&half, &half, None, 0, 1).unwrap_err().to_string();
        assert!(err.contains("f32 or f64"), "{err}");
    }
}

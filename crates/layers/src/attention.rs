//! Multi-head attention `softmax(q kᵀ · scale + mask) v` on the CPU as one task per
//! (batch, head) (issue 13).
//!
//! candle's batched matmul runs the (batch·heads) small GEMMs one after the other, each split over
//! the threads; at DINO's 197×197×64 that reached about 61 GFLOP/s on 2 cores, against 154 when
//! each (batch, head) is a task of its own. Here each task reads its head's columns of `q`, `k`
//! and `v` in place (any row stride, so the three can be views of one fused QKV projection),
//! multiplies, takes the softmax in place ([`crate::vmath::softmax_row`]) and multiplies by `v`;
//! the heads are then written side by side into `[batch, queries, heads·head_dim]`. No permuted
//! copies of q, k, v or the context are made, and no tensor of every head's probabilities
//! exists at once.
//!
//! [`attention_backward`] gives the gradients the same way, recomputing the probabilities, so a
//! graph node built on the pair keeps only q, k and v (the diffusion crate's `ops::attention`).
//!
//! f32 (softmax by [`crate::vmath`]) and f64; the callers keep candle's ops as the
//! device-generic path.

use candle_core::{
    bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

/// An element type the kernels run: f32 (softmax by [`crate::vmath`]) or f64 (std's `exp`, for
/// the finite-difference tests).
pub trait Elem: WithDType {
    /// `row ← softmax(row · scale + mask)`.
    fn softmax_row(row: &mut [Self], scale: f64, mask: Option<&[Self]>);
    fn values(storage: &CpuStorage) -> Option<&[Self]>;
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

impl Elem for f32 {
    fn softmax_row(row: &mut [f32], scale: f64, mask: Option<&[f32]>) {
        crate::vmath::softmax_row(row, scale as f32, mask)
    }
    fn values(storage: &CpuStorage) -> Option<&[f32]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut Vec<f32>> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    fn softmax_row(row: &mut [f64], scale: f64, mask: Option<&[f64]>) {
        for (i, v) in row.iter_mut().enumerate() {
            *v = *v * scale + mask.map_or(0.0, |m| m[i]);
        }
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            row.fill(f64::NAN);
            return;
        }
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
    fn values(storage: &CpuStorage) -> Option<&[f64]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut Vec<f64>> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

fn contiguous_mut<'a, T: Elem>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: the tensor must be contiguous");
    };
    match T::values_mut(storage) {
        Some(v) => Ok(&mut v[start..end]),
        None => bail!("{op}: expected {:?}", T::DTYPE),
    }
}

fn contiguous<'a, T: Elem>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: the tensor must be contiguous");
    };
    match T::values(storage) {
        Some(v) => Ok(&v[start..end]),
        None => bail!("{op}: expected {:?}", T::DTYPE),
    }
}

/// Softmax over the rows of a contiguous `[rows, cols]` score matrix, in place.
struct SoftmaxRows<'a, T> {
    scale: f64,
    mask: Option<&'a [T]>,
}

impl<T: Elem> InplaceOp1 for SoftmaxRows<'_, T> {
    fn name(&self) -> &'static str {
        "attention-softmax-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let cols = (*layout.dims().last().unwrap_or(&1)).max(1);
        let values = contiguous_mut::<T>(storage, layout, self.name())?;
        for (i, row) in values.chunks_mut(cols).enumerate() {
            let mask = self.mask.map(|m| &m[i * cols..(i + 1) * cols]);
            T::softmax_row(row, self.scale, mask);
        }
        Ok(())
    }
}

/// The softmax backward in place on `dP`, times the score scale:
/// `dP ← scale · P ⊙ (dP − Σ_cols dP ⊙ P)` (row sums in f64).
struct SoftmaxGrad {
    scale: f64,
}

impl InplaceOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "attention-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        fn go<T: Elem>(
            scale: f64,
            dst: &mut CpuStorage,
            dst_l: &Layout,
            src: &CpuStorage,
            src_l: &Layout,
        ) -> Result<()> {
            let cols = (*dst_l.dims().last().unwrap_or(&1)).max(1);
            let p = contiguous::<T>(src, src_l, "attention-softmax-grad")?;
            let dp = contiguous_mut::<T>(dst, dst_l, "attention-softmax-grad")?;
            for (g, y) in dp.chunks_mut(cols).zip(p.chunks(cols)) {
                let dot: f64 = g.iter().zip(y).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                for (g, y) in g.iter_mut().zip(y) {
                    *g = T::from_f64(scale * y.to_f64() * (g.to_f64() - dot));
                }
            }
            Ok(())
        }
        match dst {
            CpuStorage::F32(_) => go::<f32>(self.scale, dst, dst_l, src, src_l),
            _ => go::<f64>(self.scale, dst, dst_l, src, src_l),
        }
    }
}

/// Checks the operands; returns (batch, queries, keys, width, dtype).
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<(usize, usize, usize, usize, DType)> {
    let (b, nq, width) = q.dims3()?;
    let (bk, nk, wk) = k.dims3()?;
    if v.dims3()? != (bk, nk, wk) || bk != b || wk != width {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || width % heads != 0 {
        bail!("attention: width {width} is not divisible by {heads} heads");
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        bail!("attention: host kernel runs f32 or f64, not {dtype:?}");
    }
    for t in [q, k, v] {
        if t.dtype() != dtype || !t.device().is_cpu() {
            bail!("attention: every tensor must be {dtype:?} on the CPU");
        }
    }
    Ok((b, nq, nk, width, dtype))
}

/// Head `hi` of batch entry `bi` of `[batch, rows, heads·d]`: a `[rows, d]` view.
fn head(t: &Tensor, bi: usize, hi: usize, d: usize) -> Result<Tensor> {
    t.get(bi)?.narrow(1, hi * d, d)
}

/// `softmax(q kᵀ · scale + mask)` of one (batch, head), `[queries, keys]`, contiguous.
fn probabilities<T: Elem>(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<&[T]>,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    scores.inplace_op1(&SoftmaxRows { scale, mask })?;
    Ok(scores)
}

/// Writes each (batch, head) result `[rows, d]` into its columns of `[batch, rows, heads·d]`.
fn gather_heads<T: Elem>(
    per_head: &[Tensor],
    b: usize,
    rows: usize,
    heads: usize,
    d: usize,
) -> Result<Tensor> {
    let width = heads * d;
    let storages = per_head
        .iter()
        .map(|t| t.storage_and_layout())
        .collect::<Vec<_>>();
    let slices = storages
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(cpu) => contiguous::<T>(cpu, l, "attention"),
            _ => bail!("attention: a head's result is not on the CPU"),
        })
        .collect::<Result<Vec<&[T]>>>()?;
    let mut out = vec![T::zero(); b * rows * width];
    out.par_chunks_mut((rows * width).max(1))
        .enumerate()
        .for_each(|(bi, dst)| {
            for (row, dst_row) in dst.chunks_mut(width).enumerate() {
                for hi in 0..heads {
                    let src = &slices[bi * heads + hi][row * d..(row + 1) * d];
                    dst_row[hi * d..(hi + 1) * d].copy_from_slice(src);
                }
            }
        });
    Tensor::from_vec(out, (b, rows, width), &candle_core::Device::Cpu)
}

/// `softmax(q kᵀ · scale + mask) v` for every (batch, head), one task each.
///
/// # Shapes
/// - `q`: `[batch, queries, heads·head_dim]`; `k`, `v`: `[batch, keys, heads·head_dim]`; each may
///   be a view with any row stride as long as its last dimension is contiguous.
/// - `mask`: additive `[queries, keys]`, the same for every batch entry and head, or none.
/// - result: `[batch, queries, heads·head_dim]`, contiguous, heads side by side as
///   `transpose(1, 2).reshape(..)` of the per-head results.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, nq, nk, _, dtype) = check(q, k, v, heads)?;
    if let Some(m) = mask {
        if m.dims() != [nq, nk] {
            bail!("attention: mask {:?} is not [{nq}, {nk}]", m.dims());
        }
    }
    match dtype {
        DType::F32 => attention_t::<f32>(q, k, v, heads, scale, mask),
        _ => attention_t::<f64>(q, k, v, heads, scale, mask),
    }
}

fn attention_t<T: Elem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, width) = q.dims3()?;
    let mask_values = match mask {
        Some(m) => Some(m.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?),
        None => None,
    };
    let d = width / heads;
    let per_head = (0..b * heads)
        .into_par_iter()
        .map(|i| {
            let (bi, hi) = (i / heads, i % heads);
            let p = probabilities(
                &head(q, bi, hi, d)?,
                &head(k, bi, hi, d)?,
                scale,
                mask_values.as_deref(),
            )?;
            p.matmul(&head(v, bi, hi, d)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    gather_heads::<T>(&per_head, b, nq, heads, d)
}

/// The gradients of [`attention`] (without a mask) with respect to `q`, `k` and `v`, given the
/// output's gradient `grad` (`[batch, queries, heads·head_dim]`), one task per (batch, head).
/// The probabilities are recomputed rather than kept from the forward pass, so a graph that
/// holds an attention node keeps q, k and v alone, not the `[queries, keys]` scores and
/// probabilities of every head:
/// `dV = Pᵀ dO`, `dS = scale · P ⊙ (dO Vᵀ − rowsum(dO Vᵀ ⊙ P))`, `dQ = dS K`, `dK = dSᵀ Q`.
/// The gradients of `k` and `v` are computed only when `key_grads` is set.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    heads: usize,
    scale: f64,
    key_grads: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (b, nq, _, width, dtype) = check(q, k, v, heads)?;
    if grad.dims() != [b, nq, width] || grad.dtype() != dtype {
        bail!(
            "attention backward: gradient {:?} for output [{b}, {nq}, {width}]",
            grad.dims()
        );
    }
    match dtype {
        DType::F32 => backward_t::<f32>(q, k, v, grad, heads, scale, key_grads),
        _ => backward_t::<f64>(q, k, v, grad, heads, scale, key_grads),
    }
}

type HeadGrads = (Tensor, Option<(Tensor, Tensor)>);

fn backward_t<T: Elem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    heads: usize,
    scale: f64,
    key_grads: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (b, nq, width) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = width / heads;
    let per_head = (0..b * heads)
        .into_par_iter()
        .map(|i| -> Result<HeadGrads> {
            let (bi, hi) = (i / heads, i % heads);
            let (qi, ki, vi, gi) = (
                head(q, bi, hi, d)?,
                head(k, bi, hi, d)?,
                head(v, bi, hi, d)?,
                head(grad, bi, hi, d)?,
            );
            let p = probabilities::<T>(&qi, &ki, scale, None)?;
            let dv = if key_grads {
                Some(p.t()?.matmul(&gi)?)
            } else {
                None
            };
            let ds = gi.matmul(&vi.t()?)?;
            ds.inplace_op2(&p, &SoftmaxGrad { scale })?;
            drop(p);
            let dq = ds.matmul(&ki)?;
            let kv = match dv {
                Some(dv) => Some((ds.t()?.matmul(&qi)?, dv)),
                None => None,
            };
            Ok((dq, kv))
        })
        .collect::<Result<Vec<HeadGrads>>>()?;
    let dq: Vec<Tensor> = per_head.iter().map(|(dq, _)| dq.clone()).collect();
    let dq = gather_heads::<T>(&dq, b, nq, heads, d)?;
    if !key_grads {
        return Ok((dq, None));
    }
    let (dk, dv): (Vec<Tensor>, Vec<Tensor>) =
        per_head.into_iter().filter_map(|(_, kv)| kv).unzip();
    let dk = gather_heads::<T>(&dk, b, nk, heads, d)?;
    let dv = gather_heads::<T>(&dv, b, nk, heads, d)?;
    Ok((dq, Some((dk, dv))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, D};

    /// candle's ops: the per-head permute, batched matmul and softmax.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, w) = t.dims3().unwrap();
            t.reshape((b, n, heads, w / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q4, k4, v4) = (split(q), split(k), split(v));
        let att = (q4.matmul(&k4.t().unwrap()).unwrap() * scale).unwrap();
        let att = match mask {
            Some(m) => att.broadcast_add(m).unwrap(),
            None => att,
        };
        let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        let (b, nq, w) = q.dims3().unwrap();
        att.matmul(&v4)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, nq, w))
            .unwrap()
    }

    #[test]
    fn matches_candle_ops_on_views_of_a_fused_projection_with_and_without_a_mask() {
        let dev = Device::Cpu;
        let (b, n, heads, d) = (3, 13, 4, 8);
        let w = heads * d;
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * w), &dev).unwrap();
        let q = qkv.narrow(2, 0, w).unwrap();
        let k = qkv.narrow(2, w, w).unwrap();
        let v = qkv.narrow(2, 2 * w, w).unwrap();
        let causal: Vec<f32> = (0..n * n)
            .map(|i| if i % n > i / n { f32::MIN } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (n, n), &dev).unwrap();
        for mask in [None, Some(&causal)] {
            let scale = (d as f64).powf(-0.5);
            let got = attention(&q, &k, &v, heads, scale, mask).unwrap();
            let want = reference(&q, &k, &v, heads, scale, mask);
            assert_eq!(got.dims(), &[b, n, w]);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 2e-6, "max |diff| {diff}");
        }
    }

    #[test]
    fn fewer_queries_than_keys() {
        let dev = Device::Cpu;
        let (b, nk, heads, d) = (2, 9, 2, 4);
        let q = Tensor::randn(0f32, 1.0, (b, 1, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nk, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nk, heads * d), &dev).unwrap();
        let got = attention(&q, &k, &v, heads, 0.5, None).unwrap();
        let want = reference(&q, &k, &v, heads, 0.5, None);
        assert!(max_abs_diff(&got, &want) < 2e-6);
    }

    /// The gradients against candle's autograd through its composite ops, in f64, with q, k and v
    /// views of one fused projection and fewer queries than keys.
    #[test]
    fn the_backward_matches_autograd_in_f64() {
        let dev = Device::Cpu;
        let (b, nq, nk, heads, d) = (2, 5, 7, 3, 4);
        let w = heads * d;
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, nq, w), &dev).unwrap())
            .unwrap();
        let kv =
            candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, nk, 2 * w), &dev).unwrap())
                .unwrap();
        let weights = Tensor::randn(0f64, 1.0, (b, nq, w), &dev).unwrap();
        let k = kv.narrow(2, 0, w).unwrap();
        let v = kv.narrow(2, w, w).unwrap();
        let scale = 0.7;
        let loss = (reference(&q, &k, &v, heads, scale, None) * &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let (dq, kv_grads) = attention_backward(&q, &k, &v, &weights, heads, scale, true).unwrap();
        let (dk, dv) = kv_grads.unwrap();
        let want_kv = grads.get(&kv).unwrap();
        assert!(max_abs_diff(&dq, grads.get(&q).unwrap()) < 1e-12);
        assert!(max_abs_diff(&dk, &want_kv.narrow(2, 0, w).unwrap()) < 1e-12);
        assert!(max_abs_diff(&dv, &want_kv.narrow(2, w, w).unwrap()) < 1e-12);
        let (dq_only, none) =
            attention_backward(&q, &k, &v, &weights, heads, scale, false).unwrap();
        assert!(none.is_none());
        assert_eq!(max_abs_diff(&dq_only, &dq), 0.0);
    }

    #[test]
    fn mismatched_shapes_are_one_error() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 8), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((1, 5, 8), DType::F32, &dev).unwrap();
        let err = attention(&q, &k, &v, 2, 1.0, None).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = attention(&q, &k, &k, 3, 1.0, None).unwrap_err().to_string();
        assert!(err.contains("divisible"), "{err}");
    }
}

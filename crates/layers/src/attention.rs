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
//! f32 only, outside autograd; the callers keep candle's ops as the device-generic path.

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Softmax over the rows of a contiguous `[rows, cols]` score matrix, in place.
struct SoftmaxRows<'a> {
    scale: f32,
    mask: Option<&'a [f32]>,
}

impl InplaceOp1 for SoftmaxRows<'_> {
    fn name(&self) -> &'static str {
        "attention-softmax-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(values) = storage else {
            bail!("attention softmax: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("attention softmax: scores must be contiguous");
        };
        let cols = *layout.dims().last().unwrap_or(&1);
        for (i, row) in values[start..end].chunks_mut(cols.max(1)).enumerate() {
            let mask = self.mask.map(|m| &m[i * cols..(i + 1) * cols]);
            crate::vmath::softmax_row(row, self.scale, mask);
        }
        Ok(())
    }
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
    for t in [q, k, v] {
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            bail!("attention: host kernel runs f32 CPU tensors");
        }
    }
    let mask_values = match mask {
        Some(m) => {
            if m.dims() != [nq, nk] {
                bail!("attention: mask {:?} is not [{nq}, {nk}]", m.dims());
            }
            Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        }
        None => None,
    };
    let d = width / heads;
    let per_head = (0..b * heads)
        .into_par_iter()
        .map(|i| {
            let (bi, hi) = (i / heads, i % heads);
            let head = |t: &Tensor| t.get(bi)?.narrow(1, hi * d, d);
            let scores = head(q)?.matmul(&head(k)?.t()?)?;
            scores.inplace_op1(&SoftmaxRows {
                scale: scale as f32,
                mask: mask_values.as_deref(),
            })?;
            scores.matmul(&head(v)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    // Each head's `[queries, head_dim]` result into its columns of the output rows.
    let mut out = vec![0f32; b * nq * width];
    let storages = per_head
        .iter()
        .map(|t| t.storage_and_layout())
        .collect::<Vec<_>>();
    let slices = storages
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(CpuStorage::F32(v)) => match l.contiguous_offsets() {
                Some((a, z)) => Ok(&v[a..z]),
                None => bail!("attention: a head's result is not contiguous"),
            },
            _ => bail!("attention: a head's result is not f32 on the CPU"),
        })
        .collect::<Result<Vec<&[f32]>>>()?;
    out.par_chunks_mut(nq * width)
        .enumerate()
        .for_each(|(bi, dst)| {
            for (row, dst_row) in dst.chunks_mut(width).enumerate() {
                for hi in 0..heads {
                    let src = &slices[bi * heads + hi][row * d..(row + 1) * d];
                    dst_row[hi * d..(hi + 1) * d].copy_from_slice(src);
                }
            }
        });
    Tensor::from_vec(out, (b, nq, width), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
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

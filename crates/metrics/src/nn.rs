//! Building blocks shared by the ViT (DINO) and CLIP encoders: a linear layer that
//! runs as one 2-D matmul, a LayerNorm with a two-pass f64 reduction, fused-QKV self-attention
//! and the pre-LayerNorm transformer block both models use.
//!
//! Why not candle-nn's `LayerNorm`: its fused CPU kernel computes the variance as
//! `E[x²] − E[x]²` in f32, which loses digits when a residual stream has a large mean;
//! PyTorch's kernel does not, and parity is the point of this crate.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// `hidden_act` of a transformers config.
pub use layers::Activation;

/// `y = x Wᵀ + b` over the last dimension, computed as a single `[rows, in] × [in, out]` matmul.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`, contiguous (the checkpoint's `[out, in]` transposed once at load).
    weight_t: Tensor,
    bias: Option<Tensor>,
    /// The bias as f32 values, for the in-place CPU epilogues ([`layers::fused`]).
    bias_values: Option<Vec<f32>>,
}

impl Linear {
    pub fn from_weights(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let bias_values = match &bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
            bias_values,
        })
    }

    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::from_weights(&weight, bias)
    }

    /// `x Wᵀ` without the bias, `[.., in]` → `[.., out]`.
    fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = xs.elem_count() / in_dim.max(1);
        let y = xs.reshape((rows, in_dim))?.matmul(&self.weight_t)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight_t.dim(1)?;
        y.reshape(out)
    }

    /// Whether the in-place CPU epilogues may run on `xs`.
    fn fused(&self, xs: &Tensor) -> bool {
        layers::kernels::host_kernels(xs.device())
            && xs.dtype() == DType::F32
            && self.weight_t.dtype() == DType::F32
            && !xs.track_op()
    }

    /// # Shapes
    /// `xs`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_act(xs, None)
    }

    /// `act(x Wᵀ + b)`: on the CPU the bias and the activation are one in-place pass over the
    /// GEMM's output ([`layers::fused::bias_act_in_place`]).
    pub fn forward_act(&self, xs: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let y = self.matmul(xs)?;
        if self.fused(xs) {
            layers::fused::bias_act_in_place(&y, self.bias_values.as_deref(), act)?;
            return Ok(y);
        }
        let y = match &self.bias {
            Some(b) => add(&y, b)?,
            None => y,
        };
        match act {
            Some(a) => a.forward(&y),
            None => Ok(y),
        }
    }

    /// Output columns `start..start + len` of [`Linear::forward`] alone: on the CPU a GEMM against
    /// those columns of the weight (a view, no copy); elsewhere the whole output, narrowed.
    pub fn forward_cols(&self, xs: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        if !self.fused(xs) {
            return self.forward(xs)?.narrow(D::Minus1, start, len);
        }
        let dims = xs.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = xs.elem_count() / in_dim.max(1);
        let y = xs
            .reshape((rows, in_dim))?
            .matmul(&self.weight_t.narrow(1, start, len)?)?;
        let bias = self.bias_values.as_ref().map(|b| &b[start..start + len]);
        layers::fused::bias_act_in_place(&y, bias, None)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = len;
        y.reshape(out)
    }

    /// `residual + (x Wᵀ + b)`: on the CPU one in-place pass over the GEMM's output.
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let y = self.matmul(xs)?;
        if self.fused(xs) && residual.dtype() == DType::F32 && !residual.track_op() {
            layers::fused::bias_residual_in_place(&y, self.bias_values.as_deref(), residual)?;
            return Ok(y);
        }
        let y = match &self.bias {
            Some(b) => add(&y, b)?,
            None => y,
        };
        add(residual, &y)
    }
}

/// LayerNorm over the last dimension (`torch.nn.LayerNorm`): mean and variance by two passes, in
/// f64 on the CPU; elsewhere (or with [`layers::kernels::force_generic`]) two passes of candle ops
/// in the tensor's own dtype, which never forms `E[x²] − E[x]²` either.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The same parameters as tensors on the model's device, for the device-generic path.
    weight_t: Tensor,
    bias_t: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight_t = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        let bias_t = vb.get(dim, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight: weight_t.to_vec1()?,
            bias: bias_t.to_vec1()?,
            weight_t,
            bias_t,
            eps,
        })
    }

    /// # Shapes
    /// `xs`: `[.., dim]` (f32) → same shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if layers::kernels::host_kernels(xs.device()) && xs.dtype() == DType::F32 {
            return xs.contiguous()?.apply_op1_no_bwd(self);
        }
        self.forward_generic(xs)
    }

    /// The device-generic two-pass LayerNorm.
    fn forward_generic(&self, xs: &Tensor) -> Result<Tensor> {
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let dtype = xs.dtype();
        centered
            .broadcast_mul(&inv)?
            .broadcast_mul(&self.weight_t.to_dtype(dtype)?)?
            .broadcast_add(&self.bias_t.to_dtype(dtype)?)
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "metrics-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("layer norm: only f32 is supported"),
        };
        let src = match layout.contiguous_offsets() {
            Some((a, b)) => &src[a..b],
            None => candle_core::bail!("layer norm: input must be contiguous"),
        };
        let dim = layout.dims()[layout.dims().len() - 1];
        if dim != self.weight.len() {
            candle_core::bail!(
                "layer norm over {} features applied to a tensor of shape {:?}",
                self.weight.len(),
                layout.dims()
            );
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(dim)
            .zip(src.par_chunks(dim))
            .for_each(|(out, row)| {
                let n = dim as f64;
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = row
                    .iter()
                    .map(|&v| {
                        let d = v as f64 - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / n;
                let inv = 1.0 / (var + self.eps).sqrt();
                for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(&self.weight).zip(&self.bias)
                {
                    *o = ((v as f64 - mean) * inv * w as f64 + b as f64) as f32;
                }
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Multi-head self-attention with the three input projections fused into one matmul.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

/// Checkpoint names of one attention block's four projections.
pub struct AttentionNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub out: &'static str,
}

impl SelfAttention {
    pub fn load(
        vb: VarBuilder,
        names: &AttentionNames,
        dim: usize,
        heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        if heads == 0 || dim % heads != 0 {
            candle_core::bail!("hidden size {dim} is not divisible by {heads} attention heads");
        }
        let get_w = |n: &str| vb.pp(n).get((dim, dim), "weight");
        let w = Tensor::cat(&[get_w(names.q)?, get_w(names.k)?, get_w(names.v)?], 0)?;
        let b = if qkv_bias {
            let get_b = |n: &str| vb.pp(n).get(dim, "bias");
            Some(Tensor::cat(
                &[get_b(names.q)?, get_b(names.k)?, get_b(names.v)?],
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            qkv: Linear::from_weights(&w, b)?,
            out: Linear::load(vb.pp(names.out), dim, dim, true)?,
            heads,
            head_dim: dim / heads,
        })
    }

    /// `softmax(q kᵀ / √d + mask) v`, as transformers' `eager_attention_forward`.
    ///
    /// # Shapes
    /// `xs`: `[batch, seq, dim]`; `mask`: additive `[seq, seq]` or none → `[batch, seq, dim]`.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.out.forward(&self.context(xs, mask)?)
    }

    /// `residual + forward(xs, mask)`, the residual added in the output projection's epilogue.
    pub fn forward_residual(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.out
            .forward_residual(&self.context(xs, mask)?, residual)
    }

    /// `residual + forward(xs, mask)` for the first `rows` tokens only (queries from those rows,
    /// keys and values from every token): `[batch, rows, dim]`. On the CPU the other rows' queries,
    /// attention, output projection and MLP are never computed; elsewhere the whole block runs and
    /// is narrowed.
    fn forward_residual_first(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
        rows: usize,
    ) -> Result<Tensor> {
        let (_, _, d) = xs.dims3()?;
        if !self.qkv.fused(xs) {
            return self
                .forward_residual(xs, mask, residual)?
                .narrow(1, 0, rows);
        }
        let q = self.qkv.forward_cols(&xs.narrow(1, 0, rows)?, 0, d)?;
        let kv = self.qkv.forward_cols(xs, d, 2 * d)?;
        let k = kv.narrow(2, 0, d)?;
        let v = kv.narrow(2, d, d)?;
        let mask = match mask {
            Some(m) => Some(m.narrow(0, 0, rows)?),
            None => None,
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let ctx = layers::attention::attention(&q, &k, &v, self.heads, scale, mask.as_ref())?;
        self.out
            .forward_residual(&ctx, &residual.narrow(1, 0, rows)?)
    }

    /// The attention's output before the output projection, `[batch, seq, dim]`. On the CPU one
    /// task per (batch, head) reads q, k and v as views of the fused projection
    /// ([`layers::attention::attention`]); elsewhere candle's ops.
    fn context(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let qkv = self.qkv.forward(xs)?;
        if self.qkv.fused(xs) {
            let q = qkv.narrow(2, 0, d)?;
            let k = qkv.narrow(2, d, d)?;
            let v = qkv.narrow(2, 2 * d, d)?;
            return layers::attention::attention(&q, &k, &v, self.heads, scale, mask);
        }
        let qkv = qkv
            .reshape((b, n, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let q = qkv.get(0)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))
    }
}

/// A pre-LayerNorm transformer block: `x + attn(ln1(x))`, then `h + fc2(act(fc1(ln2(h))))`.
/// ViT (`ViTLayer`) and CLIP (`CLIPEncoderLayer`) are both this, with different tensor names.
#[derive(Debug, Clone)]
pub struct Block {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

/// Checkpoint names of one block's parts, relative to the block's prefix.
pub struct BlockNames {
    pub ln1: &'static str,
    pub ln2: &'static str,
    pub attn: &'static str,
    pub attn_names: AttentionNames,
    pub fc1: &'static str,
    pub fc2: &'static str,
}

/// Dimensions of one block.
pub struct BlockDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub qkv_bias: bool,
    pub eps: f64,
    pub act: Activation,
}

impl Block {
    pub fn load(vb: VarBuilder, names: &BlockNames, d: &BlockDims) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(vb.pp(names.ln1), d.hidden, d.eps)?,
            attn: SelfAttention::load(
                vb.pp(names.attn),
                &names.attn_names,
                d.hidden,
                d.heads,
                d.qkv_bias,
            )?,
            ln2: LayerNorm::load(vb.pp(names.ln2), d.hidden, d.eps)?,
            fc1: Linear::load(vb.pp(names.fc1), d.hidden, d.intermediate, true)?,
            fc2: Linear::load(vb.pp(names.fc2), d.intermediate, d.hidden, true)?,
            act: d.act,
        })
    }

    /// # Shapes
    /// `xs`: `[batch, seq, hidden]` → same.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .attn
            .forward_residual(&self.ln1.forward(xs)?, mask, xs)?;
        let m = self
            .fc1
            .forward_act(&self.ln2.forward(&h)?, Some(self.act))?;
        self.fc2.forward_residual(&m, &h)
    }

    /// `forward(xs, mask)` for the first `rows` tokens only, `[batch, rows, hidden]`: what an
    /// encoder's last block needs when only the CLS token is read. The same values as
    /// `forward(..).narrow(1, 0, rows)` up to the GEMMs' rounding.
    pub fn forward_first(&self, xs: &Tensor, mask: Option<&Tensor>, rows: usize) -> Result<Tensor> {
        let h = self
            .attn
            .forward_residual_first(&self.ln1.forward(xs)?, mask, xs, rows)?;
        let m = self
            .fc1
            .forward_act(&self.ln2.forward(&h)?, Some(self.act))?;
        self.fc2.forward_residual(&m, &h)
    }
}

/// The blocks in turn, without a mask; with `cls_only` the last block computes the first token's
/// row alone (`[batch, 1, hidden]`), for encoders whose embedding reads only the CLS token.
pub fn run_blocks(blocks: &[Block], mut xs: Tensor, cls_only: bool) -> Result<Tensor> {
    for (i, block) in blocks.iter().enumerate() {
        xs = if cls_only && i + 1 == blocks.len() {
            block.forward_first(&xs, None, 1)?
        } else {
            block.forward(&xs, None)?
        };
    }
    Ok(xs)
}

/// Non-overlapping `patch × patch` convolution (stride = kernel) as one matmul over patches.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
    channels: usize,
}

impl PatchEmbed {
    /// `weight`: `[dim, channels, patch, patch]`.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (dim, channels, p, p2) = weight.dims4()?;
        if p != p2 {
            candle_core::bail!("non-square patch kernel {p}×{p2}");
        }
        Ok(Self {
            proj: Linear::from_weights(&weight.reshape((dim, channels * p * p))?, bias)?,
            patch: p,
            channels,
        })
    }

    /// # Shapes
    /// `pixels`: `[batch, channels, h, w]` → `[batch, (h/p)·(w/p), dim]`, patches in row-major order
    /// (as `conv(..).flatten(2).transpose(1, 2)`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        if c != self.channels || h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "pixel tensor {:?} does not fit {}-channel {p}×{p} patches",
                pixels.dims(),
                self.channels
            );
        }
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        self.proj.forward(&patches)
    }
}

/// Row `i` of `[batch, seq, dim]` for every batch element: `[batch, dim]`.
/// `a + b` (same shape, or `b` a bias over `a`'s last dim): one parallel pass on the CPU for
/// f32/f64 ([`layers::host::add`]), candle's broadcast add elsewhere.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if layers::kernels::host_kernels(a.device())
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
    {
        return layers::host::add(a, b);
    }
    a.broadcast_add(b)
}

pub fn token(xs: &Tensor, i: usize) -> Result<Tensor> {
    xs.narrow(1, i, 1)?.squeeze(1)
}

/// L2-normalizes the last dimension.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    const NAMES: BlockNames = BlockNames {
        ln1: "ln1",
        ln2: "ln2",
        attn: "attn",
        attn_names: AttentionNames {
            q: "q",
            k: "k",
            v: "v",
            out: "o",
        },
        fc1: "fc1",
        fc2: "fc2",
    };

    /// A block with random weights (LayerNorm parameters included).
    fn block(act: Activation) -> Block {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let dims = BlockDims {
            hidden: 24,
            intermediate: 40,
            heads: 3,
            qkv_bias: true,
            eps: 1e-5,
            act,
        };
        Block::load(vb.clone(), &NAMES, &dims).unwrap();
        for var in vm.all_vars() {
            var.set(&Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        Block::load(vb, &NAMES, &dims).unwrap()
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

    /// The fused CPU block (attention per head, in-place epilogues) against the device-generic
    /// one, and its first-rows form against the whole block narrowed, with and without a mask.
    #[test]
    fn fused_block_and_first_rows_match_the_generic_block() {
        let n = 11;
        let xs = Tensor::randn(0f32, 1.0, (3, n, 24), &Device::Cpu).unwrap();
        let causal: Vec<f32> = (0..n * n)
            .map(|i| if i % n > i / n { f32::MIN } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
        for act in [Activation::Gelu, Activation::QuickGelu] {
            let b = block(act);
            for mask in [None, Some(&causal)] {
                let fused = b.forward(&xs, mask).unwrap();
                let generic = {
                    let _g = layers::kernels::force_generic();
                    b.forward(&xs, mask).unwrap()
                };
                let d = max_abs_diff(&fused, &generic);
                assert!(d < 5e-6, "{act:?}: fused vs generic {d}");
                for rows in [1, 4] {
                    let first = b.forward_first(&xs, mask, rows).unwrap();
                    assert_eq!(first.dims(), &[3, rows, 24]);
                    let d = max_abs_diff(&first, &fused.narrow(1, 0, rows).unwrap());
                    assert!(d < 5e-6, "{act:?}: first {rows} rows {d}");
                    let _g = layers::kernels::force_generic();
                    let first_generic = b.forward_first(&xs, mask, rows).unwrap();
                    let d = max_abs_diff(&first_generic, &generic.narrow(1, 0, rows).unwrap());
                    assert_eq!(d, 0.0);
                }
            }
        }
    }
}

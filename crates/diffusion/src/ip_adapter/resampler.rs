//! IP-Adapter Plus's image projection: a Perceiver resampler from the image encoder's penultimate
//! hidden states to `num_queries` tokens.
//!
//! Port of diffusers 0.42.1 `models/embeddings.py` (`IPAdapterPlusImageProjectionBlock`,
//! `IPAdapterPlusImageProjection.forward`) read in the original checkpoint's key layout, which
//! `loaders/unet.py` `_convert_ip_adapter_image_proj_to_diffusers` renames (`layers.{i}.0.norm1`
//! → `ln0`, `norm2` → `ln1`, `to_kv` split in halves into `to_k` / `to_v`, `layers.{i}.1.{0,1,3}`
//! → the feed-forward's LayerNorm and two bias-free linears with exact GELU between). Heads are
//! `to_q` rows / 64, as diffusers infers them; the depth is the number of `layers.{i}` in the file.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use metrics::nn::{Activation, LayerNorm, Linear};

const EPS: f64 = 1e-5;
/// diffusers builds the resampler's attention with `dim_head = 64` and infers the heads from it.
pub(crate) const DIM_HEAD: usize = 64;

#[derive(Debug, Clone)]
struct ResamplerBlock {
    ln0: LayerNorm,
    ln1: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: usize,
}

impl ResamplerBlock {
    fn new(dim: usize, inner: usize, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("0");
        let kv = attn.get((2 * inner, dim), "to_kv.weight")?;
        let ff = vb.pp("1");
        Ok(Self {
            ln0: LayerNorm::load(attn.pp("norm1"), dim, EPS)?,
            ln1: LayerNorm::load(attn.pp("norm2"), dim, EPS)?,
            to_q: Linear::load(attn.pp("to_q"), dim, inner, false)?,
            to_k: Linear::from_weights(&kv.narrow(0, 0, inner)?, None)?,
            to_v: Linear::from_weights(&kv.narrow(0, inner, inner)?, None)?,
            to_out: Linear::load(attn.pp("to_out"), inner, dim, false)?,
            ff_norm: LayerNorm::load(ff.pp("0"), dim, EPS)?,
            ff_in: Linear::load(ff.pp("1"), dim, 4 * dim, false)?,
            ff_out: Linear::load(ff.pp("3"), 4 * dim, dim, false)?,
            heads: inner / DIM_HEAD,
        })
    }

    /// # Shapes
    /// - `x`: `[b, seq, dim]` (the projected image features); `latents`: `[b, queries, dim]`;
    ///   result: like `latents`.
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.ln0.forward(x)?;
        let normed = self.ln1.forward(latents)?;
        let kv_input = Tensor::cat(&[&x, &normed], 1)?;
        let q = self.to_q.forward(&normed)?;
        let k = self.to_k.forward(&kv_input)?;
        let v = self.to_v.forward(&kv_input)?;
        let scale = (DIM_HEAD as f64).powf(-0.5);
        let attn = crate::ops::attention(&q, &k, &v, self.heads, scale)?;
        let latents = (self.to_out.forward(&attn)? + latents)?;
        let h = self
            .ff_in
            .forward_act(&self.ff_norm.forward(&latents)?, Some(Activation::Gelu))?;
        self.ff_out.forward(&h)? + latents
    }
}

/// `IPAdapterPlusImageProjection`.
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    proj_out: Linear,
    norm_out: LayerNorm,
    layers: Vec<ResamplerBlock>,
    queries: usize,
    output_dim: usize,
}

/// The sizes of a resampler, read from its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResamplerDims {
    /// Tokens out (`latents` rows).
    pub queries: usize,
    /// Width of the image encoder's hidden states (`proj_in` input).
    pub embed_dim: usize,
    /// Width of the latents.
    pub hidden_dim: usize,
    /// Width of the tokens out (`proj_out` output).
    pub output_dim: usize,
    /// Attention width (`to_q` rows).
    pub inner: usize,
    pub depth: usize,
}

impl Resampler {
    /// `vb` at `image_proj`.
    pub(crate) fn new(d: &ResamplerDims, vb: VarBuilder) -> Result<Self> {
        let layers = (0..d.depth)
            .map(|i| ResamplerBlock::new(d.hidden_dim, d.inner, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            latents: vb.get((1, d.queries, d.hidden_dim), "latents")?,
            proj_in: Linear::load(vb.pp("proj_in"), d.embed_dim, d.hidden_dim, true)?,
            proj_out: Linear::load(vb.pp("proj_out"), d.hidden_dim, d.output_dim, true)?,
            norm_out: LayerNorm::load(vb.pp("norm_out"), d.output_dim, EPS)?,
            layers,
            queries: d.queries,
            output_dim: d.output_dim,
        })
    }

    /// # Shapes
    /// `hidden`: `[b, seq, embed_dim]` → `[b, queries, output_dim]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let b = hidden.dim(0)?;
        let (_, q, d) = self.latents.dims3()?;
        let mut latents = self.latents.broadcast_as((b, q, d))?.contiguous()?;
        let x = self.proj_in.forward(hidden)?;
        for block in &self.layers {
            latents = block.forward(&x, &latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }

    pub fn queries(&self) -> usize {
        self.queries
    }

    pub fn output_dim(&self) -> usize {
        self.output_dim
    }
}

//! Transformer2DModel (continuous input), BasicTransformerBlock, Attention and the GEGLU
//! feed-forward, ported from diffusers 0.42.1:
//! - `models/transformers/transformer_2d.py`: `Transformer2DModel._init_continuous_input`,
//!   `_operate_on_continuous_inputs`, `_get_output_for_continuous_inputs`
//! - `models/attention.py`: `BasicTransformerBlock` (norm_type "layer_norm"), `FeedForward`
//! - `models/activations.py`: `GEGLU` (exact erf GELU)
//! - `models/attention_processor.py`: `Attention`, `AttnProcessor`, `Attention.get_attention_scores`
//!   (`scale = dim_head^-0.5`, softmax over keys). `upcast_attention` / `upcast_softmax` only change
//!   f16 computations and are no-ops here in f32/f64.

use super::ip::IpLayer;
use super::nn::{proceed, softmax_last_dim, Conv2d, Ctx, Flow, GroupNorm, LayerNorm, Linear};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use std::ops::ControlFlow;

/// diffusers `Attention` with the classic processor; `attn1` (self) or `attn2` (cross).
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// The hook site name when this is a cross-attention layer, e.g. `...transformer_blocks.0.attn2`.
    site: Option<String>,
}

impl Attention {
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        site: Option<String>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::new(query_dim, inner, false, vb.pp("to_q"))?,
            to_k: Linear::new(context_dim, inner, false, vb.pp("to_k"))?,
            to_v: Linear::new(context_dim, inner, false, vb.pp("to_v"))?,
            to_out: Linear::new(inner, query_dim, true, vb.pp("to_out.0"))?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
            site,
        })
    }

    /// `[b, n, heads*d]` -> `[b, heads, n, d]`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, inner) = xs.dims3()?;
        xs.reshape((b, n, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// # Shapes
    /// - `xs`: `[b, n, query_dim]`; `context`: `[b, m, context_dim]` (None: self-attention);
    ///   result: `[b, n, query_dim]`. The probabilities handed to the hook are `[b, heads, n, m]`.
    ///
    /// With an IP-Adapter attached (`ctx.ip`), a cross-attention layer `attn2` takes its text from
    /// the first tokens of `context` and adds `scale · attn(q, image tokens)` (the last
    /// `ip.tokens()` tokens) before `to_out`; the hook sees the text branch's probabilities
    /// `[b, heads, n, m − image tokens]` only.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>, ctx: &mut Ctx) -> Flow<Tensor> {
        let ip = match (&self.site, ctx.ip) {
            (Some(site), Some(ip)) => ip.layer(site).map(|layer| (site, ip, layer)),
            _ => None,
        };
        let Some((site, ip, layer)) = ip else {
            return self.attend(xs, context, ctx, None);
        };
        let context = context.unwrap_or(xs);
        let (text, image) = ip.split(context, site)?;
        self.attend(xs, Some(&text), ctx, Some((layer, &image)))
    }

    fn attend(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        ctx: &mut Ctx,
        ip: Option<(&IpLayer, &Tensor)>,
    ) -> Flow<Tensor> {
        let context = context.unwrap_or(xs);
        let (b, n, _) = xs.dims3()?;
        let hooked = self
            .site
            .as_ref()
            .is_some_and(|site| ctx.hook.wants_attention(site));
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        if !hooked {
            // On the CPU one node, one task per (batch, head), no probabilities kept.
            let out = crate::ops::attention(&q, &k, &v, self.heads, self.scale)?;
            let out = self.add_image_branch(out, &q, ip)?;
            return Ok(ControlFlow::Continue(self.to_out.forward(&out)?));
        }
        // Scaling q ([n, d]) rather than the scores ([n, m]) saves a pass over the larger tensor.
        let qh = self.split_heads(&(&q * self.scale)?)?;
        let k = self.split_heads(&k)?;
        let v = self.split_heads(&v)?;
        // With a constant context (the usual case) k and v get no gradient buffers.
        let scores = crate::ops::matmul_constant(&qh, &k.t()?)?;
        let probs = softmax_last_dim(&scores, ctx)?;
        if let Some(site) = &self.site {
            if ctx.attention(site, &probs)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        let out = crate::ops::matmul_constant(&probs, &v)?; // [b, heads, n, d]
        let out = out.transpose(1, 2)?.reshape((b, n, ()))?;
        let out = self.add_image_branch(out, &q, ip)?;
        Ok(ControlFlow::Continue(self.to_out.forward(&out)?))
    }

    /// `out + scale · attn(q, to_k_ip(image), to_v_ip(image))`; `out` unchanged without an image
    /// branch or at scale 0 (diffusers skips the branch then).
    ///
    /// # Shapes
    /// - `out`, `q`: `[b, n, inner]`; `image`: `[b, tokens, cross_attention_dim]`.
    fn add_image_branch(
        &self,
        out: Tensor,
        q: &Tensor,
        ip: Option<(&IpLayer, &Tensor)>,
    ) -> Result<Tensor> {
        let Some((layer, image)) = ip else {
            return Ok(out);
        };
        if layer.scale == 0.0 {
            return Ok(out);
        }
        let k = layer.to_k_ip.forward(image)?;
        let v = layer.to_v_ip.forward(image)?;
        let image_out = crate::ops::attention(q, &k, &v, self.heads, self.scale)?;
        out + (image_out * layer.scale)?
    }

    /// `(inner, context_dim)`: the width of the keys and of the context this layer attends to.
    pub fn key_dims(&self) -> Result<(usize, usize)> {
        self.to_k.weight().dims2()
    }

    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }
}

/// diffusers `FeedForward` with `GEGLU` (`net.0.proj`, `net.2`), inner dim `4 * dim`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(dim, 2 * inner, true, vb.pp("net.0.proj"))?,
            out: Linear::new(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    /// `ops::geglu` picks its kernel itself (host pass, exact backward in a graph, or candle's ops).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let proj = self.proj.forward(xs)?;
        self.out.forward(&crate::ops::geglu(&proj)?)
    }
}

/// diffusers `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug, Clone)]
pub(crate) struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    site: String,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        only_cross_attention: bool,
        site: String,
        vb: VarBuilder,
    ) -> Result<Self> {
        let eps = 1e-5;
        let attn1_site = only_cross_attention.then(|| format!("{site}.attn1"));
        Ok(Self {
            norm1: LayerNorm::new(dim, eps, vb.pp("norm1"))?,
            attn1: Attention::new(
                dim,
                only_cross_attention.then_some(cross_attention_dim),
                heads,
                dim_head,
                attn1_site,
                vb.pp("attn1"),
            )?,
            norm2: LayerNorm::new(dim, eps, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(cross_attention_dim),
                heads,
                dim_head,
                Some(format!("{site}.attn2")),
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, eps, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            only_cross_attention,
            site,
        })
    }

    /// Cross-attention site names of this block, in forward order.
    pub fn cross_attention_sites(&self) -> Vec<String> {
        [&self.attn1.site, &self.attn2.site]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// The cross-attention layer `attn2`.
    pub fn attn2(&self) -> &Attention {
        &self.attn2
    }

    /// # Shapes
    /// - `xs`: `[b, hw, dim]`; `context`: `[b, tokens, cross_attention_dim]`; result: like `xs`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor, ctx: &mut Ctx) -> Flow<Tensor> {
        let h = self.norm1.forward(xs, ctx)?;
        let ctx1 = self.only_cross_attention.then_some(context);
        let xs = (proceed!(self.attn1.forward(&h, ctx1, ctx)) + xs)?;
        let h = self.norm2.forward(&xs, ctx)?;
        let xs = (proceed!(self.attn2.forward(&h, Some(context), ctx)) + xs)?;
        let h = self.norm3.forward(&xs, ctx)?;
        let xs = (self.ff.forward(&h)? + xs)?;
        Ok(ctx.block_output(&self.site, &xs)?.map_continue(|()| xs))
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` on continuous (image) input.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub(crate) struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Transformer2DModel {
    pub fn new(cfg: &TransformerConfig, site: &str, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        if cfg.heads == 0 || c % cfg.heads != 0 {
            candle_core::bail!(
                "'{}': {c} channels do not split into {} attention heads",
                vb.prefix(),
                cfg.heads
            );
        }
        let dim_head = c / cfg.heads;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Projection::Linear(Linear::new(c, c, true, vb.pp("proj_in"))?),
                Projection::Linear(Linear::new(c, c, true, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(c, c, 1, 1, 0, vb.pp("proj_in"))?),
                Projection::Conv(Conv2d::new(c, c, 1, 1, 0, vb.pp("proj_out"))?),
            )
        };
        let transformer_blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    c,
                    cfg.heads,
                    dim_head,
                    cfg.cross_attention_dim,
                    cfg.only_cross_attention,
                    format!("{site}.transformer_blocks.{i}"),
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    pub fn blocks(&self) -> &[BasicTransformerBlock] {
        &self.transformer_blocks
    }

    /// # Shapes
    /// - `xs`: `[b, c, h, w]`; `context`: `[b, tokens, cross_attention_dim]`; result: like `xs`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor, ctx: &mut Ctx) -> Flow<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, ()));
        let mut hidden = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            hidden = proceed!(block.forward(&hidden, context, ctx));
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&hidden)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&hidden)?)?,
        };
        Ok(ControlFlow::Continue((out + residual)?))
    }
}

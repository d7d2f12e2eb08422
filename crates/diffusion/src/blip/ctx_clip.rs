//! BLIP-Diffusion's context-aware CLIP text encoder (`text_encoder/`, `ContextCLIPTextModel`): a
//! CLIP text transformer whose input embeddings get the Q-Former's query embeddings INSERTED (not
//! substituted) at `ctx_begin_pos`, before the position embeddings are added; the sequence grows by
//! the number of queries (SPEC §11).
//!
//! Port of diffusers 0.32.2 `pipelines/blip_diffusion/modeling_ctx_clip.py`
//! (`ContextCLIPTextEmbeddings.forward`, `ContextCLIPTextTransformer.forward` with the causal mask
//! over the grown sequence, and its `final_layer_norm`, built with PyTorch's default eps 1e-5
//! whatever the config says) and transformers 4.51.3 `models/clip/modeling_clip.py`
//! (`CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer`). Inference only.

use super::Activation;
use crate::text::ClipTextConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, hidden]`, `mask`: `[n, n]` additive; output `[b, n, hidden]`.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, i, vb.pp("mlp.fc1"))?,
            fc2: linear(i, h, vb.pp("mlp.fc2"))?,
            layer_norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
            act: Activation::parse(&cfg.hidden_act, "text_encoder config")?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        &h + self.fc2.forward(&self.act.apply(&m)?)?
    }
}

/// `ContextCLIPTextModel` (weights under `text_model.`).
#[derive(Debug, Clone)]
pub struct ContextClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ContextClipTextModel {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || h % cfg.num_attention_heads != 0 {
            candle_core::bail!(
                "text encoder config: hidden_size {h} is not divisible by num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
                .collect::<Result<_>>()?,
            // nn.LayerNorm(embed_dim): the config's layer_norm_eps is not used here.
            final_layer_norm: layer_norm(h, 1e-5, vb.pp("final_layer_norm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The input embeddings: token embeddings with `ctx` inserted after the first `ctx_begin_pos`
    /// tokens, plus position embeddings over the grown sequence.
    ///
    /// # Shapes
    /// `ids`: `[b, n]`; `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]` (`k = 0` without ctx).
    pub fn embeddings(&self, ids: &Tensor, ctx: Option<(&Tensor, usize)>) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let vocab = self.cfg.vocab_size;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= vocab {
            candle_core::bail!(
                "token id {max_id} is outside the text encoder's vocabulary of {vocab}"
            );
        }
        let tokens = self.token_embedding.forward(ids)?;
        let tokens = match ctx {
            None => tokens,
            Some((ctx, pos)) => {
                let (cb, _, ch) = ctx.dims3()?;
                if cb != b || ch != self.cfg.hidden_size {
                    candle_core::bail!(
                        "context embeddings {:?} do not fit token ids [{b}, {n}] and hidden size {}",
                        ctx.dims(),
                        self.cfg.hidden_size
                    );
                }
                if pos > n {
                    candle_core::bail!("ctx_begin_pos {pos} is past the {n} prompt tokens");
                }
                let ctx = ctx.to_dtype(tokens.dtype())?;
                Tensor::cat(
                    &[
                        &tokens.narrow(1, 0, pos)?,
                        &ctx,
                        &tokens.narrow(1, pos, n - pos)?,
                    ],
                    1,
                )?
            }
        };
        let len = tokens.dim(1)?;
        if len > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{len} tokens (prompt and context) exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        tokens.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// `last_hidden_state` of `text_encoder(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[pos] * b)`.
    ///
    /// # Shapes
    /// `ids`: `[b, n]` (u32); `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]`.
    pub fn forward(&self, ids: &Tensor, ctx: Option<(&Tensor, usize)>) -> Result<Tensor> {
        let mut xs = self.embeddings(ids, ctx)?;
        let mask = Self::causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

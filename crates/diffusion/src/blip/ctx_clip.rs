//! BLIP-Diffusion's context-aware CLIP text encoder (`text_encoder/`, `ContextCLIPTextModel`): the
//! CLIP text transformer of [`crate::text`], whose input embeddings get the Q-Former's query
//! embeddings INSERTED (not substituted) at `ctx_begin_pos`, before the position embeddings are
//! added; the sequence grows by the number of queries (SPEC §11).
//!
//! Port of diffusers 0.32.2 `pipelines/blip_diffusion/modeling_ctx_clip.py`
//! (`ContextCLIPTextEmbeddings.forward`, `ContextCLIPTextTransformer.forward` with the causal mask
//! over the grown sequence); the layers are transformers' `CLIPEncoderLayer`s. The one difference
//! from [`ClipTextModel`] besides the splice: the final layer norm is built with PyTorch's default
//! eps 1e-5 whatever the config says.

use crate::text::{ClipTextConfig, ClipTextModel};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// `ContextCLIPTextModel` (weights under `text_model.`).
#[derive(Debug, Clone)]
pub struct ContextClipTextModel {
    clip: ClipTextModel,
}

impl ContextClipTextModel {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        // nn.LayerNorm(embed_dim): the config's layer_norm_eps is not used for the final norm.
        Ok(Self {
            clip: ClipTextModel::with_final_norm_eps(cfg, 1e-5, vb)?,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        self.clip.config()
    }

    /// The input embeddings (see [`ClipTextModel::embeddings`]).
    ///
    /// # Shapes
    /// `ids`: `[b, n]`; `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]` (`k = 0` without ctx).
    pub fn embeddings(&self, ids: &Tensor, ctx: Option<(&Tensor, usize)>) -> Result<Tensor> {
        self.clip.embeddings(ids, ctx)
    }

    /// `last_hidden_state` of `text_encoder(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[pos] * b)`.
    ///
    /// # Shapes
    /// `ids`: `[b, n]` (u32); `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]`.
    pub fn forward(&self, ids: &Tensor, ctx: Option<(&Tensor, usize)>) -> Result<Tensor> {
        self.clip.forward_with_context(ids, ctx)
    }
}

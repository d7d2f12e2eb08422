//! Hugging Face `CLIPModel` (the layout of `openai/clip-vit-base-patch32`): projected image
//! embeddings (CLIP-I, CLIP-T) and projected text embeddings pooled at the end-of-text token (CLIP-T).
//!
//! Port of transformers 5.24 `models/clip/modeling_clip.py`
//! (<https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/clip/modeling_clip.py>):
//! `CLIPVisionEmbeddings.forward`, `CLIPEncoderLayer.forward`, `CLIPVisionTransformer.forward`
//! (CLS token → `post_layernorm` → `visual_projection`) and `CLIPTextTransformer.forward` (causal mask,
//! `final_layer_norm`, EOT pooling: `argmax(input_ids)` when the config's `eos_token_id` is 2, the
//! legacy value the OpenAI checkpoints carry, else the first position of `eos_token_id`).
//!
//! Not candle-transformers' CLIP: it hard-codes `quick_gelu` for the text tower and eps 1e-5, always
//! pools with `argmax`, and substitutes a random class embedding when the tensor is missing.

use crate::nn::{run_blocks, Linear, PatchEmbed};
use crate::nn::{token, Activation, AttentionNames, Block, BlockDims, BlockNames, LayerNorm};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `text_config` of a `CLIPConfig` (defaults as transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

/// `vision_config` of a `CLIPConfig` (defaults as transformers' `CLIPVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// `config.json` of a `CLIPModel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
        }
    }
}

impl ClipConfig {
    /// `openai/clip-vit-base-patch32` (its config carries the legacy `eos_token_id` 2).
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: ClipTextConfig {
                eos_token_id: 2,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

const CLIP_BLOCK: BlockNames = BlockNames {
    ln1: "layer_norm1",
    ln2: "layer_norm2",
    attn: "self_attn",
    attn_names: AttentionNames {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "out_proj",
    },
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

fn blocks(
    vb: VarBuilder,
    n: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f64,
    act: Activation,
) -> Result<Vec<Block>> {
    let dims = BlockDims {
        hidden,
        intermediate,
        heads,
        qkv_bias: true,
        eps,
        act,
    };
    let vb = vb.pp("encoder").pp("layers");
    (0..n)
        .map(|i| Block::load(vb.pp(i), &CLIP_BLOCK, &dims))
        .collect()
}

/// `CLIPVisionTransformer` + `visual_projection`.
#[derive(Debug, Clone)]
pub struct ClipVision {
    patch_embedding: PatchEmbed,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<Block>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    projection_dim: usize,
    cfg: ClipVisionConfig,
}

/// `config.json` of a `CLIPVisionModelWithProjection` (IP-Adapter's `models/image_encoder`): the
/// vision config's fields at the top level beside `projection_dim` (transformers'
/// `CLIPVisionConfig`, whose `projection_dim` defaults to 512).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionWithProjectionConfig {
    #[serde(flatten)]
    pub vision: ClipVisionConfig,
    #[serde(default = "d_projection_dim")]
    pub projection_dim: usize,
}

fn d_projection_dim() -> usize {
    512
}

impl ClipVision {
    /// `vb` at the model root (`vision_model.*`, `visual_projection.*`).
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Self::from_vision_config(&cfg.vision_config, cfg.projection_dim, vb)
    }

    /// A `CLIPVisionModelWithProjection` (same weight names as `CLIPModel`'s vision half).
    pub fn with_projection(cfg: &ClipVisionWithProjectionConfig, vb: VarBuilder) -> Result<Self> {
        Self::from_vision_config(&cfg.vision, cfg.projection_dim, vb)
    }

    fn from_vision_config(
        c: &ClipVisionConfig,
        projection_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (d, p) = (c.hidden_size, c.patch_size);
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let n_pos = (c.image_size / p).pow(2) + 1;
        Ok(Self {
            patch_embedding: PatchEmbed::new(
                &emb.pp("patch_embedding")
                    .get((d, c.num_channels, p, p), "weight")?,
                None,
            )?,
            class_embedding: emb.get(d, "class_embedding")?.reshape((1, 1, d))?,
            position_embedding: emb
                .pp("position_embedding")
                .get((n_pos, d), "weight")?
                .unsqueeze(0)?,
            pre_layrnorm: LayerNorm::load(vm.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers: blocks(
                vm.clone(),
                c.num_hidden_layers,
                d,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
            )?,
            post_layernorm: LayerNorm::load(vm.pp("post_layernorm"), d, c.layer_norm_eps)?,
            visual_projection: Linear::load(vb.pp("visual_projection"), d, projection_dim, false)?,
            projection_dim,
            cfg: c.clone(),
        })
    }

    /// Length of the projected embedding.
    pub fn projection_dim(&self) -> usize {
        self.projection_dim
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The encoder's input: patch and class embeddings with positions, after `pre_layrnorm`.
    fn embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        if h != self.cfg.image_size || w != self.cfg.image_size {
            candle_core::bail!(
                "input image size ({h}*{w}) doesn't match model ({0}*{0})",
                self.cfg.image_size
            );
        }
        let patches = self.patch_embedding.forward(pixels)?;
        let cls = self
            .class_embedding
            .broadcast_as((b, 1, self.cfg.hidden_size))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        self.pre_layrnorm.forward(&xs)
    }

    /// Projected image embeddings (`CLIPModel.get_image_features`, the `image_embeds` of
    /// `CLIPVisionModelWithProjection`).
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, image, image]` → `[batch, projection_dim]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let xs = run_blocks(&self.layers, self.embeddings(pixels)?, true)?;
        let pooled = self.post_layernorm.forward(&token(&xs, 0)?)?;
        self.visual_projection.forward(&pooled)
    }

    /// `hidden_states[-2]` of transformers' `output_hidden_states=True`: the output of the
    /// second-to-last encoder layer, every token, no final norm (what IP-Adapter Plus reads).
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, image, image]` → `[batch, patches + 1, hidden_size]`.
    pub fn penultimate_hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        let n = self.layers.len();
        if n < 1 {
            candle_core::bail!("a vision tower without layers has no penultimate hidden state");
        }
        run_blocks(&self.layers[..n - 1], self.embeddings(pixels)?, false)
    }
}

/// `CLIPTextTransformer` + `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipText {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Block>,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
    cfg: ClipTextConfig,
}

impl ClipText {
    /// `vb` at the model root (`text_model.*`, `text_projection.*`).
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let c = &cfg.text_config;
        let d = c.hidden_size;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        Ok(Self {
            token_embedding: emb.pp("token_embedding").get((c.vocab_size, d), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((c.max_position_embeddings, d), "weight")?,
            layers: blocks(
                tm.clone(),
                c.num_hidden_layers,
                d,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
            )?,
            final_layer_norm: LayerNorm::load(tm.pp("final_layer_norm"), d, c.layer_norm_eps)?,
            text_projection: Linear::load(vb.pp("text_projection"), d, cfg.projection_dim, false)?,
            cfg: c.clone(),
        })
    }

    pub fn max_len(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// The token whose hidden state is pooled, as transformers picks it: the first maximum of the
    /// ids when `eos_token_id == 2` (legacy configs), else the first occurrence of `eos_token_id`
    /// (position 0 when there is none, as torch's `argmax` of an all-false mask); `None` for no ids.
    pub fn pooled_position(ids: &[u32], eos_token_id: u32) -> Option<usize> {
        if ids.is_empty() {
            return None;
        }
        if eos_token_id == 2 {
            let max = *ids.iter().max()?;
            ids.iter().position(|&t| t == max)
        } else {
            // `(input_ids == eos_token_id).int().argmax(-1)`: with no end token (ids cut at the
            // context, as torchmetrics cuts them) the mask is all zeros and torch's argmax is 0.
            Some(ids.iter().position(|&t| t == eos_token_id).unwrap_or(0))
        }
    }

    /// Projected text embeddings (`CLIPModel.get_text_features`) of equally long id rows.
    ///
    /// # Shapes
    /// `ids`: `batch` rows of `seq ≤ max_position_embeddings` ids → `[batch, projection_dim]`.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.token_embedding.device().clone();
        let n = ids.first().map(Vec::len).unwrap_or(0);
        if ids.is_empty() || n == 0 || ids.iter().any(|r| r.len() != n) {
            candle_core::bail!("text batch must be non-empty rows of equal length");
        }
        if n > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence length {n} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let b = ids.len();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            candle_core::bail!(
                "token id {bad} outside the vocabulary ({})",
                self.cfg.vocab_size
            );
        }
        let ids_t = Tensor::from_vec(flat, b * n, &device)?;
        let xs = self
            .token_embedding
            .index_select(&ids_t, 0)?
            .reshape((b, n, self.cfg.hidden_size))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        let mask = causal_mask(n, &device)?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        let mut rows = Vec::with_capacity(b);
        for (i, r) in ids.iter().enumerate() {
            let pos = Self::pooled_position(r, self.cfg.eos_token_id).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "token ids have no end-of-text token {}",
                    self.cfg.eos_token_id
                ))
            })?;
            rows.push(xs.i((i, pos))?.unsqueeze(0)?);
        }
        let pooled = self.final_layer_norm.forward(&Tensor::cat(&rows, 0)?)?;
        self.text_projection.forward(&pooled)
    }
}

/// Additive causal mask `[n, n]`: 0 on and below the diagonal, −∞ above.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (n, n), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eot_pooling_follows_the_config_eos_token_id() {
        // Padded with EOT (49407) after the real EOT, as the OpenAI tokenizer pads.
        let ids = [49406, 320, 1929, 49407, 49407, 49407];
        // Legacy configs (eos_token_id 2): first maximum of the ids.
        assert_eq!(ClipText::pooled_position(&ids, 2), Some(3));
        // Newer configs: first occurrence of eos_token_id, even when a larger id comes earlier.
        let with_added = [49406, 49410, 320, 49407, 0];
        assert_eq!(ClipText::pooled_position(&with_added, 49407), Some(3));
        assert_eq!(ClipText::pooled_position(&with_added, 2), Some(1));
        // No end token (cut off): transformers pools at argmax of an all-false mask, position 0.
        assert_eq!(ClipText::pooled_position(&[49406, 1, 5], 49407), Some(0));
        assert_eq!(ClipText::pooled_position(&[], 49407), None);
    }

    #[test]
    fn hidden_act_is_read_from_the_config() {
        let cfg: ClipConfig = serde_json::from_str(
            r#"{"text_config": {"hidden_act": "gelu"}, "vision_config": {"hidden_act": "quick_gelu"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text_config.hidden_act, Activation::Gelu);
        assert_eq!(cfg.vision_config.hidden_act, Activation::QuickGelu);
        let bad = serde_json::from_str::<ClipConfig>(r#"{"text_config": {"hidden_act": "relu6"}}"#);
        assert!(bad.unwrap_err().to_string().contains("relu6"));
        // Defaults are transformers' CLIPConfig defaults.
        let d: ClipConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(d.projection_dim, 512);
        assert_eq!(d.text_config.eos_token_id, 49407);
        assert_eq!(d.vision_config.patch_size, 32);
    }
}

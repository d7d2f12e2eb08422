//! Hugging Face `ViTModel` (the layout of `facebook/dino-vits16`), for the DINO score (SPEC §5):
//! the embedding is the CLS token of `last_hidden_state`, i.e. after the final LayerNorm, never the
//! (randomly initialized) pooler.
//!
//! Port of transformers 5.24 `models/vit/modeling_vit.py` (`ViTEmbeddings.forward`, `ViTLayer.forward`,
//! `ViTModel.forward`; <https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/vit/modeling_vit.py>).
//! Both checkpoint layouts load: the legacy names the real checkpoint ships
//! (`encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...) and the transformers ≥ 5
//! names (`layers.N.attention.q_proj`, `mlp.fc1`, ...), with or without a `vit.` prefix.

use crate::nn::Activation;
use crate::nn::{
    run_blocks, token, AttentionNames, Block, BlockDims, BlockNames, LayerNorm, PatchEmbed,
};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `config.json` of a `ViTModel` (field names and defaults as transformers' `ViTConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "eps12")]
    pub layer_norm_eps: f64,
    #[serde(default = "d224")]
    pub image_size: usize,
    #[serde(default = "d16")]
    pub patch_size: usize,
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
}

fn d768() -> usize {
    768
}
fn d12() -> usize {
    12
}
fn d3072() -> usize {
    3072
}
fn d224() -> usize {
    224
}
fn d16() -> usize {
    16
}
fn d3() -> usize {
    3
}
fn gelu() -> Activation {
    Activation::Gelu
}
fn eps12() -> f64 {
    1e-12
}
fn yes() -> bool {
    true
}

impl VitConfig {
    /// `facebook/dino-vits16`.
    pub fn dino_vits16() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            intermediate_size: 1536,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

const LEGACY: BlockNames = BlockNames {
    ln1: "layernorm_before",
    ln2: "layernorm_after",
    attn: "attention",
    attn_names: AttentionNames {
        q: "attention.query",
        k: "attention.key",
        v: "attention.value",
        out: "output.dense",
    },
    fc1: "intermediate.dense",
    fc2: "output.dense",
};

const CURRENT: BlockNames = BlockNames {
    ln1: "layernorm_before",
    ln2: "layernorm_after",
    attn: "attention",
    attn_names: AttentionNames {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "o_proj",
    },
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

/// `ViTModel` without the pooler.
#[derive(Debug, Clone)]
pub struct Vit {
    patch_embeddings: PatchEmbed,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<Block>,
    layernorm: LayerNorm,
    cfg: VitConfig,
}

impl Vit {
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("vit.embeddings.cls_token") {
            vb.pp("vit")
        } else {
            vb
        };
        // The transformers ≥ 5 names only where the checkpoint has them; otherwise the legacy names
        // of the published checkpoints (a missing tensor is then reported under its legacy name).
        let (layers_vb, names) = if !vb.contains_tensor("encoder.layer.0.layernorm_before.weight")
            && vb.contains_tensor("layers.0.layernorm_before.weight")
        {
            (vb.pp("layers"), &CURRENT)
        } else {
            (vb.pp("encoder").pp("layer"), &LEGACY)
        };
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vb.pp("embeddings");
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_embeddings = PatchEmbed::new(
            &proj.get((d, cfg.num_channels, p, p), "weight")?,
            Some(proj.get(d, "bias")?),
        )?;
        let cls_token = emb.get((1, 1, d), "cls_token")?;
        let position_embeddings = emb.get((1, n_pos, d), "position_embeddings")?;
        let dims = BlockDims {
            hidden: d,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            qkv_bias: cfg.qkv_bias,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(layers_vb.pp(i), names, &dims))
            .collect::<Result<Vec<_>>>()?;
        let layernorm = LayerNorm::load(vb.pp("layernorm"), d, cfg.layer_norm_eps)?;
        Ok(Self {
            patch_embeddings,
            cls_token,
            position_embeddings,
            layers,
            layernorm,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// `last_hidden_state` before the final LayerNorm; with `cls_only`, its CLS row alone
    /// (`[batch, 1, hidden]`, the last block computed for that row only).
    fn encode(&self, pixels: &Tensor, cls_only: bool) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        if h != self.cfg.image_size || w != self.cfg.image_size {
            candle_core::bail!(
                "input image size ({h}*{w}) doesn't match model ({0}*{0})",
                self.cfg.image_size
            );
        }
        let patches = self.patch_embeddings.forward(pixels)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.hidden_size))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        run_blocks(&self.layers, xs, cls_only)
    }

    /// `last_hidden_state` (after the final LayerNorm).
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, image, image]` → `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(&self.encode(pixels, false)?)
    }

    /// The DINO embedding: CLS token of `last_hidden_state`. LayerNorm is per token, so only the CLS
    /// row is normalized.
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, image, image]` → `[batch, hidden]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.layernorm
            .forward(&token(&self.encode(pixels, true)?, 0)?)
    }
}

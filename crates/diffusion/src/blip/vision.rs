//! The BLIP-2 vision encoder of BLIP-Diffusion's Q-Former (`qformer.visual_encoder`).
//!
//! Port of diffusers 0.32.2 `pipelines/blip_diffusion/modeling_blip2.py` (`Blip2VisionEmbeddings`,
//! `Blip2VisionModel.forward`, which unlike transformers' has a `pre_layernorm`) and transformers
//! 4.51.3 `models/blip_2/modeling_blip_2.py` (`Blip2Attention` with its fused `qkv`, `Blip2MLP`,
//! `Blip2EncoderLayer`). Inference only.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use layers::Activation;
use serde::Deserialize;

fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}

/// `vision_config` of the Q-Former's `config.json` (transformers' `Blip2VisionConfig`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
}

#[derive(Debug, Clone)]
struct Blip2Attention {
    qkv: Linear,
    projection: Linear,
    heads: usize,
    head_dim: usize,
}

impl Blip2Attention {
    fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let qkv = if cfg.qkv_bias {
            linear(h, 3 * h, vb.pp("qkv"))?
        } else {
            linear_no_bias(h, 3 * h, vb.pp("qkv"))?
        };
        Ok(Self {
            qkv,
            projection: linear(h, h, vb.pp("projection"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, hidden]`; output the same.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, n, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (self.head_dim as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.projection.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Blip2EncoderLayer {
    self_attn: Blip2Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl Blip2EncoderLayer {
    fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: Blip2Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            fc1: linear(h, i, vb.pp("mlp.fc1"))?,
            fc2: linear(i, h, vb.pp("mlp.fc2"))?,
            layer_norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
            act: Activation::parse_field(&cfg.hidden_act, "vision_config hidden_act")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        &h + self.fc2.forward(&self.act.forward(&m)?)?
    }
}

/// `Blip2VisionModel` (weights under `visual_encoder.`).
#[derive(Debug, Clone)]
pub struct Blip2VisionModel {
    class_embedding: Tensor,
    /// `[hidden, 3, patch, patch]`, applied with stride `patch` by [`crate::ops::conv2d`] (which
    /// also runs bf16 on the CPU, unlike candle's conv).
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    layers: Vec<Blip2EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: Blip2VisionConfig,
}

impl Blip2VisionModel {
    pub fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || h % cfg.num_attention_heads != 0 {
            candle_core::bail!(
                "vision_config: hidden_size {h} is not divisible by num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
            candle_core::bail!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                cfg.image_size,
                cfg.patch_size
            );
        }
        let emb = vb.pp("embeddings");
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        Ok(Self {
            class_embedding: emb.get((1, 1, h), "class_embedding")?,
            patch_embedding: emb.get(
                (h, 3, cfg.patch_size, cfg.patch_size),
                "patch_embedding.weight",
            )?,
            position_embedding: emb.get((1, patches + 1, h), "position_embedding")?,
            pre_layernorm: layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_layernorm"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Blip2EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
                .collect::<Result<_>>()?,
            post_layernorm: layer_norm(h, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Blip2VisionConfig {
        &self.cfg
    }

    /// `last_hidden_state` (after `post_layernorm`): the class token, then one token per patch.
    ///
    /// # Shapes
    /// `pixel_values`: `[b, 3, image_size, image_size]`; output `[b, 1 + patches, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != 3 || hh != s || ww != s {
            candle_core::bail!(
                "vision encoder expects pixel values [b, 3, {s}, {s}], got [{b}, {c}, {hh}, {ww}]"
            );
        }
        let h = self.cfg.hidden_size;
        let patches = crate::ops::conv2d(
            pixel_values,
            &self.patch_embedding,
            None,
            0,
            self.cfg.patch_size,
        )?
        .flatten_from(2)?
        .transpose(1, 2)?;
        let class = self.class_embedding.broadcast_as((b, 1, h))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_layernorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_layernorm.forward(&xs)
    }
}

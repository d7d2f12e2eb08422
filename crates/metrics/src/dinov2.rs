//! Hugging Face `Dinov2Model` (the layout of `facebook/dinov2-small`), for DreamBench++'s DINOv2 score:
//! the embedding is the CLS token of `last_hidden_state`, i.e. after the final LayerNorm
//! (`last_hidden_state[:, 0, :]`, which is also the model's `pooler_output`).
//!
//! Port of transformers 5.24 `models/dinov2/modeling_dinov2.py`
//! (<https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/dinov2/modeling_dinov2.py>):
//! `Dinov2Embeddings.forward` with `interpolate_pos_encoding` (bicubic, `align_corners=False`, in f32,
//! whenever the patch grid differs from the trained one or the input is not square), `Dinov2Layer.forward`
//! (pre-LayerNorm block whose two branches are multiplied by the per-channel layer scales `lambda1`),
//! `Dinov2MLP` (`fc1` → `hidden_act` → `fc2`, width `int(hidden_size · mlp_ratio)`) or, where the config
//! sets `use_swiglu_ffn`, `Dinov2SwiGLUFFN` (`down(silu(gate(x)) · up(x))`, width
//! `(int(int(hidden · mlp_ratio) · 2 / 3) + 7) // 8 · 8`), and `Dinov2Model.forward` (final `layernorm`).
//!
//! Both checkpoint layouts load: the names the published checkpoints ship
//! (`encoder.layer.N.attention.attention.query`, `attention.output.dense`, `mlp.weights_in` holding gate and
//! up stacked, `mlp.weights_out`) and the transformers ≥ 5 names (`attention.q_proj`, `attention.o_proj`,
//! `mlp.gate_proj`/`mlp.up_proj`/`mlp.down_proj`), with or without a `dinov2.` prefix.

use crate::nn::{token, Activation, AttentionNames, LayerNorm, Linear, PatchEmbed, SelfAttention};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `config.json` of a `Dinov2Model` (field names and defaults as transformers' `Dinov2Config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// An integer in the published configs; a float is accepted (`int(hidden · ratio)` either way).
    pub mlp_ratio: f64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub use_swiglu_ffn: bool,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            use_swiglu_ffn: false,
        }
    }
}

impl Dinov2Config {
    /// Width of the feed-forward block (`Dinov2MLP` or `Dinov2SwiGLUFFN`).
    pub fn ffn_width(&self) -> usize {
        let w = (self.hidden_size as f64 * self.mlp_ratio) as usize;
        if self.use_swiglu_ffn {
            (w * 2 / 3).div_ceil(8) * 8
        } else {
            w
        }
    }
}

#[derive(Debug, Clone)]
enum Ffn {
    Mlp {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Ffn {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Mlp { fc1, fc2, act } => fc2.forward(&act.forward(&fc1.forward(xs)?)?),
            Ffn::SwiGlu { gate, up, down } => {
                let g = candle_nn::ops::silu(&gate.forward(xs)?)?;
                down.forward(&(g * up.forward(xs)?)?)
            }
        }
    }
}

/// One `Dinov2Layer`.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    attention: SelfAttention,
    /// `layer_scale1.lambda1`.
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Ffn,
    /// `layer_scale2.lambda1`.
    layer_scale2: Tensor,
}

const LEGACY_ATTENTION: AttentionNames = AttentionNames {
    q: "attention.query",
    k: "attention.key",
    v: "attention.value",
    out: "output.dense",
};

const CURRENT_ATTENTION: AttentionNames = AttentionNames {
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    out: "o_proj",
};

impl Layer {
    fn load(vb: VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let attn = vb.pp("attention");
        let names = if attn.contains_tensor("q_proj.weight") {
            &CURRENT_ATTENTION
        } else {
            &LEGACY_ATTENTION
        };
        let attention = SelfAttention::load(attn, names, d, cfg.num_attention_heads, cfg.qkv_bias)?;
        let w = cfg.ffn_width();
        let mlp = vb.pp("mlp");
        let ffn = if cfg.use_swiglu_ffn {
            if mlp.contains_tensor("gate_proj.weight") {
                Ffn::SwiGlu {
                    gate: Linear::load(mlp.pp("gate_proj"), d, w, true)?,
                    up: Linear::load(mlp.pp("up_proj"), d, w, true)?,
                    down: Linear::load(mlp.pp("down_proj"), w, d, true)?,
                }
            } else {
                // `weights_in` stacks gate (first half) and up (second half), as transformers'
                // conversion `Chunk(dim=0)` splits it.
                let wi = mlp.pp("weights_in");
                let weight = wi.get((2 * w, d), "weight")?;
                let bias = wi.get(2 * w, "bias")?;
                Ffn::SwiGlu {
                    gate: Linear::from_weights(
                        &weight.narrow(0, 0, w)?,
                        Some(bias.narrow(0, 0, w)?),
                    )?,
                    up: Linear::from_weights(
                        &weight.narrow(0, w, w)?,
                        Some(bias.narrow(0, w, w)?),
                    )?,
                    down: Linear::load(mlp.pp("weights_out"), w, d, true)?,
                }
            }
        } else {
            Ffn::Mlp {
                fc1: Linear::load(mlp.pp("fc1"), d, w, true)?,
                fc2: Linear::load(mlp.pp("fc2"), w, d, true)?,
                act: cfg.hidden_act,
            }
        };
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), d, eps)?,
            attention,
            layer_scale1: vb.pp("layer_scale1").get(d, "lambda1")?,
            norm2: LayerNorm::load(vb.pp("norm2"), d, eps)?,
            mlp: ffn,
            layer_scale2: vb.pp("layer_scale2").get(d, "lambda1")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let a = self.attention.forward(&self.norm1.forward(xs)?, None)?;
        let h = (xs + a.broadcast_mul(&self.layer_scale1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&h)?)?;
        h + m.broadcast_mul(&self.layer_scale2)?
    }
}

/// `Dinov2Model` (the mask token is not used at inference and not loaded).
#[derive(Debug, Clone)]
pub struct Dinov2 {
    patch_embeddings: PatchEmbed,
    cls_token: Tensor,
    /// `[1, 1 + grid², hidden]` as trained.
    position_embeddings: Tensor,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    cfg: Dinov2Config,
}

impl Dinov2 {
    pub fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("dinov2.embeddings.cls_token") {
            vb.pp("dinov2")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        if p == 0 || cfg.image_size < p {
            candle_core::bail!("patch size {p} does not fit image size {}", cfg.image_size);
        }
        let emb = vb.pp("embeddings");
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_embeddings = PatchEmbed::new(
            &proj.get((d, cfg.num_channels, p, p), "weight")?,
            Some(proj.get(d, "bias")?),
        )?;
        let layers_vb = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(layers_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embeddings,
            cls_token: emb.get((1, 1, d), "cls_token")?,
            position_embeddings: emb.get((1, n_pos, d), "position_embeddings")?,
            layers,
            layernorm: LayerNorm::load(vb.pp("layernorm"), d, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.cfg
    }

    /// The position embeddings for an `h × w` input: as trained when the patch grid is the trained
    /// one and the input is square, else the patch part resized bicubically to the input's grid
    /// (`interpolate_pos_encoding`).
    ///
    /// # Shapes
    /// → `[1, 1 + (h/p)·(w/p), hidden]`.
    pub fn position_embeddings_for(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let n_pos = self.position_embeddings.dim(1)? - 1;
        if gh * gw == n_pos && h == w {
            return Ok(self.position_embeddings.clone());
        }
        let side = (n_pos as f64).sqrt() as usize;
        if side * side != n_pos {
            candle_core::bail!("{n_pos} position embeddings do not form a square grid");
        }
        let d = self.cfg.hidden_size;
        let device = self.position_embeddings.device().clone();
        let dtype = self.position_embeddings.dtype();
        let table = self
            .position_embeddings
            .to_dtype(candle_core::DType::F32)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let grid: Vec<&[f32]> = table[1..].iter().map(Vec::as_slice).collect();
        let resized = bicubic_grid(&grid, side, side, gh, gw, d);
        let patch = Tensor::from_vec(resized, (1, gh * gw, d), &device)?.to_dtype(dtype)?;
        let cls = self.position_embeddings.narrow(1, 0, 1)?;
        Tensor::cat(&[&cls, &patch], 1)
    }

    /// `last_hidden_state` before the final LayerNorm.
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let patches = self.patch_embeddings.forward(pixels)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.hidden_size))?;
        let pos = self.position_embeddings_for(h, w)?;
        let mut xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&pos)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// `last_hidden_state` (after the final LayerNorm).
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, h, w]` (multiples of the patch size) → `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(&self.encode(pixels)?)
    }

    /// The DINOv2 embedding: CLS token of `last_hidden_state`.
    ///
    /// # Shapes
    /// `pixels`: `[batch, 3, h, w]` → `[batch, hidden]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(&token(&self.encode(pixels)?, 0)?)
    }
}

/// PyTorch's cubic convolution weights (`A = −0.75`) of the four taps around a source position
/// with fractional part `t` (`get_cubic_upsample_coefficients`).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Source taps (clamped indices) and weights of each output position along one axis, as
/// `upsample_bicubic2d` with `align_corners=False` and no scale factor: source position
/// `(out + 0.5) · in/out − 0.5`, not clamped below 0, taps clamped to the input.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            let i0 = i0 as i64;
            let idx = [-1i64, 0, 1, 2].map(|k| (i0 + k).clamp(0, input as i64 - 1) as usize);
            (idx, cubic_weights(t))
        })
        .collect()
}

/// Bicubic resize of a `[in_h, in_w]` grid of `dim`-vectors (row-major) to `[out_h, out_w]`.
fn bicubic_grid(
    grid: &[&[f32]],
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    dim: usize,
) -> Vec<f32> {
    let ys = cubic_taps(in_h, out_h);
    let xs = cubic_taps(in_w, out_w);
    let mut out = vec![0f32; out_h * out_w * dim];
    for (oy, (iy, wy)) in ys.iter().enumerate() {
        for (ox, (ix, wx)) in xs.iter().enumerate() {
            let dst = &mut out[(oy * out_w + ox) * dim..][..dim];
            for c in 0..dim {
                let mut acc = 0f64;
                for (a, &y) in iy.iter().enumerate() {
                    let mut row = 0f64;
                    for (b, &x) in ix.iter().enumerate() {
                        row += wx[b] * grid[y * in_w + x][c] as f64;
                    }
                    acc += wy[a] * row;
                }
                dst[c] = acc as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate_grid_points() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
        // Same size: the identity.
        let v: Vec<Vec<f32>> = (0..9).map(|i| vec![i as f32, -(i as f32)]).collect();
        let g: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
        let out = bicubic_grid(&g, 3, 3, 3, 3, 2);
        let flat: Vec<f32> = v.concat();
        assert_eq!(out, flat);
        // A ramp 0..8 along x, 8 → 16: torch's
        // `interpolate(arange(8).repeat(8, 1)[None, None], (16, 16), mode="bicubic")` gives 3.703125 at
        // column 8 (source x 3.75; A = −0.75 does not reproduce lines), −0.10546875 at column 0 (edge
        // taps clamped) and 7.10546875 at column 15.
        let ramp: Vec<Vec<f32>> = (0..64).map(|i| vec![(i % 8) as f32]).collect();
        let g: Vec<&[f32]> = ramp.iter().map(Vec::as_slice).collect();
        let out = bicubic_grid(&g, 8, 8, 16, 16, 1);
        assert_eq!(out[5 * 16 + 8] as f64, 3.703125);
        assert_eq!(out[5 * 16] as f64, -0.10546875);
        assert_eq!(out[5 * 16 + 15] as f64, 7.10546875);
    }

    #[test]
    fn ffn_width_follows_transformers() {
        let mut c = Dinov2Config {
            hidden_size: 384,
            ..Default::default()
        };
        assert_eq!(c.ffn_width(), 1536);
        c.use_swiglu_ffn = true;
        // int(1536 · 2/3) = 1024 → multiple of 8.
        assert_eq!(c.ffn_width(), 1024);
        c.hidden_size = 1536; // giant: 6144 → 4096
        assert_eq!(c.ffn_width(), 4096);
        c.hidden_size = 20; // 80 → 53 → 56
        assert_eq!(c.ffn_width(), 56);
    }
}

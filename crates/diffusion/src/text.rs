//! The CLIP text encoder that conditions Stable Diffusion (SPEC §6): transformers' `CLIPTextModel`,
//! whose `last_hidden_state` (after the final layer norm) is the UNet's `encoder_hidden_states`.
//! BLIP-Diffusion's `ContextCLIPTextModel` is the same transformer with context embeddings spliced
//! into the token embeddings ([`ClipTextModel::forward_with_context`]).
//!
//! Port of transformers 5.24 `models/clip/modeling_clip.py` (`CLIPTextEmbeddings`, `CLIPAttention`
//! with the causal mask, `CLIPMLP`, `CLIPEncoderLayer`, `CLIPTextTransformer.forward`). Layer norm
//! and softmax are composed from elementary ops, so the encoder runs in any float dtype (f64 for
//! finite-difference tests; candle's fused kernels reject f64) and stays differentiable.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder};
use layers::Activation;
use serde::Deserialize;

fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` (field names as transformers writes them).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// SD 1.x: `openai/clip-vit-large-patch14`'s text tower.
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// `nn.LayerNorm` over the last axis, composed from elementary ops.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
    })
}

impl LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

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
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
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
            act: Activation::parse_field(&cfg.hidden_act, "text encoder config hidden_act")?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        &h + self.fc2.forward(&self.act.forward(&m)?)?
    }
}

/// `CLIPTextModel` (weights under `text_model.`, or at the root as transformers 5 saves them).
///
/// The same transformer serves BLIP-Diffusion's `ContextCLIPTextModel`
/// ([`crate::blip::ContextClipTextModel`]): [`ClipTextModel::forward_with_context`] inserts
/// context embeddings into the token embeddings before the position embeddings are added.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_final_norm_eps(cfg, cfg.layer_norm_eps, vb)
    }

    /// Like [`ClipTextModel::new`] with the final layer norm's eps given apart from the config's.
    pub(crate) fn with_final_norm_eps(
        cfg: &ClipTextConfig,
        final_eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || h % cfg.num_attention_heads != 0 {
            candle_core::bail!(
                "text encoder config: hidden_size {h} is not divisible by num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        // transformers < 5 saves under `text_model.` (real SD checkpoints); 5.x saves without it.
        let vb = if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb
        } else {
            vb.pp("text_model")
        };
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, h),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(h, final_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The token-embedding table `[vocab, hidden]`.
    pub fn token_embedding(&self) -> &Tensor {
        self.token_embedding.embeddings()
    }

    /// Replaces the token-embedding table `[vocab, hidden]` (any number of rows). Textual
    /// Inversion training swaps in a table computed from a trainable row, e.g.
    /// `Tensor::cat(&[&frozen_table, row_var.as_tensor()], 0)`: the gradient then reaches the row
    /// through the rows the prompt uses, and everything else in the encoder stays constant.
    /// candle computes eagerly, so the table is a snapshot of the row: set it again after every
    /// optimizer step (on a clone of the encoder, which shares all other weights).
    ///
    /// # Shapes
    /// `table`: `[vocab, hidden]`.
    pub fn set_token_embedding(&mut self, table: Tensor) -> Result<()> {
        let (rows, hidden) = table.dims2()?;
        let old = self.token_embedding.embeddings();
        if rows == 0 || hidden != self.cfg.hidden_size {
            candle_core::bail!(
                "token-embedding table {:?} does not fit hidden size {} (expected [vocab, {}])",
                table.dims(),
                self.cfg.hidden_size,
                self.cfg.hidden_size
            );
        }
        if table.dtype() != old.dtype() || !table.device().same_device(old.device()) {
            candle_core::bail!(
                "token-embedding table is {:?} on {:?}, the encoder is {:?} on {:?}",
                table.dtype(),
                table.device(),
                old.dtype(),
                old.device()
            );
        }
        self.token_embedding = Embedding::new(table, hidden);
        Ok(())
    }

    /// Appends a row to the token-embedding table (Textual Inversion) and returns its id.
    ///
    /// # Shapes
    /// `vector`: `[hidden]`.
    pub fn push_token_embedding(&mut self, vector: &Tensor) -> Result<u32> {
        let table = self.token_embedding.embeddings();
        let row = vector
            .to_dtype(table.dtype())?
            .to_device(table.device())?
            .reshape((1, self.cfg.hidden_size))?;
        let id = table.dim(0)? as u32;
        let table = Tensor::cat(&[table, &row], 0)?;
        self.token_embedding = Embedding::new(table, self.cfg.hidden_size);
        Ok(id)
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// `last_hidden_state` for token ids.
    ///
    /// # Shapes
    /// `ids`: `[b, n]` (u32, n ≤ max_position_embeddings); output `[b, n, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with_context(ids, None)
    }

    /// The input embeddings: token embeddings with `ctx` inserted after the first `ctx_begin_pos`
    /// tokens, plus position embeddings over the grown sequence.
    ///
    /// # Shapes
    /// `ids`: `[b, n]`; `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]` (`k = 0` without ctx).
    pub fn embeddings(&self, ids: &Tensor, ctx: Option<(&Tensor, usize)>) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let vocab = self.token_embedding.embeddings().dim(0)?;
        let max_id = ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()?;
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

    /// `last_hidden_state` with `ctx` embeddings inserted at position `ctx_begin_pos`
    /// (BLIP-Diffusion's `text_encoder(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[pos] * b)`);
    /// the causal mask covers the grown sequence.
    ///
    /// # Shapes
    /// `ids`: `[b, n]` (u32); `ctx`: `[b, k, hidden]`; output `[b, n + k, hidden]`.
    pub fn forward_with_context(
        &self,
        ids: &Tensor,
        ctx: Option<(&Tensor, usize)>,
    ) -> Result<Tensor> {
        self.encode(self.embeddings(ids, ctx)?)
    }

    /// The transformer over input embeddings (causal mask, layers, final layer norm).
    fn encode(&self, mut xs: Tensor) -> Result<Tensor> {
        let mask = Self::causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// `last_hidden_state` with token `id`, the row just past the table (the token Textual
    /// Inversion trains), embedded as `row`: the same function as appending `row` to the table
    /// ([`Self::push_token_embedding`]) and calling [`Self::forward`], but the table is only looked
    /// up, so the graph holds `row` alone (no copy of the table and no table-sized gradient per
    /// forward).
    ///
    /// # Shapes
    /// `ids`: `[b, n]` (u32); `row`: `[hidden]`; output `[b, n, hidden]`.
    pub fn forward_with_new_token(&self, ids: &Tensor, id: u32, row: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let table = self.token_embedding.embeddings();
        let vocab = table.dim(0)?;
        if id as usize != vocab {
            candle_core::bail!("the new token's id {id} is not the row after the table's {vocab}");
        }
        if n > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{n} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let ids = ids.to_dtype(DType::U32)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id > id {
            candle_core::bail!(
                "token id {max_id} is outside the text encoder's vocabulary of {}",
                vocab + 1
            );
        }
        let is_new = ids.eq(&Tensor::full(id, (b, n), ids.device())?)?;
        let safe = is_new.where_cond(&ids.zeros_like()?, &ids)?;
        let tokens = self.token_embedding.forward(&safe)?;
        let row = row
            .to_dtype(tokens.dtype())?
            .reshape((1, 1, h))?
            .broadcast_as((b, n, h))?;
        let tokens = is_new
            .unsqueeze(2)?
            .broadcast_as((b, n, h))?
            .where_cond(&row, &tokens)?;
        self.encode(tokens.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?)
    }

    /// Hidden size of the output (the UNet's `cross_attention_dim`).
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }
}

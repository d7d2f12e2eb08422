//! BLIP-Diffusion's Q-Former (`qformer/`): the BLIP-2 vision encoder, learned query tokens that
//! attend to the image features and to the text of the source subject category, and the
//! projection that turns them into the context embeddings of the text encoder.
//!
//! Port of diffusers 0.32.2 `pipelines/blip_diffusion/modeling_blip2.py` (`Blip2TextEmbeddings`,
//! `Blip2QFormerLayer`, `Blip2QFormerEncoder`, `ProjLayer`, `Blip2QFormerModel.forward` with
//! `return_dict=False`, which returns `proj_layer(sequence_output[:, :num_query_tokens])`) and
//! transformers 4.51.3 `models/blip_2/modeling_blip_2.py` (`Blip2QFormerMultiHeadAttention`,
//! `Blip2QFormerSelfOutput`, `Blip2QFormerIntermediate`, `Blip2QFormerOutput`). Inference only.

use super::vision::{Blip2VisionConfig, Blip2VisionModel};
use super::BlipError;
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use layers::Activation;
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-12
}
fn d_freq() -> usize {
    2
}
fn d_pos_type() -> String {
    "absolute".into()
}
fn d_enc() -> usize {
    1408
}

/// `qformer_config` of the Q-Former's `config.json` (transformers' `Blip2QFormerConfig`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Blip2QFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// A cross-attention to the image features in every layer whose index is a multiple of this.
    #[serde(default = "d_freq")]
    pub cross_attention_frequency: usize,
    /// Hidden size of the image features (the vision encoder's `hidden_size`).
    #[serde(default = "d_enc")]
    pub encoder_hidden_size: usize,
    #[serde(default = "d_pos_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// `qformer/config.json` (transformers' `Blip2Config`, as diffusers saves `Blip2QFormerModel`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Blip2Config {
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: Blip2QFormerConfig,
    pub num_query_tokens: usize,
    /// The BERT tokenizer folder of the subject-category text (`BertTokenizer.from_pretrained`);
    /// absent means `bert-base-uncased`.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

impl Blip2Config {
    /// Structural checks that the weights alone would not catch, each naming the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        let q = &self.qformer_config;
        let v = &self.vision_config;
        if q.num_attention_heads == 0 || q.hidden_size % q.num_attention_heads != 0 {
            return Err(format!(
                "qformer_config.hidden_size {} is not divisible by num_attention_heads {}",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if q.cross_attention_frequency == 0 {
            return Err("qformer_config.cross_attention_frequency is 0".into());
        }
        if q.encoder_hidden_size != v.hidden_size {
            return Err(format!(
                "qformer_config.encoder_hidden_size {} != vision_config.hidden_size {}",
                q.encoder_hidden_size, v.hidden_size
            ));
        }
        if q.position_embedding_type != "absolute" {
            return Err(format!(
                "qformer_config.position_embedding_type '{}' is not supported (absolute)",
                q.position_embedding_type
            ));
        }
        if self.num_query_tokens == 0 {
            return Err("num_query_tokens is 0".into());
        }
        Ok(())
    }
}

/// The Q-Former's BERT WordPiece tokenizer (`BertTokenizer`: lower-casing and accent stripping per
/// `do_lower_case`, basic punctuation splitting, `[CLS] … [SEP]`).
#[derive(Clone)]
pub struct BertTokenizer {
    tok: tokenizers::Tokenizer,
    pad_id: u32,
    source: PathBuf,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("source", &self.source)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl BertTokenizer {
    /// From `vocab.txt` (one token a line; the line number is the id) and, when present, the
    /// folder's `tokenizer_config.json` (`do_lower_case`, default true).
    pub fn from_files(
        vocab: &Path,
        tokenizer_config: Option<&Path>,
    ) -> std::result::Result<Self, BlipError> {
        let bad = |reason: String| BlipError::Tokenizer {
            path: vocab.to_path_buf(),
            reason,
        };
        let lowercase = match tokenizer_config {
            Some(p) => {
                let v: serde_json::Value = weights::read_json(p)?;
                v.get("do_lower_case")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(true)
            }
            None => true,
        };
        let model = tokenizers::models::wordpiece::WordPiece::from_file(&vocab.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut tok = tokenizers::Tokenizer::new(model);
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| bad(format!("the vocabulary has no '{t}'")))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        id("[UNK]")?;
        tok.with_normalizer(Some(tokenizers::normalizers::BertNormalizer::new(
            true, true, None, lowercase,
        )));
        tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
        tok.with_post_processor(Some(tokenizers::processors::bert::BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Ok(Self {
            tok,
            pad_id: pad,
            source: vocab.to_path_buf(),
        })
    }

    /// `[CLS]`, the WordPiece ids of `text`, `[SEP]`.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, BlipError> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| BlipError::Tokenizer {
                path: self.source.clone(),
                reason: format!("encoding '{text}': {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// One past the largest id (`vocab.txt` may repeat a token; its later line wins, as in
    /// transformers' `load_vocab`).
    pub fn vocab_size(&self) -> usize {
        self.tok
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }
}

/// BERT self- or cross-attention with its output block (`attention.attention` + `attention.output`).
#[derive(Debug, Clone)]
struct QFormerAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl QFormerAttention {
    fn new(cfg: &Blip2QFormerConfig, kv_dim: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        Ok(Self {
            query: linear(h, h, a.pp("query"))?,
            key: linear(kv_dim, h, a.pp("key"))?,
            value: linear(kv_dim, h, a.pp("value"))?,
            dense: linear(h, h, vb.pp("output.dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// # Shapes
    /// `xs`: `[b, n, hidden]`; `context`: `[b, m, kv_dim]`; `mask`: additive, broadcastable to
    /// `[b, heads, n, m]`; output `[b, n, hidden]`.
    fn forward(&self, xs: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let m = context.dim(1)?;
        let split = |t: Tensor, len: usize| {
            t.reshape((b, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(xs)?, n)?;
        let k = split(self.key.forward(context)?, m)?;
        let v = split(self.value.forward(context)?, m)?;
        let mut scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.norm.forward(&(self.dense.forward(&out)? + xs)?)
    }
}

/// `intermediate(_query)` + `output(_query)`: dense, activation, dense, residual LayerNorm.
#[derive(Debug, Clone)]
struct FeedForward {
    up: Linear,
    down: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl FeedForward {
    fn new(cfg: &Blip2QFormerConfig, vb: VarBuilder, suffix: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let out = vb.pp(format!("output{suffix}"));
        Ok(Self {
            up: linear(h, i, vb.pp(format!("intermediate{suffix}.dense")))?,
            down: linear(i, h, out.pp("dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            act: Activation::parse_field(&cfg.hidden_act, "qformer_config hidden_act")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let m = self.act.forward(&self.up.forward(xs)?)?;
        self.norm.forward(&(self.down.forward(&m)? + xs)?)
    }
}

#[derive(Debug, Clone)]
struct QFormerLayer {
    attention: QFormerAttention,
    crossattention: Option<QFormerAttention>,
    ffn_query: FeedForward,
    ffn_text: FeedForward,
}

impl QFormerLayer {
    fn new(cfg: &Blip2QFormerConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        let crossattention = if index % cfg.cross_attention_frequency == 0 {
            Some(QFormerAttention::new(
                cfg,
                cfg.encoder_hidden_size,
                vb.pp("crossattention"),
            )?)
        } else {
            None
        };
        Ok(Self {
            attention: QFormerAttention::new(cfg, cfg.hidden_size, vb.pp("attention"))?,
            crossattention,
            ffn_query: FeedForward::new(cfg, vb.clone(), "_query")?,
            ffn_text: FeedForward::new(cfg, vb, "")?,
        })
    }

    /// # Shapes
    /// `xs`: `[b, queries + text, hidden]`; `image`: `[b, patches + 1, encoder_hidden]`;
    /// `mask`: `[b, 1, 1, queries + text]`; output like `xs`.
    fn forward(
        &self,
        xs: &Tensor,
        image: &Tensor,
        mask: &Tensor,
        queries: usize,
    ) -> Result<Tensor> {
        let attn = self.attention.forward(xs, xs, Some(mask))?;
        let n = attn.dim(1)?;
        let mut query = attn.narrow(1, 0, queries)?;
        if let Some(cross) = &self.crossattention {
            // The image features are never masked (an all-ones encoder mask).
            query = cross.forward(&query, image, None)?;
        }
        let query = self.ffn_query.forward(&query)?;
        if n == queries {
            return Ok(query);
        }
        let text = self
            .ffn_text
            .forward(&attn.narrow(1, queries, n - queries)?)?;
        Tensor::cat(&[&query, &text], 1)
    }
}

/// `ProjLayer`: `x + dense2(QuickGELU(dense1(LayerNorm(x))))`.
#[derive(Debug, Clone)]
struct ProjLayer {
    dense1: Linear,
    dense2: Linear,
    norm: LayerNorm,
}

impl ProjLayer {
    fn new(h: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense1: linear(h, 4 * h, vb.pp("dense1"))?,
            dense2: linear(4 * h, h, vb.pp("dense2"))?,
            // diffusers hard-codes eps = 1e-12 here, whatever the config says.
            norm: layer_norm(h, 1e-12, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.dense1.forward(&self.norm.forward(xs)?)?;
        xs + self.dense2.forward(&Activation::QuickGelu.forward(&h)?)?
    }
}

/// `Blip2QFormerModel` as BLIP-Diffusion uses it: `(reference pixels, source subject category)` →
/// query embeddings in the text encoder's space.
#[derive(Debug, Clone)]
pub struct Blip2QFormerModel {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    visual_encoder: Blip2VisionModel,
    query_tokens: Tensor,
    layers: Vec<QFormerLayer>,
    proj_layer: ProjLayer,
    cfg: Blip2Config,
}

impl Blip2QFormerModel {
    pub fn new(cfg: &Blip2Config, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.check() {
            candle_core::bail!("Q-Former config: {e}");
        }
        let q = &cfg.qformer_config;
        let h = q.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            word_embeddings: embedding(q.vocab_size, h, emb.pp("word_embeddings"))?,
            position_embeddings: emb
                .get((q.max_position_embeddings, h), "position_embeddings.weight")?,
            embeddings_norm: layer_norm(h, q.layer_norm_eps, emb.pp("LayerNorm"))?,
            visual_encoder: Blip2VisionModel::new(&cfg.vision_config, vb.pp("visual_encoder"))?,
            query_tokens: vb.get((1, cfg.num_query_tokens, h), "query_tokens")?,
            layers: (0..q.num_hidden_layers)
                .map(|i| QFormerLayer::new(q, i, vb.pp(format!("encoder.layer.{i}"))))
                .collect::<Result<_>>()?,
            proj_layer: ProjLayer::new(h, vb.pp("proj_layer"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Blip2Config {
        &self.cfg
    }

    pub fn visual_encoder(&self) -> &Blip2VisionModel {
        &self.visual_encoder
    }

    pub fn num_query_tokens(&self) -> usize {
        self.cfg.num_query_tokens
    }

    /// Query embeddings (`qformer(image_input=pixels, text_input=subjects, return_dict=False)`).
    /// `text_ids` holds one BERT-tokenized subject category per image (`[CLS] … [SEP]`); shorter
    /// ones are padded with `pad_id` and masked, as `tokenizer(.., padding=True)` does.
    ///
    /// # Shapes
    /// `pixel_values`: `[b, 3, image_size, image_size]`; output `[b, num_query_tokens, hidden]`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        text_ids: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<Tensor> {
        let b = pixel_values.dim(0)?;
        if text_ids.len() != b {
            candle_core::bail!(
                "Q-Former: {} subject categories for a batch of {b} images",
                text_ids.len()
            );
        }
        let q = &self.cfg.qformer_config;
        let n = text_ids.iter().map(Vec::len).max().unwrap_or(0);
        if n == 0 {
            candle_core::bail!("Q-Former: empty subject-category token ids");
        }
        if n > q.max_position_embeddings {
            candle_core::bail!(
                "Q-Former: the subject category has {n} tokens, more than max_position_embeddings {}",
                q.max_position_embeddings
            );
        }
        if let Some(&bad) = text_ids
            .iter()
            .flatten()
            .find(|&&id| id as usize >= q.vocab_size)
        {
            candle_core::bail!(
                "Q-Former: token id {bad} is outside the vocabulary of {}",
                q.vocab_size
            );
        }
        let dev = pixel_values.device();
        let dtype = self.query_tokens.dtype();
        let mut ids = Vec::with_capacity(b * n);
        let mut mask = Vec::with_capacity(b * (self.cfg.num_query_tokens + n));
        for t in text_ids {
            ids.extend(t.iter().copied().chain(std::iter::repeat(pad_id)).take(n));
            mask.extend(std::iter::repeat_n(0f32, self.cfg.num_query_tokens));
            // get_extended_attention_mask: (1 - mask) * -10000.
            mask.extend((0..n).map(|i| if i < t.len() { 0.0 } else { -10000.0 }));
        }
        let ids = Tensor::from_vec(ids, (b, n), dev)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, self.cfg.num_query_tokens + n), dev)?
            .to_dtype(dtype)?;

        let text = self
            .word_embeddings
            .forward(&ids)?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, n)?)?;
        let queries =
            self.query_tokens
                .broadcast_as((b, self.cfg.num_query_tokens, q.hidden_size))?;
        let mut xs = self
            .embeddings_norm
            .forward(&Tensor::cat(&[&queries, &text], 1)?)?;
        let image = self
            .visual_encoder
            .forward(&pixel_values.to_dtype(dtype)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &image, &mask, self.cfg.num_query_tokens)?;
        }
        self.proj_layer
            .forward(&xs.narrow(1, 0, self.cfg.num_query_tokens)?)
    }
}

/// BERT's uncased base vocabulary on the hub: `google-bert/bert-base-uncased`, stored for years by
/// transformers and diffusers under its old id `bert-base-uncased`, so a user's offline cache may
/// hold either.
pub const BERT_BASE_UNCASED: [&str; 2] = ["google-bert/bert-base-uncased", "bert-base-uncased"];

/// Where the Q-Former's tokenizer folder may be, in the order to try, from the `tokenizer` field of
/// `qformer/config.json`: a path relative to the model folder, to `qformer/`, or absolute; else a
/// hub repo id (`bert-base-uncased`, the default, under both its ids: [`BERT_BASE_UNCASED`]).
pub(super) fn tokenizer_sources(
    model: &weights::ModelSource,
    reference: Option<&str>,
) -> Vec<weights::ModelSource> {
    let name = reference.unwrap_or("bert-base-uncased");
    if let weights::ModelSource::Local(root) = model {
        for dir in [
            root.join(name),
            root.join("qformer").join(name),
            PathBuf::from(name),
        ] {
            if dir.is_dir() {
                return vec![weights::ModelSource::Local(dir)];
            }
        }
        // A path into the model folder (`qformer/tokenizer`) that is not there: report it as
        // missing rather than asking the hub for a repo of that name.
        if let Some(std::path::Component::Normal(first)) = Path::new(name).components().next() {
            if root.join(first).is_dir() {
                return vec![weights::ModelSource::Local(root.join(name))];
            }
        }
    }
    if BERT_BASE_UNCASED.contains(&name) {
        return BERT_BASE_UNCASED
            .iter()
            .map(|repo| weights::ModelSource::Hub {
                repo: repo.to_string(),
            })
            .collect();
    }
    match weights::ModelSource::parse(name) {
        Ok(src) => vec![src],
        // Not a folder and not a repo id: report it as the folder that was looked for.
        Err(_) => vec![weights::ModelSource::Local(match model {
            weights::ModelSource::Local(root) => root.join(name),
            weights::ModelSource::Hub { .. } => PathBuf::from(name),
        })],
    }
}

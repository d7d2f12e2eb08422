//! The facade later issues call: load the DINO and CLIP models (a local folder or a hub id, via the
//! `weights` crate), embed images (rayon for read + decode + preprocess, batched inference, the
//! on-disk cache), and score generated images against a subject's real images and a CLIP-T prompt,
//! or compute the real-image oracle.

use crate::cache::{sha256_hex, EmbeddingCache};
use crate::clip::{ClipConfig, ClipText, ClipVision};
use crate::dinov2::{Dinov2, Dinov2Config};
use crate::preprocess::{decode_rgb, Preprocess};
use crate::protocol::{Arch, Formula, ImageScoring, Pairing, Scoring, Truncation};
use crate::scores::{self, Bootstrap, Summary};
use crate::tokenizer::ClipTokenizer;
use crate::vit::{Vit, VitConfig};
use crate::MetricsError;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use weights::ModelSource;

pub const DEFAULT_DINO: &str = "facebook/dino-vits16";
pub const DEFAULT_CLIP: &str = "openai/clip-vit-base-patch32";

/// A model's files, resolved.
struct Resolved {
    config: PathBuf,
    files: Vec<PathBuf>,
    source: ModelSource,
}

fn resolve(model: &str) -> Result<Resolved, MetricsError> {
    let source = ModelSource::parse(model)?;
    let config = source.file(&["config.json"])?;
    let files = source.weight_files("", &["model", "pytorch_model"])?;
    Ok(Resolved {
        config,
        files,
        source,
    })
}

fn files_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| format!("'{}'", f.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cache key of a model: what it is, how images are preprocessed for it, its config, and the
/// identity (name, size, modification time) of its weight files.
fn model_key(kind: &str, pre: &Preprocess, r: &Resolved) -> Result<String, MetricsError> {
    let mut id = format!("metrics-v1\n{kind}\n{}\n", pre.tag());
    let cfg = std::fs::read(&r.config).map_err(|source| MetricsError::Io {
        path: r.config.clone(),
        source,
    })?;
    id.push_str(&sha256_hex(&cfg));
    for f in &r.files {
        let meta = std::fs::metadata(f).map_err(|source| MetricsError::Io {
            path: f.clone(),
            source,
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let canon = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        id.push_str(&format!("\n{} {} {mtime}", canon.display(), meta.len()));
    }
    Ok(format!("{kind}-{}", &sha256_hex(id.as_bytes())[..32]))
}

/// DINO ViT-S/16 (any `ViTModel` folder).
pub struct DinoModel {
    pub vit: Vit,
    pub name: String,
    key: String,
}

impl DinoModel {
    pub fn load(model: &str, device: &Device) -> Result<Self, MetricsError> {
        Self::load_with(model, &Preprocess::DINO, device)
    }

    /// With the preprocessing its embeddings are cached under.
    pub fn load_with(model: &str, pre: &Preprocess, device: &Device) -> Result<Self, MetricsError> {
        let r = resolve(model)?;
        let cfg: VitConfig = weights::read_json(&r.config)?;
        let vb = weights::var_builder(&r.files, DType::F32, device)?;
        let vit = Vit::new(&cfg, vb).map_err(|source| MetricsError::Model {
            model: model.into(),
            files: files_list(&r.files),
            source,
        })?;
        Ok(Self {
            vit,
            name: model.into(),
            key: model_key("dino", pre, &r)?,
        })
    }
}

/// CLIP ViT-B/32 (any `CLIPModel` folder) with its tokenizer.
pub struct ClipModel {
    pub vision: ClipVision,
    pub text: ClipText,
    pub tokenizer: ClipTokenizer,
    pub name: String,
    key: String,
}

impl ClipModel {
    pub fn load(model: &str, device: &Device) -> Result<Self, MetricsError> {
        Self::load_with(model, &Preprocess::CLIP, device)
    }

    /// With the preprocessing its image embeddings are cached under.
    pub fn load_with(model: &str, pre: &Preprocess, device: &Device) -> Result<Self, MetricsError> {
        let r = resolve(model)?;
        let cfg: ClipConfig = weights::read_json(&r.config)?;
        let vb = weights::var_builder(&r.files, DType::F32, device)?;
        let wrap = |source| MetricsError::Model {
            model: model.into(),
            files: files_list(&r.files),
            source,
        };
        let vision = ClipVision::new(&cfg, vb.clone()).map_err(wrap)?;
        let text = ClipText::new(&cfg, vb).map_err(wrap)?;
        let max_len = cfg.text_config.max_position_embeddings;
        let tokenizer = match r.source.file(&["tokenizer.json"]) {
            Ok(p) => ClipTokenizer::from_tokenizer_json(&p, max_len)?,
            Err(first) => match (
                r.source.file(&["vocab.json"]),
                r.source.file(&["merges.txt"]),
            ) {
                (Ok(v), Ok(m)) => ClipTokenizer::from_vocab_merges(&v, &m, max_len)?,
                _ => return Err(first.into()),
            },
        };
        Ok(Self {
            vision,
            text,
            tokenizer,
            name: model.into(),
            key: model_key("clip", pre, &r)?,
        })
    }

    /// Projected text embeddings, one prompt at a time (no padding needed).
    pub fn embed_texts(&self, prompts: &[&str]) -> Result<Vec<Vec<f32>>, MetricsError> {
        self.embed_texts_with(prompts, Truncation::KeepEnd)
    }

    /// As [`ClipModel::embed_texts`], long prompts handled as `rule` says.
    pub fn embed_texts_with(
        &self,
        prompts: &[&str],
        rule: Truncation,
    ) -> Result<Vec<Vec<f32>>, MetricsError> {
        prompts
            .iter()
            .map(|p| {
                let ids = self.tokenizer.encode_with(p, rule)?;
                let e = self
                    .text
                    .embed(&[ids])
                    .and_then(|t| t.squeeze(0)?.to_vec1::<f32>())
                    .map_err(|source| MetricsError::Inference {
                        what: format!("prompt '{p}'"),
                        source,
                    })?;
                Ok(e)
            })
            .collect()
    }
}

/// The network of an extra score.
pub enum Backbone {
    Vit(Vit),
    Dinov2(Dinov2),
    Clip(ClipVision),
}

impl Backbone {
    /// Image embeddings `[batch, dim]` of `[batch, 3, h, w]` pixels.
    pub fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Vit(m) => m.embed(pixels),
            Backbone::Dinov2(m) => m.embed(pixels),
            Backbone::Clip(m) => m.embed(pixels),
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Backbone::Vit(m) => m.config().hidden_size,
            Backbone::Dinov2(m) => m.config().hidden_size,
            Backbone::Clip(m) => m.projection_dim(),
        }
    }
}

/// The model of an extra score (a profile's `[metrics.scoring.extra.NAME]`), e.g. DINOv2.
pub struct ExtraModel {
    pub name: String,
    pub model: String,
    pub backbone: Backbone,
    pub pre: Preprocess,
    key: String,
}

impl ExtraModel {
    pub fn load(
        name: &str,
        model: &str,
        arch: Arch,
        pre: &Preprocess,
        device: &Device,
    ) -> Result<Self, MetricsError> {
        let r = resolve(model)?;
        let vb = weights::var_builder(&r.files, DType::F32, device)?;
        let wrap = |source| MetricsError::Model {
            model: model.into(),
            files: files_list(&r.files),
            source,
        };
        let (backbone, kind) = match arch {
            Arch::Vit => {
                let cfg: VitConfig = weights::read_json(&r.config)?;
                (Backbone::Vit(Vit::new(&cfg, vb).map_err(wrap)?), "dino")
            }
            Arch::Dinov2 => {
                let cfg: Dinov2Config = weights::read_json(&r.config)?;
                (
                    Backbone::Dinov2(Dinov2::new(&cfg, vb).map_err(wrap)?),
                    "dinov2",
                )
            }
            Arch::Clip => {
                let cfg: ClipConfig = weights::read_json(&r.config)?;
                (
                    Backbone::Clip(ClipVision::new(&cfg, vb).map_err(wrap)?),
                    "clip",
                )
            }
        };
        Ok(Self {
            name: name.into(),
            model: model.into(),
            backbone,
            pre: *pre,
            key: model_key(kind, pre, &r)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ScorerOptions {
    pub batch_size: usize,
    /// `None` disables the cache.
    pub cache: Option<EmbeddingCache>,
    pub bootstrap: Bootstrap,
    pub device: Device,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            cache: Some(EmbeddingCache::new(EmbeddingCache::default_dir())),
            bootstrap: Bootstrap::default(),
            device: Device::Cpu,
        }
    }
}

/// DINO and CLIP embeddings of a list of images, in the list's order (and those of the extra
/// scores' models, by score name).
#[derive(Debug, Clone, Default)]
pub struct ImageEmbeddings {
    pub dino: Vec<Vec<f32>>,
    pub clip: Vec<Vec<f32>>,
    pub extra: BTreeMap<String, Vec<Vec<f32>>>,
}

/// The scores of one generated image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageScores {
    pub path: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// The profile's extra scores (DreamBench++'s `dinov2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// `pnd score`'s result: means first (the contract), then spread, intervals and per-image rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreReport {
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    pub n_generated: usize,
    pub n_real: usize,
    pub prompt: String,
    pub dino_summary: Summary,
    pub clip_i_summary: Summary,
    pub clip_t_summary: Summary,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_summary: BTreeMap<String, Summary>,
    pub per_image: Vec<ImageScores>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubjectOracle {
    pub dino: f64,
    pub clip_i: f64,
    pub n_images: usize,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// `pnd oracle`'s result: means over all ordered pairs of distinct real images of a subject, pooled
/// over subjects, and per subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OracleReport {
    pub dino: f64,
    pub clip_i: f64,
    pub n_images: usize,
    pub n_pairs: usize,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    pub per_subject: BTreeMap<String, SubjectOracle>,
}

pub struct Scorer {
    pub dino: DinoModel,
    pub clip: ClipModel,
    /// The profile's extra scores' models, in name order.
    pub extra: Vec<ExtraModel>,
    pub scoring: Scoring,
    pub options: ScorerOptions,
}

/// One image read and (where not cached) preprocessed, per encoder: `Ok(embedding)` from the
/// cache, else `Err(model input)`.
struct Prepared {
    hash: String,
    inputs: Vec<Result<Vec<f32>, Vec<f32>>>,
}

/// A model's image embedding function: `[batch, 3, h, w]` → `[batch, dim]`.
type EmbedFn<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Sync + 'a>;

/// One image encoder of the scorer: DINO, CLIP's vision tower or an extra model.
struct Encoder<'a> {
    what: &'a str,
    key: &'a str,
    dim: usize,
    pre: Preprocess,
    embed: EmbedFn<'a>,
}

impl Scorer {
    /// The DreamBooth protocol's scoring.
    pub fn load(dino: &str, clip: &str, options: ScorerOptions) -> Result<Self, MetricsError> {
        Self::load_scoring(dino, clip, Scoring::dreambooth(), options)
    }

    /// A profile's scoring: its preprocessing, pairing, formulas and extra models.
    pub fn load_scoring(
        dino: &str,
        clip: &str,
        scoring: Scoring,
        options: ScorerOptions,
    ) -> Result<Self, MetricsError> {
        scoring.validate().map_err(MetricsError::Protocol)?;
        let device = &options.device;
        let extra = scoring
            .extra
            .iter()
            .map(|(name, e)| {
                ExtraModel::load(name, &e.model, e.arch, &e.preprocess.recipe(), device).map_err(
                    |source| MetricsError::Extra {
                        name: name.clone(),
                        model: e.model.clone(),
                        source: Box::new(source),
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            dino: DinoModel::load_with(dino, &scoring.dino.preprocess.recipe(), device)?,
            clip: ClipModel::load_with(clip, &scoring.clip_i.preprocess.recipe(), device)?,
            extra,
            scoring,
            options,
        })
    }

    fn encoders(&self) -> Vec<Encoder<'_>> {
        let mut out = vec![
            Encoder {
                what: "DINO",
                key: &self.dino.key,
                dim: self.dino.vit.config().hidden_size,
                pre: self.scoring.dino.preprocess.recipe(),
                embed: Box::new(|x| self.dino.vit.embed(x)),
            },
            Encoder {
                what: "CLIP",
                key: &self.clip.key,
                dim: self.clip.vision.projection_dim(),
                pre: self.scoring.clip_i.preprocess.recipe(),
                embed: Box::new(|x| self.clip.vision.embed(x)),
            },
        ];
        for e in &self.extra {
            out.push(Encoder {
                what: &e.name,
                key: &e.key,
                dim: e.backbone.dim(),
                pre: e.pre,
                embed: Box::new(|x| e.backbone.embed(x)),
            });
        }
        out
    }

    fn cached(&self, key: &str, hash: &str, dim: usize) -> Option<Vec<f32>> {
        self.options.cache.as_ref()?.get(key, hash, dim)
    }

    /// Reads one image; per encoder, `Ok(embedding)` where the cache has it, else `Err(model input)`.
    fn prepare(&self, path: &Path, encoders: &[Encoder]) -> Result<Prepared, MetricsError> {
        let bytes = std::fs::read(path).map_err(|e| MetricsError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let hash = sha256_hex(&bytes);
        let hits: Vec<Option<Vec<f32>>> = encoders
            .iter()
            .map(|e| self.cached(e.key, &hash, e.dim))
            .collect();
        let img = if hits.iter().any(Option::is_none) {
            Some(decode_rgb(&bytes, path)?)
        } else {
            None
        };
        let inputs = hits
            .into_iter()
            .zip(encoders)
            .map(|(hit, e)| match hit {
                Some(v) => Ok(v),
                None => Err(e.pre.apply(img.as_ref().expect("decoded on a miss"))),
            })
            .collect();
        Ok(Prepared { inputs, hash })
    }

    /// Image embeddings of `paths` for every model of the profile (batched; cached by model,
    /// preprocessing and file content).
    pub fn embed_images(&self, paths: &[PathBuf]) -> Result<ImageEmbeddings, MetricsError> {
        let encoders = self.encoders();
        let mut columns: Vec<Vec<Vec<f32>>> = vec![Vec::new(); encoders.len()];
        let bs = self.options.batch_size.max(1);
        for chunk in paths.chunks(bs) {
            let prepared: Vec<Prepared> = chunk
                .par_iter()
                .map(|p| self.prepare(p, &encoders))
                .collect::<Result<_, _>>()?;
            let what = || {
                format!(
                    "images {}..",
                    chunk
                        .first()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            };
            for (k, e) in encoders.iter().enumerate() {
                let out =
                    self.run_batch(&prepared, k, e)
                        .map_err(|source| MetricsError::Inference {
                            what: format!("{} of {}", e.what, what()),
                            source,
                        })?;
                columns[k].extend(out);
            }
        }
        let mut columns = columns.into_iter();
        let dino = columns.next().unwrap_or_default();
        let clip = columns.next().unwrap_or_default();
        let extra = self
            .extra
            .iter()
            .map(|e| e.name.clone())
            .zip(columns)
            .collect();
        Ok(ImageEmbeddings { dino, clip, extra })
    }

    fn run_batch(
        &self,
        prepared: &[Prepared],
        k: usize,
        enc: &Encoder,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let misses: Vec<usize> = (0..prepared.len())
            .filter(|&i| prepared[i].inputs[k].is_err())
            .collect();
        let mut fresh = Vec::new();
        if !misses.is_empty() {
            let s = enc.pre.crop as usize;
            let mut flat = Vec::with_capacity(misses.len() * 3 * s * s);
            for &i in &misses {
                if let Err(x) = &prepared[i].inputs[k] {
                    flat.extend_from_slice(x);
                }
            }
            let x = Tensor::from_vec(flat, (misses.len(), 3, s, s), &self.options.device)?;
            fresh = (enc.embed)(&x)?.to_vec2::<f32>()?;
        }
        let mut fresh_it = fresh.into_iter();
        let mut out = Vec::with_capacity(prepared.len());
        for p in prepared {
            match &p.inputs[k] {
                Ok(e) => out.push(e.clone()),
                Err(_) => {
                    let e = fresh_it.next().expect("one embedding per miss");
                    if let Some(c) = &self.options.cache {
                        c.put(enc.key, &p.hash, &e)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    }
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Scores generated images against a subject's real images and the CLIP-T prompt. Under a
    /// one-to-one pairing, `real` is the one reference image (or one per generated image).
    pub fn score(
        &self,
        generated: &[PathBuf],
        real: &[PathBuf],
        prompt: &str,
    ) -> Result<ScoreReport, MetricsError> {
        self.score_with_reference(generated, real, real, prompt)
    }

    /// As [`Scorer::score`], with the subject's real images for the all-real pairing and the
    /// reference image(s) the generation was conditioned on for the one-to-one pairing: each score
    /// takes the set its profile's pairing names.
    pub fn score_with_reference(
        &self,
        generated: &[PathBuf],
        real: &[PathBuf],
        reference: &[PathBuf],
        prompt: &str,
    ) -> Result<ScoreReport, MetricsError> {
        let g = self.embed_images(generated)?;
        let r = self.embed_images(real)?;
        let one_to_one = self.scoring.dino.pairing == Pairing::OneToOne
            || self.scoring.clip_i.pairing == Pairing::OneToOne
            || self
                .scoring
                .extra
                .values()
                .any(|e| e.pairing == Pairing::OneToOne);
        // The reference set is embedded only when a score pairs with it.
        let refs = if reference == real || !one_to_one {
            r.clone()
        } else {
            self.embed_images(reference)?
        };
        let t = self
            .clip
            .embed_texts_with(&[prompt], self.scoring.clip_t.truncation)?
            .remove(0);
        let names: Vec<String> = generated.iter().map(|p| p.display().to_string()).collect();
        score_embeddings_with(
            &self.scoring,
            &names,
            &g,
            &Reals {
                all: &r,
                reference: &refs,
            },
            &t,
            prompt,
            &self.options.bootstrap,
        )
    }

    /// The oracle over `(subject, real images)`: every ordered pair of distinct real images of a
    /// subject, under the profile's formulas (whatever its pairing of generated images).
    pub fn oracle(
        &self,
        subjects: &[(String, Vec<PathBuf>)],
    ) -> Result<OracleReport, MetricsError> {
        let all: Vec<PathBuf> = subjects.iter().flat_map(|(_, p)| p.clone()).collect();
        let e = self.embed_images(&all)?;
        let mut start = 0;
        let mut groups = Vec::new();
        for (name, paths) in subjects {
            let end = start + paths.len();
            groups.push((name.as_str(), start..end));
            start = end;
        }
        Ok(oracle_embeddings_with(&self.scoring, &groups, &e))
    }
}

/// The real images a generated image may be compared with.
pub struct Reals<'a> {
    /// Every real image of the subject (the all-real pairing).
    pub all: &'a ImageEmbeddings,
    /// The reference image(s) (the one-to-one pairing): one, or one per generated image.
    pub reference: &'a ImageEmbeddings,
}

/// Scores from embeddings under the DreamBooth protocol (the pure part of [`Scorer::score`]).
pub fn score_embeddings(
    names: &[String],
    generated: &ImageEmbeddings,
    real: &ImageEmbeddings,
    text: &[f32],
    prompt: &str,
    boot: &Bootstrap,
) -> ScoreReport {
    let reals = Reals {
        all: real,
        reference: real,
    };
    score_embeddings_with(
        &Scoring::dreambooth(),
        names,
        generated,
        &reals,
        text,
        prompt,
        boot,
    )
    .expect("the all-real pairing pairs any sets")
}

/// Per-image values of one image score: the formula over the pairs the pairing names.
fn image_values(
    what: &str,
    s: &ImageScoring,
    generated: &[Vec<f32>],
    reals: (&[Vec<f32>], &[Vec<f32>]),
) -> Result<Vec<f64>, MetricsError> {
    let f = s.formula();
    match s.pairing {
        Pairing::AllReal => {
            let real = reals.0;
            Ok(generated
                .iter()
                .map(|g| {
                    if real.is_empty() {
                        f64::NAN
                    } else {
                        real.iter()
                            .map(|r| f.pair(scores::cosine(g, r)))
                            .sum::<f64>()
                            / real.len() as f64
                    }
                })
                .collect())
        }
        Pairing::OneToOne => {
            let reference = reals.1;
            let n = generated.len();
            if reference.len() != 1 && reference.len() != n {
                return Err(MetricsError::Pairing(format!(
                    "{what}: the one-to-one pairing needs one reference image or one per generated image; got {} for {n}",
                    reference.len()
                )));
            }
            Ok(generated
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let r = &reference[if reference.len() == 1 { 0 } else { i }];
                    f.pair(scores::cosine(g, r))
                })
                .collect())
        }
    }
}

/// The summary of per-image values, its mean and interval through the formula's aggregate clamp.
fn summarize_with(values: &[f64], f: &Formula, boot: &Bootstrap) -> Summary {
    let mut s = scores::summarize(values, boot);
    s.mean = f.aggregate(s.mean);
    s.ci95 = [f.aggregate(s.ci95[0]), f.aggregate(s.ci95[1])];
    s
}

/// Scores from embeddings under a profile's scoring.
pub fn score_embeddings_with(
    scoring: &Scoring,
    names: &[String],
    generated: &ImageEmbeddings,
    reals: &Reals,
    text: &[f32],
    prompt: &str,
    boot: &Bootstrap,
) -> Result<ScoreReport, MetricsError> {
    let dino = image_values(
        "dino",
        &scoring.dino,
        &generated.dino,
        (&reals.all.dino, &reals.reference.dino),
    )?;
    let clip_i = image_values(
        "clip_i",
        &scoring.clip_i,
        &generated.clip,
        (&reals.all.clip, &reals.reference.clip),
    )?;
    let tf = scoring.clip_t.formula();
    let clip_t: Vec<f64> = generated
        .clip
        .iter()
        .map(|g| tf.pair(scores::cosine(g, text)))
        .collect();
    let mut extra_values = BTreeMap::new();
    let mut extra = BTreeMap::new();
    let mut extra_summary = BTreeMap::new();
    for (name, e) in &scoring.extra {
        let none = Vec::new();
        let pick = |set: &ImageEmbeddings| -> Vec<Vec<f32>> {
            set.extra.get(name).cloned().unwrap_or_default()
        };
        let g = generated.extra.get(name).unwrap_or(&none);
        let v = image_values(
            name,
            &e.image_scoring(),
            g,
            (&pick(reals.all), &pick(reals.reference)),
        )?;
        let sum = summarize_with(&v, &e.image_scoring().formula(), boot);
        extra.insert(name.clone(), sum.mean);
        extra_summary.insert(name.clone(), sum);
        extra_values.insert(name.clone(), v);
    }
    let per_image: Vec<ImageScores> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ImageScores {
            path: n.clone(),
            dino: dino[i],
            clip_i: clip_i[i],
            clip_t: clip_t[i],
            extra: extra_values
                .iter()
                .map(|(k, v)| (k.clone(), v[i]))
                .collect(),
        })
        .collect();
    let (ds, cis, cts) = (
        summarize_with(&dino, &scoring.dino.formula(), boot),
        summarize_with(&clip_i, &scoring.clip_i.formula(), boot),
        summarize_with(&clip_t, &tf, boot),
    );
    Ok(ScoreReport {
        dino: ds.mean,
        clip_i: cis.mean,
        clip_t: cts.mean,
        n_generated: names.len(),
        n_real: reals.all.dino.len(),
        prompt: prompt.into(),
        dino_summary: ds,
        clip_i_summary: cis,
        clip_t_summary: cts,
        extra,
        extra_summary,
        per_image,
    })
}

/// The DreamBooth oracle from embeddings grouped by subject (index ranges into `e`).
pub fn oracle_embeddings(
    groups: &[(&str, std::ops::Range<usize>)],
    e: &ImageEmbeddings,
) -> OracleReport {
    oracle_embeddings_with(&Scoring::dreambooth(), groups, e)
}

/// The oracle from embeddings grouped by subject, each pair through the profile's formula.
pub fn oracle_embeddings_with(
    scoring: &Scoring,
    groups: &[(&str, std::ops::Range<usize>)],
    e: &ImageEmbeddings,
) -> OracleReport {
    let of = |emb: &[Vec<f32>], f: Formula| {
        let o = scores::oracle_with(groups.iter().map(|(n, r)| (*n, &emb[r.clone()])), |c| {
            f.pair(c)
        });
        let mean = f.aggregate(o.mean);
        (o, mean)
    };
    let (d, d_mean) = of(&e.dino, scoring.dino.formula());
    let (c, c_mean) = of(&e.clip, scoring.clip_i.formula());
    let extra: Vec<(String, scores::OracleScore, f64)> = scoring
        .extra
        .iter()
        .filter_map(|(name, x)| {
            let emb = e.extra.get(name)?;
            let (o, m) = of(emb, x.image_scoring().formula());
            Some((name.clone(), o, m))
        })
        .collect();
    let per_subject = groups
        .iter()
        .map(|(n, r)| {
            (
                n.to_string(),
                SubjectOracle {
                    dino: scoring.dino.formula().aggregate(d.per_subject[*n]),
                    clip_i: scoring.clip_i.formula().aggregate(c.per_subject[*n]),
                    n_images: r.len(),
                    extra: extra
                        .iter()
                        .map(|(k, o, _)| {
                            let f = scoring.extra[k].image_scoring().formula();
                            (k.clone(), f.aggregate(o.per_subject[*n]))
                        })
                        .collect(),
                },
            )
        })
        .collect();
    OracleReport {
        dino: d_mean,
        clip_i: c_mean,
        n_images: groups.iter().map(|(_, r)| r.len()).sum(),
        n_pairs: d.pairs,
        extra: extra.iter().map(|(k, _, m)| (k.clone(), *m)).collect(),
        per_subject,
    }
}

/// The images a PATH argument names: every `.jpg`/`.jpeg`/`.png` of a folder sorted by name, or the
/// single file itself.
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>, MetricsError> {
    let io = |source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).map_err(io)?.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    // An unreadable entry is an error, never a silently smaller image set.
    let entries = std::fs::read_dir(path)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    let mut files: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension()
                        .and_then(|e| e.to_str())
                        .map(str::to_ascii_lowercase)
                        .as_deref(),
                    Some("jpg" | "jpeg" | "png")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(MetricsError::NoImages(path.to_path_buf()));
    }
    Ok(files)
}

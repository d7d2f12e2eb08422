//! The facade later issues call: load the DINO and CLIP models (a local folder or a hub id, via the
//! `weights` crate), embed images (rayon for read + decode + preprocess, batched inference, the
//! on-disk cache), and score generated images against a subject's real images and a CLIP-T prompt,
//! or compute the real-image oracle.

use crate::cache::{sha256_hex, EmbeddingCache};
use crate::clip::{ClipConfig, ClipText, ClipVision};
use crate::preprocess::{decode_rgb, Preprocess};
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
            key: model_key("dino", &Preprocess::DINO, &r)?,
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
            key: model_key("clip", &Preprocess::CLIP, &r)?,
        })
    }

    /// Projected text embeddings, one prompt at a time (no padding needed).
    pub fn embed_texts(&self, prompts: &[&str]) -> Result<Vec<Vec<f32>>, MetricsError> {
        prompts
            .iter()
            .map(|p| {
                let ids = self.tokenizer.encode(p)?;
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

/// DINO and CLIP embeddings of a list of images, in the list's order.
#[derive(Debug, Clone, Default)]
pub struct ImageEmbeddings {
    pub dino: Vec<Vec<f32>>,
    pub clip: Vec<Vec<f32>>,
}

/// The three scores of one generated image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageScores {
    pub path: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
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
    pub per_image: Vec<ImageScores>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubjectOracle {
    pub dino: f64,
    pub clip_i: f64,
    pub n_images: usize,
}

/// `pnd oracle`'s result: means over all ordered pairs of distinct real images of a subject, pooled
/// over subjects, and per subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OracleReport {
    pub dino: f64,
    pub clip_i: f64,
    pub n_images: usize,
    pub n_pairs: usize,
    pub per_subject: BTreeMap<String, SubjectOracle>,
}

pub struct Scorer {
    pub dino: DinoModel,
    pub clip: ClipModel,
    pub options: ScorerOptions,
}

/// One image read and (where not cached) preprocessed.
struct Prepared {
    hash: String,
    dino: Result<Vec<f32>, Vec<f32>>,
    clip: Result<Vec<f32>, Vec<f32>>,
}

impl Scorer {
    pub fn load(dino: &str, clip: &str, options: ScorerOptions) -> Result<Self, MetricsError> {
        Ok(Self {
            dino: DinoModel::load(dino, &options.device)?,
            clip: ClipModel::load(clip, &options.device)?,
            options,
        })
    }

    fn cached(&self, key: &str, hash: &str, dim: usize) -> Option<Vec<f32>> {
        self.options.cache.as_ref()?.get(key, hash, dim)
    }

    /// Reads one image; `Ok(embedding)` where the cache has it, else `Err(model input)`.
    fn prepare(&self, path: &Path) -> Result<Prepared, MetricsError> {
        let bytes = std::fs::read(path).map_err(|e| MetricsError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let hash = sha256_hex(&bytes);
        let dino_dim = self.dino.vit.config().hidden_size;
        let clip_dim = self.clip.vision.projection_dim();
        let dino_hit = self.cached(&self.dino.key, &hash, dino_dim);
        let clip_hit = self.cached(&self.clip.key, &hash, clip_dim);
        let img = if dino_hit.is_none() || clip_hit.is_none() {
            Some(decode_rgb(&bytes, path)?)
        } else {
            None
        };
        let pre = |hit: Option<Vec<f32>>, p: &Preprocess| match hit {
            Some(e) => Ok(e),
            None => Err(p.apply(img.as_ref().expect("decoded on a miss"))),
        };
        Ok(Prepared {
            dino: pre(dino_hit, &Preprocess::DINO),
            clip: pre(clip_hit, &Preprocess::CLIP),
            hash,
        })
    }

    /// DINO and CLIP image embeddings of `paths` (batched; cached by model and file content).
    pub fn embed_images(&self, paths: &[PathBuf]) -> Result<ImageEmbeddings, MetricsError> {
        let mut out = ImageEmbeddings::default();
        let bs = self.options.batch_size.max(1);
        for chunk in paths.chunks(bs) {
            let prepared: Vec<Prepared> = chunk
                .par_iter()
                .map(|p| self.prepare(p))
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
            let dino = self
                .run_batch(
                    &prepared,
                    |p| &p.dino,
                    Preprocess::DINO.crop,
                    &self.dino.key,
                    |x| self.dino.vit.embed(x),
                )
                .map_err(|source| MetricsError::Inference {
                    what: format!("DINO of {}", what()),
                    source,
                })?;
            let clip = self
                .run_batch(
                    &prepared,
                    |p| &p.clip,
                    Preprocess::CLIP.crop,
                    &self.clip.key,
                    |x| self.clip.vision.embed(x),
                )
                .map_err(|source| MetricsError::Inference {
                    what: format!("CLIP of {}", what()),
                    source,
                })?;
            out.dino.extend(dino);
            out.clip.extend(clip);
        }
        Ok(out)
    }

    fn run_batch(
        &self,
        prepared: &[Prepared],
        pick: impl Fn(&Prepared) -> &Result<Vec<f32>, Vec<f32>>,
        side: u32,
        key: &str,
        model: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let misses: Vec<usize> = (0..prepared.len())
            .filter(|&i| pick(&prepared[i]).is_err())
            .collect();
        let mut fresh = Vec::new();
        if !misses.is_empty() {
            let s = side as usize;
            let mut flat = Vec::with_capacity(misses.len() * 3 * s * s);
            for &i in &misses {
                if let Err(x) = pick(&prepared[i]) {
                    flat.extend_from_slice(x);
                }
            }
            let x = Tensor::from_vec(flat, (misses.len(), 3, s, s), &self.options.device)?;
            fresh = model(&x)?.to_vec2::<f32>()?;
        }
        let mut fresh_it = fresh.into_iter();
        let mut out = Vec::with_capacity(prepared.len());
        for p in prepared {
            match pick(p) {
                Ok(e) => out.push(e.clone()),
                Err(_) => {
                    let e = fresh_it.next().expect("one embedding per miss");
                    if let Some(c) = &self.options.cache {
                        c.put(key, &p.hash, &e)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    }
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Scores generated images against a subject's real images and the CLIP-T prompt.
    pub fn score(
        &self,
        generated: &[PathBuf],
        real: &[PathBuf],
        prompt: &str,
    ) -> Result<ScoreReport, MetricsError> {
        let g = self.embed_images(generated)?;
        let r = self.embed_images(real)?;
        let t = self.clip.embed_texts(&[prompt])?.remove(0);
        let names: Vec<String> = generated.iter().map(|p| p.display().to_string()).collect();
        Ok(score_embeddings(
            &names,
            &g,
            &r,
            &t,
            prompt,
            &self.options.bootstrap,
        ))
    }

    /// The oracle over `(subject, real images)`.
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
        Ok(oracle_embeddings(&groups, &e))
    }
}

/// Scores from embeddings (the pure part of [`Scorer::score`]).
pub fn score_embeddings(
    names: &[String],
    generated: &ImageEmbeddings,
    real: &ImageEmbeddings,
    text: &[f32],
    prompt: &str,
    boot: &Bootstrap,
) -> ScoreReport {
    let per_image: Vec<ImageScores> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ImageScores {
            path: n.clone(),
            dino: scores::mean_cosine(&generated.dino[i], &real.dino),
            clip_i: scores::mean_cosine(&generated.clip[i], &real.clip),
            clip_t: scores::cosine(&generated.clip[i], text),
        })
        .collect();
    let col = |f: fn(&ImageScores) -> f64| per_image.iter().map(f).collect::<Vec<_>>();
    let (d, ci, ct) = (col(|s| s.dino), col(|s| s.clip_i), col(|s| s.clip_t));
    let (ds, cis, cts) = (
        scores::summarize(&d, boot),
        scores::summarize(&ci, boot),
        scores::summarize(&ct, boot),
    );
    ScoreReport {
        dino: ds.mean,
        clip_i: cis.mean,
        clip_t: cts.mean,
        n_generated: names.len(),
        n_real: real.dino.len(),
        prompt: prompt.into(),
        dino_summary: ds,
        clip_i_summary: cis,
        clip_t_summary: cts,
        per_image,
    }
}

/// The oracle from embeddings grouped by subject (index ranges into `e`).
pub fn oracle_embeddings(
    groups: &[(&str, std::ops::Range<usize>)],
    e: &ImageEmbeddings,
) -> OracleReport {
    let d = scores::oracle(groups.iter().map(|(n, r)| (*n, &e.dino[r.clone()])));
    let c = scores::oracle(groups.iter().map(|(n, r)| (*n, &e.clip[r.clone()])));
    let per_subject = groups
        .iter()
        .map(|(n, r)| {
            (
                n.to_string(),
                SubjectOracle {
                    dino: d.per_subject[*n],
                    clip_i: c.per_subject[*n],
                    n_images: r.len(),
                },
            )
        })
        .collect();
    OracleReport {
        dino: d.mean,
        clip_i: c.mean,
        n_images: groups.iter().map(|(_, r)| r.len()).sum(),
        n_pairs: d.pairs,
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

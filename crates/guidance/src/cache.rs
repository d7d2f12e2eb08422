//! The on-disk caches of the per-subject and per-prompt work (SPEC §7, "computed once per subject";
//! SPEC §10, "a layout template once per (base model, identifier-free prompt, seed), shared by
//! every guided method"): inversions and palettes keyed by [`CacheKey`], layout templates keyed by
//! [`TemplateKey`], all in one folder. File formats are [`crate::store`]'s.
//!
//! An entry that cannot be read, fails its checksum or holds non-finite values is a miss (SPEC
//! §9): it is recomputed and replaced, and the [`CacheWarning`] naming the file comes back with
//! the value for the caller to print (this crate never prints).

use crate::error::{Error, Result};
use crate::guide::{Palette, TemplateMaps};
use crate::inversion::Inversion;
use crate::store::{
    read_inversion, read_palette, read_template, write_inversion, write_palette, write_template,
};
use candle_core::{DType, Tensor};
use diffusion::pipeline::StableDiffusion;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What identifies a cached inversion and palette.
#[derive(Debug, Clone, Serialize)]
pub struct CacheKey {
    /// The model argument (folder or hub id) and any Textual Inversion file.
    pub model: String,
    /// SHA-256 of the reference image file.
    pub image_sha256: String,
    pub prompt: String,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    pub scheduler: String,
    pub inversion: String,
    pub dtype: String,
}

/// What identifies a layout template: the template model, the identifier-free prompt, the initial
/// latents (the seed and the size) and the sampling settings that shape the maps. Nothing of the
/// personalized model or the guidance weights enters it, so every guided method of a sweep shares
/// the template of a (base model, prompt, seed).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateKey {
    /// Where the template model's components came from ([`diffusion::pipeline::Provenance`]).
    pub model: String,
    pub dtype: String,
    pub scheduler: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// SHA-256 of the initial latents (f32 bytes).
    pub init_sha256: String,
    pub steps: usize,
    pub cfg_scale: f64,
    /// Template token positions whose maps are kept.
    pub tokens: Vec<usize>,
    /// Layout steps `[start, end)` whose maps are kept.
    pub window: [usize; 2],
}

impl TemplateKey {
    /// The key of the template of `base` sampled from `init` with `prompt`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        base: &StableDiffusion,
        prompt: &str,
        negative_prompt: &str,
        init: &Tensor,
        steps: usize,
        cfg_scale: f64,
        tokens: &[usize],
        window: std::ops::Range<usize>,
    ) -> Result<Self> {
        Ok(TemplateKey {
            model: format!("{:?}", base.provenance),
            dtype: format!("{:?}", base.dtype()),
            scheduler: format!("{:?}", base.scheduler),
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            init_sha256: tensor_sha256(init)?,
            steps,
            cfg_scale,
            tokens: tokens.to_vec(),
            window: [window.start, window.end],
        })
    }
}

/// The first 12 bytes (hex) of the SHA-256 of a key's JSON and `extra`.
fn digest(key: &impl Serialize, extra: &str) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_string(key).expect("key serializes"));
    h.update(extra.as_bytes());
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// SHA-256 of a tensor's values as little-endian f32, hex.
pub fn tensor_sha256(t: &Tensor) -> Result<String> {
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut h = Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// Where a cached value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
}

/// A cache entry that was there but unusable, and was recomputed and replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheWarning {
    pub path: PathBuf,
    /// What was wrong with it (a failed read, a checksum mismatch, a non-finite value).
    pub reason: String,
}

impl std::fmt::Display for CacheWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache entry '{}' is unusable ({}); recomputed and replaced",
            self.path.display(),
            self.reason
        )
    }
}

/// A value from a cache, whether it was there, and why an entry that was there went unused.
#[derive(Debug, Clone)]
pub struct Cached<T> {
    pub value: T,
    pub status: CacheStatus,
    /// Set on a miss whose entry existed but could not be used.
    pub warning: Option<CacheWarning>,
}

impl<T> Cached<T> {
    pub fn hit(&self) -> bool {
        self.status == CacheStatus::Hit
    }
}

/// The reason of a failed read, without the entry's path where the error leads with it.
fn reason(e: &Error) -> String {
    match e {
        Error::File(f) => f.reason().to_string(),
        e => e.to_string(),
    }
}

/// The value stored at `path` when `present` and readable, else `compute`d and stored there (an
/// unreadable entry is replaced, with a warning).
fn read_or_compute<T>(
    path: &Path,
    present: bool,
    read: impl FnOnce(&Path) -> Result<T>,
    compute: impl FnOnce() -> Result<T>,
    write: impl FnOnce(&Path, &T) -> Result<()>,
) -> Result<Cached<T>> {
    let mut warning = None;
    if present {
        match read(path) {
            Ok(value) => {
                return Ok(Cached {
                    value,
                    status: CacheStatus::Hit,
                    warning: None,
                })
            }
            Err(e) => {
                warning = Some(CacheWarning {
                    path: path.to_path_buf(),
                    reason: reason(&e),
                })
            }
        }
    }
    let value = compute()?;
    write(path, &value)?;
    Ok(Cached {
        value,
        status: CacheStatus::Miss,
        warning,
    })
}

/// An on-disk cache of inversions and palettes under one folder.
pub struct PaletteCache {
    pub dir: PathBuf,
}

impl PaletteCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PaletteCache { dir: dir.into() }
    }

    pub fn inversion_path(&self, key: &CacheKey) -> PathBuf {
        self.dir
            .join(format!("inversion-{}.safetensors", digest(key, "")))
    }

    pub fn palette_path(
        &self,
        key: &CacheKey,
        sites: &[String],
        tau: f64,
        window: std::ops::Range<usize>,
    ) -> PathBuf {
        let extra = format!("{sites:?}|{tau}|{window:?}");
        self.dir
            .join(format!("palette-{}.safetensors", digest(key, &extra)))
    }

    /// The inversion of `key`, computed with `compute` and stored on a miss.
    pub fn inversion(
        &self,
        key: &CacheKey,
        sd: &StableDiffusion,
        compute: impl FnOnce() -> Result<Inversion>,
    ) -> Result<Cached<Inversion>> {
        let path = self.inversion_path(key);
        read_or_compute(
            &path,
            path.is_file(),
            |p| read_inversion(p, sd),
            compute,
            write_inversion,
        )
    }

    /// The palette of `key` for `sites`, computed with `compute` and stored on a miss.
    pub fn palette(
        &self,
        key: &CacheKey,
        sites: &[String],
        tau: f64,
        window: std::ops::Range<usize>,
        sd: &StableDiffusion,
        compute: impl FnOnce() -> Result<Palette>,
    ) -> Result<Cached<Palette>> {
        let path = self.palette_path(key, sites, tau, window.clone());
        read_or_compute(
            &path,
            path.is_file(),
            |p| read_palette(p, sites, window, sd),
            compute,
            write_palette,
        )
    }
}

/// An on-disk cache of layout templates, beside the [`PaletteCache`] in the same folder.
pub struct TemplateCache {
    pub dir: PathBuf,
}

impl TemplateCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TemplateCache { dir: dir.into() }
    }

    pub fn template_path(&self, key: &TemplateKey) -> PathBuf {
        self.dir
            .join(format!("template-{}.safetensors", digest(key, "")))
    }

    /// The template maps of `key` (sampled with `base`), computed with `compute` and stored on a
    /// miss.
    pub fn template(
        &self,
        key: &TemplateKey,
        base: &StableDiffusion,
        compute: impl FnOnce() -> Result<TemplateMaps>,
    ) -> Result<Cached<TemplateMaps>> {
        let path = self.template_path(key);
        let sites = base.unet.cross_attention_sites();
        let window = key.window[0]..key.window[1].min(key.steps);
        read_or_compute(
            &path,
            path.is_file(),
            |p| read_template(p, &sites, window, base),
            compute,
            write_template,
        )
    }
}

//! The result rows a sweep writes: one per generated image.

use serde::{Deserialize, Serialize};

/// One generated image and its scores (SPEC §8). Flat, so it is one CSV line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRow {
    /// Stable job id, `method__subject__pNN__sS`.
    pub id: String,
    /// The experiment's method name (a table row).
    pub method: String,
    /// `stable-diffusion`, `textual-inversion`, `dreambooth`, `blip-diffusion`.
    pub baseline: String,
    /// With Pick-and-Draw guidance.
    pub guided: bool,
    pub subject: String,
    pub prompt_index: usize,
    pub seed: u64,
    /// The prompt the image was generated from.
    pub prompt: String,
    /// The prompt CLIP-T scores against (class noun, no identifier).
    pub clip_t_prompt: String,
    /// The generated image, relative to the run folder.
    pub image: String,
    /// The subject's reference image (for grids), as given to the run.
    pub reference: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// Wall time of generation (guidance included), seconds. Not part of any table.
    pub seconds: f64,
    /// The device that generated the image (`cpu`, `cuda:0`); empty in rows of older runs.
    #[serde(default)]
    pub device: String,
    /// The generation precision (`f32`, `f16`, `bf16`); empty in rows of older runs.
    #[serde(default)]
    pub dtype: String,
    /// The largest DINO similarity of the image to one real image of its subject: above the
    /// subject's largest real-vs-real similarity ([`OracleRow::dino_max_pair`]) the image is
    /// counted as a possible copy of the input. Absent in rows of older runs.
    #[serde(default)]
    pub dino_max: Option<f64>,
}

/// The "Real Images (Oracle)" row, written by the sweep's oracle step as `oracle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OracleRow {
    pub dino: f64,
    pub clip_i: f64,
    /// Per subject: (subject, dino, clip_i).
    pub per_subject: Vec<(String, f64, f64)>,
    /// Per subject: the largest DINO similarity between two distinct real images (the copy
    /// flag's threshold). Empty in oracles of older runs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub dino_max_pair: std::collections::BTreeMap<String, f64>,
}

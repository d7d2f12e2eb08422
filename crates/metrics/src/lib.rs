//! DreamBench metrics natively in candle (SPEC §5): DINO (ViT-S/16, ViT-S/8, DINOv2), CLIP-I and
//! CLIP-T (CLIP ViT-B/32, ViT-L/14), preprocessing bit-exact to PIL + torchvision or transformers'
//! image processors, the published protocols' formulas and pairings ([`protocol`]), scores with
//! aggregates and bootstrap intervals, the real-image oracle, and an on-disk embedding cache.
//!
//! Entry point for other crates: [`Scorer`] (`Scorer::load(dino, clip, options)` for the DreamBooth
//! protocol, `Scorer::load_scoring(dino, clip, scoring, options)` for a profile's, then
//! [`Scorer::score`] / [`Scorer::score_with_reference`] / [`Scorer::oracle`] /
//! [`Scorer::embed_images`]).

// Errors carry the offending file and candle's message; they sit on cold paths, so their size
// (candle's error type is large) does not matter.
#![allow(clippy::result_large_err)]

pub mod cache;
pub mod clip;
pub mod dinov2;
pub mod nn;
pub mod preprocess;
pub mod protocol;
pub mod scorer;
pub mod scores;
pub mod tokenizer;
pub mod vit;

pub use cache::EmbeddingCache;
pub use preprocess::Preprocess;
pub use protocol::Scoring;
pub use scorer::{
    list_images, ClipModel, DinoModel, ExtraModel, ImageEmbeddings, ImageScores, OracleReport,
    ScoreReport, Scorer, ScorerOptions, SubjectOracle, DEFAULT_CLIP, DEFAULT_DINO,
};
pub use scores::{Bootstrap, Summary};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// The weights do not fit the architecture the config describes (a missing tensor, a wrong
    /// shape): candle's message names the tensor, this names the files.
    #[error("model '{model}' (weights {files}): {source}")]
    Model {
        model: String,
        files: String,
        source: candle_core::Error,
    },
    #[error("reading image '{path}': {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("tokenizer '{path}': {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error(transparent)]
    ClipTokenizer(#[from] clip_tokenizer::Error),
    /// A protocol profile's scoring table is inconsistent.
    #[error("metric protocol: {0}")]
    Protocol(String),
    /// Generated and real images cannot be paired as the protocol says.
    #[error("pairing: {0}")]
    Pairing(String),
    #[error("no images (jpg, jpeg, png) in '{0}'")]
    NoImages(PathBuf),
    #[error("'{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing embedding cache entry '{path}': {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error("embedding {what}: {source}")]
    Inference {
        what: String,
        source: candle_core::Error,
    },
    /// A profile's extra score whose model cannot be loaded (named, not blamed on DINO or CLIP).
    #[error("the protocol's extra score '{name}' (model '{model}'): {source}")]
    Extra {
        name: String,
        model: String,
        source: Box<MetricsError>,
    },
}

impl From<imaging::ImageError> for MetricsError {
    fn from(e: imaging::ImageError) -> Self {
        MetricsError::Image {
            path: e.path,
            reason: e.reason,
        }
    }
}

//! BLIP-Diffusion (Li, Li, Hoi, NeurIPS 2023), the zero-shot subject-driven baseline of the
//! Pick-and-Draw paper's Table 1, in the diffusers `BlipDiffusionPipeline` layout
//! (`Salesforce/blipdiffusion`): the reference image and its source subject category go through the
//! BLIP-2 Q-Former ([`qformer`], [`vision`]) to query embeddings, which the context-aware CLIP text
//! encoder ([`ctx_clip`]) inserts into the prompt embedding; the SD UNet, VAE and DDIM of this crate
//! then sample ([`pipeline`]).
//!
//! The reference is diffusers 0.32.2 with transformers 4.51.3 (`pipelines/blip_diffusion/`): later
//! versions cannot load or silently change the pipeline (SPEC §11). The fixtures are written by
//! `tools/fixtures/blip_diffusion.py`. The reference image is decoded and resized exactly as PIL
//! does ([`imaging`]), so the processed pixels equal the reference's bit for bit, JPEGs included.
//!
//! Differences from the reference, all deliberate:
//! - Sampling uses DDIM in SD's configuration (SPEC §6) instead of the folder's PNDM, like the
//!   other baselines; the loop is otherwise the pipeline's (CFG on `[uncond, cond]`).
//! - A negative prompt longer than 77 tokens is truncated (the reference fails on it).
//! - The Q-Former tokenizer is built from the `vocab.txt` of the folder `qformer/config.json`
//!   names (`tokenizer`), resolved against the model folder, `qformer/`, then as a hub repo id;
//!   without one, `bert-base-uncased` as diffusers does, looked up in the hub cache (or
//!   downloaded) as `google-bert/bert-base-uncased`, then under its old id `bert-base-uncased`.

// Load errors carry the weights crate's and the pipeline's errors unboxed; they are built once per
// failed load, never on a hot path.
#![allow(clippy::result_large_err)]

pub mod ctx_clip;
pub mod image;
pub mod pipeline;
pub mod qformer;
pub mod vision;

pub use ctx_clip::ContextClipTextModel;
pub use image::{BlipImageProcessor, BlipImageProcessorConfig};
pub use pipeline::{
    blip_text_prompt, BlipConditioning, BlipDiffusion, BlipDiffusionConfig, BlipDiffusionPipeline,
    BlipOutput, BlipRequest, PromptSettings,
};
pub use qformer::{BertTokenizer, Blip2Config, Blip2QFormerModel};
pub use vision::{Blip2VisionConfig, Blip2VisionModel};

use std::path::PathBuf;

/// Errors of loading or running BLIP-Diffusion; each names the component, file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum BlipError {
    #[error("BLIP-Diffusion model '{model}' lacks its {component}: {source}")]
    MissingComponent {
        model: String,
        component: &'static str,
        source: weights::WeightsError,
    },
    #[error("BLIP-Diffusion {component} config '{path}': {reason}")]
    Config {
        component: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "BLIP-Diffusion {component} weights '{path}' do not match the config '{config}': {source}"
    )]
    Weights {
        component: &'static str,
        path: String,
        config: PathBuf,
        source: candle_core::Error,
    },
    #[error("Q-Former tokenizer '{path}': {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("reference image '{path}': {reason}")]
    Image { path: PathBuf, reason: String },
    #[error(transparent)]
    Files(#[from] weights::WeightsError),
    #[error(transparent)]
    ClipTokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    UNet(#[from] crate::unet::UNetError),
    #[error(transparent)]
    Ddim(#[from] crate::ddim::DdimError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

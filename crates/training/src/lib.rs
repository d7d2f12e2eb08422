//! Training the baselines of Table 1 (issue 14): Textual Inversion and DreamBooth for Stable
//! Diffusion, following diffusers' `examples/textual_inversion/textual_inversion.py` and
//! `examples/dreambooth/train_dreambooth.py` step for step (see each module), with resumable
//! checkpoints.
//!
//! - [`schedule`]: the forward process (`DDPMScheduler.add_noise`, `get_velocity`) and the loss.
//! - [`adamw`]: `torch.optim.AdamW` and `clip_grad_norm_`.
//! - [`data`]: image folders, transforms and prompt templates.
//! - [`rng`]: randomness drawn from `(seed, stream, index)`, so a resumed run draws what the
//!   uninterrupted one drew.
//! - [`train_loop`]: micro-batches, gradient accumulation, optimizer steps, checkpoints, trace.
//! - [`textual_inversion`], [`dreambooth`]: the two trainers.

pub mod adamw;
pub mod data;
pub mod dreambooth;
pub mod rng;
pub mod schedule;
pub mod textual_inversion;
pub mod train_loop;

use std::path::PathBuf;

/// Everything that stops a training run, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training images '{dir}': {reason}")]
    Images { dir: PathBuf, reason: String },
    #[error("token '{token}' is already in the tokenizer's vocabulary (id {id}); pick a new placeholder such as '<{token}-ti>'")]
    TokenExists { token: String, id: u32 },
    #[error("--init-token '{token}' is {count} tokens ({pieces}); it must be a single token of the vocabulary")]
    InitToken {
        token: String,
        count: usize,
        pieces: String,
    },
    #[error("--resolution {0} is not a positive multiple of 8 (the VAE's downsampling); use a multiple of 8 such as {near}", near = near_multiples_of_8(*.0))]
    Resolution(u32),
    #[error("model '{0}' has no scheduler/scheduler_config.json: training adds noise by the model's own DDPM schedule (betas, prediction type); use a complete diffusers folder or copy scheduler/ from its base model")]
    NoScheduler(String),
    #[error("output '{0}' exists; pass --overwrite to replace it (and its checkpoints)")]
    OutputExists(PathBuf),
    #[error("checkpoints in '{dir}' were made with other settings ({reason}); remove them or pass --overwrite")]
    CheckpointMismatch { dir: PathBuf, reason: String },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    // Transparent: with `#[from]` the inner error is also the source, and `{:#}` would print it
    // twice.
    // Boxed, as the pipeline's own errors are: they are large, and every `Result` carries them.
    #[error(transparent)]
    Model(Box<diffusion::pipeline::PipelineError>),
    #[error(transparent)]
    Tokenizer(Box<diffusion::tokenizer::TokenizerError>),
    #[error(transparent)]
    Scheduler(Box<diffusion::ddim::DdimError>),
    #[error("writing '{path}': {reason}")]
    Write { path: PathBuf, reason: String },
    /// A checkpoint file written ([`weights::files`]): the message names the file.
    #[error(transparent)]
    File(#[from] weights::files::FileError),
    #[error(transparent)]
    Tensor(Box<candle_core::Error>),
}

macro_rules! boxed_from {
    ($($variant:ident: $t:ty),*) => {$(
        impl From<$t> for TrainError {
            fn from(e: $t) -> Self {
                TrainError::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Model: diffusion::pipeline::PipelineError,
    Tokenizer: diffusion::tokenizer::TokenizerError,
    Scheduler: diffusion::ddim::DdimError,
    Tensor: candle_core::Error
);

pub type Result<T> = std::result::Result<T, TrainError>;

/// The multiples of 8 nearest `r` ("56 or 64"; "8" below it), for the resolution error.
fn near_multiples_of_8(r: u32) -> String {
    let below = r / 8 * 8;
    if below == 0 {
        "8".into()
    } else {
        format!("{below} or {}", below + 8)
    }
}

/// Loads a base model to train from: its scheduler config is required (the forward process
/// follows it, and a missing one must not fall back to a default schedule), so its absence is
/// [`TrainError::NoScheduler`] before anything loads.
pub fn load_base(
    model: &str,
    opts: &diffusion::pipeline::LoadOptions,
) -> Result<diffusion::pipeline::StableDiffusion> {
    let src =
        weights::ModelSource::parse(model).map_err(diffusion::pipeline::PipelineError::from)?;
    scheduler_file(&src, model)?;
    Ok(diffusion::pipeline::StableDiffusion::load(model, opts)?)
}

/// The model's `scheduler/scheduler_config.json`, or [`TrainError::NoScheduler`] when it has none
/// (other failures, such as offline or a failed download, as the pipeline says them).
pub fn scheduler_file(src: &weights::ModelSource, model: &str) -> Result<std::path::PathBuf> {
    match src.file(&["scheduler/scheduler_config.json"]) {
        Ok(f) => Ok(f),
        Err(weights::WeightsError::MissingFile { .. }) => {
            Err(TrainError::NoScheduler(model.into()))
        }
        Err(e) => Err(diffusion::pipeline::PipelineError::from(e).into()),
    }
}

/// A positive multiple of 8, or [`TrainError::Resolution`].
pub fn check_resolution(r: u32) -> Result<u32> {
    if r == 0 || r % 8 != 0 {
        return Err(TrainError::Resolution(r));
    }
    Ok(r)
}

//! What both generators do around sampling: progress, and the outputs (latents, PNG).

use super::args::GenerateArgs;
use crate::commands::common::save_image;
use crate::progress::{ProgressMode, StepProgress};
use anyhow::Context;
use candle_core::Tensor;
use diffusion::pipeline::{write_latents, StableDiffusion};

/// The denoising progress of one image: a bar on a terminal, a line every few steps in a log.
pub(super) fn step_progress(args: &GenerateArgs) -> StepProgress {
    StepProgress::new("denoising", args.steps, ProgressMode::detect(!args.quiet))
}

/// Writes `--save-latents` (if asked, all images) and the decoded images, one per seed.
pub(super) fn write_outputs(
    args: &GenerateArgs,
    sd: &StableDiffusion,
    latents: &Tensor,
) -> anyhow::Result<()> {
    if let Some(p) = &args.save_latents {
        write_latents(p, latents).with_context(|| format!("writing latents '{}'", p.display()))?;
    }
    let images = sd.decode_images(latents)?;
    for (img, seed) in images.iter().zip(args.seeds()?) {
        save_image(img, &args.image_path(seed))?;
    }
    Ok(())
}

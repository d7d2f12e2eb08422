//! Null-text inversion of the reference image (SPEC §7), as
//! prompt-to-prompt's null-text notebook does it
//! (<https://github.com/google/prompt-to-prompt/blob/9c472e44aa1b607da59fea94820f7be9b26da511/null_text_w_ptp.ipynb>,
//! `NullInversion.ddim_loop` and `null_optimization`):
//! DDIM inversion with the conditional embedding ([`ddim_invert`]), then per sampling step a fresh
//! Adam on the unconditional embedding against the MSE between the CFG DDIM step and the inverted
//! latent ([`null_text_optimize`]); [`replay`] samples the inverted trajectory back. This module
//! joins them into one [`Inversion`] with its reconstruction report. The palette taken from the
//! replay is [`crate::palette`]'s job, files [`crate::store`]'s, the on-disk cache
//! [`crate::cache`]'s.

mod ddim;
mod null_text;
mod reference;
mod replay;

// The inversion file is written by `pnd invert`; its format lives with the others in `store`.
pub use crate::store::{read_inversion, write_inversion};
pub use ddim::ddim_invert;
pub use null_text::{null_text_optimize, NullText};
pub use reference::{encode_image, load_reference_image};
pub use replay::replay;

use crate::config::InversionConfig;
use crate::error::Result;
use candle_core::{DType, Tensor};
use diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

/// Where the null-text optimization reports its progress: `(steps done, steps)` after each
/// sampling step. A process sets it once (the `pnd` binary prints a line every few steps, since
/// an inversion runs for minutes on real models before any sampling step); unset, nothing is
/// reported. A function pointer, so the library holds no state of its caller's.
static PROGRESS: std::sync::OnceLock<fn(usize, usize)> = std::sync::OnceLock::new();

/// Sets the inversion's progress report (see [`PROGRESS`]); later calls are ignored.
pub fn set_progress(report: fn(usize, usize)) {
    let _ = PROGRESS.set(report);
}

fn report_progress(done: usize, total: usize) {
    if let Some(report) = PROGRESS.get() {
        report(done, total);
    }
}

/// Reconstruction quality of an inversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InversionReport {
    pub steps: usize,
    /// Mean over steps of the MSE between the replayed latent and the inverted one, with the
    /// optimized null embeddings.
    pub trajectory_mse: f64,
    /// The same with the empty prompt's embedding at every step (plain DDIM inversion).
    pub trajectory_mse_ddim: f64,
    /// MSE of the final replayed latent against the encoded image.
    pub final_mse: f64,
    pub final_mse_ddim: f64,
    /// PSNR (dB) of the decoded reconstruction against the input image.
    pub psnr: f64,
    pub psnr_ddim: f64,
    /// Adam updates per step.
    pub updates: Vec<usize>,
}

/// A null-text inversion.
pub struct Inversion {
    /// The inverted noise latent `z_T`, `[1, 4, h, w]`.
    pub z_t: Tensor,
    /// `[steps, 77, dim]`.
    pub null_embeddings: Tensor,
    pub report: InversionReport,
}

fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?
        .to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?)
}

fn psnr(sd: &StableDiffusion, z: &Tensor, img: &image::RgbImage) -> Result<f64> {
    let rec = sd.decode_images(z)?.remove(0);
    let se: f64 = rec
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let m = se / img.as_raw().len() as f64;
    Ok(if m == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / m).log10()
    })
}

/// Null-text inversion of `img` under `prompt` with `steps` DDIM steps.
pub fn invert(
    sd: &StableDiffusion,
    img: &image::RgbImage,
    prompt: &str,
    steps: usize,
    settings: &InversionConfig,
) -> Result<Inversion> {
    let cond = sd.encode_prompt(prompt)?;
    let empty = sd.encode_prompt("")?;
    invert_embeddings(sd, img, &cond, &empty, steps, settings)
}

/// Null-text inversion of `img` with given embeddings: [`crate::inversion::invert`] with the
/// conditional embedding `cond` and the starting unconditional embedding `empty` in place of the
/// text prompt's and the empty prompt's (for conditionings a string cannot express, such as
/// BLIP's query-bearing context embeddings).
///
/// # Shapes
/// `cond`, `empty`: `[1, seq, dim]`.
pub fn invert_embeddings(
    sd: &StableDiffusion,
    img: &image::RgbImage,
    cond: &Tensor,
    empty: &Tensor,
    steps: usize,
    settings: &InversionConfig,
) -> Result<Inversion> {
    let ddim = sd.ddim(steps)?;
    let n = ddim.timesteps().len();
    let z0 = encode_image(sd, img)?;
    let traj = ddim_invert(sd, &ddim, &z0, cond)?;
    let nt = null_text_optimize(sd, &ddim, &traj, cond, empty, settings)?;
    let z_t = traj[n].clone();
    let quality = |nulls: &[Tensor]| -> Result<(f64, f64, f64)> {
        let lat = replay(
            sd,
            &ddim,
            &z_t,
            nulls,
            cond,
            settings.guidance_scale,
            n,
            &mut |_| None,
            &mut |_, _| Ok(()),
        )?;
        let mut sum = 0.0;
        for (i, z) in lat.iter().enumerate() {
            sum += mse(z, &traj[n - 1 - i])?;
        }
        let last = lat.last().expect("steps > 0");
        Ok((sum / n as f64, mse(last, &z0)?, psnr(sd, last, img)?))
    };
    let (trajectory_mse, final_mse, p) = quality(&nt.embeddings)?;
    let (trajectory_mse_ddim, final_mse_ddim, p_ddim) = quality(&vec![empty.clone(); n])?;
    Ok(Inversion {
        z_t,
        null_embeddings: Tensor::cat(&nt.embeddings, 0)?,
        report: InversionReport {
            steps,
            trajectory_mse,
            trajectory_mse_ddim,
            final_mse,
            final_mse_ddim,
            psnr: p,
            psnr_ddim: p_ddim,
            updates: nt.updates,
        },
    })
}

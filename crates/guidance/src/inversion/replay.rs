//! Replay of an inverted trajectory: CFG sampling from `z_T` with the per-step optimized null
//! embeddings, with an optional capture hook per step.

use crate::capture::SiteCapture;
use crate::error::Result;
use candle_core::Tensor;
use diffusion::ddim::Ddim;
use diffusion::hooks::NoHook;
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};

/// CFG sampling from `z_T` with per-step unconditional embeddings; returns every latent after
/// each step (`[z_{N−1}, …, z_0]`). `hook_at(i)` may give a hook for step `i`; sampling stops
/// after `stop` steps.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z_t: &Tensor,
    nulls: &[Tensor],
    cond: &Tensor,
    cfg_scale: f64,
    stop: usize,
    hook_at: &mut dyn FnMut(usize) -> Option<SiteCapture>,
    captured: &mut dyn FnMut(usize, SiteCapture) -> Result<()>,
) -> Result<Vec<Tensor>> {
    let mut z = z_t.clone();
    let mut out = Vec::new();
    for (i, null) in nulls.iter().enumerate().take(stop) {
        let emb = PromptEmbeddings {
            uncond: null.clone(),
            cond: cond.clone(),
        };
        match hook_at(i) {
            Some(mut cap) => {
                z = sd.cfg_step(ddim, &z, i, &emb, cfg_scale, &mut cap)?.latents;
                captured(i, cap)?;
            }
            None => {
                z = sd
                    .cfg_step(ddim, &z, i, &emb, cfg_scale, &mut NoHook)?
                    .latents
            }
        }
        out.push(z.clone());
    }
    Ok(out)
}

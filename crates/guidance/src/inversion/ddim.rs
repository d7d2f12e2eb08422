//! DDIM inversion (SPEC §7): the reference latent carried to the noisiest step with the
//! conditional embedding only.

use crate::error::Result;
use candle_core::Tensor;
use diffusion::ddim::Ddim;
use diffusion::pipeline::StableDiffusion;

/// DDIM inversion with the conditional embedding: `[z_0, z_1, …, z_N]`, `z_N` the noisiest.
pub fn ddim_invert(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z0: &Tensor,
    cond: &Tensor,
) -> Result<Vec<Tensor>> {
    let ts = ddim.timesteps();
    let mut out = vec![z0.clone()];
    let mut z = z0.clone();
    for i in 0..ts.len() {
        let t = ts[ts.len() - 1 - i];
        let eps = sd.unet.forward(&z, t as f64, cond)?;
        z = ddim.inverse_step(&eps, t, &z)?;
        out.push(z.clone());
    }
    Ok(out)
}

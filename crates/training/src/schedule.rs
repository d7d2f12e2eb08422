//! The forward diffusion process of training: diffusers' `DDPMScheduler.add_noise` and
//! `get_velocity` over the model's own scheduler config (`scheduler/scheduler_config.json`).

use candle_core::{DType, Result, Tensor};
use diffusion::ddim::{Ddim, DdimConfig, Prediction};

/// ᾱ_t of the training schedule and what the UNet predicts.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `alphas_cumprod` as torch holds them (f32, cumulated in f32).
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
}

impl NoiseSchedule {
    /// The schedule of a scheduler config (any diffusers scheduler's `beta_*` fields; the
    /// `DDPMScheduler` the training scripts build reads the same ones).
    pub fn new(cfg: &DdimConfig) -> std::result::Result<Self, diffusion::ddim::DdimError> {
        let ddim = Ddim::new(cfg, 1)?;
        Ok(Self {
            alphas_cumprod: ddim.alphas_cumprod().iter().map(|&a| a as f32).collect(),
            prediction: ddim.prediction(),
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// Per-entry `[b, 1, 1, 1]` factors `f(ᾱ_t)` in f32, as torch computes `alphas_cumprod[t] ** 0.5`
    /// (f32 `pow`, correctly rounded like `sqrt`).
    fn factor(&self, timesteps: &[usize], like: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
        let mut shape = vec![1usize; like.rank()];
        shape[0] = timesteps.len();
        let v: Vec<f32> = timesteps
            .iter()
            .map(|&t| f(self.alphas_cumprod[t]))
            .collect();
        Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
    }

    fn check(&self, x: &Tensor, timesteps: &[usize]) -> Result<()> {
        let b = x.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        if let Some(&t) = timesteps.iter().find(|&&t| t >= self.alphas_cumprod.len()) {
            candle_core::bail!(
                "timestep {t} is outside the schedule's {} training timesteps",
                self.alphas_cumprod.len()
            );
        }
        Ok(())
    }

    /// `sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) noise` (`DDPMScheduler.add_noise`).
    ///
    /// # Shapes
    /// `x0`, `noise`: `[b, ...]`; `timesteps`: `b` values; result like `x0`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.check(x0, timesteps)?;
        let a = self.factor(timesteps, x0, f32::sqrt)?;
        let s = self.factor(timesteps, x0, |ac| (1.0 - ac).sqrt())?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// `sqrt(ᾱ_t) noise − sqrt(1 − ᾱ_t) x0` (`DDPMScheduler.get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.check(x0, timesteps)?;
        let a = self.factor(timesteps, x0, f32::sqrt)?;
        let s = self.factor(timesteps, x0, |ac| (1.0 - ac).sqrt())?;
        noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
    }

    /// The regression target of the model's prediction type: ε, or v. `sample` prediction is not
    /// trained by the scripts and is refused, as they do.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => self.velocity(x0, noise, timesteps),
            Prediction::Sample => {
                candle_core::bail!(
                    "unknown prediction type 'sample' for training (epsilon or v_prediction)"
                )
            }
        }
    }
}

/// The scripts' forward process for a micro-batch, in `dtype`: latents sampled from the VAE
/// posterior (`posterior_noise` as its randn) × `scaling_factor`, then noised at `timesteps`.
/// Returns `(latents, noise, noisy latents)`, all in `dtype` and outside any graph.
pub fn noisy_latents(
    vae: &diffusion::vae::AutoencoderKL,
    schedule: &NoiseSchedule,
    pixels: &Tensor,
    posterior_noise: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let latents = (vae
        .encode_sample(&pixels.to_dtype(dtype)?, posterior_noise)?
        .detach()
        * vae.config().scaling_factor)?;
    let noise = noise.to_dtype(dtype)?;
    let noisy = schedule.add_noise(&latents, &noise, timesteps)?;
    Ok((latents, noise, noisy))
}

/// `F.mse_loss(pred.float(), target.float(), reduction="mean")`.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let d = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    d.sqr()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn add_noise_mixes_by_the_schedule_and_velocity_is_its_rotation() {
        let s = NoiseSchedule::new(&DdimConfig::stable_diffusion()).unwrap();
        assert_eq!(s.num_train_timesteps(), 1000);
        let x0 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let n = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0]], &Device::Cpu).unwrap();
        let noisy = s
            .add_noise(&x0, &n, &[0, 999])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let ac0 = s.alphas_cumprod[0];
        let ac1 = s.alphas_cumprod[999];
        // SD's scaled-linear schedule: ᾱ_0 = 1 − 0.00085, ᾱ_999 ≈ 0.0047.
        assert!((ac0 - 0.99915).abs() < 1e-6, "{ac0}");
        assert!((ac1 - 0.004660).abs() < 1e-5, "{ac1}");
        let want = |x: f32, e: f32, ac: f32| ac.sqrt() * x + (1.0 - ac).sqrt() * e;
        assert_eq!(noisy[0][0], want(1.0, 0.5, ac0));
        assert_eq!(noisy[1][1], want(4.0, 0.0, ac1));
        let v = s
            .velocity(&x0, &n, &[0, 999])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(v[1][0], ac1.sqrt() * 2.0 - (1.0 - ac1).sqrt() * 3.0);
        assert!(s.add_noise(&x0, &n, &[0]).is_err());
        assert!(s.add_noise(&x0, &n, &[0, 1000]).is_err());
    }
}

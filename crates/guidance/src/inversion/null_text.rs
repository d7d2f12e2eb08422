//! Null-text optimization (SPEC §7; prompt-to-prompt's `null_optimization`): per sampling step a
//! fresh Adam on the unconditional embedding against the MSE between the CFG DDIM step and the
//! inverted latent.

use crate::config::{InversionConfig, NullTextPrecision};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use diffusion::ddim::Ddim;
use diffusion::hooks::NoHook;
use diffusion::pipeline::{PromptEmbeddings, StableDiffusion};

/// Result of the null-text optimization.
pub struct NullText {
    /// One optimized unconditional embedding per sampling step, `[1, 77, dim]` each.
    pub embeddings: Vec<Tensor>,
    /// Adam updates taken per step.
    pub updates: Vec<usize>,
}

/// Optimizes the unconditional embedding step by step (SPEC §7 constants in `settings`). A NaN or
/// infinite loss (a diverging optimization, non-finite inputs) is [`Error::NullTextNonFinite`].
pub fn null_text_optimize(
    sd: &StableDiffusion,
    ddim: &Ddim,
    trajectory: &[Tensor],
    cond: &Tensor,
    uncond0: &Tensor,
    settings: &InversionConfig,
) -> Result<NullText> {
    let ts = ddim.timesteps();
    let n = ts.len();
    let model_dtype = uncond0.dtype();
    // The optimized embedding, its Adam moments and the loss in f32 unless asked otherwise.
    let opt_dtype = match settings.null_text_precision {
        NullTextPrecision::F32 if model_dtype != DType::F64 => DType::F32,
        _ => model_dtype,
    };
    let mut uncond = uncond0.detach().to_dtype(opt_dtype)?;
    let mut z = trajectory[n].clone();
    let mut embeddings = Vec::with_capacity(n);
    let mut updates = Vec::with_capacity(n);
    for (i, &t) in ts.iter().enumerate() {
        let var = Var::from_tensor(&uncond)?;
        let params = ParamsAdamW {
            lr: settings.lr * (1.0 - i as f64 / 100.0),
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt = AdamW::new(vec![var.clone()], params)?;
        let target = &trajectory[n - 1 - i];
        let eps_cond = sd.unet.forward(&z, t as f64, cond)?;
        let threshold = settings.epsilon + i as f64 * settings.epsilon_slope;
        let mut k = 0;
        while k < settings.inner_steps {
            let null = var.as_tensor().to_dtype(model_dtype)?;
            let eps_uncond = sd.unet.forward(&z, t as f64, &null)?;
            let eps = (&eps_uncond + ((&eps_cond - &eps_uncond)? * settings.guidance_scale)?)?;
            let prev = ddim.step(&eps, t, &z)?.prev_sample;
            let loss = (prev.to_dtype(opt_dtype)? - target.to_dtype(opt_dtype)?)?
                .sqr()?
                .mean_all()?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::NullTextNonFinite {
                    step: i,
                    iteration: k,
                    loss: value,
                });
            }
            opt.backward_step(&loss)?;
            k += 1;
            if value < threshold {
                break;
            }
        }
        uncond = var.as_tensor().detach();
        updates.push(k);
        super::report_progress(i + 1, n);
        let emb = PromptEmbeddings {
            uncond: uncond.to_dtype(model_dtype)?,
            cond: cond.clone(),
        };
        z = sd
            .cfg_step(ddim, &z, i, &emb, settings.guidance_scale, &mut NoHook)?
            .latents;
        embeddings.push(emb.uncond);
    }
    Ok(NullText {
        embeddings,
        updates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// candle_nn's AdamW with weight_decay 0 is PyTorch's Adam (default betas and eps):
    /// three steps on f(θ) = Σ c·θ² checked against the textbook update.
    #[test]
    fn adamw_without_decay_is_adam() -> Result<()> {
        let dev = Device::Cpu;
        let c = [0.5f64, -2.0, 3.0];
        let mut theta = vec![1.0f64, 0.3, -0.7];
        let var = Var::new(theta.as_slice(), &dev)?;
        let lr = 1e-2;
        let mut opt = AdamW::new(
            vec![var.clone()],
            ParamsAdamW {
                lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let ct = Tensor::new(&c, &dev)?;
        for step in 1..=3 {
            let loss = (var.as_tensor().sqr()? * &ct)?.sum_all()?;
            opt.backward_step(&loss)?;
            for k in 0..3 {
                let g = 2.0 * c[k] * theta[k];
                m[k] = b1 * m[k] + (1.0 - b1) * g;
                v[k] = b2 * v[k] + (1.0 - b2) * g * g;
                let mh = m[k] / (1.0 - b1.powi(step));
                let vh = v[k] / (1.0 - b2.powi(step));
                theta[k] -= lr * mh / (vh.sqrt() + eps);
            }
            let got: Vec<f64> = var.as_tensor().to_vec1()?;
            for k in 0..3 {
                assert!(
                    (got[k] - theta[k]).abs() < 1e-14,
                    "step {step}: {got:?} vs {theta:?}"
                );
            }
        }
        Ok(())
    }
}

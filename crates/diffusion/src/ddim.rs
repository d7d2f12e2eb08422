//! DDIM sampling and inversion (SPEC §6, §7), a port of diffusers' `DDIMScheduler`
//! (diffusers 0.42.1, `src/diffusers/schedulers/scheduling_ddim.py`: `__init__`, `set_timesteps`,
//! `step` with eta = 0) and of prompt-to-prompt's `next_step` for DDIM inversion
//! (`null_text_w_ptp.ipynb`).
//!
//! The noise schedule is computed in `f32` exactly as diffusers does (betas, `1 - beta`, cumulative
//! product in `f32`), then kept as `f64` for the step coefficients.

use candle_core::{Result, Tensor};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum DdimError {
    #[error("scheduler config: unsupported {key} = {value} (supported: {supported})")]
    Unsupported {
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{steps} sampling steps (--steps, diffusers' num_inference_steps): must be in 1..={train} (the scheduler's num_train_timesteps)")]
    Steps { steps: usize, train: usize },
}

fn d_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_eps() -> String {
    "epsilon".into()
}
fn d_leading() -> String {
    "leading".into()
}

/// `scheduler/scheduler_config.json`, with diffusers' `DDIMScheduler` defaults for absent keys.
/// Other schedulers' configs (SD 1.5 ships a `PNDMScheduler` one) are read the way
/// `DDIMScheduler.from_config` reads them: the shared keys count, the rest is ignored.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DdimConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl DdimConfig {
    /// Stable Diffusion 1.x: 1000 steps, scaled_linear 0.00085 → 0.012, `set_alpha_to_one = false`,
    /// `steps_offset = 1`, leading spacing, epsilon prediction, no clipping (SPEC §6).
    pub fn stable_diffusion() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// The result of one DDIM step.
#[derive(Debug, Clone)]
pub struct DdimStepOutput {
    /// x_{t-1}.
    pub prev_sample: Tensor,
    /// The predicted x_0 at this step.
    pub pred_original_sample: Tensor,
}

/// A DDIM schedule set to a number of inference steps (`DDIMScheduler` after `set_timesteps`).
#[derive(Debug, Clone)]
pub struct Ddim {
    cfg: DdimConfig,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
}

fn unsupported(key: &'static str, value: impl ToString, supported: &'static str) -> DdimError {
    DdimError::Unsupported {
        key,
        value: value.to_string(),
        supported,
    }
}

impl Ddim {
    /// The schedule of `cfg` with `num_inference_steps` steps (`DDIMScheduler(**cfg).set_timesteps(n)`).
    pub fn new(
        cfg: &DdimConfig,
        num_inference_steps: usize,
    ) -> std::result::Result<Self, DdimError> {
        let train = cfg.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > train {
            return Err(DdimError::Steps {
                steps: num_inference_steps,
                train,
            });
        }
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => {
                return Err(unsupported(
                    "prediction_type",
                    other,
                    "epsilon, v_prediction, sample",
                ))
            }
        };
        if cfg.thresholding {
            return Err(unsupported("thresholding", true, "false"));
        }
        if cfg.rescale_betas_zero_snr {
            return Err(unsupported("rescale_betas_zero_snr", true, "false"));
        }
        // Betas in f32 as torch computes them.
        let betas: Vec<f32> = if let Some(tb) = &cfg.trained_betas {
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match cfg.beta_schedule.as_str() {
                "linear" => linspace_f32(cfg.beta_start, cfg.beta_end, train),
                "scaled_linear" => linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), train)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                other => {
                    return Err(unsupported(
                        "beta_schedule",
                        other,
                        "linear, scaled_linear (or trained_betas)",
                    ))
                }
            }
        };
        let mut acc = 1f32;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let n = num_inference_steps;
        let timesteps: Vec<usize> = match cfg.timestep_spacing.as_str() {
            "leading" => {
                let ratio = train / n;
                (0..n).rev().map(|i| i * ratio + cfg.steps_offset).collect()
            }
            "trailing" => {
                // np.round(np.arange(train, 0, -ratio)) - 1
                let ratio = train as f64 / n as f64;
                let len = (train as f64 / ratio).ceil() as usize;
                (0..len)
                    .map(|k| (train as f64 - k as f64 * ratio).round_ties_even() as i64 - 1)
                    .map(|t| t.max(0) as usize)
                    .collect()
            }
            "linspace" => {
                // np.linspace(0, train - 1, n).round()[::-1]
                let stop = (train - 1) as f64;
                let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
                (0..n)
                    .rev()
                    .map(|k| {
                        let v = if k + 1 == n && n > 1 {
                            stop
                        } else {
                            k as f64 * step
                        };
                        v.round_ties_even() as usize
                    })
                    .collect()
            }
            other => {
                return Err(unsupported(
                    "timestep_spacing",
                    other,
                    "leading, trailing, linspace",
                ))
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            prediction,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps,
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.cfg
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// The timesteps, from the noisiest, as `DDIMScheduler.timesteps`.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// ᾱ for every training timestep (`alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ(t), or the final ᾱ (`final_alpha_cumprod`) for t < 0.
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        if t < 0 {
            self.final_alpha_cumprod
        } else {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        }
    }

    /// `t - num_train_timesteps / num_inference_steps` (integer division, as diffusers).
    pub fn prev_timestep(&self, t: usize) -> i64 {
        t as i64 - (self.cfg.num_train_timesteps / self.num_inference_steps) as i64
    }

    /// (x̂_0, ε̂) from the model output at ᾱ = `alpha_t`.
    fn split(
        &self,
        model_output: &Tensor,
        alpha_t: f64,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (a, b) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        Ok(match self.prediction {
            Prediction::Epsilon => (((sample - (model_output * b)?)? / a)?, model_output.clone()),
            Prediction::Sample => (model_output.clone(), ((sample - (model_output * a)?)? / b)?),
            Prediction::VPrediction => (
                ((sample * a)? - (model_output * b)?)?,
                ((model_output * a)? + (sample * b)?)?,
            ),
        })
    }

    /// One deterministic DDIM step (eta = 0) from `timestep` to `prev_timestep(timestep)`.
    /// Differentiable in all tensor inputs.
    ///
    /// Matches `DDIMScheduler.step` (scheduling_ddim.py, `step`, eta = 0, no thresholding).
    ///
    /// # Shapes
    /// `model_output`, `sample`: `[b, c, h, w]`; outputs the same.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<DdimStepOutput> {
        let alpha_t = self.alpha_cumprod(timestep as i64);
        let alpha_prev = self.alpha_cumprod(self.prev_timestep(timestep));
        let (mut x0, eps) = self.split(model_output, alpha_t, sample)?;
        if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let prev = ((&x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?)?;
        Ok(DdimStepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }

    /// One DDIM inversion step towards more noise (SPEC §7, prompt-to-prompt's `next_step`): from
    /// the latent at `prev_timestep(timestep)` (ᾱ of that timestep, the final ᾱ when negative) to
    /// the latent at `timestep`, with `model_output` the UNet's ε̂ evaluated on the less noisy
    /// `sample` at the target `timestep`. Epsilon prediction only.
    ///
    /// # Shapes
    /// `model_output`, `sample`: `[b, c, h, w]`; output the same.
    pub fn inverse_step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        if self.prediction != Prediction::Epsilon {
            candle_core::bail!(
                "DDIM inversion supports prediction_type epsilon only, the scheduler has {}",
                self.cfg.prediction_type
            );
        }
        let alpha_from = self.alpha_cumprod(self.prev_timestep(timestep));
        let alpha_to = self.alpha_cumprod(timestep as i64);
        let x0 = ((sample - (model_output * (1.0 - alpha_from).sqrt())?)? / alpha_from.sqrt())?;
        (x0 * alpha_to.sqrt())? + (model_output * (1.0 - alpha_to).sqrt())?
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: torch fills the first half from `start` and the
/// second from `end` with step `(end - start) / (n - 1)`.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn five_steps_match_diffusers_test() {
        let d = Ddim::new(&DdimConfig::stable_diffusion(), 5).unwrap();
        assert_eq!(d.timesteps(), &[801, 601, 401, 201, 1]);
    }

    #[test]
    fn inverse_step_undoes_step_with_same_noise_prediction() {
        let d = Ddim::new(&DdimConfig::stable_diffusion(), 50).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 4, 3, 3), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let eps = Tensor::randn(0f32, 1., (1, 4, 3, 3), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        for &t in &[981usize, 21, 1] {
            let prev = d.step(&eps, t, &x).unwrap().prev_sample;
            let back = d.inverse_step(&eps, t, &prev).unwrap();
            let err = (back - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 1e-9, "t={t} err={err}");
        }
    }

    /// Finite differences in f64: d(Σ w ⊙ step(ε, t, x))/dx and /dε, and the same for the
    /// inverse step, against candle's autograd (the null-text optimisation differentiates through
    /// the step).
    #[test]
    fn step_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let r = |seed: u64| {
            crate::noise::seeded_normal(seed, &[1, 2, 2, 2], &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let (x0, e0, w) = (r(1), r(2), r(3));
        for pred in ["epsilon", "v_prediction"] {
            let mut c = DdimConfig::stable_diffusion();
            c.prediction_type = pred.into();
            let d = Ddim::new(&c, 50).unwrap();
            for inverse in [false, true] {
                if inverse && pred != "epsilon" {
                    continue;
                }
                let f = |x: &Tensor, e: &Tensor| -> Tensor {
                    let y = if inverse {
                        d.inverse_step(e, 501, x).unwrap()
                    } else {
                        d.step(e, 501, x).unwrap().prev_sample
                    };
                    (y * &w).unwrap().sum_all().unwrap()
                };
                let xv = candle_core::Var::from_tensor(&x0).unwrap();
                let ev = candle_core::Var::from_tensor(&e0).unwrap();
                let grads = f(xv.as_tensor(), ev.as_tensor()).backward().unwrap();
                for (which, var) in [("x", &xv), ("eps", &ev)] {
                    let g: Vec<f64> = grads
                        .get(var.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                    let h = 1e-6;
                    for i in 0..base.len() {
                        let bump = |s: f64| {
                            let mut v = base.clone();
                            v[i] += s * h;
                            Tensor::from_vec(v, (1, 2, 2, 2), &dev).unwrap()
                        };
                        let (p, m) = (bump(1.0), bump(-1.0));
                        let (fp, fm) = if which == "x" {
                            (f(&p, &e0), f(&m, &e0))
                        } else {
                            (f(&x0, &p), f(&x0, &m))
                        };
                        let fd = (fp.to_scalar::<f64>().unwrap() - fm.to_scalar::<f64>().unwrap())
                            / (2.0 * h);
                        let rel = (fd - g[i]).abs() / fd.abs().max(1e-8);
                        assert!(
                            rel < 1e-4,
                            "{pred} inverse={inverse} d/d{which}[{i}]: fd {fd} autograd {}",
                            g[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_config_values_are_named() {
        let mut c = DdimConfig::stable_diffusion();
        c.timestep_spacing = "random".into();
        let e = Ddim::new(&c, 10).unwrap_err().to_string();
        assert!(
            e.contains("timestep_spacing") && e.contains("random"),
            "{e}"
        );
        let e = Ddim::new(&DdimConfig::stable_diffusion(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("0 sampling steps (--steps"), "{e}");
    }
}

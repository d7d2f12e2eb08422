//! AdamW as `torch.optim.AdamW` (the single-tensor path torch takes for CPU tensors), with its
//! state open for checkpoints, and `torch.nn.utils.clip_grad_norm_`.
//!
//! Per parameter `p` with gradient `g`, at step `t` (from 1):
//! `p ← p·(1 − lr·wd)`; `m ← m + (1 − β1)(g − m)`; `v ← β2·v + (1 − β2)·g²`;
//! `p ← p − (lr / (1 − β1ᵗ)) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + ε)`.

use candle_core::{DType, Result, Tensor, Var};
use std::collections::HashMap;

/// `torch.optim.AdamW`'s hyper-parameters (the scripts' defaults: β = (0.9, 0.999), ε = 1e-8,
/// weight decay 1e-2).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The example scripts' `--adam_*` defaults with learning rate `lr`.
    pub fn scripts(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Named parameters (f32 master weights) and their first and second moments.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update; `grads[i]` is the gradient of `params()[i]`. A parameter without a gradient
    /// (`None`: the loss does not reach it) is left alone, as torch skips a `None` `.grad`.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bias1;
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(p.dtype())?;
            let decayed = p.as_tensor().affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            // torch's lerp with weight < 0.5: m + w (g − m).
            let m = (&self.m[i] + ((&g - &self.m[i])? * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + ((&g * (1.0 - c.beta2))? * &g)?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&m / &denom)? * step_size)?;
            p.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as `{"m.<name>", "v.<name>"}` (for a checkpoint).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores [`Self::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let get = |k: String| -> Result<Tensor> {
                let t = state
                    .get(&k)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks '{k}'")))?;
                if t.dims() != p.dims() {
                    candle_core::bail!(
                        "checkpoint '{k}' has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.dims()
                    );
                }
                t.to_dtype(p.dtype())?.to_device(p.device())
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.step = steps;
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient by
/// `min(1, max_norm / (‖g‖ + 1e-6))`, where ‖g‖ is the 2-norm over all of them; returns ‖g‖.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        // The norm of the per-tensor norms, as torch stacks them.
        let n = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        sq += (n as f64) * (n as f64);
    }
    let total = (sq.sqrt() as f32) as f64;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    for g in grads.iter_mut().flatten() {
        *g = (&*g * coef)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of AdamW on one scalar, against the closed form.
    #[test]
    fn two_steps_follow_the_torch_formula() {
        let cfg = AdamWConfig::scripts(0.1);
        let p = Var::from_tensor(&Tensor::new(&[1f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        let g1 = Tensor::new(&[0.5f64, 0.0], &Device::Cpu).unwrap();
        let g2 = Tensor::new(&[-0.25f64, 1.0], &Device::Cpu).unwrap();
        opt.step(&[Some(g1)]).unwrap();
        opt.step(&[Some(g2)]).unwrap();
        let got = p.as_tensor().to_vec1::<f64>().unwrap();
        let reference = |mut x: f64, gs: [f64; 2]| {
            let (mut m, mut v) = (0.0, 0.0);
            for (t, g) in gs.iter().enumerate() {
                let t = t as i32 + 1;
                x *= 1.0 - 0.1 * 1e-2;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let mh = m / (1.0 - 0.9f64.powi(t));
                let vh = (v / (1.0 - 0.999f64.powi(t))).sqrt();
                x -= 0.1 * mh / (vh + 1e-8);
            }
            x
        };
        assert!(
            (got[0] - reference(1.0, [0.5, -0.25])).abs() < 1e-12,
            "{got:?}"
        );
        assert!(
            (got[1] - reference(-2.0, [0.0, 1.0])).abs() < 1e-12,
            "{got:?}"
        );
        assert_eq!(opt.steps(), 2);
        assert!(opt.step(&[]).is_err());
    }

    #[test]
    fn clipping_scales_only_above_the_bound() {
        let mut g = vec![
            Some(Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap()),
            None,
            Some(Tensor::new(&[4f32], &Device::Cpu).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((a - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-6, "{a}");
        let mut small = vec![Some(Tensor::new(&[0.3f32], &Device::Cpu).unwrap())];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(
            small[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3]
        );
    }
}

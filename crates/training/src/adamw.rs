//! AdamW as `torch.optim.AdamW` (the single-tensor path torch takes for CPU tensors), with its
//! state open for checkpoints, and `torch.nn.utils.clip_grad_norm_`.
//!
//! Per parameter `p` with gradient `g`, at step `t` (from 1):
//! `p ← p·(1 − lr·wd)`; `m ← m + (1 − β1)(g − m)`; `v ← β2·v + (1 − β2)·g²`;
//! `p ← p − (lr / (1 − β1ᵗ)) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + ε)`.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, Var};
use rayon::prelude::*;
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

/// Named parameters (f32 master weights) and their first and second moments (allocated at a
/// parameter's first update, as torch does: until then they are zero).
///
/// On the CPU an f32 parameter is updated by one parallel pass over its value, gradient and
/// moments (three new buffers); elsewhere by tensor ops (a dozen parameter-sized temporaries).
/// Both compute the formula above in f32 with the coefficients rounded to f32, as torch does.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    step: usize,
}

/// The f32 values of a contiguous CPU tensor, to `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&v[start..end]))
}

/// Coefficients of one update, in f32.
#[derive(Clone, Copy)]
struct Coefficients {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// The CPU pass: `(p, m, v)` after the update, or `None` when the tensors are not contiguous
/// f32 CPU tensors.
fn host_update(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    k: Coefficients,
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let n = p.elem_count();
    with_f32(p, |p| {
        with_f32(g, |g| {
            let run = |m: Option<&[f32]>, v: Option<&[f32]>| {
                let mut np = vec![0f32; n];
                let mut nm = vec![0f32; n];
                let mut nv = vec![0f32; n];
                const CHUNK: usize = 1 << 14;
                np.par_chunks_mut(CHUNK)
                    .zip(nm.par_chunks_mut(CHUNK))
                    .zip(nv.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, ((op, om), ov))| {
                        let base = c * CHUNK;
                        for i in 0..op.len() {
                            let j = base + i;
                            let gj = g[j];
                            let mj = m.map_or(0.0, |m| m[j]);
                            let vj = v.map_or(0.0, |v| v[j]);
                            let m1 = mj + (gj - mj) * k.one_minus_beta1;
                            let v1 = vj * k.beta2 + k.one_minus_beta2 * gj * gj;
                            let denom = v1.sqrt() / k.bias2_sqrt + k.eps;
                            op[i] = p[j] * k.decay - k.step_size * (m1 / denom);
                            om[i] = m1;
                            ov[i] = v1;
                        }
                    });
                (np, nm, nv)
            };
            match (m, v) {
                (Some(m), Some(v)) => {
                    with_f32(m, |m| with_f32(v, |v| run(Some(m), Some(v)))).flatten()
                }
                _ => Some(run(None, None)),
            }
        })
        .flatten()
    })
    .flatten()
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vec![None; params.len()];
        let v = vec![None; params.len()];
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
        let k = Coefficients {
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bias2_sqrt: bias2_sqrt as f32,
            eps: c.eps as f32,
            step_size: step_size as f32,
        };
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(p.dtype())?;
            let host = if p.dtype() == DType::F32 && p.device().is_cpu() {
                let g = g.contiguous()?;
                host_update(p.as_tensor(), &g, self.m[i].as_ref(), self.v[i].as_ref(), k)
            } else {
                None
            };
            if let Some((np, nm, nv)) = host {
                let shape = p.shape().clone();
                let dev = p.device().clone();
                p.set(&Tensor::from_vec(np, shape.clone(), &dev)?)?;
                self.m[i] = Some(Tensor::from_vec(nm, shape.clone(), &dev)?);
                self.v[i] = Some(Tensor::from_vec(nv, shape, &dev)?);
                continue;
            }
            let zeros = p.as_tensor().zeros_like()?;
            let m0 = self.m[i].clone().unwrap_or_else(|| zeros.clone());
            let v0 = self.v[i].clone().unwrap_or(zeros);
            let decayed = p.as_tensor().affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            // torch's lerp with weight < 0.5: m + w (g − m).
            let m = (&m0 + ((&g - &m0)? * (1.0 - c.beta1))?)?;
            let v = ((&v0 * c.beta2)? + ((&g * (1.0 - c.beta2))? * &g)?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&m / &denom)? * step_size)?;
            p.set(&(decayed - update)?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }

    /// The moments as `{"m.<name>", "v.<name>"}` (for a checkpoint).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, p)) in self.params.iter().enumerate() {
            let zero = || p.as_tensor().zeros_like();
            out.insert(
                format!("m.{name}"),
                self.m[i].clone().map_or_else(zero, Ok)?,
            );
            out.insert(
                format!("v.{name}"),
                self.v[i].clone().map_or_else(zero, Ok)?,
            );
        }
        Ok(out)
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
            self.m[i] = Some(get(format!("m.{name}"))?);
            self.v[i] = Some(get(format!("v.{name}"))?);
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

    /// The CPU pass and the tensor-op path give the same f32 parameters and moments.
    #[test]
    fn the_cpu_pass_matches_the_tensor_ops() {
        let n = 40_000;
        let vals = |seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                        / 16777216.0)
                        - 0.5
                })
                .collect()
        };
        let run = |generic: bool| {
            let p = Var::from_tensor(&Tensor::from_vec(vals(1), (200, 200), &Device::Cpu).unwrap())
                .unwrap();
            let mut opt =
                AdamW::new(vec![("p".into(), p.clone())], AdamWConfig::scripts(1e-2)).unwrap();
            for s in 0..3u32 {
                let g = Tensor::from_vec(vals(10 + s), (200, 200), &Device::Cpu).unwrap();
                // A transposed gradient takes the non-contiguous input path of the CPU pass.
                let g = if generic {
                    g.t().unwrap().t().unwrap()
                } else {
                    g.t().unwrap().contiguous().unwrap().t().unwrap()
                };
                if generic {
                    // Force the tensor-op path: a parameter the CPU pass does not take (f64).
                    let p64 =
                        Var::from_tensor(&p.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
                    let mut o64 =
                        AdamW::new(vec![("p".into(), p64.clone())], AdamWConfig::scripts(1e-2))
                            .unwrap();
                    o64.m = opt
                        .m
                        .iter()
                        .map(|m| m.as_ref().map(|m| m.to_dtype(DType::F64).unwrap()))
                        .collect();
                    o64.v = opt
                        .v
                        .iter()
                        .map(|v| v.as_ref().map(|v| v.to_dtype(DType::F64).unwrap()))
                        .collect();
                    o64.step = opt.step;
                    o64.step(&[Some(g.to_dtype(DType::F64).unwrap())]).unwrap();
                    p.set(&p64.as_tensor().to_dtype(DType::F32).unwrap())
                        .unwrap();
                    opt.m = o64
                        .m
                        .iter()
                        .map(|m| m.as_ref().map(|m| m.to_dtype(DType::F32).unwrap()))
                        .collect();
                    opt.v = o64
                        .v
                        .iter()
                        .map(|v| v.as_ref().map(|v| v.to_dtype(DType::F32).unwrap()))
                        .collect();
                    opt.step = o64.step;
                } else {
                    opt.step(&[Some(g)]).unwrap();
                }
            }
            p.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(false), run(true));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // f32 pass against f64 ops rounded to f32: a few f32 ulps of values of about 0.5.
        assert!(worst < 1e-6, "{worst}");
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

//! In-place epilogues of a linear layer on the CPU (issue 13): the bias and the activation in one
//! parallel pass over the GEMM's fresh output, or the bias and the residual stream. Each saves a
//! full-size allocation and one or two passes over memory against separate candle ops.
//!
//! Only for f32 CPU tensors that no graph tracks (the metrics' encoders): the callers keep
//! candle's ops as the device-generic path.

use crate::{vmath, Activation};
use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task (rounded to whole rows).
const CHUNK: usize = 1 << 14;

fn values_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("{op}: f32 only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: the output must be contiguous");
    };
    Ok(&mut values[start..end])
}

fn check_bias(op: &str, cols: usize, bias: Option<&[f32]>) -> Result<()> {
    if let Some(b) = bias {
        if b.len() != cols {
            bail!("{op}: bias of {} for rows of {cols}", b.len());
        }
    }
    Ok(())
}

/// `f(y + b)` of an activation, f32, as this crate computes it on the CPU.
fn activation_fn(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Gelu => vmath::gelu_erf,
        Activation::QuickGelu => vmath::quick_gelu,
        Activation::GeluTanh => |v| {
            let c: f32 = 0.797_884_6;
            0.5 * v * (1.0 + f32::tanh(c * v * (1.0 + 0.044715 * v * v)))
        },
        Activation::Silu => |v| v / (1.0 + vmath::exp(-v)),
        Activation::Relu => |v| v.max(0.0),
    }
}

struct BiasAct<'a> {
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
}

impl InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "bias-activation"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let cols = *layout.dims().last().unwrap_or(&1);
        check_bias(self.name(), cols, self.bias)?;
        let values = values_mut(storage, layout, self.name())?;
        let chunk = cols.max(1) * (1 + CHUNK / cols.max(1));
        values.par_chunks_mut(chunk).for_each(|part| {
            if let Some(b) = self.bias {
                for row in part.chunks_mut(cols) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += *b;
                    }
                }
            }
            match self.act {
                // Monomorphized per activation so that each loop vectorizes.
                Some(Activation::Gelu) => vmath::map_in_place(part, vmath::gelu_erf),
                Some(Activation::QuickGelu) => vmath::map_in_place(part, vmath::quick_gelu),
                Some(a) => {
                    let f = activation_fn(a);
                    part.iter_mut().for_each(|v| *v = f(*v));
                }
                None => {}
            }
        });
        Ok(())
    }
}

/// `y ← act(y + bias)` in place, in parallel; `y` is `[.., cols]`, `bias` has `cols` values.
/// GELU and quick-GELU use [`vmath`] (PyTorch's CPU formula for `erf`).
pub fn bias_act_in_place(y: &Tensor, bias: Option<&[f32]>, act: Option<Activation>) -> Result<()> {
    y.inplace_op1(&BiasAct { bias, act })
}

struct BiasResidual<'a> {
    bias: Option<&'a [f32]>,
}

impl InplaceOp2 for BiasResidual<'_> {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let cols = *dst_l.dims().last().unwrap_or(&1);
        check_bias(self.name(), cols, self.bias)?;
        if src_l.dims() != dst_l.dims() {
            bail!(
                "bias-residual: residual {:?} for output {:?}",
                src_l.dims(),
                dst_l.dims()
            );
        }
        let CpuStorage::F32(src) = src else {
            bail!("bias-residual: f32 only");
        };
        let Some((a, z)) = src_l.contiguous_offsets() else {
            bail!("bias-residual: the residual must be contiguous");
        };
        let src = &src[a..z];
        let values = values_mut(dst, dst_l, self.name())?;
        let chunk = cols.max(1) * (1 + CHUNK / cols.max(1));
        values
            .par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(part, res)| match self.bias {
                Some(b) => {
                    for (row, res) in part.chunks_mut(cols).zip(res.chunks(cols)) {
                        for ((v, b), r) in row.iter_mut().zip(b).zip(res) {
                            *v = *r + (*v + *b);
                        }
                    }
                }
                None => {
                    for (v, r) in part.iter_mut().zip(res) {
                        *v += *r;
                    }
                }
            });
        Ok(())
    }
}

/// `y ← residual + (y + bias)` in place, in parallel (the order of PyTorch's `residual + linear(x)`).
pub fn bias_residual_in_place(y: &Tensor, bias: Option<&[f32]>, residual: &Tensor) -> Result<()> {
    let residual = residual.contiguous()?;
    y.inplace_op2(&residual, &BiasResidual { bias })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Module};

    #[test]
    fn bias_and_activation_in_place_match_candle_ops() {
        let dev = Device::Cpu;
        let (rows, cols) = (300, 70);
        let x = Tensor::randn(0f32, 2.0, (rows, cols), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, cols, &dev).unwrap();
        let bias = b.to_vec1::<f32>().unwrap();
        for act in [
            Activation::Gelu,
            Activation::QuickGelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            let want = candle_core::Tensor::broadcast_add(&x, &b).unwrap();
            let want = {
                let _g = crate::kernels::force_generic();
                act.forward(&want).unwrap()
            };
            let y = x.copy().unwrap();
            bias_act_in_place(&y, Some(&bias), Some(act)).unwrap();
            let d = max_abs_diff(&y, &want);
            // vmath's erf is A&S (1.5e-7 absolute) where candle's is libm's.
            assert!(d < 2e-6, "{act:?}: max |diff| {d}");
        }
        let y = x.copy().unwrap();
        bias_act_in_place(&y, Some(&bias), None).unwrap();
        assert_eq!(max_abs_diff(&y, &x.broadcast_add(&b).unwrap()), 0.0);
    }

    #[test]
    fn bias_and_residual_in_place_equal_the_two_adds() {
        let dev = Device::Cpu;
        let y0 = Tensor::randn(0f32, 1.0, (5, 33, 40), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (5, 33, 40), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        let want = (&r + y0.broadcast_add(&b).unwrap()).unwrap();
        let y = y0.copy().unwrap();
        bias_residual_in_place(&y, Some(&b.to_vec1::<f32>().unwrap()), &r).unwrap();
        assert_eq!(max_abs_diff(&y, &want), 0.0);
        let y = y0.copy().unwrap();
        bias_residual_in_place(&y, None, &r).unwrap();
        assert_eq!(max_abs_diff(&y, &(&y0 + &r).unwrap()), 0.0);
        let err = bias_residual_in_place(&y, Some(&[1.0; 3]), &r)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias of 3"), "{err}");
    }
}

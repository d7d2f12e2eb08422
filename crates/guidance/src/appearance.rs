//! Appearance picking (SPEC §7): UREMD and exact EMD between the masked reference and
//! generated transformer-block features, and ℓ_app averaged over the selected layers.

use crate::config::Distance;
use crate::error::{Error, Result};
use crate::ot;
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// Cosine distances `1 − cos(V_ref_i, V_gen_j)`.
///
/// # Shapes
/// - `v_ref`: `[n, c]`, `v_gen`: `[m, c]` → `[n, m]`
pub fn cosine_distances(v_ref: &Tensor, v_gen: &Tensor) -> Result<Tensor> {
    let (n, c) = v_ref.dims2()?;
    let (m, c2) = v_gen.dims2()?;
    if c != c2 || n == 0 || m == 0 {
        return Err(Error::FeatureSets {
            reference: [n, c],
            generated: [m, c2],
        });
    }
    let unit = |v: &Tensor| -> Result<Tensor> {
        let norm = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        Ok(v.broadcast_div(&norm)?)
    };
    let sim = unit(v_ref)?.matmul(&unit(v_gen)?.t()?)?;
    Ok(sim.affine(-1.0, 1.0)?)
}

/// UREMD(V_ref, V_gen): the mean over generated vectors of the nearest reference vector's cosine
/// distance; the gradient flows through the selected minimum.
///
/// # Shapes
/// - `v_ref`: `[n, c]`, `v_gen`: `[m, c]` → scalar
pub fn uremd(v_ref: &Tensor, v_gen: &Tensor) -> Result<Tensor> {
    Ok(cosine_distances(v_ref, v_gen)?.min(0)?.mean_all()?)
}

/// Exact EMD with uniform marginals: `Σ P*_ij C_ij` with the optimal plan `P*` held fixed, so
/// the gradient flows through the cost matrix only. Non-finite features (a diverged latent) have no
/// plan: the loss is then NaN, like [`uremd`]'s, so the guided sampler reports the update as
/// non-finite and skips it (or aborts, as configured) instead of stopping here.
///
/// # Shapes
/// - `v_ref`: `[n, c]`, `v_gen`: `[m, c]` → scalar
pub fn emd(v_ref: &Tensor, v_gen: &Tensor) -> Result<Tensor> {
    let cost = cosine_distances(v_ref, v_gen)?;
    let (n, m) = cost.dims2()?;
    let values: Vec<f64> = crate::readback::to_host(&cost.detach().to_dtype(DType::F64)?)?;
    let dense = match ot::transport_uniform(&values, n, m) {
        Ok(plan) => {
            let mut dense = vec![0.0f64; n * m];
            for &(i, j, w) in &plan.entries {
                dense[i * m + j] = w;
            }
            dense
        }
        Err(ot::TransportError::NonFinite { .. }) => vec![f64::NAN; n * m],
        Err(e) => return Err(e.into()),
    };
    let p = Tensor::from_vec(dense, (n, m), cost.device())?.to_dtype(cost.dtype())?;
    Ok((cost * p)?.sum_all()?)
}

/// The distance of [`Distance`] between two feature sets.
pub fn distance(kind: Distance, v_ref: &Tensor, v_gen: &Tensor) -> Result<Tensor> {
    match kind {
        Distance::Uremd => uremd(v_ref, v_gen),
        Distance::Emd => emd(v_ref, v_gen),
    }
}

/// Rows of `features` at `indices` (a mask).
///
/// # Shapes
/// - `features`: `[hw, c]` → `[indices.len(), c]`
pub fn masked_features(features: &Tensor, indices: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(indices, features.device())?;
    Ok(features.index_select(&idx, 0)?)
}

/// One appearance layer's inputs.
pub struct AppearanceLayer<'a> {
    /// Transformer-block site, e.g. `up_blocks.2.attentions.0.transformer_blocks.0`.
    pub site: &'a str,
    /// Reference features `[hw, c]` (constants).
    pub reference: &'a Tensor,
    pub reference_mask: &'a [u32],
    /// Generated features `[hw, c]`, in the graph of the latent.
    pub generated: &'a Tensor,
    pub generated_mask: &'a [u32],
}

/// Mask sizes of one layer, as the trace reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskSize {
    pub layer: String,
    pub generated: usize,
    pub reference: usize,
    /// True when either mask is empty and the layer did not count.
    pub skipped: bool,
}

/// ℓ_app with the per-layer bookkeeping.
pub struct AppearanceLoss {
    /// Scalar; 0 (outside any graph) when every layer was skipped.
    pub loss: Tensor,
    pub masks: Vec<MaskSize>,
    pub skipped: usize,
}

/// `t` in f32 when it is f16 or bf16, else unchanged: the losses are computed in at least f32.
pub fn loss_precision(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// ℓ_app = mean over layers of the distance between masked features, skipping layers whose
/// generated or reference mask is empty (0 when none remain).
pub fn appearance_loss(layers: &[AppearanceLayer<'_>], kind: Distance) -> Result<AppearanceLoss> {
    let mut terms = Vec::new();
    let mut masks = Vec::with_capacity(layers.len());
    let (mut dtype, mut device) = (DType::F32, candle_core::Device::Cpu);
    for l in layers {
        dtype = loss_precision(l.generated)?.dtype();
        device = l.generated.device().clone();
        let skipped = l.generated_mask.is_empty() || l.reference_mask.is_empty();
        masks.push(MaskSize {
            layer: l.site.to_string(),
            generated: l.generated_mask.len(),
            reference: l.reference_mask.len(),
            skipped,
        });
        if skipped {
            continue;
        }
        // Half-precision features (an f16/bf16 model) enter the loss in f32; the cast passes the
        // gradient back in the model's dtype.
        let v_ref = masked_features(&loss_precision(&l.reference.detach())?, l.reference_mask)?;
        let v_gen = masked_features(&loss_precision(l.generated)?, l.generated_mask)?;
        terms.push(distance(kind, &v_ref, &v_gen)?);
    }
    let skipped = layers.len() - terms.len();
    let loss = if terms.is_empty() {
        Tensor::zeros((), dtype, &device)?
    } else {
        let k = terms.len() as f64;
        (Tensor::stack(&terms, 0)?.sum_all()? / k)?
    };
    Ok(AppearanceLoss {
        loss,
        masks,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_gradient;
    use candle_core::Device;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f64> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn cos_dist(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        1.0 - dot / (na * nb)
    }

    /// NaN features give a NaN loss and gradient under either distance (the guided sampler then
    /// reports and skips the update); the exact EMD does not panic on them.
    #[test]
    fn nan_features_give_a_nan_loss_not_a_panic() -> Result<()> {
        let dev = Device::Cpu;
        let reference = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev)?;
        let generated = candle_core::Var::new(&[[0.5f64, f64::NAN], [1.0, 2.0]], &dev)?;
        for kind in [Distance::Uremd, Distance::Emd] {
            let layers = [AppearanceLayer {
                site: "l0",
                reference: &reference,
                reference_mask: &[0, 1, 2],
                generated: generated.as_tensor(),
                generated_mask: &[0, 1],
            }];
            let loss = appearance_loss(&layers, kind)?.loss;
            assert!(loss.to_scalar::<f64>()?.is_nan(), "{kind:?}");
            let grads = loss.backward()?;
            let g: Vec<Vec<f64>> = grads.get(generated.as_tensor()).unwrap().to_vec2()?;
            assert!(g.iter().flatten().any(|v| v.is_nan()), "{kind:?}: {g:?}");
        }
        Ok(())
    }

    #[test]
    fn uremd_matches_brute_force() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(7);
        for (n, m, c) in [(1, 1, 3), (3, 5, 4), (6, 2, 8)] {
            let r = rand_vec(&mut rng, n * c);
            let g = rand_vec(&mut rng, m * c);
            let want = (0..m)
                .map(|j| {
                    (0..n)
                        .map(|i| cos_dist(&r[i * c..(i + 1) * c], &g[j * c..(j + 1) * c]))
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
                / m as f64;
            let rt = Tensor::from_vec(r, (n, c), &dev)?;
            let gt = Tensor::from_vec(g, (m, c), &dev)?;
            let got = uremd(&rt, &gt)?.to_scalar::<f64>()?;
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
            // Identical sets are at distance 0; UREMD is unidirectional.
            assert!(uremd(&gt, &gt)?.to_scalar::<f64>()?.abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn emd_matches_permutation_brute_force() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(8);
        let (n, c) = (5, 3);
        let r = rand_vec(&mut rng, n * c);
        let g = rand_vec(&mut rng, n * c);
        let mut best = f64::INFINITY;
        let mut perm: Vec<usize> = (0..n).collect();
        // Heap's algorithm over all 120 permutations.
        fn heap(k: usize, p: &mut Vec<usize>, f: &mut dyn FnMut(&[usize])) {
            if k == 1 {
                f(p);
                return;
            }
            for i in 0..k {
                heap(k - 1, p, f);
                let s = if k % 2 == 0 { i } else { 0 };
                p.swap(s, k - 1);
            }
        }
        heap(n, &mut perm, &mut |p| {
            let cost: f64 = (0..n)
                .map(|i| cos_dist(&r[i * c..(i + 1) * c], &g[p[i] * c..(p[i] + 1) * c]))
                .sum();
            best = best.min(cost / n as f64);
        });
        let rt = Tensor::from_vec(r.clone(), (n, c), &dev)?;
        let gt = Tensor::from_vec(g.clone(), (n, c), &dev)?;
        let got = emd(&rt, &gt)?.to_scalar::<f64>()?;
        assert!((got - best).abs() < 1e-12, "{got} vs {best}");
        // EMD is at least UREMD's lower bound (each generated vector pays at least its nearest).
        assert!(got >= uremd(&rt, &gt)?.to_scalar::<f64>()? - 1e-12);
        Ok(())
    }

    #[test]
    fn empty_sets_are_errors_and_skipped_layers() -> Result<()> {
        let dev = Device::Cpu;
        let f = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev)?;
        let empty = Tensor::zeros((0, 2), DType::F64, &dev)?;
        assert!(uremd(&f, &empty).is_err());
        assert!(emd(&empty, &f).is_err());
        let layer = |site, rm: &'static [u32], gm: &'static [u32]| AppearanceLayer {
            site,
            reference: &f,
            reference_mask: rm,
            generated: &f,
            generated_mask: gm,
        };
        // Every layer empty: ℓ_app = 0 and all skipped.
        let out = appearance_loss(
            &[layer("a", &[], &[0]), layer("b", &[1], &[])],
            Distance::Uremd,
        )?;
        assert_eq!(out.loss.to_scalar::<f64>()?, 0.0);
        assert_eq!(out.skipped, 2);
        assert!(out.masks.iter().all(|m| m.skipped));
        assert_eq!((out.masks[1].reference, out.masks[1].generated), (1, 0));
        // One layer kept: the mean is over the remaining layer only.
        let out = appearance_loss(
            &[layer("a", &[], &[0]), layer("b", &[0], &[1])],
            Distance::Emd,
        )?;
        assert_eq!(out.skipped, 1);
        assert!((out.loss.to_scalar::<f64>()? - 1.0).abs() < 1e-12); // orthogonal vectors
        let out = appearance_loss(
            &[layer("a", &[0, 1], &[2]), layer("b", &[0], &[1])],
            Distance::Uremd,
        )?;
        let want = (cos_dist(&[1.0, 0.0], &[1.0, 1.0]) + 1.0) / 2.0;
        assert!((out.loss.to_scalar::<f64>()? - want).abs() < 1e-12);
        assert_eq!(out.skipped, 0);
        Ok(())
    }

    fn gradient_check(kind: Distance, n: usize, m: usize) -> Result<()> {
        let dev = Device::Cpu;
        let c = 4;
        let mut rng = StdRng::seed_from_u64(9 + n as u64 * 31 + m as u64);
        let reference = Tensor::from_vec(rand_vec(&mut rng, 6 * c), (6, c), &dev)?;
        let x0 = rand_vec(&mut rng, 5 * c);
        let rm: Vec<u32> = (0..n as u32).collect();
        let gm: Vec<u32> = (5 - m as u32..5).collect();
        check_gradient(
            &x0,
            |x| {
                let generated = x.reshape((5, c))?;
                let layers = [
                    AppearanceLayer {
                        site: "l0",
                        reference: &reference,
                        reference_mask: &rm,
                        generated: &generated,
                        generated_mask: &gm,
                    },
                    AppearanceLayer {
                        site: "l1",
                        reference: &reference,
                        reference_mask: &[1, 4],
                        generated: &generated,
                        generated_mask: &[0, 2],
                    },
                ];
                Ok(appearance_loss(&layers, kind)?.loss)
            },
            1e-4,
        )
    }

    #[test]
    fn uremd_gradient_matches_finite_differences() -> Result<()> {
        gradient_check(Distance::Uremd, 6, 3)?;
        gradient_check(Distance::Uremd, 2, 5)
    }

    #[test]
    fn emd_gradient_matches_finite_differences() -> Result<()> {
        gradient_check(Distance::Emd, 3, 3)?;
        gradient_check(Distance::Emd, 4, 2)?;
        gradient_check(Distance::Emd, 2, 5)
    }

    #[test]
    fn emd_gradient_equals_fixed_plan_gradient() -> Result<()> {
        // d/dV of Σ P* C with P* fixed: compare candle's gradient with the hand-written one.
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(10);
        let (n, m, c) = (3, 4, 3);
        let r = rand_vec(&mut rng, n * c);
        let g = rand_vec(&mut rng, m * c);
        let rt = Tensor::from_vec(r.clone(), (n, c), &dev)?;
        let gv = candle_core::Var::from_vec(g.clone(), (m, c), &dev)?;
        let grads = emd(&rt, gv.as_tensor())?.backward()?;
        let got: Vec<Vec<f64>> = grads.get(gv.as_tensor()).unwrap().to_vec2()?;
        let cost: Vec<f64> = (0..n * m)
            .map(|k| {
                cos_dist(
                    &r[(k / m) * c..(k / m + 1) * c],
                    &g[(k % m) * c..(k % m + 1) * c],
                )
            })
            .collect();
        let plan = ot::transport_uniform(&cost, n, m)?;
        let mut want = vec![vec![0.0; c]; m];
        for &(i, j, w) in &plan.entries {
            let a = &r[i * c..(i + 1) * c];
            let b = &g[j * c..(j + 1) * c];
            let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
            let cos = 1.0 - cos_dist(a, b);
            for k in 0..c {
                // d(1 − cos)/db_k = −(a_k/(|a||b|) − cos · b_k/|b|²)
                want[j][k] -= w * (a[k] / (na * nb) - cos * b[k] / (nb * nb));
            }
        }
        for j in 0..m {
            for k in 0..c {
                assert!((got[j][k] - want[j][k]).abs() < 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn works_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let r = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev)?;
        let g = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0]], &dev)?;
        let u = uremd(&r, &g)?.to_scalar::<f32>()?;
        assert!((u - (1.0 - 0.5f32.sqrt()) / 2.0).abs() < 1e-6);
        let e = emd(&r, &g)?.to_scalar::<f32>()?;
        assert!((e - (1.0 - 0.5f32.sqrt()) / 2.0).abs() < 1e-6);
        Ok(())
    }
}

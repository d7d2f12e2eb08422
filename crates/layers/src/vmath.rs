//! Branch-free f32 `exp` and `erf`, and the exact-GELU, quick-GELU and softmax passes built on
//! them, written so that LLVM vectorizes the loops over slices (issue 13: libm's scalar `erff`
//! and `expf` made GELU and softmax a fifth of the metrics' ViT time).
//!
//! - [`exp`]: Cephes' `expf` scheme: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-5 polynomial
//!   for `eʳ`, and `2ⁿ` put in the exponent bits. Relative error below 2.5e-7 (tested against f64).
//! - [`erf`]: Abramowitz & Stegun 7.1.26, `1 − t·P(t)·e^(−x²)` with `t = 1/(1 + 0.3275911|x|)`,
//!   absolute error below 1.5e-7. It is the formula of PyTorch's vectorized CPU `erf`
//!   (`aten/src/ATen/cpu/vec/vec256/vec256_float.h`), which `torch.nn.functional.gelu` runs on
//!   the CPU, so the metrics' GELU follows the reference computation more closely than libm does.
//!
//! On x86-64 the loops are compiled a second time with AVX2 enabled and chosen at run time. No
//! fused multiply-add is written or introduced (Rust does not contract `a * b + c`), so both
//! compilations give the same bits.

/// Below this, `eˣ` is 0 in the result (f32's smallest normal is `e^−87.34`).
const EXP_LO: f32 = -87.336_55;
/// Above this, `eˣ` would overflow the `2ⁿ` exponent trick; inputs are clamped to it.
const EXP_HI: f32 = 88.376_26;

/// `eˣ` in f32 (relative error < 2.5e-7; 0 below −87.34; clamped at `e^88.38`). Not for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·C1 is exact for |n| < 2⁹.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(EXP_LO, EXP_HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * scale
    }
}

/// `erf(x)` in f32 by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), as PyTorch's
/// vectorized CPU kernels compute it.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r = 1.061_405_4 * t - 1.453_152;
    let r = r * t + 1.421_413_8;
    let r = r * t - 0.284_496_74;
    let r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp(-(a * a));
    y.copysign(x)
}

/// Exact GELU `x·Φ(x) = x/2·(1 + erf(x/√2))`, as `torch.nn.functional.gelu` on the CPU.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x·σ(1.702 x)` (OpenAI CLIP's `quick_gelu`).
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// `v ← f(v)` for every value, vectorized where the CPU allows.
#[inline(always)]
pub fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { map_in_place_avx2(values, f) };
        return;
    }
    for v in values.iter_mut() {
        *v = f(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn map_in_place_avx2(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    for v in values.iter_mut() {
        *v = f(*v);
    }
}

/// Softmax of one row in place, `row ← softmax(row · scale + mask)` (`mask` additive, as long as
/// the row, or none), as `torch.softmax` over the last dimension: max subtracted, exponentials
/// summed in f32, then divided by the sum.
pub fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { softmax_row_avx2(row, scale, mask) };
        return;
    }
    softmax_row_portable(row, scale, mask)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_row_avx2(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    softmax_row_portable(row, scale, mask)
}

#[inline(always)]
fn softmax_row_portable(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    match mask {
        Some(m) => {
            for (v, &m) in row.iter_mut().zip(m) {
                *v = *v * scale + m;
            }
        }
        None => {
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
    let max = lanes_fold(row, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every position masked: torch gives NaN (0/0); keep that.
        row.fill(f32::NAN);
        return;
    }
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let sum = lanes_fold(row, 0.0, |a, b| a + b);
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// A reduction over 8 interleaved lanes (so that it vectorizes without reassociating a single
/// chain), then across the lanes.
#[inline(always)]
fn lanes_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = init;
    for a in acc {
        r = f(r, a);
    }
    for &v in tail {
        r = f(r, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th f32 in `[lo, hi]`, plus the ends.
    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    #[test]
    fn exp_is_within_2_5e_7_relative_of_f64_over_the_normal_range() {
        let xs = grid(-87.3, 88.3, 400_000);
        let mut worst = 0f64;
        for &x in &xs {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(100.0).is_finite());
    }

    /// A&S's 1.5e-7, plus f32 rounding of `1 − t·P(t)·e^(−x²)` (measured: 5.06e-7 near |x| = 0.5).
    const ERF_BOUND: f64 = 6e-7;

    #[test]
    fn erf_and_gelu_are_within_the_bounds_of_abramowitz_stegun() {
        let mut worst_erf = 0f64;
        let mut worst_gelu = 0f64;
        for &x in &grid(-10.0, 10.0, 200_000) {
            let x64 = x as f64;
            let want = candle_core::cpu::erf::erf_f64(x64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
            let want_gelu = x64 * 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x64 / 2f64.sqrt()));
            // erf's absolute error, scaled by x/2, plus f32 rounding of the product.
            let bound =
                ERF_BOUND * 0.5 * x64.abs() + 2.0 * f32::EPSILON as f64 * want_gelu.abs() + 1e-12;
            let err = (gelu_erf(x) as f64 - want_gelu).abs();
            worst_gelu = worst_gelu.max(err / bound);
        }
        assert!(worst_erf < ERF_BOUND, "worst erf error {worst_erf:e}");
        assert!(worst_gelu <= 1.0, "gelu exceeds its bound by {worst_gelu}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-20.0), -1.0);
        assert_eq!(gelu_erf(0.0), 0.0);
    }

    #[test]
    fn quick_gelu_matches_f64() {
        for &x in &grid(-60.0, 60.0, 100_000) {
            let x64 = x as f64;
            // The exponent as f32 rounds it (so does PyTorch's); from there on, f64.
            let arg = (-1.702 * x) as f64;
            let want = x64 / (1.0 + arg.exp());
            let got = quick_gelu(x) as f64;
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30,
                "quick_gelu({x}) = {got} against {want}"
            );
        }
    }

    #[test]
    fn the_vectorized_and_portable_loops_give_the_same_bits() {
        let xs = grid(-12.0, 12.0, 10_007);
        let mut a = xs.clone();
        map_in_place(&mut a, gelu_erf);
        let b: Vec<f32> = xs.iter().map(|&x| gelu_erf(x)).collect();
        assert_eq!(a, b);
        let mut r1 = xs.clone();
        softmax_row(&mut r1, 0.3, None);
        let mut r2 = xs.clone();
        softmax_row_portable(&mut r2, 0.3, None);
        assert_eq!(r1, r2);
    }

    #[test]
    fn softmax_rows_match_f64_with_scale_and_mask() {
        let n = 77;
        let row: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.9)
            .collect();
        let mask: Vec<f32> = (0..n)
            .map(|i| if i > 50 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        for (scale, m) in [(0.125f32, None), (1.0, Some(&mask[..]))] {
            let mut got = row.clone();
            softmax_row(&mut got, scale, m);
            let z: Vec<f64> = row
                .iter()
                .enumerate()
                // The logits as the kernel forms them in f32; from there on, f64.
                .map(|(i, &v)| (v * scale + m.map_or(0.0, |m| m[i])) as f64)
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            for (g, v) in got.iter().zip(&z) {
                let want = (v - max).exp() / sum;
                // f32 rounding of `z − max` (as PyTorch's kernel has it), then a few ulp.
                let eps = f32::EPSILON as f64;
                if want == 0.0 {
                    assert_eq!(*g, 0.0, "a masked position");
                    continue;
                }
                let bound = (4.0 + (v - max).abs()) * eps * want;
                assert!((*g as f64 - want).abs() <= bound, "{g} against {want}");
            }
        }
        let mut all_masked = vec![f32::NEG_INFINITY; 5];
        softmax_row(&mut all_masked, 1.0, None);
        assert!(all_masked.iter().all(|v| v.is_nan()));
    }
}

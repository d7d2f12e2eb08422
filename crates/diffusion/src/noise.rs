//! Seeded initial noise (SPEC §6 "Noise").
//!
//! Our own documented generator, not torch's: `rand::rngs::StdRng::seed_from_u64(seed)` (ChaCha12
//! in rand 0.9, pinned by the lockfile) drawing `rand_distr::StandardNormal` f32 values, filled in
//! row-major order of `[1, 4, h, w]`. The same seed gives the same latents on every machine; it
//! does not give the latents `torch.randn` gives for that seed. To reproduce an image of another
//! implementation exactly, pass its initial latents (`--init-latents`) instead.

use candle_core::{Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Standard normal noise of `shape` from `seed`.
pub fn seeded_normal(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::from_vec(data, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let a = seeded_normal(3, &[1, 4, 8, 8], &Device::Cpu).unwrap();
        let b = seeded_normal(3, &[1, 4, 8, 8], &Device::Cpu).unwrap();
        let c = seeded_normal(4, &[1, 4, 8, 8], &Device::Cpu).unwrap();
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(d(&a, &b), 0.0);
        assert!(d(&a, &c) > 1.0);
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.3 && (var - 1.0).abs() < 0.3,
            "mean {mean} var {var}"
        );
    }
}

//! The trainers' randomness, drawn from `(seed, stream, index)` alone: the data order of an epoch,
//! the template, flip and crop of a sample, and the noise, posterior noise and timesteps of a
//! micro-step. Nothing carries state from one step to the next, so a run resumed from a
//! checkpoint draws exactly what the uninterrupted run drew. These are our own documented
//! generators (rand's `StdRng`, ChaCha12), not torch's: the same seed does not reproduce a
//! diffusers run's draws; the parity tests feed both sides the same inputs instead.

use candle_core::{Device, Result, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use rand_distr::StandardNormal;

/// What a draw is for; each stream is independent of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The permutation of the dataset in an epoch (index: the epoch).
    Order = 1,
    /// Per-sample augmentations: template, flip, crop (index: the sample position).
    Augment = 2,
    /// The noise added to the latents (index: the micro-step).
    Noise = 3,
    /// The VAE posterior's noise (index: the micro-step).
    Posterior = 4,
    /// The timesteps (index: the micro-step).
    Timestep = 5,
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The generator of one `(seed, stream, index)`.
pub fn rng(seed: u64, stream: Stream, index: u64) -> StdRng {
    let s = mix(mix(seed ^ 0x9e3779b97f4a7c15).wrapping_add(stream as u64) ^ mix(index));
    StdRng::seed_from_u64(s)
}

/// A permutation of `0..n` (the `shuffle=True` DataLoader's epoch order).
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng(seed, Stream::Order, epoch));
    v
}

/// Standard normal f32 noise of `shape` (`torch.randn_like`).
pub fn normal(
    seed: u64,
    stream: Stream,
    index: u64,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let mut r = rng(seed, stream, index);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(data, shape, device)
}

/// `b` timesteps uniform in `0..num_train_timesteps` (`torch.randint`).
pub fn timesteps(seed: u64, index: u64, b: usize, num_train_timesteps: usize) -> Vec<usize> {
    let mut r = rng(seed, Stream::Timestep, index);
    (0..b)
        .map(|_| r.random_range(0..num_train_timesteps))
        .collect()
}

//! DreamBench scores from embeddings (SPEC §5): cosine similarities, the DINO/CLIP-I pairing (a
//! generated image against every real image of its subject), CLIP-T, aggregates (mean, per-subject
//! mean, standard deviation, 95% bootstrap confidence interval) and the real-image oracle.
//! All arithmetic is in f64.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Plain cosine similarity (no ×2.5, no clipping); 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Mean cosine similarity of one embedding to each of a set (the DINO / CLIP-I score of one image).
pub fn mean_cosine(x: &[f32], set: &[Vec<f32>]) -> f64 {
    if set.is_empty() {
        return f64::NAN;
    }
    set.iter().map(|r| cosine(x, r)).sum::<f64>() / set.len() as f64
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (n − 1 in the denominator); 0 for a single value.
pub fn std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

/// How the bootstrap confidence interval is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self {
            resamples: 1000,
            seed: 0,
        }
    }
}

/// Mean, spread and a 95% percentile-bootstrap interval of the mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
    pub ci95: [f64; 2],
    pub n: usize,
}

/// Summarizes per-image scores; the interval resamples the scores with replacement
/// `boot.resamples` times from a generator seeded with `boot.seed`, and takes the 2.5th and
/// 97.5th percentiles (linear interpolation, as `numpy.percentile`) of the resampled means.
pub fn summarize(xs: &[f64], boot: &Bootstrap) -> Summary {
    let n = xs.len();
    let m = mean(xs);
    let ci95 = if n == 0 || boot.resamples == 0 {
        [f64::NAN, f64::NAN]
    } else {
        let mut rng = StdRng::seed_from_u64(boot.seed);
        let mut means: Vec<f64> = (0..boot.resamples)
            .map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
            .collect();
        means.sort_by(|a, b| a.total_cmp(b));
        [percentile(&means, 2.5), percentile(&means, 97.5)]
    };
    Summary {
        mean: m,
        std: std(xs),
        ci95,
        n,
    }
}

/// `numpy.percentile(sorted, q)` with linear interpolation.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Mean score per subject of `(subject, score)` rows.
pub fn per_subject_means<'a>(
    rows: impl IntoIterator<Item = (&'a str, f64)>,
) -> BTreeMap<String, f64> {
    let mut acc: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (s, v) in rows {
        let e = acc.entry(s.to_string()).or_default();
        e.0 += v;
        e.1 += 1;
    }
    acc.into_iter()
        .map(|(s, (sum, n))| (s, sum / n as f64))
        .collect()
}

/// Oracle value of one subject: the mean cosine over all ordered pairs of distinct real images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairMean {
    pub sum: f64,
    pub pairs: usize,
}

impl PairMean {
    pub fn of(embeddings: &[Vec<f32>]) -> Self {
        Self::of_with(embeddings, |c| c)
    }

    /// As [`PairMean::of`], with `f` applied to each pair's cosine (a profile's formula).
    pub fn of_with(embeddings: &[Vec<f32>], f: impl Fn(f64) -> f64) -> Self {
        let mut sum = 0.0;
        let mut pairs = 0;
        for (i, a) in embeddings.iter().enumerate() {
            for (j, b) in embeddings.iter().enumerate() {
                if i != j {
                    sum += f(cosine(a, b));
                    pairs += 1;
                }
            }
        }
        Self { sum, pairs }
    }

    pub fn mean(&self) -> f64 {
        if self.pairs == 0 {
            f64::NAN
        } else {
            self.sum / self.pairs as f64
        }
    }
}

/// The oracle over subjects: per-subject pair means and the mean over all pairs pooled.
pub fn oracle<'a>(subjects: impl IntoIterator<Item = (&'a str, &'a [Vec<f32>])>) -> OracleScore {
    oracle_with(subjects, |c| c)
}

/// As [`oracle`], with `f` applied to each pair's cosine.
pub fn oracle_with<'a>(
    subjects: impl IntoIterator<Item = (&'a str, &'a [Vec<f32>])>,
    f: impl Fn(f64) -> f64 + Copy,
) -> OracleScore {
    let mut per_subject = BTreeMap::new();
    let (mut sum, mut pairs) = (0.0, 0);
    for (name, emb) in subjects {
        let pm = PairMean::of_with(emb, f);
        sum += pm.sum;
        pairs += pm.pairs;
        per_subject.insert(name.to_string(), pm.mean());
    }
    OracleScore {
        mean: if pairs == 0 {
            f64::NAN
        } else {
            sum / pairs as f64
        },
        pairs,
        per_subject,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OracleScore {
    pub mean: f64,
    pub pairs: usize,
    pub per_subject: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-15);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-15);
        assert!((cosine(&[1.0, 0.0], &[-3.0, 0.0]) + 1.0).abs() < 1e-15);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn summary_std_and_bootstrap_are_deterministic_and_bracket_the_mean() {
        let xs: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let b = Bootstrap::default();
        let s = summarize(&xs, &b);
        assert_eq!(s, summarize(&xs, &b));
        assert!(s.ci95[0] < s.mean && s.mean < s.ci95[1], "{s:?}");
        // Standard error ≈ std / √n; a 95% interval is about ±1.96 of it.
        let half = (s.ci95[1] - s.ci95[0]) / 2.0;
        let se = s.std / (xs.len() as f64).sqrt();
        assert!(half > 1.5 * se && half < 2.5 * se, "{half} vs {se}");
        let other = summarize(
            &xs,
            &Bootstrap {
                resamples: 1000,
                seed: 1,
            },
        );
        assert_ne!(s.ci95, other.ci95);
        assert!((std(&[1.0, 3.0]) - 2f64.sqrt()).abs() < 1e-15);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
    }

    #[test]
    fn oracle_pools_all_ordered_pairs() {
        let a = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
        let b = vec![vec![1.0, 0.0], vec![2.0, 0.0]];
        let o = oracle([("a", a.as_slice()), ("b", b.as_slice())]);
        let c = std::f64::consts::FRAC_1_SQRT_2;
        // a: pairs (0,1)=0, (0,2)=c, (1,2)=c, each twice → mean 2c/3; b: 1.
        assert!((o.per_subject["a"] - 2.0 * c / 3.0).abs() < 1e-12);
        assert!((o.per_subject["b"] - 1.0).abs() < 1e-12);
        assert_eq!(o.pairs, 8);
        assert!((o.mean - (4.0 * c + 2.0) / 8.0).abs() < 1e-12);
        let m = per_subject_means([("x", 1.0), ("y", 2.0), ("x", 3.0)]);
        assert_eq!(m["x"], 2.0);
        assert_eq!(m["y"], 2.0);
    }
}

//! Paired statistics of a guided method against its baseline, and the copy flag.
//!
//! A guided row and its unguided baseline answer the same jobs (subject, prompt, seed), so their
//! difference is measured pair by pair: the mean of the per-image differences, a 95% percentile
//! bootstrap interval of that mean (pairs resampled with replacement, the metrics crate's
//! bootstrap), and a two-sided paired permutation p-value (the sign of each difference flipped:
//! every one of the 2^n flips when n ≤ [`EXACT_UP_TO`], else [`PERMUTATIONS`] seeded random
//! flips, counted as (1 + hits) / (1 + draws)). Everything is seeded: a report is the same twice.
//!
//! A possible copy of the input is an image whose DINO similarity to one real image of its subject
//! exceeds the largest similarity between two real images of that subject (OmniGen#87 beat the
//! oracle by returning the input).

use super::rows::{ImageRow, OracleRow};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

/// Up to this many pairs the permutation test enumerates every sign flip (2^16 = 65 536).
pub const EXACT_UP_TO: usize = 16;
/// Random sign flips above [`EXACT_UP_TO`] pairs.
pub const PERMUTATIONS: usize = 10_000;
/// Bootstrap resamples of the paired interval.
pub const RESAMPLES: usize = 1000;

/// The paired difference (guided − baseline) of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedDelta {
    pub pairs: usize,
    /// Mean of the per-pair differences.
    pub delta: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Two-sided paired permutation p-value.
    pub p_value: f64,
}

/// Paired statistics of `guided[i] − baseline[i]`; `seed` draws the bootstrap and the random flips.
pub fn paired_delta(guided: &[f64], baseline: &[f64], seed: u64) -> PairedDelta {
    assert_eq!(
        guided.len(),
        baseline.len(),
        "paired values of different lengths"
    );
    let d: Vec<f64> = guided.iter().zip(baseline).map(|(g, b)| g - b).collect();
    let summary = metrics::scores::summarize(
        &d,
        &metrics::Bootstrap {
            resamples: RESAMPLES,
            seed,
        },
    );
    PairedDelta {
        pairs: d.len(),
        delta: summary.mean,
        ci_low: summary.ci95[0],
        ci_high: summary.ci95[1],
        p_value: sign_flip_p(&d, seed),
    }
}

/// Two-sided p-value of the paired permutation test of mean(d) = 0: the share of sign flips whose
/// |sum| reaches the observed |sum| (exact up to [`EXACT_UP_TO`] values, else Monte Carlo). NaN
/// for no values.
pub fn sign_flip_p(d: &[f64], seed: u64) -> f64 {
    let n = d.len();
    if n == 0 {
        return f64::NAN;
    }
    let observed = d.iter().sum::<f64>().abs();
    // Sums of the same values in another order differ in the last bits: a flip that ties the
    // observed statistic must count, whatever its rounding.
    let slack = 1e-12 * d.iter().map(|x| x.abs()).sum::<f64>();
    let reaches = |s: f64| s.abs() + slack >= observed;
    if n <= EXACT_UP_TO {
        let total = 1u64 << n;
        let hits = (0..total)
            .filter(|mask| {
                let s: f64 = d
                    .iter()
                    .enumerate()
                    .map(|(i, x)| if mask >> i & 1 == 1 { -x } else { *x })
                    .sum();
                reaches(s)
            })
            .count();
        return hits as f64 / total as f64;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let hits = (0..PERMUTATIONS)
        .filter(|_| {
            let s: f64 = d
                .iter()
                .map(|x| if rng.random::<bool>() { -x } else { *x })
                .sum();
            reaches(s)
        })
        .count();
    (1 + hits) as f64 / (1 + PERMUTATIONS) as f64
}

/// A guided method against its baseline on their matched jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub guided: String,
    pub baseline: String,
    /// DINO, CLIP-I, CLIP-T.
    pub metrics: [PairedDelta; 3],
    /// The extra scores by name, on the matched pairs that both have it (see
    /// [`ImageRow::extra`]); empty without any.
    pub extra: BTreeMap<String, PairedDelta>,
}

/// The pairs of two methods' rows on (subject, prompt index, seed), in `guided`'s row order.
pub fn matched<'a>(
    rows: &'a [ImageRow],
    guided: &str,
    baseline: &str,
) -> Vec<(&'a ImageRow, &'a ImageRow)> {
    let base: BTreeMap<(&str, usize, u64), &ImageRow> = rows
        .iter()
        .filter(|r| r.method == baseline)
        .map(|r| ((r.subject.as_str(), r.prompt_index, r.seed), r))
        .collect();
    rows.iter()
        .filter(|r| r.method == guided)
        .filter_map(|g| {
            base.get(&(g.subject.as_str(), g.prompt_index, g.seed))
                .map(|b| (g, *b))
        })
        .collect()
}

/// The paired comparison of `guided` against `baseline` (`None` without a matched pair).
pub fn compare(rows: &[ImageRow], guided: &str, baseline: &str, seed: u64) -> Option<Comparison> {
    let pairs = matched(rows, guided, baseline);
    if pairs.is_empty() {
        return None;
    }
    let metric = |f: fn(&ImageRow) -> f64| {
        let g: Vec<f64> = pairs.iter().map(|(g, _)| f(g)).collect();
        let b: Vec<f64> = pairs.iter().map(|(_, b)| f(b)).collect();
        paired_delta(&g, &b, seed)
    };
    let names: std::collections::BTreeSet<&String> =
        pairs.iter().flat_map(|(g, _)| g.extra.keys()).collect();
    let extra = names
        .into_iter()
        .filter_map(|name| {
            let (g, b): (Vec<f64>, Vec<f64>) = pairs
                .iter()
                .filter_map(|(g, b)| Some((*g.extra.get(name)?, *b.extra.get(name)?)))
                .unzip();
            (!g.is_empty()).then(|| (name.clone(), paired_delta(&g, &b, seed)))
        })
        .collect();
    Some(Comparison {
        guided: guided.into(),
        baseline: baseline.into(),
        metrics: [
            metric(|r| r.dino),
            metric(|r| r.clip_i),
            metric(|r| r.clip_t),
        ],
        extra,
    })
}

/// How many of `method`'s images are possible copies of the input: DINO similarity to one real
/// image of the subject above the subject's largest real-vs-real similarity. `None` when a row or
/// the oracle lacks what the flag needs (runs written before it existed).
pub fn possible_copies(rows: &[ImageRow], method: &str, oracle: &OracleRow) -> Option<usize> {
    let mut copies = 0;
    for r in rows.iter().filter(|r| r.method == method) {
        let threshold = oracle.dino_max_pair.get(&r.subject)?;
        if r.dino_max? > *threshold {
            copies += 1;
        }
    }
    Some(copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_pairs_give_delta_zero_and_p_one() {
        let x = [0.3, 0.5, 0.1, 0.9, 0.7];
        let p = paired_delta(&x, &x, 1);
        assert_eq!((p.pairs, p.delta, p.ci_low, p.ci_high), (5, 0.0, 0.0, 0.0));
        assert_eq!(p.p_value, 1.0);
        // Above the exact limit, the Monte Carlo count gives 1 too.
        let many: Vec<f64> = (0..40).map(|i| i as f64 / 40.0).collect();
        assert_eq!(paired_delta(&many, &many, 3).p_value, 1.0);
    }

    #[test]
    fn a_constant_shift_collapses_the_interval_on_the_shift() {
        let b = [0.2, 0.4, 0.6, 0.1, 0.3, 0.8];
        let g: Vec<f64> = b.iter().map(|x| x + 0.05).collect();
        let p = paired_delta(&g, &b, 7);
        for v in [p.delta, p.ci_low, p.ci_high] {
            assert!((v - 0.05).abs() < 1e-12, "{p:?}");
        }
        // Six equal positive differences: only "all +" and "all −" reach |sum|: 2 / 64.
        assert!((p.p_value - 2.0 / 64.0).abs() < 1e-15, "{p:?}");
    }

    #[test]
    fn exact_permutation_p_values_computed_by_hand() {
        // d = [1, 2, 3]: |sum| = 6; of the 8 sign flips only ±6 reach it: p = 2/8.
        assert_eq!(sign_flip_p(&[1.0, 2.0, 3.0], 0), 0.25);
        // d = [1, -1, 2]: |sum| = 2; the 8 flips give 1-1+2 = 2, -1-1+2 = 0, 1+1+2 = 4,
        // 1-1-2 = -2, -1+1+2 = 2, -1-1-2 = -4, 1+1-2 = 0, -1+1-2 = -2: 6 of 8 reach 2.
        assert_eq!(sign_flip_p(&[1.0, -1.0, 2.0], 0), 0.75);
        // One pair: both flips reach |d|.
        assert_eq!(sign_flip_p(&[0.4], 0), 1.0);
        assert!(sign_flip_p(&[], 0).is_nan());
    }

    #[test]
    fn a_large_consistent_shift_is_significant_and_seeded() {
        let b: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let g: Vec<f64> = b
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.1 + 0.01 * (i % 3) as f64)
            .collect();
        let p = paired_delta(&g, &b, 11);
        // Every flip but the observed signs has a smaller |sum|: p = (1 + hits) / 10001 with
        // essentially no hits.
        assert!(p.p_value < 0.001, "{p:?}");
        assert!(
            p.ci_low > 0.1 && p.ci_high < 0.12 && p.ci_low < p.delta && p.delta < p.ci_high,
            "{p:?}"
        );
        assert_eq!(paired_delta(&g, &b, 11), p);
    }

    fn row(
        method: &str,
        subject: &str,
        prompt: usize,
        dino: f64,
        dino_max: Option<f64>,
    ) -> ImageRow {
        ImageRow {
            id: format!("{method}__{subject}__p{prompt:02}__s0"),
            method: method.into(),
            baseline: "stable-diffusion".into(),
            guided: method.ends_with("+pnd"),
            subject: subject.into(),
            prompt_index: prompt,
            seed: 0,
            prompt: String::new(),
            clip_t_prompt: String::new(),
            image: String::new(),
            reference: String::new(),
            dino,
            clip_i: dino,
            clip_t: dino,
            extra: Default::default(),
            device: String::new(),
            dtype: String::new(),
            dino_max,
            timing: Default::default(),
        }
    }

    #[test]
    fn only_matched_jobs_are_compared() {
        let rows = vec![
            row("sd", "dog", 0, 0.5, None),
            row("sd", "dog", 1, 0.6, None),
            row("sd+pnd", "dog", 1, 0.9, None),
            row("sd+pnd", "cat", 0, 0.1, None),
        ];
        let pairs = matched(&rows, "sd+pnd", "sd");
        assert_eq!(pairs.len(), 1);
        let c = compare(&rows, "sd+pnd", "sd", 0).unwrap();
        assert_eq!(c.metrics[0].pairs, 1);
        assert!((c.metrics[0].delta - 0.3).abs() < 1e-12);
        assert!(compare(&rows, "sd+pnd", "db", 0).is_none());
    }

    /// `row` with extra score `dinov2 = v` (none for `None`).
    fn with_dinov2(mut r: ImageRow, v: Option<f64>) -> ImageRow {
        r.extra = v.map(|v| ("dinov2".to_string(), v)).into_iter().collect();
        r
    }

    #[test]
    fn extra_scores_are_compared_and_tabled_like_the_others() {
        use super::super::{aggregate, tables};
        let rows = vec![
            with_dinov2(row("sd", "dog", 0, 0.5, None), Some(10.0)),
            with_dinov2(row("sd", "dog", 1, 0.6, None), Some(20.0)),
            with_dinov2(row("sd", "dog", 2, 0.6, None), None),
            with_dinov2(row("sd+pnd", "dog", 0, 0.9, None), Some(13.0)),
            with_dinov2(row("sd+pnd", "dog", 1, 0.9, None), Some(26.0)),
            with_dinov2(row("sd+pnd", "dog", 2, 0.9, None), Some(30.0)),
        ];
        let c = compare(&rows, "sd+pnd", "sd", 7).unwrap();
        // The pair whose baseline lacks the score is left out of its statistics only.
        assert_eq!(c.metrics[0].pairs, 3);
        assert_eq!(
            c.extra["dinov2"],
            paired_delta(&[13.0, 26.0], &[10.0, 20.0], 7)
        );
        assert_eq!(c.extra["dinov2"].delta, 4.5);
        let names = ["sd".to_string(), "sd+pnd".to_string()];
        let summaries = aggregate::by_method(&rows, &names, 0).unwrap();
        assert_eq!(summaries[0].extra["dinov2"].mean, 15.0);
        assert_eq!(summaries[1].extra["dinov2"].mean, 23.0);
        let subjects = aggregate::by_subject(&rows, &names).unwrap();
        assert_eq!(subjects[1].extra["dinov2"], 23.0);
        let infos: Vec<tables::MethodInfo> = names
            .iter()
            .map(|n| tables::MethodInfo {
                name: n.clone(),
                label: n.clone(),
                baseline: "stable-diffusion".into(),
                guided: n.ends_with("+pnd"),
                compare_to: None,
            })
            .collect();
        let oracle = OracleRow {
            dino: 0.7,
            clip_i: 0.8,
            per_subject: vec![],
            dino_max_pair: Default::default(),
            extra: [("dinov2".to_string(), 90.0)].into(),
        };
        let extras = tables::TableExtras {
            paired: vec![c],
            ..Default::default()
        };
        let table = tables::method_table(&summaries, &infos, Some(&oracle), &extras);
        let md = tables::markdown(&table);
        assert!(
            md.starts_with("| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | dinov2 ↑ | images | possible copies |\n|---|---:|---:|---:|---:|---:|---:|\n| Real Images (Oracle) | 0.700 | 0.800 | – | 90.000 | – | – |\n| sd | "),
            "{md}"
        );
        assert!(md.contains(" | 23.000 (+8.000) | 3 | – |\n"), "{md}");
        assert!(
            md.contains("| ΔCLIP-T | Δdinov2 |\n|---|---|---:|---:|---:|---:|---:|\n"),
            "{md}"
        );
        assert!(md.contains("| +4.500 ["), "{md}");
        let csv = tables::csv(&table).unwrap();
        let header = csv.lines().next().unwrap();
        assert!(
            header.starts_with("method,images,dino,clip_i,clip_t,dinov2,delta_dino,delta_clip_i,delta_clip_t,delta_dinov2,expected,")
                && header.ends_with(",paired_p_clip_t,paired_delta_dinov2,paired_ci95_low_dinov2,paired_ci95_high_dinov2,paired_p_dinov2"),
            "{csv}"
        );
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("Real Images (Oracle),,0.700000,0.800000,,90.000000,,"),
            "{csv}"
        );
        let tex = tables::latex(&table);
        assert!(
            tex.contains("& 23.000 ({\\scriptsize $+8.000$}) \\\\\n"),
            "{tex}"
        );

        // Without extra scores: the tables as they were.
        let plain: Vec<ImageRow> = rows.into_iter().map(|r| with_dinov2(r, None)).collect();
        let summaries = aggregate::by_method(&plain, &names, 0).unwrap();
        assert!(summaries[0].extra.is_empty());
        let mut oracle = oracle;
        oracle.extra.clear();
        let extras = tables::TableExtras {
            paired: vec![compare(&plain, "sd+pnd", "sd", 7).unwrap()],
            ..Default::default()
        };
        let table = tables::method_table(&summaries, &infos, Some(&oracle), &extras);
        let md = tables::markdown(&table);
        assert!(md.starts_with("| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | images | possible copies |\n|---|---:|---:|---:|---:|---:|\n"), "{md}");
        assert!(md.contains("| Method | vs | pairs | ΔDINO | ΔCLIP-I | ΔCLIP-T |\n|---|---|---:|---:|---:|---:|\n"), "{md}");
        let csv = tables::csv(&table).unwrap();
        assert_eq!(
            csv.lines().next().unwrap(),
            "method,images,dino,clip_i,clip_t,delta_dino,delta_clip_i,delta_clip_t,expected,possible_copies,pairs,paired_delta_dino,paired_ci95_low_dino,paired_ci95_high_dino,paired_p_dino,paired_delta_clip_i,paired_ci95_low_clip_i,paired_ci95_high_clip_i,paired_p_clip_i,paired_delta_clip_t,paired_ci95_low_clip_t,paired_ci95_high_clip_t,paired_p_clip_t"
        );
        assert!(tables::latex(&table).starts_with("\\begin{tabular}{lccc}\n\\toprule\nMethod & DINO $\\uparrow$ & CLIP-I $\\uparrow$ & CLIP-T $\\uparrow$ \\\\\n"));
    }

    #[test]
    fn images_above_the_largest_real_pair_are_possible_copies() {
        let oracle = OracleRow {
            dino: 0.7,
            clip_i: 0.8,
            per_subject: vec![],
            dino_max_pair: [("dog".to_string(), 0.9), ("cat".to_string(), 0.8)].into(),
            extra: Default::default(),
        };
        let rows = vec![
            row("m", "dog", 0, 0.5, Some(0.95)),
            row("m", "dog", 1, 0.5, Some(0.9)),
            row("m", "cat", 0, 0.5, Some(0.85)),
            row("other", "cat", 0, 0.5, Some(0.5)),
        ];
        // 0.95 > 0.9 and 0.85 > 0.8 count; 0.9 does not exceed 0.9.
        assert_eq!(possible_copies(&rows, "m", &oracle), Some(2));
        assert_eq!(possible_copies(&rows, "other", &oracle), Some(0));
        let old = vec![row("m", "dog", 0, 0.5, None)];
        assert_eq!(possible_copies(&old, "m", &oracle), None);
        let unknown = vec![row("m", "wolf_plushie", 0, 0.5, Some(0.99))];
        assert_eq!(possible_copies(&unknown, "m", &oracle), None);
    }
}

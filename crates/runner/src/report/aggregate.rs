//! Aggregation of result rows with polars: per-method and per-subject means, standard deviations,
//! and the 95% bootstrap confidence interval of each method's mean (the metrics crate's bootstrap).

use super::rows::ImageRow;
use polars::prelude::*;
use polars_io::parquet::write::ParquetWriter;
use std::collections::{BTreeMap, BTreeSet};

/// One method's scores over all its images.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSummary {
    pub method: String,
    pub baseline: String,
    pub guided: bool,
    pub images: usize,
    pub dino: Stat,
    pub clip_i: Stat,
    pub clip_t: Stat,
    /// The profile's extra scores by name (see [`ImageRow::extra`]); empty without any.
    pub extra: BTreeMap<String, Stat>,
}

/// Mean, sample standard deviation and 95% bootstrap confidence interval of the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Per-subject means of one method.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectSummary {
    pub method: String,
    pub subject: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// The extra scores' means by name.
    pub extra: BTreeMap<String, f64>,
}

pub const METRICS: [&str; 3] = ["dino", "clip_i", "clip_t"];

/// The names of the extra scores any of the rows has, sorted.
pub fn extra_names(rows: &[ImageRow]) -> Vec<String> {
    rows.iter()
        .flat_map(|r| r.extra.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The rows as a polars frame (one row per image): then one column per extra score, named by
/// it, null where a row lacks it.
pub fn frame(rows: &[ImageRow]) -> PolarsResult<DataFrame> {
    let s = |f: fn(&ImageRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let x = |f: fn(&ImageRow) -> f64| rows.iter().map(f).collect::<Vec<_>>();
    let mut df = df!(
        "id" => s(|r| r.id.clone()),
        "method" => s(|r| r.method.clone()),
        "baseline" => s(|r| r.baseline.clone()),
        "guided" => rows.iter().map(|r| r.guided).collect::<Vec<_>>(),
        "subject" => s(|r| r.subject.clone()),
        "prompt_index" => rows.iter().map(|r| r.prompt_index as u32).collect::<Vec<_>>(),
        "seed" => rows.iter().map(|r| r.seed).collect::<Vec<_>>(),
        "prompt" => s(|r| r.prompt.clone()),
        "clip_t_prompt" => s(|r| r.clip_t_prompt.clone()),
        "image" => s(|r| r.image.clone()),
        "dino" => x(|r| r.dino),
        "clip_i" => x(|r| r.clip_i),
        "clip_t" => x(|r| r.clip_t),
        "seconds" => x(|r| r.timing.seconds),
    )?;
    for name in extra_names(rows) {
        if df.get_column_names().iter().any(|c| c.as_str() == name) {
            polars_bail!(Duplicate: "extra score '{}' has the name of a result column", name);
        }
        let values: Vec<Option<f64>> = rows.iter().map(|r| r.extra.get(&name).copied()).collect();
        df.with_column(Column::new(name.as_str().into(), values))?;
    }
    Ok(df)
}

fn f64_at(df: &DataFrame, name: &str, i: usize) -> PolarsResult<f64> {
    Ok(df.column(name)?.f64()?.get(i).unwrap_or(f64::NAN))
}

fn str_at(df: &DataFrame, name: &str, i: usize) -> PolarsResult<String> {
    Ok(df
        .column(name)?
        .str()?
        .get(i)
        .unwrap_or_default()
        .to_string())
}

/// Per-method summaries in the order of `methods` (methods without rows are left out).
pub fn by_method(
    rows: &[ImageRow],
    methods: &[String],
    bootstrap_seed: u64,
) -> PolarsResult<Vec<MethodSummary>> {
    let mut aggs = vec![
        col("baseline").first(),
        col("guided").first(),
        col("dino").len().alias("n"),
    ];
    let extras = extra_names(rows);
    let all: Vec<&str> = METRICS
        .iter()
        .copied()
        .chain(extras.iter().map(String::as_str))
        .collect();
    for &m in &all {
        aggs.push(col(m).mean().alias(format!("{m}_mean")));
        aggs.push(col(m).std(1).alias(format!("{m}_std")));
    }
    let df = frame(rows)?
        .lazy()
        .group_by([col("method")])
        .agg(aggs)
        .collect()?;
    let mut out = Vec::new();
    for method in methods {
        let Some(i) =
            (0..df.height()).find(|&i| str_at(&df, "method", i).ok().as_deref() == Some(method))
        else {
            continue;
        };
        let values = |metric: &str| -> Vec<f64> {
            rows.iter()
                .filter(|r| &r.method == method)
                .filter_map(|r| match metric {
                    "dino" => Some(r.dino),
                    "clip_i" => Some(r.clip_i),
                    "clip_t" => Some(r.clip_t),
                    // A row without the score (an older run's) has no value.
                    name => r.extra.get(name).copied(),
                })
                .collect()
        };
        let stat = |metric: &str| -> PolarsResult<Stat> {
            // The metrics crate's bootstrap, so `pnd score` and reports give the same intervals.
            let summary = metrics::scores::summarize(
                &values(metric),
                &metrics::Bootstrap {
                    resamples: 1000,
                    seed: bootstrap_seed,
                },
            );
            let (ci_low, ci_high) = (summary.ci95[0], summary.ci95[1]);
            Ok(Stat {
                mean: f64_at(&df, &format!("{metric}_mean"), i)?,
                std: f64_at(&df, &format!("{metric}_std"), i)?,
                ci_low,
                ci_high,
            })
        };
        out.push(MethodSummary {
            method: method.clone(),
            baseline: str_at(&df, "baseline", i)?,
            guided: df.column("guided")?.bool()?.get(i).unwrap_or(false),
            images: df.column("n")?.u32()?.get(i).unwrap_or(0) as usize,
            dino: stat("dino")?,
            clip_i: stat("clip_i")?,
            clip_t: stat("clip_t")?,
            extra: extras
                .iter()
                .map(|m| Ok((m.clone(), stat(m)?)))
                .collect::<PolarsResult<_>>()?,
        });
    }
    Ok(out)
}

/// Per-(method, subject) means, sorted by method order then subject name.
pub fn by_subject(rows: &[ImageRow], methods: &[String]) -> PolarsResult<Vec<SubjectSummary>> {
    let extras = extra_names(rows);
    let means: Vec<Expr> = METRICS
        .iter()
        .copied()
        .chain(extras.iter().map(String::as_str))
        .map(|m| col(m).mean())
        .collect();
    let df = frame(rows)?
        .lazy()
        .group_by([col("method"), col("subject")])
        .agg(means)
        .sort(["subject"], SortMultipleOptions::default())
        .collect()?;
    let mut out = Vec::new();
    for method in methods {
        for i in 0..df.height() {
            if str_at(&df, "method", i)? != *method {
                continue;
            }
            out.push(SubjectSummary {
                method: method.clone(),
                subject: str_at(&df, "subject", i)?,
                dino: f64_at(&df, "dino", i)?,
                clip_i: f64_at(&df, "clip_i", i)?,
                clip_t: f64_at(&df, "clip_t", i)?,
                extra: extras
                    .iter()
                    .map(|m| Ok((m.clone(), f64_at(&df, m, i)?)))
                    .collect::<PolarsResult<_>>()?,
            });
        }
    }
    Ok(out)
}

/// Writes the rows as Parquet (atomically).
pub fn write_parquet(rows: &[ImageRow], path: &std::path::Path) -> anyhow::Result<()> {
    let mut df = frame(rows)?;
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(&mut df)?;
    crate::sweep::write_file_atomic(path, &buf)?;
    Ok(())
}

//! `pnd report RUN_DIR`: tables (Markdown, LaTeX, CSV), Pareto plots, per-subject bars and image
//! grids from a run folder's rows (SPEC §8). Aggregation uses polars; figures use plotters.

pub mod aggregate;
pub mod grids;
pub mod plots;
pub mod rows;
pub mod tables;

use crate::sweep::{write_file_atomic, RunStore};
use anyhow::Context;
use rows::{ImageRow, OracleRow};
use std::path::{Path, PathBuf};
use tables::{baseline_label, MethodInfo};

/// Seed of the bootstrap resampling, fixed so a report is reproducible byte for byte.
pub const BOOTSTRAP_SEED: u64 = 0x5eed;

/// What a report wrote.
#[derive(Debug, Clone)]
pub struct ReportOutput {
    pub dir: PathBuf,
    pub table_markdown: String,
    pub files: Vec<PathBuf>,
}

/// Method display information from a plan's resolved config (`methods[].{name,label,baseline,pick_and_draw}`).
pub fn method_infos(config: &serde_json::Value) -> Vec<MethodInfo> {
    config["methods"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let name = m["name"].as_str().unwrap_or_default().to_string();
                    let baseline = m["baseline"].as_str().unwrap_or_default().to_string();
                    let guided = m["pick_and_draw"].as_bool().unwrap_or(false);
                    let label = m["label"].as_str().map(str::to_string).unwrap_or_else(|| {
                        let b = baseline_label(&baseline);
                        if guided {
                            format!("{b} + Pick-and-Draw")
                        } else {
                            b.to_string()
                        }
                    });
                    MethodInfo {
                        name,
                        label,
                        baseline,
                        guided,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the report of `run_dir` into `run_dir/report` (or `out`).
pub fn write_report(run_dir: &Path, out: Option<&Path>) -> anyhow::Result<ReportOutput> {
    let store = RunStore::open(run_dir)?;
    let plan = store.plan()?;
    let infos = method_infos(&plan.config);
    let rows: Vec<ImageRow> = store
        .rows()
        .with_context(|| format!("reading rows of '{}'", run_dir.display()))?;
    anyhow::ensure!(
        !rows.is_empty(),
        "run '{}' has no finished rows yet",
        run_dir.display()
    );
    let oracle_path = run_dir.join("oracle.json");
    let oracle: Option<OracleRow> = if oracle_path.is_file() {
        Some(
            serde_json::from_str(&std::fs::read_to_string(&oracle_path)?)
                .with_context(|| format!("parsing '{}'", oracle_path.display()))?,
        )
    } else {
        None
    };
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run_dir.join("report"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating '{}'", dir.display()))?;
    let names: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
    let summaries = aggregate::by_method(&rows, &names, BOOTSTRAP_SEED)?;
    let subjects = aggregate::by_subject(&rows, &names)?;
    let table = tables::method_table(&summaries, &infos, oracle.as_ref());
    let mut files = Vec::new();
    let md = tables::markdown(&table);
    for (name, text) in [
        ("table.md", md.clone()),
        ("table.tex", tables::latex(&table)),
        ("table.csv", tables::csv(&table)?),
    ] {
        let p = dir.join(name);
        write_file_atomic(&p, text.as_bytes())?;
        files.push(p);
    }
    let stats = stats_csv(&summaries)?;
    write_file_atomic(&dir.join("stats.csv"), stats.as_bytes())?;
    files.push(dir.join("stats.csv"));
    let per_subject = per_subject_csv(&subjects)?;
    write_file_atomic(&dir.join("per_subject.csv"), per_subject.as_bytes())?;
    files.push(dir.join("per_subject.csv"));
    aggregate::write_parquet(&rows, &dir.join("results.parquet"))?;
    files.push(dir.join("results.parquet"));
    files.extend(plots::pareto_plots(&dir, &summaries, &infos)?);
    files.extend(plots::subject_bars(&dir, &subjects, &infos)?);
    files.extend(grids::image_grids(
        run_dir,
        &dir.join("grids"),
        &rows,
        &infos,
    )?);
    Ok(ReportOutput {
        dir,
        table_markdown: md,
        files,
    })
}

/// Mean, standard deviation and bootstrap CI per method and metric.
fn stats_csv(summaries: &[aggregate::MethodSummary]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "method",
        "images",
        "metric",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
    ])?;
    for s in summaries {
        for (m, st) in [("dino", s.dino), ("clip_i", s.clip_i), ("clip_t", s.clip_t)] {
            w.write_record([
                s.method.clone(),
                s.images.to_string(),
                m.into(),
                format!("{:.6}", st.mean),
                format!("{:.6}", st.std),
                format!("{:.6}", st.ci_low),
                format!("{:.6}", st.ci_high),
            ])?;
        }
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

fn per_subject_csv(subjects: &[aggregate::SubjectSummary]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["method", "subject", "dino", "clip_i", "clip_t"])?;
    for s in subjects {
        w.write_record([
            s.method.clone(),
            s.subject.clone(),
            format!("{:.6}", s.dino),
            format!("{:.6}", s.clip_i),
            format!("{:.6}", s.clip_t),
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

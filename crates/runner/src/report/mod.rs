//! `pnd report RUN_DIR`: tables (Markdown, LaTeX, CSV), Pareto plots, per-subject bars and image
//! grids from a run folder's rows (SPEC §8). Aggregation uses polars; figures use plotters.

pub mod aggregate;
pub mod grids;
pub mod header;
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
    /// The front page's header: provenance, finished and failed jobs (see [`header`]).
    pub header: String,
    pub table_markdown: String,
    pub files: Vec<PathBuf>,
}

/// A method as a plan's resolved config records it (`methods[]` of the experiment).
#[derive(serde::Deserialize)]
struct PlannedMethod {
    name: String,
    baseline: String,
    #[serde(default)]
    pick_and_draw: bool,
    #[serde(default)]
    label: Option<String>,
}

/// Method display information from a plan's resolved config (`methods[].{name,label,baseline,pick_and_draw}`).
/// A config without a valid `methods` list is an error (a damaged or foreign `plan.json`).
pub fn method_infos(config: &serde_json::Value) -> anyhow::Result<Vec<MethodInfo>> {
    let methods: Vec<PlannedMethod> = serde_json::from_value(config["methods"].clone())
        .context("its config has no valid `methods` list (name and baseline of each)")?;
    Ok(methods
        .into_iter()
        .map(|m| {
            let label = m.label.unwrap_or_else(|| {
                let b = baseline_label(&m.baseline);
                if m.pick_and_draw {
                    format!("{b} + Pick-and-Draw")
                } else {
                    b.to_string()
                }
            });
            MethodInfo {
                name: m.name,
                label,
                baseline: m.baseline,
                guided: m.pick_and_draw,
            }
        })
        .collect())
}

/// Writes the report of `run_dir` into `run_dir/report` (or `out`).
pub fn write_report(run_dir: &Path, out: Option<&Path>) -> anyhow::Result<ReportOutput> {
    let store = RunStore::open(run_dir)?;
    let plan = store.plan()?;
    let infos = method_infos(&plan.config)
        .with_context(|| format!("reading '{}'", run_dir.join("plan.json").display()))?;
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
    let failures = store.failures()?;
    let head = header::header(&plan, rows.len(), &failures);
    for (name, text) in [
        ("report.md", format!("{head}\n## Table\n\n{md}")),
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
        header: head,
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

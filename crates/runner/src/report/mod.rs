//! `pnd report RUN_DIR`: tables (Markdown, LaTeX, CSV), Pareto plots, per-subject bars and image
//! grids from a run folder's rows (SPEC §8), and `index.html`, one page showing them all; and
//! the sheet of `pnd maps` ([`maps`]).
//! Aggregation uses polars; figures use plotters.

pub mod aggregate;
pub mod explore;
pub mod gate;
pub mod glyphs;
pub mod grids;
pub mod header;
pub mod html;
pub mod maps;
pub mod paired;
pub mod plots;
pub mod protocols;
pub mod rows;
pub mod tables;
pub mod text;
pub mod timing;

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
    /// The table's lines (the oracle first, then the methods).
    pub table: Vec<tables::TableRow>,
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
    #[serde(default)]
    compare_to: Option<String>,
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
                // Another program's images: the method's own name says what they are.
                if m.baseline == "images" {
                    return m.name.clone();
                }
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
                compare_to: m.compare_to,
            }
        })
        .collect())
}

/// How a report is written.
#[derive(Debug, Clone, Default)]
pub struct ReportOptions {
    /// A failing oracle gate ([`gate::oracle_gate`]) is an error instead of a warning.
    pub strict: bool,
}

/// Writes the report of `run_dir` into `run_dir/report` (or `out`).
pub fn write_report(run_dir: &Path, out: Option<&Path>) -> anyhow::Result<ReportOutput> {
    write_report_with(&[run_dir.to_path_buf()], out, &ReportOptions::default())
}

/// The metric models of a plan (`[metrics] dino` and `clip` of its config; empty when absent).
fn metric_models(plan: &crate::sweep::Plan) -> (String, String) {
    let m = &plan.config["metrics"];
    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
    (s("dino"), s("clip"))
}

/// The protocol profile a plan scored under (`[metrics.scoring] profile`; plans written before
/// profiles existed scored under the DreamBooth protocol).
fn scoring_profile(plan: &crate::sweep::Plan) -> String {
    plan.config["metrics"]["scoring"]["profile"]
        .as_str()
        .unwrap_or(gate::GATED_PROFILE)
        .to_string()
}

/// `dog, cat (2 subjects)`, at most 8 names.
fn subject_list(s: &std::collections::BTreeSet<String>) -> String {
    let names: Vec<&str> = s.iter().take(8).map(String::as_str).collect();
    let more = if s.len() > 8 { ", ..." } else { "" };
    format!(
        "{}{more} ({})",
        names.join(", "),
        crate::lists::count(s.len(), "subject")
    )
}

fn read_oracle(run_dir: &Path) -> anyhow::Result<Option<OracleRow>> {
    let path = run_dir.join("oracle.json");
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing '{}'", path.display()))?,
    ))
}

/// Writes the report of one run, or of several runs in one table (a sweep's and a `pnd eval`'s:
/// `out` is then required). The runs must be scored with the same metric models and have
/// different method names; the first run's oracle is the table's.
pub fn write_report_with(
    runs: &[PathBuf],
    out: Option<&Path>,
    options: &ReportOptions,
) -> anyhow::Result<ReportOutput> {
    let Some(first_run) = runs.first() else {
        anyhow::bail!("no run folder to report");
    };
    anyhow::ensure!(
        runs.len() == 1 || out.is_some(),
        "a report of {} runs needs --out (it belongs to none of them)",
        runs.len()
    );
    let mut infos: Vec<MethodInfo> = Vec::new();
    let mut rows: Vec<ImageRow> = Vec::new();
    let mut extras = tables::TableExtras::default();
    let mut oracle: Option<OracleRow> = None;
    let mut heads = Vec::new();
    let mut builds: Vec<String> = Vec::new();
    let mut models: Option<(String, String, &PathBuf)> = None;
    let mut profile: Option<(String, &PathBuf)> = None;
    type Data = (Option<String>, std::collections::BTreeSet<String>);
    let mut dataset: Option<(Data, &PathBuf)> = None;
    for run_dir in runs {
        let store = RunStore::open(run_dir)?;
        let plan = store.plan()?;
        let run_infos = method_infos(&plan.config)
            .with_context(|| format!("reading '{}'", run_dir.join("plan.json").display()))?;
        let (dino, clip) = metric_models(&plan);
        // Scores of two protocols are on different scales (100 · cos, 2.5 · max(cos, 0)).
        let p = scoring_profile(&plan);
        match &profile {
            None => profile = Some((p, run_dir)),
            Some((first_p, first)) if *first_p != p => anyhow::bail!(
                "runs '{}' and '{}' were scored under different protocols ('{first_p}' vs '{p}'): their scores do not share a table (`pnd eval --protocol all` shows profiles side by side)",
                first.display(),
                run_dir.display()
            ),
            Some(_) => {}
        }
        match &models {
            None => models = Some((dino, clip, run_dir)),
            Some((d, c, first)) if (d, c) != (&dino, &clip) => anyhow::bail!(
                "runs '{}' and '{}' were scored with different metric models ('{d}', '{c}' vs '{dino}', '{clip}'): their scores do not share a table",
                first.display(),
                run_dir.display()
            ),
            Some(_) => {}
        }
        // The oracle and every score are over a dataset copy and a subject set: runs that differ
        // in either do not share a table (whose oracle would be the first run's).
        let data = (
            plan.provenance.as_ref().map(|p| p.dataset.sha256.clone()),
            plan.jobs
                .iter()
                .map(|j| j.subject.clone())
                .collect::<std::collections::BTreeSet<String>>(),
        );
        match &dataset {
            None => dataset = Some((data, run_dir)),
            Some(((sha, subjects), first)) => {
                if let (Some(a), Some(b)) = (sha, &data.0) {
                    anyhow::ensure!(
                        a == b,
                        "runs '{}' and '{}' were scored on different copies of the dataset (sha256 {a} vs {b}): their scores and oracles do not share a table",
                        first.display(),
                        run_dir.display()
                    );
                }
                anyhow::ensure!(
                    *subjects == data.1,
                    "runs '{}' and '{}' cover different subjects ({} vs {}): their means and oracle do not share a table (score both on the same subjects)",
                    first.display(),
                    run_dir.display(),
                    subject_list(subjects),
                    subject_list(&data.1)
                );
            }
        }
        for info in run_infos {
            anyhow::ensure!(
                !infos.iter().any(|i| i.name == info.name),
                "method '{}' is in more than one of the runs (the second: '{}'); score it under another name (`pnd eval --name`)",
                info.name,
                run_dir.display()
            );
            infos.push(info);
        }
        // The row errors name their file already.
        let mut run_rows: Vec<ImageRow> = store.rows()?;
        for r in &mut run_rows {
            r.timing = store
                .read_timing(&dreambench::JobId(r.id.clone()))
                .unwrap_or_default();
        }
        if runs.len() > 1 {
            // Image paths are relative to their own run folder.
            for r in &mut run_rows {
                r.image = run_dir.join(&r.image).display().to_string();
            }
        }
        for j in &plan.jobs {
            *extras.expected.entry(j.method.clone()).or_default() += 1;
        }
        if oracle.is_none() {
            oracle = read_oracle(run_dir)?;
        }
        let failures = store.failures()?;
        heads.push(header::header(&plan, run_rows.len(), &failures));
        if let Some(p) = &plan.provenance {
            let line = p.build_line();
            if !builds.contains(&line) {
                builds.push(line);
            }
        }
        rows.extend(run_rows);
    }
    anyhow::ensure!(
        !rows.is_empty(),
        "run '{}' has no finished rows yet",
        runs.iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join("', '")
    );
    let (dino, clip, _) = models.expect("one run at least");
    let (profile, _) = profile.expect("one run at least");
    let gate = gate::oracle_gate(&profile, &dino, &clip, oracle.as_ref());
    if let (gate::Gate::Fail(message), true) = (&gate, options.strict) {
        anyhow::bail!("oracle gate (--strict): {message}");
    }
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| first_run.join("report"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating '{}'", dir.display()))?;
    let names: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
    let summaries = aggregate::by_method(&rows, &names, BOOTSTRAP_SEED)?;
    let subjects = aggregate::by_subject(&rows, &names)?;
    for s in &summaries {
        if let Some(b) = tables::baseline_of(&summaries, &infos, s) {
            extras
                .paired
                .extend(paired::compare(&rows, &s.method, &b.method, BOOTSTRAP_SEED));
        }
        if let Some(n) = oracle
            .as_ref()
            .and_then(|o| paired::possible_copies(&rows, &s.method, o))
        {
            extras.copies.insert(s.method.clone(), n);
        }
    }
    let table = tables::method_table(&summaries, &infos, oracle.as_ref(), &extras);
    let mut files = Vec::new();
    let md = tables::markdown(&table);
    let head = compose_header(&heads, &gate);
    let timings = timing::method_timings(&rows, &infos);
    let runtime = timing::runtime_rows(&timings, &summaries, &infos);
    let time = format!(
        "{}\n{}",
        timing::runtime_markdown(&runtime),
        timing::markdown(&timings, &builds)
    );
    for (name, text) in [
        ("report.md", format!("{head}\n## Table\n\n{md}\n{time}")),
        ("table.md", md.clone()),
        ("table.tex", tables::latex(&table)),
        ("table.csv", tables::csv(&table)?),
        ("runtime.tex", timing::runtime_latex(&runtime)),
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
    // What the table was made from, beside the page (a report folder copied off a cluster keeps
    // its links): each run's rows, plan (provenance) and oracle.
    for (i, run_dir) in runs.iter().enumerate() {
        for name in ["results.csv", "plan.json", "oracle.json"] {
            let src = run_dir.join(name);
            if !src.is_file() {
                continue;
            }
            let dst = match runs.len() {
                1 => dir.join(name),
                _ => dir.join(format!("run{}-{name}", i + 1)),
            };
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading '{}'", src.display()))?;
            write_file_atomic(&dst, &bytes)?;
            files.push(dst);
        }
    }
    let data = files.clone();
    let mut images = plots::pareto_plots(&dir, &summaries, &infos, &extras.paired)?;
    images.extend(plots::subject_bars(&dir, &subjects, &infos)?);
    images.extend(grids::image_grids(
        first_run,
        &dir.join("grids"),
        &rows,
        &infos,
    )?);
    // The results explorer: every image, linked from the page (issue 27).
    let explorer = explore::write_explorer(&explore::Explorer {
        dir: &dir,
        title: head
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("# Report of "),
        runs,
        rows: &rows,
        infos: &infos,
        summaries: &summaries,
    })?;
    let labels: Vec<(String, String)> = infos
        .iter()
        .map(|i| (i.name.clone(), i.label.clone()))
        .collect();
    let page = html::page(&html::Page {
        dir: &dir,
        head: &head,
        table: &md,
        timing: &time,
        images: &images,
        data: &data,
        methods: &labels,
    });
    files.extend(images);
    files.extend(explorer);
    write_file_atomic(&dir.join("index.html"), page.as_bytes())?;
    files.push(dir.join("index.html"));
    Ok(ReportOutput {
        dir,
        header: head,
        table_markdown: md,
        table,
        files,
    })
}

/// The front page's header: the oracle gate's warning right under the title, the first run's
/// provenance and jobs, then each further run's (title demoted), then the gate's line.
fn compose_header(heads: &[String], gate: &gate::Gate) -> String {
    let mut out = String::new();
    for (k, h) in heads.iter().enumerate() {
        let (title, rest) = h.split_once('\n').unwrap_or((h.as_str(), ""));
        if k == 0 {
            out.push_str(title);
            out.push('\n');
            if let gate::Gate::Fail(message) = gate {
                out.push_str(&format!("\n> **Warning (oracle gate):** {message}\n"));
            }
        } else {
            out.push_str(&format!(
                "\n## Also in this table: {}\n",
                title.trim_start_matches("# Report of ")
            ));
        }
        out.push_str(rest);
    }
    let line = match gate {
        gate::Gate::Pass => format!(
            "- Oracle gate: passed (DINO and CLIP-I within {} of the paper's {} and {})",
            gate::TOLERANCE,
            gate::PAPER_ORACLE.0,
            gate::PAPER_ORACLE.1
        ),
        gate::Gate::NotApplicable(why) => format!("- Oracle gate: not applied ({why})"),
        gate::Gate::Fail(_) => "- Oracle gate: FAILED (see the warning above)".into(),
    };
    out.push_str(&line);
    out.push('\n');
    out
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
        let builtin = [("dino", s.dino), ("clip_i", s.clip_i), ("clip_t", s.clip_t)];
        let extra = s.extra.iter().map(|(k, st)| (k.as_str(), *st));
        for (m, st) in builtin.into_iter().chain(extra) {
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
    let extras: std::collections::BTreeSet<&String> =
        subjects.iter().flat_map(|s| s.extra.keys()).collect();
    let mut header: Vec<&str> = vec!["method", "subject", "dino", "clip_i", "clip_t"];
    header.extend(extras.iter().map(|k| k.as_str()));
    w.write_record(&header)?;
    for s in subjects {
        let mut record = vec![
            s.method.clone(),
            s.subject.clone(),
            format!("{:.6}", s.dino),
            format!("{:.6}", s.clip_i),
            format!("{:.6}", s.clip_t),
        ];
        record.extend(extras.iter().map(|k| match s.extra.get(*k) {
            Some(v) if !v.is_nan() => format!("{v:.6}"),
            _ => String::new(),
        }));
        w.write_record(&record)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

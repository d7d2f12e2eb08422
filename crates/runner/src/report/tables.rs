//! Table 1 / Table 2 layouts (the paper's): one row per method, guided rows with their change
//! against the unguided baseline they build on; Markdown, LaTeX and CSV.

use super::aggregate::MethodSummary;
use super::rows::OracleRow;
use std::fmt::Write;

/// How a method is shown in tables and plots.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    pub name: String,
    pub label: String,
    pub baseline: String,
    pub guided: bool,
}

/// The label of a baseline as the paper writes it.
pub fn baseline_label(baseline: &str) -> &str {
    match baseline {
        "stable-diffusion" => "Stable Diffusion",
        "textual-inversion" => "Textual Inversion",
        "dreambooth" => "DreamBooth",
        "blip-diffusion" => "BLIP-Diffusion",
        other => other,
    }
}

/// One table line: scores, and for guided methods the change against their baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    pub label: String,
    pub images: Option<usize>,
    pub scores: [f64; 3],
    pub delta: Option<[f64; 3]>,
    /// The CLIP-T cell is empty for the oracle (real images have no prompt).
    pub has_clip_t: bool,
}

/// Builds the table: the oracle first (if given), then methods in the experiment's order.
/// A guided method is compared with the first unguided method of the same baseline.
pub fn method_table(
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    oracle: Option<&OracleRow>,
) -> Vec<TableRow> {
    let mut rows = Vec::new();
    if let Some(o) = oracle {
        rows.push(TableRow {
            label: "Real Images (Oracle)".into(),
            images: None,
            scores: [o.dino, o.clip_i, f64::NAN],
            delta: None,
            has_clip_t: false,
        });
    }
    for s in summaries {
        let label = infos
            .iter()
            .find(|i| i.name == s.method)
            .map(|i| i.label.clone())
            .unwrap_or_else(|| s.method.clone());
        let scores = [s.dino.mean, s.clip_i.mean, s.clip_t.mean];
        let delta = s
            .guided
            .then(|| {
                summaries
                    .iter()
                    .find(|b| !b.guided && b.baseline == s.baseline)
            })
            .flatten()
            .map(|b| {
                [
                    scores[0] - b.dino.mean,
                    scores[1] - b.clip_i.mean,
                    scores[2] - b.clip_t.mean,
                ]
            });
        rows.push(TableRow {
            label,
            images: Some(s.images),
            scores,
            delta,
            has_clip_t: true,
        });
    }
    rows
}

fn cell(v: f64, delta: Option<f64>, signed: impl Fn(f64) -> String) -> String {
    match delta {
        Some(d) => format!("{v:.3} ({})", signed(d)),
        None => format!("{v:.3}"),
    }
}

/// GitHub Markdown.
pub fn markdown(rows: &[TableRow]) -> String {
    let mut s = String::from(
        "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | images |\n|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let c = |k: usize| {
            if k == 2 && !r.has_clip_t {
                "–".to_string()
            } else {
                cell(r.scores[k], r.delta.map(|d| d[k]), |d| format!("{d:+.3}"))
            }
        };
        let n = r
            .images
            .map(|n| n.to_string())
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.label,
            c(0),
            c(1),
            c(2),
            n
        );
    }
    s
}

fn latex_escape(text: &str) -> String {
    text.replace('\\', "\\textbackslash{}")
        .replace('&', "\\&")
        .replace('%', "\\%")
        .replace('_', "\\_")
        .replace('#', "\\#")
}

/// A LaTeX `tabular` (booktabs), deltas in small type as the paper prints them.
pub fn latex(rows: &[TableRow]) -> String {
    let mut s = String::from("\\begin{tabular}{lccc}\n\\toprule\nMethod & DINO $\\uparrow$ & CLIP-I $\\uparrow$ & CLIP-T $\\uparrow$ \\\\\n\\midrule\n");
    for r in rows {
        let c = |k: usize| {
            if k == 2 && !r.has_clip_t {
                "--".to_string()
            } else {
                cell(r.scores[k], r.delta.map(|d| d[k]), |d| {
                    format!("{{\\scriptsize ${d:+.3}$}}")
                })
            }
        };
        let _ = writeln!(
            s,
            "{} & {} & {} & {} \\\\",
            latex_escape(&r.label),
            c(0),
            c(1),
            c(2)
        );
    }
    s.push_str("\\bottomrule\n\\end{tabular}\n");
    s
}

/// CSV with full precision: method, scores, deltas (empty where not applicable).
pub fn csv(rows: &[TableRow]) -> anyhow::Result<String> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    w.write_record([
        "method",
        "images",
        "dino",
        "clip_i",
        "clip_t",
        "delta_dino",
        "delta_clip_i",
        "delta_clip_t",
    ])?;
    for r in rows {
        let f = |v: f64| {
            if v.is_nan() {
                String::new()
            } else {
                format!("{v:.6}")
            }
        };
        let d = |k: usize| r.delta.map(|d| format!("{:.6}", d[k])).unwrap_or_default();
        w.write_record([
            r.label.clone(),
            r.images.map(|n| n.to_string()).unwrap_or_default(),
            f(r.scores[0]),
            f(r.scores[1]),
            f(r.scores[2]),
            d(0),
            d(1),
            d(2),
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

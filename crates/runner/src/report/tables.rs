//! Table 1 / Table 2 layouts (the paper's): one row per method, guided rows with their change
//! against the unguided baseline they build on; Markdown, LaTeX and CSV.

use super::aggregate::MethodSummary;
use super::paired::{Comparison, PairedDelta};
use super::rows::OracleRow;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How a method is shown in tables and plots.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    pub name: String,
    pub label: String,
    pub baseline: String,
    pub guided: bool,
    /// The method it is compared with, when not the usual one (see
    /// [`crate::experiment::MethodSpec::compare_to`]).
    pub compare_to: Option<String>,
}

/// The label of a baseline as the paper writes it.
pub fn baseline_label(baseline: &str) -> &str {
    match baseline {
        "stable-diffusion" => "Stable Diffusion",
        "textual-inversion" => "Textual Inversion",
        "dreambooth" => "DreamBooth",
        "blip-diffusion" => "BLIP-Diffusion",
        "ip-adapter" => "IP-Adapter",
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
    /// The jobs the method's run planned, when it scored fewer (a partial `pnd eval`).
    pub expected: Option<usize>,
    /// Images that may copy the input (see [`super::paired::possible_copies`]); `None` unknown.
    pub copies: Option<usize>,
    /// For a guided method: its baseline's label and the paired differences (DINO, CLIP-I,
    /// CLIP-T) on their matched jobs.
    pub paired: Option<(String, [PairedDelta; 3])>,
    /// The profile's extra scores by name (DreamBench++'s `dinov2`), each one more column after
    /// CLIP-T; empty without any.
    pub extra: BTreeMap<String, f64>,
    /// For a compared method: the change of each extra score its baseline also has.
    pub extra_delta: BTreeMap<String, f64>,
    /// For a compared method: the paired differences of the extra scores.
    pub paired_extra: BTreeMap<String, PairedDelta>,
}

/// The extra scores' names of a table's lines (its extra columns), sorted.
pub fn extra_columns<'a>(rows: impl IntoIterator<Item = &'a TableRow>) -> Vec<String> {
    rows.into_iter()
        .flat_map(|r| r.extra.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// What the table adds to the means, by method name: planned jobs, possible copies, paired
/// comparisons.
#[derive(Debug, Clone, Default)]
pub struct TableExtras {
    pub expected: BTreeMap<String, usize>,
    pub copies: BTreeMap<String, usize>,
    pub paired: Vec<Comparison>,
}

/// The method a method is compared with: the one its `compare_to` names (when it has rows),
/// else for a guided method the first unguided method of the same baseline.
pub fn baseline_of<'a>(
    summaries: &'a [MethodSummary],
    infos: &[MethodInfo],
    guided: &MethodSummary,
) -> Option<&'a MethodSummary> {
    let named = infos
        .iter()
        .find(|i| i.name == guided.method)
        .and_then(|i| i.compare_to.as_ref());
    if let Some(target) = named {
        return summaries
            .iter()
            .find(|b| &b.method == target && b.method != guided.method);
    }
    if !guided.guided {
        return None;
    }
    summaries
        .iter()
        .find(|b| !b.guided && b.baseline == guided.baseline)
}

/// Builds the table: the oracle first (if given), then methods in the experiment's order.
/// A guided method is compared with the first unguided method of the same baseline.
pub fn method_table(
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    oracle: Option<&OracleRow>,
    extras: &TableExtras,
) -> Vec<TableRow> {
    let label_of = |name: &str| {
        infos
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.label.clone())
            .unwrap_or_else(|| name.to_string())
    };
    let mut rows = Vec::new();
    if let Some(o) = oracle {
        rows.push(TableRow {
            label: "Real Images (Oracle)".into(),
            images: None,
            scores: [o.dino, o.clip_i, f64::NAN],
            delta: None,
            has_clip_t: false,
            expected: None,
            copies: None,
            paired: None,
            extra: o.extra.clone(),
            extra_delta: BTreeMap::new(),
            paired_extra: BTreeMap::new(),
        });
    }
    for s in summaries {
        let label = label_of(&s.method);
        let scores = [s.dino.mean, s.clip_i.mean, s.clip_t.mean];
        let base = baseline_of(summaries, infos, s);
        let comparison = base.and_then(|b| {
            extras
                .paired
                .iter()
                .find(|c| c.guided == s.method && c.baseline == b.method)
        });
        let paired = base
            .zip(comparison)
            .map(|(b, c)| (label_of(&b.method), c.metrics));
        let extra: BTreeMap<String, f64> =
            s.extra.iter().map(|(k, st)| (k.clone(), st.mean)).collect();
        let extra_delta = base
            .map(|b| {
                extra
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v - b.extra.get(k)?.mean)))
                    .collect()
            })
            .unwrap_or_default();
        let delta = base.map(|b| {
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
            expected: extras
                .expected
                .get(&s.method)
                .copied()
                .filter(|&n| n > s.images),
            copies: extras.copies.get(&s.method).copied(),
            paired,
            extra,
            extra_delta,
            paired_extra: comparison.map(|c| c.extra.clone()).unwrap_or_default(),
        });
    }
    rows
}

/// The images cell: the count, and the coverage when the run planned more.
pub fn images_cell(r: &TableRow) -> String {
    match (r.images, r.expected) {
        (Some(n), Some(e)) => format!("{n} of {e} ({:.0}%)", 100.0 * n as f64 / e as f64),
        (Some(n), None) => n.to_string(),
        (None, _) => "–".into(),
    }
}

fn paired_cell(p: &PairedDelta) -> String {
    format!(
        "{:+.3} [{:+.3}, {:+.3}], p {}",
        p.delta,
        p.ci_low,
        p.ci_high,
        p_text(p.p_value)
    )
}

/// A p-value to three decimals; below 0.001 as "< 0.001".
fn p_text(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// The cell of extra score `name` (with its change, when the line has one); `None` when the line
/// lacks the score.
fn extra_cell(r: &TableRow, name: &str, signed: impl Fn(f64) -> String) -> Option<String> {
    let v = r.extra.get(name).filter(|v| !v.is_nan())?;
    Some(cell(*v, r.extra_delta.get(name).copied(), signed))
}

fn cell(v: f64, delta: Option<f64>, signed: impl Fn(f64) -> String) -> String {
    match delta {
        Some(d) => format!("{v:.3} ({})", signed(d)),
        None => format!("{v:.3}"),
    }
}

/// GitHub Markdown: the table, then the paired differences of the guided methods.
pub fn markdown(rows: &[TableRow]) -> String {
    let names = extra_columns(rows);
    let head: String = names.iter().map(|n| format!(" {n} ↑ |")).collect();
    let rule = "---:|".repeat(names.len());
    let mut s = format!(
        "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |{head} images | possible copies |\n|---|---:|---:|---:|{rule}---:|---:|\n",
    );
    for r in rows {
        let c = |k: usize| {
            if k == 2 && !r.has_clip_t {
                "–".to_string()
            } else {
                cell(r.scores[k], r.delta.map(|d| d[k]), |d| format!("{d:+.3}"))
            }
        };
        let copies = r
            .copies
            .map(|n| n.to_string())
            .unwrap_or_else(|| "–".into());
        let more: String = names
            .iter()
            .map(|n| {
                let v = extra_cell(r, n, |d| format!("{d:+.3}")).unwrap_or_else(|| "–".into());
                format!(" {v} |")
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |{more} {} | {copies} |",
            r.label,
            c(0),
            c(1),
            c(2),
            images_cell(r)
        );
    }
    let paired: Vec<_> = rows
        .iter()
        .filter_map(|r| r.paired.as_ref().map(|p| (r, p)))
        .collect();
    if !paired.is_empty() {
        let names = extra_columns(paired.iter().map(|(r, _)| *r));
        let head: String = names.iter().map(|n| format!(" Δ{n} |")).collect();
        let rule = "---:|".repeat(names.len());
        let _ = write!(
            s,
            "\nPaired differences against the baseline on matched (subject, prompt, seed): mean [95% bootstrap interval], permutation p.\n\n| Method | vs | pairs | ΔDINO | ΔCLIP-I | ΔCLIP-T |{head}\n|---|---|---:|---:|---:|---:|{rule}\n",
        );
        for (r, (base, m)) in paired {
            let more: String = names
                .iter()
                .map(|n| {
                    let v = r
                        .paired_extra
                        .get(n)
                        .map(paired_cell)
                        .unwrap_or_else(|| "–".into());
                    format!(" {v} |")
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {base} | {} | {} | {} | {} |{more}",
                r.label,
                m[0].pairs,
                paired_cell(&m[0]),
                paired_cell(&m[1]),
                paired_cell(&m[2])
            );
        }
    }
    s
}

pub(super) fn latex_escape(text: &str) -> String {
    text.replace('\\', "\\textbackslash{}")
        .replace('&', "\\&")
        .replace('%', "\\%")
        .replace('_', "\\_")
        .replace('#', "\\#")
}

/// A LaTeX `tabular` (booktabs), deltas in small type as the paper prints them.
pub fn latex(rows: &[TableRow]) -> String {
    let names = extra_columns(rows);
    let cols = "c".repeat(names.len());
    let head: String = names
        .iter()
        .map(|n| format!(" & {} $\\uparrow$", latex_escape(n)))
        .collect();
    let mut s = format!("\\begin{{tabular}}{{lccc{cols}}}\n\\toprule\nMethod & DINO $\\uparrow$ & CLIP-I $\\uparrow$ & CLIP-T $\\uparrow${head} \\\\\n\\midrule\n");
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
        let more: String = names
            .iter()
            .map(|n| {
                let v = extra_cell(r, n, |d| format!("{{\\scriptsize ${d:+.3}$}}"))
                    .unwrap_or_else(|| "--".into());
                format!(" & {v}")
            })
            .collect();
        let _ = writeln!(
            s,
            "{} & {} & {} & {}{more} \\\\",
            latex_escape(&r.label),
            c(0),
            c(1),
            c(2)
        );
    }
    s.push_str("\\bottomrule\n\\end{tabular}\n");
    s
}

/// CSV with full precision: method, scores, deltas, then the planned jobs, the possible copies
/// and the paired statistics (empty where not applicable).
pub fn csv(rows: &[TableRow]) -> anyhow::Result<String> {
    let names = extra_columns(rows);
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = ["method", "images", "dino", "clip_i", "clip_t"]
        .map(String::from)
        .to_vec();
    header.extend(names.iter().cloned());
    header.extend(["delta_dino", "delta_clip_i", "delta_clip_t"].map(String::from));
    header.extend(names.iter().map(|n| format!("delta_{n}")));
    header.extend(["expected", "possible_copies", "pairs"].map(String::from));
    for m in super::aggregate::METRICS
        .iter()
        .copied()
        .chain(names.iter().map(String::as_str))
    {
        for k in [
            "paired_delta",
            "paired_ci95_low",
            "paired_ci95_high",
            "paired_p",
        ] {
            header.push(format!("{k}_{m}"));
        }
    }
    w.write_record(&header)?;
    for r in rows {
        let f = |v: f64| {
            if v.is_nan() {
                String::new()
            } else {
                format!("{v:.6}")
            }
        };
        let d = |k: usize| r.delta.map(|d| format!("{:.6}", d[k])).unwrap_or_default();
        let n = |v: Option<usize>| v.map(|n| n.to_string()).unwrap_or_default();
        let mut record = vec![
            r.label.clone(),
            n(r.images),
            f(r.scores[0]),
            f(r.scores[1]),
            f(r.scores[2]),
        ];
        record.extend(
            names
                .iter()
                .map(|k| r.extra.get(k).map(|&v| f(v)).unwrap_or_default()),
        );
        record.extend([d(0), d(1), d(2)]);
        record.extend(names.iter().map(|k| {
            r.extra_delta
                .get(k)
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default()
        }));
        record.extend([
            n(r.expected.or(r.images)),
            n(r.copies),
            n(r.paired.as_ref().map(|(_, m)| m[0].pairs)),
        ]);
        let four = |p: Option<&PairedDelta>| match p {
            Some(p) => [p.delta, p.ci_low, p.ci_high, p.p_value]
                .map(|v| format!("{v:.6}"))
                .to_vec(),
            None => vec![String::new(); 4],
        };
        for k in 0..3 {
            record.extend(four(r.paired.as_ref().map(|(_, m)| &m[k])));
        }
        for k in &names {
            record.extend(four(r.paired_extra.get(k)));
        }
        w.write_record(&record)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

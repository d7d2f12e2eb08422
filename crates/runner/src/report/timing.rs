//! Where the time went: per method, the device and precision its images were made on, and the
//! mean seconds per image of the whole generation and of each phase the rows record (inversion,
//! palette, layout template, sampling with its guidance passes, decoding, scoring); and the
//! runtime table (the paper's Table 3) built from the same means. A batch's time is shared
//! equally by its images. The timings are the run folder's `timings/` files (see
//! [`super::rows::Timing`]), which the report attaches to the rows it reads.

use super::aggregate::MethodSummary;
use super::rows::ImageRow;
use super::tables::{baseline_of, latex_escape, MethodInfo};
use std::collections::BTreeSet;
use std::fmt::Write;

/// The paper's Table 3 (Lv et al., ACM MM 2024; SPEC §10): seconds per image on an RTX 4090,
/// Stable Diffusion without and with Pick-and-Draw.
pub const PAPER_TABLE3: [(&str, f64); 2] = [
    ("Stable Diffusion", 7.9),
    ("Stable Diffusion + Pick-and-Draw", 28.9),
];

/// Mean of the recorded values; `None` when no row recorded it.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn cell(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into())
}

/// One method's timings: where its images were made and the mean seconds per image of the whole
/// generation and of each phase.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodTiming {
    pub method: String,
    pub label: String,
    /// The devices (and precisions) of its rows, comma-separated; `–` when none was recorded.
    pub devices: String,
    pub dtypes: String,
    pub images: usize,
    /// The whole generation (guidance, amortized work and decoding included), over the images
    /// generated here (not another program's).
    pub generation: Option<f64>,
    pub inversion: Option<f64>,
    pub palette: Option<f64>,
    pub template: Option<f64>,
    pub sampling: Option<f64>,
    pub decode: Option<f64>,
    pub scoring: Option<f64>,
    /// The generation without the amortized work (inversion, palette, template): what each
    /// image costs once the shared work is done.
    pub per_image: Option<f64>,
    /// The null-text inversion and its palette, shared by a subject's images, amortized.
    pub amortized_inversion: Option<f64>,
}

/// The timings of each method of `infos` with rows, in `infos`' order.
pub fn method_timings(rows: &[ImageRow], infos: &[MethodInfo]) -> Vec<MethodTiming> {
    let mut out = Vec::new();
    for info in infos {
        let mine: Vec<&ImageRow> = rows.iter().filter(|r| r.method == info.name).collect();
        if mine.is_empty() {
            continue;
        }
        let set = |f: fn(&ImageRow) -> &str| {
            let v: BTreeSet<&str> = mine
                .iter()
                .map(|r| f(r))
                .filter(|x| !x.is_empty())
                .collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                v.into_iter().collect::<Vec<_>>().join(", ")
            }
        };
        // Another program's images: their generation was not timed here.
        let generated: Vec<&ImageRow> = mine
            .iter()
            .copied()
            .filter(|r| r.device != "external")
            .collect();
        let m = |f: fn(&ImageRow) -> Option<f64>| mean(mine.iter().map(|r| f(r)));
        let shared = |r: &ImageRow| {
            let t = &r.timing;
            [t.inversion_s, t.palette_s, t.template_s]
                .into_iter()
                .flatten()
                .sum::<f64>()
        };
        let inversion_and_palette = |r: &ImageRow| -> Option<f64> {
            match (r.timing.inversion_s, r.timing.palette_s) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            }
        };
        out.push(MethodTiming {
            method: info.name.clone(),
            label: info.label.clone(),
            devices: set(|r| r.device.as_str()),
            dtypes: set(|r| r.dtype.as_str()),
            images: mine.len(),
            generation: mean(generated.iter().map(|r| Some(r.timing.seconds))),
            inversion: m(|r| r.timing.inversion_s),
            palette: m(|r| r.timing.palette_s),
            template: m(|r| r.timing.template_s),
            sampling: m(|r| r.timing.sampling_s),
            decode: m(|r| r.timing.decode_s),
            scoring: m(|r| r.timing.scoring_s),
            per_image: mean(
                generated
                    .iter()
                    .map(|r| Some((r.timing.seconds - shared(r)).max(0.0))),
            ),
            amortized_inversion: mean(generated.iter().map(|r| inversion_and_palette(r))),
        });
    }
    out
}

/// The Markdown section "Where the time went": the builds when the runs had several, then one
/// line per method with rows.
pub fn markdown(timings: &[MethodTiming], builds: &[String]) -> String {
    let mut s = String::from("## Where the time went\n\n");
    // One build is in the header already; several (runs of other builds in one table) are
    // listed here, since their times are not comparable.
    if builds.len() > 1 {
        for b in builds {
            let _ = writeln!(s, "- Build: {b}");
        }
    }
    s.push_str(
        "\nSeconds per image, mean over the method's images (a batch's time shared by its images); – where a phase did not run or was not recorded. Generation is the whole of it (guidance included); sampling includes the guidance passes.\n\n| Method | device | dtype | images | generation | inversion | palette | template | sampling | decoding | scoring |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in timings {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label,
            t.devices,
            t.dtypes,
            t.images,
            cell(t.generation),
            cell(t.inversion),
            cell(t.palette),
            cell(t.template),
            cell(t.sampling),
            cell(t.decode),
            cell(t.scoring),
        );
    }
    s
}

/// One line of the runtime table.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeRow {
    pub label: String,
    pub devices: String,
    pub dtypes: String,
    pub images: Option<usize>,
    /// Seconds per image without the amortized work.
    pub generation: Option<f64>,
    pub inversion: Option<f64>,
    pub template: Option<f64>,
    /// The whole generation per image.
    pub total: Option<f64>,
    /// `generation` against the method's baseline's (the method it is compared with).
    pub ratio: Option<f64>,
    /// A line of the paper's Table 3, not measured here.
    pub paper: bool,
}

/// The runtime table (Table 3): each method's lines of [`method_timings`], then the paper's
/// RTX 4090 lines. A method is set against its baseline as the score table does
/// ([`baseline_of`]).
pub fn runtime_rows(
    timings: &[MethodTiming],
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
) -> Vec<RuntimeRow> {
    let mut rows: Vec<RuntimeRow> = timings
        .iter()
        .map(|t| {
            let base = summaries
                .iter()
                .find(|s| s.method == t.method)
                .and_then(|s| baseline_of(summaries, infos, s))
                .and_then(|b| timings.iter().find(|x| x.method == b.method));
            let ratio = match (t.per_image, base.and_then(|b| b.per_image)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            RuntimeRow {
                label: t.label.clone(),
                devices: t.devices.clone(),
                dtypes: t.dtypes.clone(),
                images: Some(t.images),
                generation: t.per_image,
                inversion: t.amortized_inversion,
                template: t.generation.and(t.template),
                total: t.generation,
                ratio,
                paper: false,
            }
        })
        .collect();
    let (sd, pnd) = (PAPER_TABLE3[0].1, PAPER_TABLE3[1].1);
    for (label, secs) in PAPER_TABLE3 {
        rows.push(RuntimeRow {
            label: format!("Paper (Table 3): {label}"),
            devices: "RTX 4090 (paper)".into(),
            dtypes: "–".into(),
            images: None,
            generation: Some(secs),
            inversion: None,
            template: None,
            total: None,
            ratio: (secs == pnd).then_some(pnd / sd),
            paper: true,
        });
    }
    rows
}

fn ratio_cell(r: Option<f64>, dash: &str) -> String {
    r.map(|x| format!("{x:.1}×")).unwrap_or_else(|| dash.into())
}

/// The paper's figures in one decimal, as it prints them; ours in two.
fn seconds(r: &RuntimeRow, v: Option<f64>, dash: &str) -> String {
    match v {
        Some(s) if r.paper => format!("{s:.1}"),
        Some(s) => format!("{s:.2}"),
        None => dash.into(),
    }
}

/// The Markdown section "Runtime (Table 3)".
pub fn runtime_markdown(rows: &[RuntimeRow]) -> String {
    let mut s = String::from(
        "## Runtime (Table 3)\n\nSeconds per image, mean over each method's images, on this run's device and precision. **generation**: sampling (the guidance passes included) and decoding; the work shared by several images is shown apart, amortized over the images that share it: **inversion** (the reference's null-text inversion and palette, once per subject) and **template** (the layout template, once per base model, prompt and seed); **total** is all of it. **×**: generation against the method's baseline. The rows marked **Paper (Table 3)** are the paper's RTX 4090 figures (one figure per image, shown under generation), not measured here.\n\n| Method | device | dtype | images | generation | inversion (amortized) | template (amortized) | total | × |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.devices,
            r.dtypes,
            r.images.map_or("–".into(), |n| n.to_string()),
            seconds(r, r.generation, "–"),
            seconds(r, r.inversion, "–"),
            seconds(r, r.template, "–"),
            seconds(r, r.total, "–"),
            ratio_cell(r.ratio, "–"),
        );
    }
    s
}

/// The runtime table as a LaTeX `tabular` (booktabs), the paper's lines in their own block.
pub fn runtime_latex(rows: &[RuntimeRow]) -> String {
    let mut s = String::from(
        "% Seconds per image (pnd report). Generation: sampling with the guidance passes, and decoding;\n% inversion (and palette) and layout template amortized over the images that share them.\n\\begin{tabular}{lllrrrrrr}\n\\toprule\nMethod & Device & dtype & Images & Generation (s) & Inversion (s) & Template (s) & Total (s) & $\\times$ \\\\\n\\midrule\n",
    );
    let mut paper_started = false;
    for r in rows {
        if r.paper && !paper_started {
            paper_started = true;
            s.push_str("\\midrule\n\\multicolumn{9}{l}{\\emph{Paper (Table 3), RTX 4090}} \\\\\n");
        }
        let label = r
            .label
            .strip_prefix("Paper (Table 3): ")
            .unwrap_or(&r.label);
        let _ = writeln!(
            s,
            "{} & {} & {} & {} & {} & {} & {} & {} & {} \\\\",
            latex_escape(label),
            latex_escape(&r.devices.replace(" (paper)", "")).replace('–', "--"),
            latex_escape(&r.dtypes).replace('–', "--"),
            r.images.map_or("--".into(), |n| n.to_string()),
            seconds(r, r.generation, "--"),
            seconds(r, r.inversion, "--"),
            seconds(r, r.template, "--"),
            seconds(r, r.total, "--"),
            ratio_cell(r.ratio, "--").replace('×', "$\\times$"),
        );
    }
    s.push_str("\\bottomrule\n\\end{tabular}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::rows::Timing;

    fn row(method: &str, seconds: f64, inversion: Option<f64>, template: Option<f64>) -> ImageRow {
        ImageRow {
            id: format!("{method}__dog__p00__s0"),
            method: method.into(),
            baseline: "stable-diffusion".into(),
            guided: method.ends_with("pnd"),
            subject: "dog".into(),
            prompt_index: 0,
            seed: 0,
            prompt: "a dog".into(),
            clip_t_prompt: "a dog".into(),
            image: String::new(),
            reference: String::new(),
            dino: 0.5,
            clip_i: 0.5,
            clip_t: 0.3,
            extra: Default::default(),
            device: "cpu".into(),
            dtype: "f32".into(),
            dino_max: None,
            timing: Timing {
                seconds,
                inversion_s: inversion,
                palette_s: inversion.map(|_| 0.5),
                template_s: template,
                sampling_s: Some(1.0),
                decode_s: Some(0.25),
                scoring_s: Some(0.1),
            },
        }
    }

    fn info(name: &str, label: &str, guided: bool) -> MethodInfo {
        MethodInfo {
            name: name.into(),
            label: label.into(),
            baseline: "stable-diffusion".into(),
            guided,
            compare_to: None,
        }
    }

    fn summary(method: &str, guided: bool) -> MethodSummary {
        let stat = super::super::aggregate::Stat {
            mean: 0.0,
            std: 0.0,
            ci_low: 0.0,
            ci_high: 0.0,
        };
        MethodSummary {
            method: method.into(),
            baseline: "stable-diffusion".into(),
            guided,
            images: 2,
            dino: stat,
            clip_i: stat,
            clip_t: stat,
            extra: Default::default(),
        }
    }

    /// Amortized work is taken out of the per-image generation and shown apart; the guided
    /// method's ratio is against its baseline; the paper's lines follow, marked as such.
    #[test]
    fn runtime_table_by_hand() {
        // sd: 2 s and 4 s; sd+pnd: 10 s with 3.5 s of inversion+palette and 1 s of template, and
        // 7 s with none (a cache hit recorded as 0 s).
        let rows = vec![
            row("sd", 2.0, None, None),
            row("sd", 4.0, None, None),
            row("sd+pnd", 10.0, Some(3.0), Some(1.0)),
            row("sd+pnd", 7.0, Some(0.0), Some(0.0)),
        ];
        let infos = vec![
            info("sd", "Stable Diffusion", false),
            info("sd+pnd", "Stable Diffusion + Pick-and-Draw", true),
        ];
        let timings = method_timings(&rows, &infos);
        let summaries = vec![summary("sd", false), summary("sd+pnd", true)];
        let table = runtime_rows(&timings, &summaries, &infos);
        assert_eq!(table.len(), 4);
        let (sd, pnd) = (&table[0], &table[1]);
        assert_eq!(
            (sd.generation, sd.total, sd.ratio),
            (Some(3.0), Some(3.0), None)
        );
        assert_eq!((sd.inversion, sd.template), (None, None));
        // Per image: (10 − 3 − 0.5 − 1) = 5.5 and (7 − 0 − 0.5 − 0) = 6.5 → 6.0.
        assert_eq!(pnd.generation, Some(6.0));
        assert_eq!(pnd.inversion, Some((3.5 + 0.5) / 2.0));
        assert_eq!(pnd.template, Some(0.5));
        assert_eq!(pnd.total, Some(8.5));
        assert_eq!(pnd.ratio, Some(2.0));
        assert!(table[2].paper && table[3].paper);
        assert_eq!(table[3].generation, Some(28.9));
        let md = runtime_markdown(&table);
        assert!(md.starts_with("## Runtime (Table 3)"), "{md}");
        assert!(
            md.contains("| Stable Diffusion + Pick-and-Draw | cpu | f32 | 2 | 6.00 | 2.00 | 0.50 | 8.50 | 2.0× |"),
            "{md}"
        );
        assert!(
            md.contains("| Paper (Table 3): Stable Diffusion + Pick-and-Draw | RTX 4090 (paper) | – | – | 28.9 | – | – | – | 3.7× |"),
            "{md}"
        );
        let tex = runtime_latex(&table);
        assert!(
            tex.contains("\\multicolumn{9}{l}{\\emph{Paper (Table 3), RTX 4090}}"),
            "{tex}"
        );
        assert!(
            tex.contains("Stable Diffusion + Pick-and-Draw & RTX 4090 & -- & -- & 28.9 & -- & -- & -- & 3.7$\\times$ \\\\"),
            "{tex}"
        );
        assert!(
            tex.contains("Stable Diffusion & cpu & f32 & 2 & 3.00 & -- & -- & 3.00 & -- \\\\"),
            "{tex}"
        );
        assert_eq!(tex.matches("\\\\\n").count(), 1 + 4 + 1, "{tex}");
    }
}

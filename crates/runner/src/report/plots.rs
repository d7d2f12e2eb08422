//! Figures with plotters, each as PNG and SVG: Pareto plots (DINO vs CLIP-T, CLIP-I vs CLIP-T)
//! with the 95% bootstrap interval of each mean as error bars and an arrow from each baseline to
//! its guided version, and per-subject bars (the paper's Fig. 5).

use super::aggregate::{MethodSummary, SubjectSummary};
use super::paired::Comparison;
use super::tables::MethodInfo;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

pub(super) const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// The bundled DejaVu Sans, so text renders the same on machines without system fonts.
pub(super) fn register_font() {
    REGISTER.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_err() {
            panic!("the bundled DejaVu Sans font does not parse");
        }
    });
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Color of a method: one hue per baseline; guided methods drawn filled, unguided hollow.
fn baseline_color(baseline: &str, infos: &[MethodInfo]) -> RGBColor {
    let mut seen: Vec<&str> = Vec::new();
    for i in infos {
        if !seen.contains(&i.baseline.as_str()) {
            seen.push(&i.baseline);
        }
    }
    let k = seen.iter().position(|b| *b == baseline).unwrap_or(0);
    PALETTE[k % PALETTE.len()]
}

fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.15).max(0.01);
    (lo - pad)..(hi + pad)
}

fn draw_pareto<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
    y_metric: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let y_stat = |s: &MethodSummary| if y_metric == "dino" { s.dino } else { s.clip_i };
    let y_of = |s: &MethodSummary| y_stat(s).mean;
    let y_name = if y_metric == "dino" { "DINO" } else { "CLIP-I" };
    // The axes hold the 95% bootstrap intervals drawn as error bars around each mean.
    let xr = padded_range(
        summaries
            .iter()
            .flat_map(|s| [s.clip_t.mean, s.clip_t.ci_low, s.clip_t.ci_high]),
    );
    let yr = padded_range(summaries.iter().flat_map(|s| {
        let st = y_stat(s);
        [st.mean, st.ci_low, st.ci_high]
    }));
    let (xspan, yspan) = (xr.end - xr.start, yr.end - yr.start);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{y_name} vs CLIP-T"), (FONT, 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(xr, yr)?;
    chart
        .configure_mesh()
        .x_desc("CLIP-T (text alignment)")
        .y_desc(format!("{y_name} (subject fidelity)"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    // Arrows: baseline -> guided (or the method a `compare_to` names -> the method).
    for g in summaries {
        let Some(b) = super::tables::baseline_of(summaries, infos, g) else {
            continue;
        };
        let color = baseline_color(&g.baseline, infos);
        let (x0, y0, x1, y1) = (b.clip_t.mean, y_of(b), g.clip_t.mean, y_of(g));
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x0, y0), (x1, y1)],
            color.stroke_width(2),
        )))?;
        // Arrowhead in normalized axis units so it looks the same at any scale.
        let (dx, dy) = ((x1 - x0) / xspan, (y1 - y0) / yspan);
        let len = (dx * dx + dy * dy).sqrt();
        if len > 1e-9 {
            let (ux, uy) = (dx / len, dy / len);
            let (h, w) = (0.035, 0.018);
            let p = |a: f64, b: f64| (x1 + a * xspan, y1 + b * yspan);
            let head = vec![
                p(0.0, 0.0),
                p(-ux * h - uy * w, -uy * h + ux * w),
                p(-ux * h + uy * w, -uy * h - ux * w),
            ];
            chart.draw_series(std::iter::once(Polygon::new(head, color.filled())))?;
        }
    }
    // Error bars: the 95% bootstrap interval of each mean, both axes, with caps.
    for s in summaries {
        let color = baseline_color(&s.baseline, infos);
        let (x, y, ys) = (s.clip_t.mean, y_of(s), y_stat(s));
        let (cap_x, cap_y) = (0.008 * xspan, 0.008 * yspan);
        let mut bars = Vec::new();
        if ys.ci_low.is_finite() && ys.ci_high.is_finite() {
            bars.push(vec![(x, ys.ci_low), (x, ys.ci_high)]);
            for v in [ys.ci_low, ys.ci_high] {
                bars.push(vec![(x - cap_x, v), (x + cap_x, v)]);
            }
        }
        let xs = s.clip_t;
        if xs.ci_low.is_finite() && xs.ci_high.is_finite() {
            bars.push(vec![(xs.ci_low, y), (xs.ci_high, y)]);
            for v in [xs.ci_low, xs.ci_high] {
                bars.push(vec![(v, y - cap_y), (v, y + cap_y)]);
            }
        }
        chart.draw_series(
            bars.into_iter()
                .map(|line| PathElement::new(line, color.stroke_width(1))),
        )?;
    }
    for s in summaries {
        let color = baseline_color(&s.baseline, infos);
        let label = infos
            .iter()
            .find(|i| i.name == s.method)
            .map(|i| i.label.clone())
            .unwrap_or_else(|| s.method.clone());
        let style = if s.guided {
            color.filled()
        } else {
            color.stroke_width(2)
        };
        let point = (s.clip_t.mean, y_of(s));
        chart.draw_series(std::iter::once(Circle::new(point, 6, style)))?;
        chart.draw_series(std::iter::once(Text::new(
            label,
            point,
            (FONT, 13).into_font().color(&BLACK),
        )))?;
        // A guided method's paired difference from its baseline on matched jobs, under its label.
        if let Some(c) = paired.iter().find(|c| c.guided == s.method) {
            let d = &c.metrics[if y_metric == "dino" { 0 } else { 1 }];
            let p = if d.p_value < 0.001 {
                "< 0.001".to_string()
            } else {
                format!("{:.3}", d.p_value)
            };
            let text = format!(
                "Δ{y_name} {:+.3} [{:+.3}, {:+.3}], p {p}, {} pairs",
                d.delta, d.ci_low, d.ci_high, d.pairs
            );
            chart.draw_series(std::iter::once(
                EmptyElement::at(point)
                    + Text::new(text, (0, 15), (FONT, 12).into_font().color(&color)),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

fn draw_subject_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    subjects: &[SubjectSummary],
    infos: &[MethodInfo],
    metric: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let value = |s: &SubjectSummary| match metric {
        "dino" => s.dino,
        "clip_i" => s.clip_i,
        _ => s.clip_t,
    };
    let mut names: Vec<&str> = subjects.iter().map(|s| s.subject.as_str()).collect();
    names.sort();
    names.dedup();
    let methods: Vec<&MethodInfo> = infos
        .iter()
        .filter(|i| subjects.iter().any(|s| s.method == i.name))
        .collect();
    // Horizontal bars: subject names stay readable with all 30 subjects.
    let xmax = subjects.iter().map(value).fold(0.0f64, f64::max).max(1e-3) * 1.9; // room for the legend
    let xmin = subjects.iter().map(value).fold(0.0f64, f64::min).min(0.0);
    let title = match metric {
        "dino" => "DINO per subject",
        "clip_i" => "CLIP-I per subject",
        _ => "CLIP-T per subject",
    };
    let n = names.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(140)
        .build_cartesian_2d(xmin..xmax, 0.0..n)?;
    let names_for_labels = names.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(names.len() * 2 + 1)
        .y_label_formatter(&move |y| {
            // Row k spans [n-k-1, n-k): label at its middle, first subject on top.
            let pos = n - y - 0.5;
            let k = pos.round();
            if (pos - k).abs() < 1e-6 && k >= 0.0 {
                names_for_labels
                    .get(k as usize)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FONT, 12))
        .draw()?;
    let height = 0.8 / methods.len().max(1) as f64;
    for (m, info) in methods.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        let bars = subjects
            .iter()
            .filter(|s| s.method == info.name)
            .filter_map(|s| {
                let k = names.iter().position(|x| *x == s.subject)? as f64;
                let y1 = n - k - 0.1 - m as f64 * height;
                Some(Rectangle::new(
                    [(0.0, y1 - height * 0.95), (value(s), y1)],
                    color.filled(),
                ))
            });
        chart
            .draw_series(bars)?
            .label(info.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn both_formats(
    stem: &Path,
    size: (u32, u32),
    draw_png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> DrawResult,
    draw_svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> DrawResult,
) -> anyhow::Result<Vec<PathBuf>> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_png(BitMapBackend::new(&png, size).into_drawing_area())
        .map_err(|e| anyhow::anyhow!("drawing '{}': {e}", png.display()))?;
    draw_svg(SVGBackend::new(&svg, size).into_drawing_area())
        .map_err(|e| anyhow::anyhow!("drawing '{}': {e}", svg.display()))?;
    Ok(vec![png, svg])
}

/// `pareto_dino.{png,svg}` and `pareto_clip_i.{png,svg}` in `dir`: each method's mean with its
/// 95% bootstrap intervals as error bars, and each guided method's paired difference (interval
/// and p-value) from its baseline written under it.
pub fn pareto_plots(
    dir: &Path,
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for metric in ["dino", "clip_i"] {
        out.extend(both_formats(
            &dir.join(format!("pareto_{metric}")),
            (800, 600),
            |a| draw_pareto(a, summaries, infos, paired, metric),
            |a| draw_pareto(a, summaries, infos, paired, metric),
        )?);
    }
    Ok(out)
}

/// `subjects_{dino,clip_i,clip_t}.{png,svg}` in `dir`.
pub fn subject_bars(
    dir: &Path,
    subjects: &[SubjectSummary],
    infos: &[MethodInfo],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for metric in ["dino", "clip_i", "clip_t"] {
        let n = subjects
            .iter()
            .map(|s| s.subject.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let methods = subjects
            .iter()
            .map(|s| s.method.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let height = (120 + (n * methods.max(1)) as u32 * 9).max(400);
        out.extend(both_formats(
            &dir.join(format!("subjects_{metric}")),
            (800, height),
            |a| draw_subject_bars(a, subjects, infos, metric),
            |a| draw_subject_bars(a, subjects, infos, metric),
        )?);
    }
    Ok(out)
}

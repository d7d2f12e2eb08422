//! Figures with plotters, each as PNG and SVG: Pareto plots (DINO, CLIP-I and each extra score
//! vs CLIP-T) with the 95% bootstrap interval of each mean as error bars, an arrow from each
//! baseline to its guided version, labels placed clear of each other and of the bars, and a
//! legend with the paired differences; and per-subject bars (the paper's Fig. 5). PNG text is
//! drawn by [`super::glyphs::GlyphBackend`] (plotters' own splits words).

use super::aggregate::{MethodSummary, Stat, SubjectSummary};
use super::glyphs::GlyphBackend;
use super::paired::{Comparison, PairedDelta};
use super::tables::MethodInfo;
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

pub(super) const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// The bundled DejaVu Sans, so text renders the same on machines without system fonts.
pub(super) fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, super::glyphs::FONT_BYTES)
            .is_err()
        {
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

/// Which score of a summary a plot shows: the built-in DINO and CLIP-I, or an extra score by
/// name (`None` where the method lacks it).
fn method_stat(s: &MethodSummary, metric: &str) -> Option<Stat> {
    match metric {
        "dino" => Some(s.dino),
        "clip_i" => Some(s.clip_i),
        "clip_t" => Some(s.clip_t),
        other => s.extra.get(other).copied(),
    }
    .filter(|st| st.mean.is_finite())
}

/// The paired difference of a comparison on `metric`.
fn delta_of<'a>(c: &'a Comparison, metric: &str) -> Option<&'a PairedDelta> {
    match metric {
        "dino" => Some(&c.metrics[0]),
        "clip_i" => Some(&c.metrics[1]),
        "clip_t" => Some(&c.metrics[2]),
        other => c.extra.get(other),
    }
}

/// How a score is named in the figures.
pub(super) fn metric_name(metric: &str) -> String {
    match metric {
        "dino" => "DINO".into(),
        "clip_i" => "CLIP-I".into(),
        "clip_t" => "CLIP-T".into(),
        other => other.to_string(),
    }
}

/// A tick value as a reader writes it: the decimals the axis' steps need (a tenth of `span`,
/// one more for steps like 0.025), trailing zeros dropped, and zero never "-0.0".
pub fn tick_label(v: f64, span: f64) -> String {
    let decimals = if span > 0.0 && span.is_finite() {
        (1.0 - (span / 10.0).log10().floor()).clamp(0.0, 12.0) as usize
    } else {
        3
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

/// A box on the canvas, in pixels (y down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

type Point = (f64, f64);

impl Rect {
    pub fn around((x, y): Point, r: f64) -> Self {
        Rect {
            x0: x - r,
            y0: y - r,
            x1: x + r,
            y1: y + r,
        }
    }
    /// The area the two boxes share (0 when apart or only touching).
    pub fn overlap(&self, o: &Rect) -> f64 {
        let w = self.x1.min(o.x1) - self.x0.max(o.x0);
        let h = self.y1.min(o.y1) - self.y0.max(o.y0);
        if w > 0.0 && h > 0.0 {
            w * h
        } else {
            0.0
        }
    }
    pub fn intersects(&self, o: &Rect) -> bool {
        self.overlap(o) > 0.0
    }
    pub fn inside(&self, o: &Rect) -> bool {
        self.x0 >= o.x0 && self.y0 >= o.y0 && self.x1 <= o.x1 && self.y1 <= o.y1
    }
    /// Whether the segment a–b passes through the box (Liang–Barsky clipping).
    pub fn hits_segment(&self, a: Point, b: Point) -> bool {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        for (p, q) in [
            (-dx, a.0 - self.x0),
            (dx, self.x1 - a.0),
            (-dy, a.1 - self.y0),
            (dy, self.y1 - a.1),
        ] {
            if p == 0.0 {
                if q <= 0.0 {
                    return false;
                }
            } else {
                let t = q / p;
                if p < 0.0 {
                    t0 = t0.max(t);
                } else {
                    t1 = t1.min(t);
                }
            }
        }
        t0 < t1
    }
    /// The point of the box nearest to `p` (where a leader line ends).
    pub fn nearest(&self, (x, y): Point) -> Point {
        (x.clamp(self.x0, self.x1), y.clamp(self.y0, self.y1))
    }
}

/// What labels must not cover: boxes (markers) and segments (interval bars, arrows).
#[derive(Debug, Clone, Default)]
pub struct Obstacles {
    pub boxes: Vec<Rect>,
    pub segments: Vec<(Point, Point)>,
}

/// Distances (pixels) from its point at which a label is tried, nearest first.
const RINGS: [f64; 10] = [8.0, 14.0, 22.0, 32.0, 45.0, 60.0, 80.0, 105.0, 135.0, 170.0];
/// Directions tried on each ring (degrees, y down): right, then above right, below right, left...
const ANGLES: [f64; 12] = [
    0.0, -35.0, 35.0, 180.0, -145.0, 145.0, -90.0, 90.0, -65.0, 65.0, -115.0, 115.0,
];

/// Places one label box of each `size` near its `anchor`: the nearest position (ring by ring,
/// direction by direction) inside `bounds` that covers no label placed before it and no
/// obstacle; where none is free, the position covering the least. Returns the boxes in order.
pub fn place_labels(
    anchors: &[Point],
    sizes: &[(f64, f64)],
    obstacles: &Obstacles,
    bounds: Rect,
) -> Vec<Rect> {
    let mut placed: Vec<Rect> = Vec::new();
    for (&(px, py), &(w, h)) in anchors.iter().zip(sizes) {
        let mut best: Option<(f64, Rect)> = None;
        'search: for r in RINGS {
            for deg in ANGLES {
                let (c, s) = (deg.to_radians().cos(), deg.to_radians().sin());
                let (ax, ay) = (px + r * c, py + r * s);
                let x0 = ax - w * (1.0 - c) / 2.0;
                let y0 = ay - h * (1.0 - s) / 2.0;
                let b = Rect {
                    x0,
                    y0,
                    x1: x0 + w,
                    y1: y0 + h,
                };
                let mut cost: f64 = placed.iter().map(|p| b.overlap(p)).sum::<f64>()
                    + obstacles.boxes.iter().map(|o| b.overlap(o)).sum::<f64>()
                    + obstacles
                        .segments
                        .iter()
                        .filter(|(a, z)| b.hits_segment(*a, *z))
                        .count() as f64
                        * 50.0;
                if !b.inside(&bounds) {
                    cost += 1e6;
                }
                if cost == 0.0 {
                    best = Some((0.0, b));
                    break 'search;
                }
                // Farther positions only win by covering less.
                match best {
                    Some((c0, _)) if c0 <= cost => {}
                    _ => best = Some((cost, b)),
                }
            }
        }
        placed.push(best.expect("one candidate at least").1);
    }
    placed
}

/// A method's marker: one colour per baseline, filled when guided, and one shape per method of
/// the same baseline (circle, square, triangle...), so two methods at one spot stay apart.
#[derive(Debug, Clone, Copy)]
struct Marker {
    color: RGBColor,
    filled: bool,
    shape: usize,
}

fn markers(summaries: &[MethodSummary], infos: &[MethodInfo]) -> Vec<Marker> {
    let mut seen: Vec<&str> = Vec::new();
    summaries
        .iter()
        .map(|s| {
            let shape = seen.iter().filter(|b| **b == s.baseline).count();
            seen.push(&s.baseline);
            Marker {
                color: baseline_color(&s.baseline, infos),
                filled: s.guided,
                shape,
            }
        })
        .collect()
}

/// Marker radius in pixels.
const MARK: i32 = 6;

/// Draws a marker; a hollow one `opaque` has a white inside (in the legend), else none (on the
/// chart, where it is drawn over the filled ones so both of two methods at one spot show).
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    m: Marker,
    opaque: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let r = MARK;
    let points: Vec<(i32, i32)> = match m.shape % 6 {
        0 => Vec::new(),
        1 => vec![
            (x - r + 1, y - r + 1),
            (x + r - 1, y - r + 1),
            (x + r - 1, y + r - 1),
            (x - r + 1, y + r - 1),
        ],
        2 => vec![(x, y - r - 1), (x + r, y + r - 1), (x - r, y + r - 1)],
        3 => vec![
            (x, y - r - 1),
            (x + r + 1, y),
            (x, y + r + 1),
            (x - r - 1, y),
        ],
        4 => vec![(x, y + r + 1), (x + r, y - r + 1), (x - r, y - r + 1)],
        _ => vec![
            (x - r, y - 2),
            (x - 2, y - 2),
            (x - 2, y - r),
            (x + 2, y - r),
            (x + 2, y - 2),
            (x + r, y - 2),
            (x + r, y + 2),
            (x + 2, y + 2),
            (x + 2, y + r),
            (x - 2, y + r),
            (x - 2, y + 2),
            (x - r, y + 2),
        ],
    };
    let fill = (m.filled || opaque).then_some(if m.filled { m.color } else { WHITE });
    if points.is_empty() {
        if let Some(fill) = fill {
            area.draw(&Circle::new((x, y), r, fill.filled()))?;
        }
        area.draw(&Circle::new((x, y), r, m.color.stroke_width(2)))?;
    } else {
        if let Some(fill) = fill {
            area.draw(&Polygon::new(points.clone(), fill.filled()))?;
        }
        let mut closed = points.clone();
        closed.push(points[0]);
        area.draw(&PathElement::new(closed, m.color.stroke_width(2)))?;
    }
    Ok(())
}

/// The size of `text` in `font` on `area` (a rough estimate if the font cannot measure it).
fn text_size<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    font: &TextStyle,
) -> (f64, f64) {
    area.estimate_text_size(text, font)
        .map(|(w, h)| (w as f64, h as f64))
        .unwrap_or((text.chars().count() as f64 * 7.5, 14.0))
}

/// One line of a legend: the marker (or a colour swatch) and its text lines.
struct LegendEntry {
    marker: Option<Marker>,
    swatch: RGBColor,
    lines: Vec<(String, RGBColor)>,
}

/// Legend rows: one entry a row, its text lines side by side when they fit in `width`, else
/// one under the other. Returns the height it needs.
fn legend_height(lines_per_entry: usize, entries: usize, stacked: bool) -> u32 {
    let per = if stacked { lines_per_entry.max(1) } else { 1 };
    (12 + entries * (per * 17 + 3)) as u32
}

/// Draws `entries` top down in `area` (outside the plot: nothing of the chart under it);
/// `columns` are the x positions of the text lines when side by side.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
    columns: &[i32],
    stacked: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut y = 8;
    for e in entries {
        let cy = y + 8;
        match e.marker {
            Some(m) => draw_marker(area, (24, cy), m, true)?,
            None => {
                area.draw(&Rectangle::new(
                    [(18, cy - 6), (30, cy + 6)],
                    e.swatch.filled(),
                ))?;
            }
        }
        for (k, (text, color)) in e.lines.iter().enumerate() {
            let (x, dy) = if stacked {
                (columns[0], k as i32 * 17)
            } else {
                (columns[k.min(columns.len() - 1)], 0)
            };
            area.draw(&Text::new(
                text.clone(),
                (x, y + 1 + dy),
                (FONT, 13).into_font().color(color),
            ))?;
        }
        let rows = if stacked { e.lines.len().max(1) } else { 1 };
        y += rows as i32 * 17 + 3;
    }
    Ok(())
}

/// The legend rows of a Pareto plot: each method's marker and label, and for a compared method
/// its paired difference on `metric` from the method it is compared with.
fn pareto_legend(
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
    marks: &[Marker],
    metric: &str,
) -> Vec<LegendEntry> {
    let name = metric_name(metric);
    summaries
        .iter()
        .zip(marks)
        .map(|(s, m)| {
            let mut lines = vec![(label_of(infos, &s.method), BLACK)];
            let c = paired.iter().find(|c| c.guided == s.method);
            if let Some((c, d)) = c.and_then(|c| Some((c, delta_of(c, metric)?))) {
                let p = if d.p_value < 0.001 {
                    "< 0.001".to_string()
                } else {
                    format!("{:.3}", d.p_value)
                };
                lines.push((
                    format!(
                        "Δ{name} {:+.3} [{:+.3}, {:+.3}], p {p}, {} pairs vs {}",
                        d.delta,
                        d.ci_low,
                        d.ci_high,
                        d.pairs,
                        label_of(infos, &c.baseline)
                    ),
                    m.color,
                ));
            }
            LegendEntry {
                marker: Some(*m),
                swatch: m.color,
                lines,
            }
        })
        .collect()
}

fn label_of(infos: &[MethodInfo], method: &str) -> String {
    infos
        .iter()
        .find(|i| i.name == method)
        .map(|i| i.label.clone())
        .unwrap_or_else(|| method.to_string())
}

/// Canvas width of every figure.
const WIDTH: u32 = 800;
/// Height of a Pareto plot's chart (its legend goes below).
const PARETO_HEIGHT: u32 = 560;

/// Whether the legend's text lines go one under the other, and the x of each column.
fn legend_columns(entries: &[LegendEntry], measure: impl Fn(&str) -> f64) -> (bool, Vec<i32>) {
    let first = entries
        .iter()
        .filter_map(|e| e.lines.first())
        .map(|(t, _)| measure(t))
        .fold(0.0, f64::max);
    let second = entries
        .iter()
        .filter_map(|e| e.lines.get(1))
        .map(|(t, _)| measure(t))
        .fold(0.0, f64::max);
    let x0 = 40;
    let x1 = x0 + first as i32 + 18;
    let stacked = second > 0.0 && x1 as f64 + second > WIDTH as f64 - 10.0;
    (stacked, vec![x0, x1])
}

/// The boxes of the labels the Pareto plot draws beside its points, and what they avoid, in
/// canvas pixels (for tests: see [`pareto_layout`]).
pub struct ParetoLayout {
    pub points: Vec<Point>,
    pub labels: Vec<Rect>,
    pub obstacles: Obstacles,
    pub plot: Rect,
}

fn draw_pareto<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
    y_metric: &str,
) -> Result<ParetoLayout, Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    // The methods that have this score (an extra score may be missing from some).
    let shown: Vec<MethodSummary> = summaries
        .iter()
        .filter(|s| method_stat(s, y_metric).is_some())
        .cloned()
        .collect();
    let summaries = &shown[..];
    let y_stat = |s: &MethodSummary| method_stat(s, y_metric).expect("filtered");
    let y_of = |s: &MethodSummary| y_stat(s).mean;
    let y_name = metric_name(y_metric);
    let marks = markers(summaries, infos);
    let entries = pareto_legend(summaries, infos, paired, &marks, y_metric);
    let font: TextStyle = (FONT, 13).into_font().color(&BLACK);
    let (stacked, columns) = legend_columns(&entries, |t| text_size(&root, t, &font).0);
    let lines = entries.iter().map(|e| e.lines.len()).max().unwrap_or(1);
    let (_, height) = root.dim_in_pixel();
    let legend_h = legend_height(lines, entries.len(), stacked).min(height / 2);
    let (plot, legend) = root.split_vertically(height - legend_h);
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
    let x_ticks = move |v: &f64| tick_label(*v, xspan);
    let y_ticks = move |v: &f64| tick_label(*v, yspan);
    let mut chart = ChartBuilder::on(&plot)
        .caption(format!("{y_name} vs CLIP-T"), (FONT, 22))
        .margin(15)
        .margin_right(25)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xr, yr)?;
    chart
        .configure_mesh()
        .x_desc("CLIP-T (text alignment)")
        .y_desc(format!("{y_name} (subject fidelity)"))
        .x_label_formatter(&x_ticks)
        .y_label_formatter(&y_ticks)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let coord = chart.as_coord_spec().clone();
    let px = move |x: f64, y: f64| {
        let (a, b) = coord.translate(&(x, y));
        (a as f64, b as f64)
    };
    let mut obstacles = Obstacles::default();
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
        obstacles.segments.push((px(x0, y0), px(x1, y1)));
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
            for k in 1..3 {
                obstacles
                    .segments
                    .push((px(head[0].0, head[0].1), px(head[k].0, head[k].1)));
            }
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
        for line in &bars {
            obstacles
                .segments
                .push((px(line[0].0, line[0].1), px(line[1].0, line[1].1)));
        }
        chart.draw_series(
            bars.into_iter()
                .map(|line| PathElement::new(line, color.stroke_width(1))),
        )?;
    }
    let points: Vec<Point> = summaries
        .iter()
        .map(|s| px(s.clip_t.mean, y_of(s)))
        .collect();
    for p in &points {
        obstacles.boxes.push(Rect::around(*p, MARK as f64 + 2.0));
    }
    // Labels beside the points, placed clear of each other, the markers and the bars, with a
    // leader line when moved away; the paired differences are in the legend below the chart.
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let bounds = Rect {
        x0: xs.start as f64 + 2.0,
        y0: ys.start as f64 + 2.0,
        x1: xs.end as f64 - 2.0,
        y1: ys.end as f64 - 2.0,
    };
    let labels: Vec<String> = summaries
        .iter()
        .map(|s| label_of(infos, &s.method))
        .collect();
    let sizes: Vec<(f64, f64)> = labels
        .iter()
        .map(|l| {
            let (w, h) = text_size(&plot, l, &font);
            (w + 6.0, h + 4.0)
        })
        .collect();
    let boxes = place_labels(&points, &sizes, &obstacles, bounds);
    for (((label, b), p), m) in labels.iter().zip(&boxes).zip(&points).zip(&marks) {
        let near = b.nearest(*p);
        if (near.0 - p.0).hypot(near.1 - p.1) > MARK as f64 + 4.0 {
            plot.draw(&PathElement::new(
                vec![(p.0 as i32, p.1 as i32), (near.0 as i32, near.1 as i32)],
                m.color.mix(0.7).stroke_width(1),
            ))?;
        }
        plot.draw(&Rectangle::new(
            [(b.x0 as i32, b.y0 as i32), (b.x1 as i32, b.y1 as i32)],
            WHITE.mix(0.85).filled(),
        ))?;
        plot.draw(&Text::new(
            label.clone(),
            (b.x0 as i32 + 3, b.y0 as i32 + 2),
            font.clone(),
        ))?;
    }
    // Filled markers first, hollow ones over them.
    for filled in [true, false] {
        for (p, m) in points
            .iter()
            .zip(&marks)
            .filter(|(_, m)| m.filled == filled)
        {
            draw_marker(&plot, (p.0 as i32, p.1 as i32), *m, false)?;
        }
    }
    draw_legend(&legend, &entries, &columns, stacked)?;
    root.present()?;
    Ok(ParetoLayout {
        points,
        labels: boxes,
        obstacles,
        plot: bounds,
    })
}

/// The value axis of per-subject bars: from 0 (or below the lowest bar, when one is negative)
/// to just past the highest, so every bar fits and the axis is no longer than the data needs.
pub fn bar_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let lo = if lo < 0.0 { lo - pad } else { 0.0 };
    let hi = if hi > 0.0 || lo == 0.0 { hi + pad } else { 0.0 };
    lo..hi
}

/// The value of a subject's mean on `metric` (NaN when the method lacks an extra score).
fn subject_value(s: &SubjectSummary, metric: &str) -> f64 {
    match metric {
        "dino" => s.dino,
        "clip_i" => s.clip_i,
        "clip_t" => s.clip_t,
        other => s.extra.get(other).copied().unwrap_or(f64::NAN),
    }
}

/// Rows of a flowing legend of `labels` (swatch and label, left to right) in `width` pixels.
fn flow_rows(widths: &[f64], width: f64) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut x = 18.0;
    for (k, w) in widths.iter().enumerate() {
        let need = 16.0 + w + 22.0;
        if x + need > width && !rows.last().expect("a row").is_empty() {
            rows.push(Vec::new());
            x = 18.0;
        }
        rows.last_mut().expect("a row").push(k);
        x += need;
    }
    rows
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
    let value = |s: &SubjectSummary| subject_value(s, metric);
    let mut names: Vec<&str> = subjects.iter().map(|s| s.subject.as_str()).collect();
    names.sort();
    names.dedup();
    let methods: Vec<&MethodInfo> = infos
        .iter()
        .filter(|i| {
            subjects
                .iter()
                .any(|s| s.method == i.name && value(s).is_finite())
        })
        .collect();
    let range = bar_range(subjects.iter().map(value));
    let span = range.end - range.start;
    let ticks = move |v: &f64| tick_label(*v, span);
    let title = format!("{} per subject", metric_name(metric));
    let n = names.len() as f64;
    // The legend goes below the chart, outside the bars.
    let font: TextStyle = (FONT, 13).into_font().color(&BLACK);
    let widths: Vec<f64> = methods
        .iter()
        .map(|m| text_size(&root, &m.label, &font).0)
        .collect();
    let rows = flow_rows(&widths, WIDTH as f64 - 10.0);
    let (_, height) = root.dim_in_pixel();
    let legend_h = (10 + rows.len() * 20) as u32;
    let (plot, legend) = root.split_vertically(height - legend_h);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, (FONT, 22))
        .margin(15)
        .margin_right(30)
        .x_label_area_size(35)
        .y_label_area_size(140)
        .build_cartesian_2d(range, 0.0..n)?;
    let names_for_labels = names.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_label_formatter(&ticks)
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
            .filter(|s| s.method == info.name && value(s).is_finite())
            .filter_map(|s| {
                let k = names.iter().position(|x| *x == s.subject)? as f64;
                let y1 = n - k - 0.1 - m as f64 * height;
                let v = value(s);
                Some(Rectangle::new(
                    [(v.min(0.0), y1 - height * 0.95), (v.max(0.0), y1)],
                    color.filled(),
                ))
            });
        chart.draw_series(bars)?;
    }
    // A line at zero when bars go both ways.
    if chart.x_range().start < 0.0 {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (0.0, n)],
            BLACK.stroke_width(1),
        )))?;
    }
    for (r, row) in rows.iter().enumerate() {
        let y = 6 + r as i32 * 20;
        let mut x = 18;
        for &k in row {
            let color = PALETTE[k % PALETTE.len()];
            legend.draw(&Rectangle::new(
                [(x, y + 2), (x + 11, y + 13)],
                color.filled(),
            ))?;
            legend.draw(&Text::new(
                methods[k].label.clone(),
                (x + 16, y),
                font.clone(),
            ))?;
            x += (16.0 + widths[k] + 22.0) as i32;
        }
    }
    root.present()?;
    Ok(())
}

fn both_formats<T>(
    stem: &Path,
    size: (u32, u32),
    draw_png: impl FnOnce(DrawingArea<GlyphBackend, Shift>) -> Result<T, Box<dyn std::error::Error>>,
    draw_svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Result<T, Box<dyn std::error::Error>>,
) -> anyhow::Result<(Vec<PathBuf>, T)> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let out = draw_png(GlyphBackend::new(BitMapBackend::new(&png, size)).into_drawing_area())
        .map_err(|e| anyhow::anyhow!("drawing '{}': {e}", png.display()))?;
    draw_svg(SVGBackend::new(&svg, size).into_drawing_area())
        .map_err(|e| anyhow::anyhow!("drawing '{}': {e}", svg.display()))?;
    Ok((vec![png, svg], out))
}

/// The scores a set of summaries has beside CLIP-T: DINO, CLIP-I, then each extra score.
fn y_metrics(summaries: &[MethodSummary]) -> Vec<String> {
    let mut out: Vec<String> = vec!["dino".into(), "clip_i".into()];
    let extras: std::collections::BTreeSet<&String> =
        summaries.iter().flat_map(|s| s.extra.keys()).collect();
    out.extend(extras.into_iter().cloned());
    out
}

/// The Pareto plot of `metric` against CLIP-T, drawn to `stem.{png,svg}`; the layout of its
/// point labels in the PNG.
pub fn pareto_layout(
    stem: &Path,
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
    metric: &str,
) -> anyhow::Result<(Vec<PathBuf>, ParetoLayout)> {
    // Room for the legend below the chart, as draw_pareto lays it out.
    register_font();
    let font = (FONT, 13).into_font();
    let shown: Vec<MethodSummary> = summaries
        .iter()
        .filter(|s| method_stat(s, metric).is_some())
        .cloned()
        .collect();
    let entries = pareto_legend(&shown, infos, paired, &markers(&shown, infos), metric);
    let (stacked, _) = legend_columns(&entries, |t| {
        font.box_size(t)
            .map(|(w, _)| w as f64)
            .unwrap_or(t.chars().count() as f64 * 7.5)
    });
    let lines = entries.iter().map(|e| e.lines.len()).max().unwrap_or(1);
    let size = (
        WIDTH,
        PARETO_HEIGHT + legend_height(lines, entries.len(), stacked),
    );
    both_formats(
        stem,
        size,
        |a| draw_pareto(a, summaries, infos, paired, metric),
        |a| draw_pareto(a, summaries, infos, paired, metric),
    )
}

/// `pareto_<score>.{png,svg}` in `dir` for DINO, CLIP-I and each extra score (DreamBench++'s
/// `dinov2`) against CLIP-T: each method's mean with its 95% bootstrap intervals as error bars,
/// its label beside it, and a legend below with each compared method's paired difference
/// (interval and p-value) from the method it is compared with.
pub fn pareto_plots(
    dir: &Path,
    summaries: &[MethodSummary],
    infos: &[MethodInfo],
    paired: &[Comparison],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for metric in y_metrics(summaries) {
        let (files, _) = pareto_layout(
            &dir.join(format!("pareto_{metric}")),
            summaries,
            infos,
            paired,
            &metric,
        )?;
        out.extend(files);
    }
    Ok(out)
}

/// `subjects_<score>.{png,svg}` in `dir`: DINO, CLIP-I, CLIP-T and each extra score.
pub fn subject_bars(
    dir: &Path,
    subjects: &[SubjectSummary],
    infos: &[MethodInfo],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut metrics: Vec<String> = ["dino", "clip_i", "clip_t"].map(String::from).to_vec();
    let extras: std::collections::BTreeSet<&String> =
        subjects.iter().flat_map(|s| s.extra.keys()).collect();
    metrics.extend(extras.into_iter().cloned());
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
    // Bars, then a legend below them (methods flow over rows).
    let height = (120 + (n * methods.max(1)) as u32 * 9).max(400) + 20 + 20 * methods as u32 / 3;
    for metric in metrics {
        let (files, ()) = both_formats(
            &dir.join(format!("subjects_{metric}")),
            (WIDTH, height),
            |a| draw_subject_bars(a, subjects, infos, &metric),
            |a| draw_subject_bars(a, subjects, infos, &metric),
        )?;
        out.extend(files);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::paired::paired_delta;

    fn stat(mean: f64, half: f64) -> Stat {
        Stat {
            mean,
            std: half,
            ci_low: mean - half,
            ci_high: mean + half,
        }
    }

    fn info(name: &str, baseline: &str, guided: bool) -> MethodInfo {
        let b = super::super::tables::baseline_label(baseline);
        MethodInfo {
            name: name.into(),
            label: if guided {
                format!("{b} + Pick-and-Draw")
            } else {
                b.to_string()
            },
            baseline: baseline.into(),
            guided,
            compare_to: None,
        }
    }

    fn summary(i: &MethodInfo, dino: f64, clip_t: f64, dinov2: Option<f64>) -> MethodSummary {
        MethodSummary {
            method: i.name.clone(),
            baseline: i.baseline.clone(),
            guided: i.guided,
            images: 12,
            dino: stat(dino, 0.02),
            clip_i: stat(dino + 0.1, 0.01),
            clip_t: stat(clip_t, 0.004),
            extra: dinov2
                .map(|v| ("dinov2".to_string(), stat(v, 1.0)))
                .into_iter()
                .collect(),
        }
    }

    /// Table 1's eight methods, two pairs of them on one spot and the rest close together.
    fn crowded() -> (Vec<MethodInfo>, Vec<MethodSummary>, Vec<Comparison>) {
        let infos = vec![
            info("sd", "stable-diffusion", false),
            info("sd+pnd", "stable-diffusion", true),
            info("ti", "textual-inversion", false),
            info("ti+pnd", "textual-inversion", true),
            info("db", "dreambooth", false),
            info("db+pnd", "dreambooth", true),
            info("blip", "blip-diffusion", false),
            info("blip+pnd", "blip-diffusion", true),
        ];
        let at = [
            (0.30, 0.30),
            (0.30, 0.30), // on top of sd
            (0.55, 0.26),
            (0.58, 0.255),
            (0.60, 0.26),
            (0.60, 0.26), // on top of db
            (0.59, 0.27),
            (0.62, 0.265),
        ];
        let summaries: Vec<MethodSummary> = infos
            .iter()
            .zip(at)
            .map(|(i, (d, t))| summary(i, d, t, Some(60.0 + 20.0 * d)))
            .collect();
        let d = paired_delta(&[0.5, 0.6, 0.7], &[0.4, 0.45, 0.6], 1);
        let paired = infos
            .iter()
            .filter(|i| i.guided)
            .map(|g| Comparison {
                guided: g.name.clone(),
                baseline: g.name.trim_end_matches("+pnd").into(),
                metrics: [d; 3],
                extra: [("dinov2".to_string(), d)].into(),
            })
            .collect();
        (infos, summaries, paired)
    }

    #[test]
    fn pareto_labels_cover_no_label_marker_or_bar_and_stay_in_the_plot() {
        let (infos, summaries, paired) = crowded();
        let tmp = tempfile::tempdir().unwrap();
        // To look at them: PND_KEEP_REPORT=/some/dir cargo test -p runner --lib report::plots
        let dir = std::env::var_os("PND_KEEP_REPORT")
            .map(PathBuf::from)
            .unwrap_or_else(|| tmp.path().to_path_buf());
        std::fs::create_dir_all(&dir).unwrap();
        for metric in ["dino", "clip_i", "dinov2"] {
            let (files, l) = pareto_layout(
                &dir.join(format!("crowded_{metric}")),
                &summaries,
                &infos,
                &paired,
                metric,
            )
            .unwrap();
            assert!(files.iter().all(|f| f.is_file()), "{files:?}");
            assert_eq!(l.labels.len(), 8);
            for (k, b) in l.labels.iter().enumerate() {
                assert!(
                    b.inside(&l.plot),
                    "{metric}: label {k} {b:?} outside {:?}",
                    l.plot
                );
                for (j, o) in l.labels.iter().enumerate().filter(|(j, _)| *j != k) {
                    assert!(!b.intersects(o), "{metric}: labels {k} and {j} overlap");
                }
                for o in &l.obstacles.boxes {
                    assert!(!b.intersects(o), "{metric}: label {k} covers a marker");
                }
                for (a, z) in &l.obstacles.segments {
                    assert!(!b.hits_segment(*a, *z), "{metric}: label {k} covers a bar");
                }
            }
            // Two methods on one spot: one marker over the other, each label its own box.
            assert_eq!(l.points[0], l.points[1]);
            assert_ne!(l.labels[0], l.labels[1]);
        }
    }

    #[test]
    fn labels_that_cannot_all_fit_still_go_where_they_cover_least() {
        let bounds = Rect {
            x0: 0.0,
            y0: 0.0,
            x1: 100.0,
            y1: 40.0,
        };
        let boxes = place_labels(
            &[(50.0, 20.0); 6],
            &[(60.0, 16.0); 6],
            &Obstacles::default(),
            bounds,
        );
        assert_eq!(boxes.len(), 6);
        // The first two fit (above and below or beside): only later ones may overlap.
        assert!(!boxes[0].intersects(&boxes[1]), "{boxes:?}");
    }

    #[test]
    fn ticks_read_as_written_by_hand() {
        assert_eq!(tick_label(-1e-17, 0.3), "0");
        assert_eq!(tick_label(-0.25, 0.3), "-0.25");
        assert_eq!(tick_label(0.2000000001, 0.3), "0.2");
        assert_eq!(tick_label(0.725, 0.3), "0.725");
        assert_eq!(tick_label(85.0, 20.0), "85");
        assert_eq!(tick_label(0.0025, 0.02), "0.0025");
    }

    #[test]
    fn segments_and_boxes_intersect_as_drawn() {
        let r = Rect {
            x0: 10.0,
            y0: 10.0,
            x1: 20.0,
            y1: 20.0,
        };
        assert!(r.hits_segment((0.0, 15.0), (30.0, 15.0)));
        assert!(r.hits_segment((0.0, 0.0), (30.0, 30.0)));
        assert!(!r.hits_segment((0.0, 0.0), (30.0, 5.0)));
        assert!(!r.hits_segment((21.0, 0.0), (21.0, 30.0)));
        assert!(r.hits_segment((15.0, 15.0), (15.0, 16.0)), "inside");
        assert_eq!(r.nearest((0.0, 15.0)), (10.0, 15.0));
        assert!(r.intersects(&Rect::around((21.0, 15.0), 2.0)));
        assert!(!r.intersects(&Rect::around((23.0, 15.0), 2.0)));
    }

    #[test]
    fn bar_axes_hold_every_bar_and_no_more_than_the_data_needs() {
        for values in [
            vec![0.2, 0.7, 0.55],
            vec![0.31, 0.29],
            vec![-0.05, 0.4, 0.3],
            vec![-0.2, -0.1],
            vec![81.0, 92.5],
        ] {
            let r = bar_range(values.iter().copied());
            let lo = values.iter().copied().fold(0.0, f64::min);
            let hi = values.iter().copied().fold(0.0, f64::max);
            assert!(r.start <= lo && r.end >= hi, "{values:?}: {r:?}");
            // Bars start at 0: the axis spans the data and 0, plus at most 10%.
            assert!(
                r.end - r.start <= (hi - lo) * 1.1 + 2e-3,
                "{values:?}: {r:?}"
            );
            if lo < 0.0 {
                assert!(r.start < lo, "the lowest negative bar has room: {r:?}");
            }
        }
        // Before: DINO bars of 0.8 ran on an axis to 0.8 · 1.9 = 1.52 (room for the legend).
        assert!(bar_range([0.8, 0.6].into_iter()).end < 0.85);
    }

    #[test]
    fn an_extra_score_gets_its_pareto_plot_and_its_bars() {
        let (infos, summaries, paired) = crowded();
        let tmp = tempfile::tempdir().unwrap();
        let files = pareto_plots(tmp.path(), &summaries, &infos, &paired).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for n in [
            "pareto_dino.png",
            "pareto_clip_i.svg",
            "pareto_dinov2.png",
            "pareto_dinov2.svg",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
        }
        let subjects: Vec<SubjectSummary> = summaries
            .iter()
            .flat_map(|s| {
                ["dog", "vase"].map(|subject| SubjectSummary {
                    method: s.method.clone(),
                    subject: subject.into(),
                    dino: s.dino.mean,
                    clip_i: s.clip_i.mean,
                    clip_t: s.clip_t.mean,
                    extra: s.extra.iter().map(|(k, v)| (k.clone(), v.mean)).collect(),
                })
            })
            .collect();
        let bars = subject_bars(tmp.path(), &subjects, &infos).unwrap();
        assert!(
            bars.iter().any(|f| f.ends_with("subjects_dinov2.png")),
            "{bars:?}"
        );
        let svg = std::fs::read_to_string(tmp.path().join("subjects_dinov2.svg")).unwrap();
        assert!(svg.contains("dinov2 per subject"), "{svg}");
        // Without extra scores, the three plots of before.
        let plain: Vec<MethodSummary> = summaries
            .into_iter()
            .map(|mut s| {
                s.extra.clear();
                s
            })
            .collect();
        let none = tempfile::tempdir().unwrap();
        let files = pareto_plots(none.path(), &plain, &infos, &paired).unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
    }
}

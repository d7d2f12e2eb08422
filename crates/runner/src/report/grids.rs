//! Image grids (the paper's Figs. 4, 6–8): for each subject and each baseline that has a guided
//! version, one row per prompt: reference | without guidance | with guidance (first seed); a
//! method in no such pair (a `pnd eval` run's only method) gets reference | its images. The
//! columns are labelled at the top, each row by its prompt and seed.

use super::rows::ImageRow;
use super::tables::MethodInfo;
use anyhow::Context;
use image::{imageops, Rgb, RgbImage};
use std::path::{Path, PathBuf};

const CELL: u32 = 192;
const GAP: u32 = 4;
/// Height of the column titles above the first row.
const HEADER: u32 = 24;
/// Height of the prompt-and-seed line above each row.
const LABEL: u32 = 20;

/// Writes `text` into `img` at (x, y) (top left), in the report's bundled font.
fn draw_text(img: &mut RgbImage, text: &str, (x, y): (u32, u32), size: f64) -> anyhow::Result<()> {
    use plotters::prelude::*;
    super::plots::register_font();
    let (w, h) = img.dimensions();
    let root = super::glyphs::GlyphBackend::new(BitMapBackend::with_buffer(img.as_mut(), (w, h)))
        .into_drawing_area();
    let style = (super::plots::FONT, size).into_font().color(&BLACK);
    root.draw(&Text::new(text.to_string(), (x as i32, y as i32), style))
        .and_then(|_| root.present())
        .map_err(|e| anyhow::anyhow!("drawing the label '{text}': {e}"))
}

/// A label cut to about `max` characters.
fn fit(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn load_cell(path: &Path) -> anyhow::Result<RgbImage> {
    let img = image::open(path)
        .with_context(|| format!("reading image '{}'", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let crop = imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    Ok(imageops::resize(
        &crop,
        CELL,
        CELL,
        imageops::FilterType::Triangle,
    ))
}

/// The pairs of methods a grid shows side by side, with their column titles: each guided method
/// after its unguided baseline ("without" | "with"), and each method of baseline `images` (another
/// program's images) after the first of the harness' unguided methods, or any method after the one
/// its `compare_to` names (both titled by their labels).
fn grid_pairs(infos: &[MethodInfo]) -> Vec<(&MethodInfo, &MethodInfo, [String; 2])> {
    let mut pairs: Vec<(&MethodInfo, &MethodInfo, [String; 2])> = Vec::new();
    // A method that names the one it is compared with: that one, titled by their labels.
    let named = |i: &MethodInfo| {
        i.compare_to
            .as_ref()
            .and_then(|t| infos.iter().find(|b| &b.name == t && b.name != i.name))
    };
    for info in infos {
        if let Some(base) = named(info) {
            pairs.push((base, info, [fit(&base.label, 22), fit(&info.label, 22)]));
        }
    }
    for guided in infos.iter().filter(|i| i.guided && named(i).is_none()) {
        if let Some(base) = infos
            .iter()
            .find(|b| !b.guided && b.baseline == guided.baseline)
        {
            pairs.push((base, guided, ["without".into(), "with".into()]));
        }
    }
    let harness = infos.iter().find(|i| !i.guided && i.baseline != "images");
    for external in infos
        .iter()
        .filter(|i| i.baseline == "images" && named(i).is_none())
    {
        if let Some(base) = harness {
            pairs.push((
                base,
                external,
                [fit(&base.label, 22), fit(&external.label, 22)],
            ));
        }
    }
    pairs
}

/// The grids' columns after the reference, with their titles: each pair of [`grid_pairs`], then
/// each method in no pair alone (a `pnd eval` run of one method: its images beside the subject's).
fn grid_columns(infos: &[MethodInfo]) -> Vec<(Vec<&MethodInfo>, Vec<String>)> {
    let pairs = grid_pairs(infos);
    let paired = |i: &MethodInfo| {
        pairs
            .iter()
            .any(|(a, b, _)| a.name == i.name || b.name == i.name)
    };
    let mut out: Vec<(Vec<&MethodInfo>, Vec<String>)> = pairs
        .iter()
        .map(|(a, b, t)| (vec![*a, *b], t.to_vec()))
        .collect();
    for single in infos.iter().filter(|i| !paired(i)) {
        out.push((vec![single], vec![fit(&single.label, 22)]));
    }
    out
}

/// Writes the grids under `dir` and returns their paths. Image paths in rows are relative to `run_dir`
/// (generated) or as given (reference).
pub fn image_grids(
    run_dir: &Path,
    dir: &Path,
    rows: &[ImageRow],
    infos: &[MethodInfo],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    subjects.sort();
    subjects.dedup();
    for (columns, titles) in grid_columns(infos) {
        let last = columns.last().expect("a grid has a column");
        for subject in &subjects {
            let pick = |method: &str| -> Vec<&ImageRow> {
                let mut v: Vec<&ImageRow> = rows
                    .iter()
                    .filter(|r| r.method == method && r.subject == *subject)
                    .collect();
                v.sort_by_key(|r| (r.prompt_index, r.seed));
                v.dedup_by_key(|r| r.prompt_index);
                v
            };
            let cols: Vec<Vec<&ImageRow>> = columns.iter().map(|m| pick(&m.name)).collect();
            // The prompts every column has (the first seed of each).
            let prompts: Vec<usize> = cols[0]
                .iter()
                .map(|r| r.prompt_index)
                .filter(|p| cols.iter().all(|c| c.iter().any(|r| r.prompt_index == *p)))
                .collect();
            if prompts.is_empty() {
                continue;
            }
            let reference = load_cell(Path::new(&cols[cols.len() - 1][0].reference))?;
            let n = prompts.len() as u32;
            let ncol = 1 + cols.len() as u32;
            let mut grid = RgbImage::from_pixel(
                ncol * CELL + (ncol + 1) * GAP,
                HEADER + n * (LABEL + CELL + GAP) + GAP,
                Rgb([255, 255, 255]),
            );
            let heads = std::iter::once("reference").chain(titles.iter().map(String::as_str));
            for (col, title) in heads.enumerate() {
                let x = GAP + col as u32 * (CELL + GAP);
                draw_text(&mut grid, title, (x + 2, 4), 16.0)?;
            }
            for (k, p) in prompts.iter().enumerate() {
                let top = HEADER + k as u32 * (LABEL + CELL + GAP);
                let y = top + LABEL;
                let cells: Vec<&ImageRow> = cols
                    .iter()
                    .map(|c| {
                        *c.iter()
                            .find(|r| r.prompt_index == *p)
                            .expect("prompt listed in every column")
                    })
                    .collect();
                let label = format!("{}, seed {}", cells[0].clip_t_prompt, cells[0].seed);
                draw_text(&mut grid, &fit(&label, 80), (GAP + 2, top + 3), 13.0)?;
                imageops::replace(&mut grid, &reference, GAP as i64, y as i64);
                for (c, row) in cells.iter().enumerate() {
                    let x = (c as u32 + 1) * (CELL + GAP) + GAP;
                    imageops::replace(
                        &mut grid,
                        &load_cell(&run_dir.join(&row.image))?,
                        x as i64,
                        y as i64,
                    );
                }
            }
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{subject}__{}.png", last.name));
            let tmp = dir.join(format!(
                ".tmp-{}-{subject}__{}.png",
                std::process::id(),
                last.name
            ));
            grid.save(&tmp)
                .with_context(|| format!("writing '{}'", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("writing '{}'", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

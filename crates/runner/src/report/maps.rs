//! `pnd maps`' files (the paper's Fig. 3): one sheet, `maps.png`, with a column per
//! cross-attention layer in inference order (titled "7 · 16×16": its number and its map's
//! resolution) and a row per panel kind: the subject token's min–max normalized map `Â`, the
//! appearance loss's mask `[Â ≥ τ]` (appearance layers only), the layout loss's smoothed map
//! `G(Â)`, and optionally `Â` over the decoded image; beside it `maps.safetensors` (the captured
//! tensors), `maps.json` (what was captured and where each tile lies on the sheet) and
//! `image.png` (the decoded image).
//!
//! Drawing rule, so a pixel can be checked against its tensor: a map of `h × w` is upscaled by
//! the integer factor `scale = max(1, TILE / max(h, w))` by repetition (nearest neighbour): the
//! tile's pixel `(x, y)` shows the value at `[y / scale, x / scale]`, as the gray level
//! `round(255 · v)` (R = G = B; a mask: 255 inside, 0 outside), framed by a gray line outside
//! it. A tile's top-left corner is in `maps.json`.

use super::grids::draw_text;
use crate::sweep::write_file_atomic;
use anyhow::Context;
use candle_core::Tensor;
use guidance::inspect::{AttentionMaps, LayerMaps, MapsContext};
use image::{imageops, Rgb, RgbImage};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The side of a tile's cell in pixels.
pub const TILE: u32 = 128;
const GAP: u32 = 10;
/// Width of the row titles at the left.
const LEFT: u32 = 150;
/// Height of the sheet's title lines.
const TITLE: u32 = 58;
/// Height of the column titles above the first row.
const HEADER: u32 = 22;
/// Fill of a cell without a tile (a mask row's non-appearance layer).
const EMPTY: Rgb<u8> = Rgb([236, 236, 236]);

/// A panel kind: a row of the sheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Panel {
    Attention,
    Mask,
    Smoothed,
    Overlay,
}

impl Panel {
    fn title(self, tau: f64) -> [String; 2] {
        match self {
            Panel::Attention => ["attention Â".into(), "min–max normalized".into()],
            Panel::Mask => [format!("mask Â ≥ τ = {tau}"), "appearance layers".into()],
            Panel::Smoothed => ["smoothed G(Â)".into(), "layout loss".into()],
            Panel::Overlay => ["Â over the image".into(), "decoded image".into()],
        }
    }
}

/// What the sheet's title says besides the maps' own facts.
#[derive(Debug, Clone)]
pub struct SheetOptions {
    /// Draw the overlay row.
    pub overlay: bool,
    /// Where the maps come from, e.g. "generation, seed 0" or "reference 'dog/00.jpg' (inverted)".
    pub source: String,
    /// The smoothing, e.g. "3×3 Gaussian σ = 0.5 (aa)".
    pub smoothing: String,
}

/// One layer's entry in `maps.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TileInfo {
    pub order: usize,
    pub site: String,
    pub height: usize,
    pub width: usize,
    pub appearance: bool,
    /// The upscaling factor of the layer's tiles.
    pub scale: u32,
    /// Top-left corner `[x, y]` of the layer's tile in each row (`mask`: appearance layers only).
    pub tiles: BTreeMap<Panel, [u32; 2]>,
    /// The layer's tensors in `maps.safetensors`.
    pub tensors: Vec<String>,
}

/// `maps.json`.
#[derive(Debug, Clone, Serialize)]
pub struct MapsIndex {
    pub source: String,
    #[serde(flatten)]
    pub context: MapsContext,
    pub smoothing: String,
    pub sheet: String,
    /// The side of a cell of the sheet (TILE, or the largest tile when larger).
    pub cell: u32,
    pub rows: Vec<Panel>,
    pub layers: Vec<TileInfo>,
}

/// The files `pnd maps` wrote.
#[derive(Debug, Clone)]
pub struct MapsOutput {
    pub sheet: PathBuf,
    pub tensors: PathBuf,
    pub index: PathBuf,
    pub image: PathBuf,
}

/// `round(255 · v)`, clamped to the byte range.
pub fn gray(v: f32) -> u8 {
    (255.0 * v).round().clamp(0.0, 255.0) as u8
}

/// The upscaling factor of an `h × w` map (see the module's drawing rule).
pub fn scale_of(height: usize, width: usize) -> u32 {
    (TILE / height.max(width).max(1) as u32).max(1)
}

fn values(t: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

/// Draws `pixel(value)` of each map position as a `scale × scale` block at `(x0, y0)`.
fn draw_map(
    sheet: &mut RgbImage,
    map: &[Vec<f32>],
    scale: u32,
    (x0, y0): (u32, u32),
    pixel: impl Fn(f32, u32, u32) -> Rgb<u8>,
) {
    for (i, row) in map.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            for dy in 0..scale {
                for dx in 0..scale {
                    let (x, y) = (j as u32 * scale + dx, i as u32 * scale + dy);
                    sheet.put_pixel(x0 + x, y0 + y, pixel(v, x, y));
                }
            }
        }
    }
}

/// A 1-pixel gray frame just outside the `w × h` tile at `(x0, y0)` (in the gap between cells),
/// so a tile's white edge stays visible on the white sheet.
fn frame(sheet: &mut RgbImage, (x0, y0): (u32, u32), w: u32, h: u32) {
    let line = Rgb([150, 150, 150]);
    for x in x0 - 1..=x0 + w {
        sheet.put_pixel(x, y0 - 1, line);
        sheet.put_pixel(x, y0 + h, line);
    }
    for y in y0 - 1..=y0 + h {
        sheet.put_pixel(x0 - 1, y, line);
        sheet.put_pixel(x0 + w, y, line);
    }
}

/// A heat colour for `v` in [0, 1]: dark blue, through red, to yellow.
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    [
        255.0 * (1.5 * v).min(1.0),
        255.0 * (2.0 * v - 1.0).max(0.0),
        255.0 * (0.5 - v).max(0.0),
    ]
}

fn png_bytes(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// The tensors of `layer` in `maps.safetensors`: `attention.NN`, `normalized.NN`, `smoothed.NN`
/// and (appearance layers) `mask.NN`, NN its two-digit number.
fn layer_tensors(layer: &LayerMaps) -> Vec<(String, Tensor)> {
    let n = layer.order;
    let mut out = vec![
        (format!("attention.{n:02}"), layer.attention.clone()),
        (format!("normalized.{n:02}"), layer.normalized.clone()),
        (format!("smoothed.{n:02}"), layer.smoothed.clone()),
    ];
    if let Some(m) = &layer.mask {
        out.push((format!("mask.{n:02}"), m.clone()));
    }
    out
}

/// Writes the sheet, the tensors, the index and the decoded image into `dir`.
pub fn write_maps(
    dir: &Path,
    maps: &AttentionMaps,
    image: &RgbImage,
    opts: &SheetOptions,
) -> anyhow::Result<MapsOutput> {
    anyhow::ensure!(!maps.layers.is_empty(), "no cross-attention layer captured");
    let c = &maps.context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating '{}'", dir.display()))?;
    let mut rows = vec![Panel::Attention, Panel::Mask, Panel::Smoothed];
    if opts.overlay {
        rows.push(Panel::Overlay);
    }
    // A cell holds the largest tile (maps wider than TILE are drawn at scale 1).
    let cell = maps
        .layers
        .iter()
        .map(|l| l.height.max(l.width) as u32 * scale_of(l.height, l.width))
        .fold(TILE, u32::max);
    let columns = maps.layers.len() as u32;
    let width = LEFT + columns * (cell + GAP);
    let height = TITLE + HEADER + rows.len() as u32 * (cell + GAP);
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let title = format!(
        "Cross-attention of '{}' (token {}) at step {} of {} (t = {}), {}",
        c.subject_word, c.subject_token, c.step, c.steps, c.timestep, opts.source
    );
    draw_text(&mut sheet, &title, (8, 6), 17.0)?;
    let subtitle = format!(
        "prompt \"{}\"; {} layers in inference order (down, mid, up); mask τ = {}; smoothing {}",
        c.prompt,
        maps.layers.len(),
        c.tau,
        opts.smoothing
    );
    draw_text(&mut sheet, &subtitle, (8, 30), 13.0)?;
    for (r, panel) in rows.iter().enumerate() {
        let y = TITLE + HEADER + r as u32 * (cell + GAP);
        let [a, b] = panel.title(c.tau);
        draw_text(&mut sheet, &a, (8, y + cell / 2 - 18), 14.0)?;
        draw_text(&mut sheet, &b, (8, y + cell / 2 + 2), 12.0)?;
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut infos = Vec::with_capacity(maps.layers.len());
    for (c, layer) in maps.layers.iter().enumerate() {
        let x = LEFT + c as u32 * (cell + GAP);
        let label = format!("{} · {}×{}", layer.order, layer.height, layer.width);
        draw_text(&mut sheet, &label, (x + 2, TITLE), 14.0)?;
        let scale = scale_of(layer.height, layer.width);
        let normalized = values(&layer.normalized)?;
        let mut tiles = BTreeMap::new();
        for (r, panel) in rows.iter().enumerate() {
            let at = (x, TITLE + HEADER + r as u32 * (cell + GAP));
            match panel {
                Panel::Attention => {
                    draw_map(&mut sheet, &normalized, scale, at, |v, _, _| {
                        Rgb([gray(v); 3])
                    });
                }
                Panel::Mask => match &layer.mask {
                    Some(m) => {
                        let m: Vec<Vec<f32>> = values(m)?;
                        draw_map(&mut sheet, &m, scale, at, |v, _, _| {
                            Rgb([if v > 0.0 { 255 } else { 0 }; 3])
                        });
                    }
                    None => {
                        imageops::replace(
                            &mut sheet,
                            &RgbImage::from_pixel(cell, cell, EMPTY),
                            at.0 as i64,
                            at.1 as i64,
                        );
                        continue;
                    }
                },
                Panel::Smoothed => {
                    let s = values(&layer.smoothed)?;
                    draw_map(&mut sheet, &s, scale, at, |v, _, _| Rgb([gray(v); 3]));
                }
                Panel::Overlay => {
                    let (tw, th) = (layer.width as u32 * scale, layer.height as u32 * scale);
                    let base = imageops::resize(image, tw, th, imageops::FilterType::Triangle);
                    draw_map(&mut sheet, &normalized, scale, at, |v, px, py| {
                        let p = base.get_pixel(px, py).0;
                        let h = heat(v);
                        // The image shows through where the subject token attends little.
                        let a = 0.2 + 0.6 * v.clamp(0.0, 1.0);
                        Rgb(std::array::from_fn(|k| {
                            ((1.0 - a) * p[k] as f32 + a * h[k]).round() as u8
                        }))
                    });
                }
            }
            frame(
                &mut sheet,
                at,
                layer.width as u32 * scale,
                layer.height as u32 * scale,
            );
            tiles.insert(*panel, [at.0, at.1]);
        }
        let named = layer_tensors(layer);
        infos.push(TileInfo {
            order: layer.order,
            site: layer.site.clone(),
            height: layer.height,
            width: layer.width,
            appearance: layer.mask.is_some(),
            scale,
            tiles,
            tensors: named.iter().map(|(n, _)| n.clone()).collect(),
        });
        tensors.extend(named);
    }
    let out = MapsOutput {
        sheet: dir.join("maps.png"),
        tensors: dir.join("maps.safetensors"),
        index: dir.join("maps.json"),
        image: dir.join("image.png"),
    };
    let index = MapsIndex {
        source: opts.source.clone(),
        context: maps.context.clone(),
        smoothing: opts.smoothing.clone(),
        sheet: "maps.png".into(),
        cell,
        rows,
        layers: infos,
    };
    weights::files::save_plain(&tensors, &out.tensors)?;
    write_file_atomic(&out.sheet, &png_bytes(&sheet)?)?;
    write_file_atomic(&out.image, &png_bytes(image)?)?;
    write_file_atomic(
        &out.index,
        format!("{}\n", serde_json::to_string_pretty(&index)?).as_bytes(),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_levels_and_scales() {
        assert_eq!(
            (gray(0.0), gray(1.0), gray(0.5), gray(0.2)),
            (0, 255, 128, 51)
        );
        assert_eq!((gray(-0.1), gray(1.2)), (0, 255));
        assert_eq!(
            (
                scale_of(64, 64),
                scale_of(8, 8),
                scale_of(2, 2),
                scale_of(96, 96)
            ),
            (2, 16, 64, 1)
        );
        assert_eq!(scale_of(200, 200), 1);
    }
}

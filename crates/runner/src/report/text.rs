//! Text drawn into raster figures (the report's grids, `pnd figures`) in the bundled DejaVu Sans,
//! so labels render the same on every machine, and measured with the same font.

use image::RgbImage;

/// DejaVu Sans' height (ascent − descent, the size plotters and ab_glyph draw at) in ems: a font
/// drawn at `size` px here has an em of `size / EM_HEIGHT` px, its CSS `font-size`.
pub const EM_HEIGHT: f64 = (1901.0 + 483.0) / 2048.0;

/// Writes `text` into `img` with its top left at (x, y), at plotters' `size` (px of ascent −
/// descent), each glyph at its own bearing ([`super::glyphs::GlyphBackend`]: plotters' bitmap
/// text splits words). The baseline lies [`super::glyphs::BASELINE`]` · size` below `y`.
pub fn draw_text(
    img: &mut RgbImage,
    text: &str,
    (x, y): (i64, i64),
    size: f64,
) -> anyhow::Result<()> {
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

/// Writes `text` with its baseline at `baseline` and its horizontal center at `center`.
pub fn draw_centered(
    img: &mut RgbImage,
    text: &str,
    (center, baseline): (f64, f64),
    size: f64,
) -> anyhow::Result<()> {
    let x = center - text_width(text, size) / 2.0;
    draw_text(
        img,
        text,
        (
            x.round() as i64,
            (baseline - super::glyphs::BASELINE as f64 * size).round() as i64,
        ),
        size,
    )
}

/// The advance width of `text` in pixels at `size` (kerning included).
pub fn text_width(text: &str, size: f64) -> f64 {
    use plotters::style::IntoFont;
    super::plots::register_font();
    (super::plots::FONT, size)
        .into_font()
        .box_size(text)
        .map(|(w, _)| w as f64)
        .unwrap_or(0.0)
}

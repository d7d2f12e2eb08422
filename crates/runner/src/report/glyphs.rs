//! PNG text with each glyph where the font puts it.
//!
//! plotters 0.3.7 draws `ab_glyph` text (`style/font/ab_glyph.rs`, `FontDataInternal::draw`) by
//! rasterizing each glyph at the origin and pasting it at the pen position truncated to whole
//! pixels, without the glyph's own offset (`px_bounds().min.x`, its left side bearing): letters
//! with a large bearing move right, those with a small one left, and words split ("sub ject",
//! "Pick-an d-Draw" in the reports before this fix). [`GlyphBackend`] wraps the bitmap backend
//! and draws text itself: each glyph outlined at its fractional pen position (kerning included)
//! and pasted at its pixel bounds. The layout box (what plotters measures to place labels) is
//! plotters' own, so the charts are laid out as before. The SVG files are not affected: their
//! text is `<text>` rendered by the viewer.

use ab_glyph::{point, Font, FontRef, ScaleFont};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

/// The bundled DejaVu Sans, the font every PNG of the report is drawn with.
pub(super) const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Where the baseline lies below the top of a line of text, as a share of the style's size:
/// the SVG backend's `dy="0.76em"` at its `font-size` of size / 1.24, so a PNG and its SVG put
/// text at the same height.
pub(super) const BASELINE: f32 = 0.76 / 1.24;

/// The coverage of each pixel of `text` drawn at `size` (plotters' size: the glyphs' pixel
/// scale) with its top left at (0, 0) and its baseline at `BASELINE · size`.
pub fn rasterize(font: &FontRef, size: f32, text: &str, mut pixel: impl FnMut(i32, i32, f32)) {
    let scaled = font.as_scaled(size);
    let baseline = BASELINE * size;
    let mut caret = 0.0f32;
    let mut prev = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(size, point(caret, baseline));
        if let Some(outlined) = font.outline_glyph(glyph) {
            let b = outlined.px_bounds();
            let (x0, y0) = (b.min.x as i32, b.min.y as i32);
            outlined.draw(|x, y, coverage| pixel(x0 + x as i32, y0 + y as i32, coverage));
        }
        caret += scaled.h_advance(id);
    }
}

/// The bitmap backend with text drawn by [`rasterize`].
pub struct GlyphBackend<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

impl<'a> GlyphBackend<'a> {
    pub fn new(inner: BitMapBackend<'a>) -> Self {
        Self {
            inner,
            font: FontRef::try_from_slice(FONT_BYTES).expect("the bundled DejaVu Sans parses"),
        }
    }
}

type Error<'a> = DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

impl<'a> DrawingBackend for GlyphBackend<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), Error<'a>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), Error<'a>> {
        self.inner.present()
    }
    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), Error<'a>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), Error<'a>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), Error<'a>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), Error<'a>> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), Error<'a>> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), Error<'a>> {
        self.inner.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), Error<'a>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    /// As the default `draw_text` (anchor from plotters' layout box, then the rotation), with the
    /// glyphs from [`rasterize`].
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> Result<(), Error<'a>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let (w, h) = self.get_size();
        let mut pixels = Vec::new();
        rasterize(&self.font, style.size() as f32, text, |x, y, coverage| {
            pixels.push((x, y, coverage))
        });
        for (x, y, coverage) in pixels {
            if coverage <= 0.0 {
                continue;
            }
            let (x, y) = transform.transform(x + dx, y + dy);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                self.inner
                    .draw_pixel((x, y), color.mix(coverage.min(1.0) as f64))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blank columns between the ink of `text` drawn at `size`: the widest run inside it.
    fn widest_gap(text: &str, size: f32) -> usize {
        let font = FontRef::try_from_slice(FONT_BYTES).unwrap();
        let mut ink = std::collections::BTreeSet::new();
        rasterize(&font, size, text, |x, _, c| {
            if c > 0.25 {
                ink.insert(x);
            }
        });
        let cols: Vec<i32> = ink.into_iter().collect();
        cols.windows(2)
            .map(|w| (w[1] - w[0] - 1) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Words stay whole: inside "subject" and "Pick-and-Draw" no gap reaches a space's width,
    /// which "sub ject" shows (the split the reports had).
    #[test]
    fn words_are_not_split_and_spaces_are_kept() {
        for size in [12.0, 13.0, 15.0, 22.0] {
            let space = widest_gap("sub ject", size);
            for word in ["subject", "Pick-and-Draw", "DreamBooth", "CLIP-I"] {
                let inner = widest_gap(word, size);
                assert!(
                    inner < space && inner as f32 <= (0.15 * size).max(2.0),
                    "{word} at {size}: a gap of {inner} px inside, a space is {space} px"
                );
            }
        }
    }

    /// The glyphs land where the font's advances and kerning put them: the ink of "ij" starts
    /// at the first glyph's bearing and the text is as wide as plotters' layout box says.
    #[test]
    fn ink_matches_the_layout_plotters_measures() {
        let font = FontRef::try_from_slice(FONT_BYTES).unwrap();
        let size = 20.0;
        let mut xs = Vec::new();
        rasterize(&font, size, "Pick-and-Draw", |x, _, c| {
            if c > 0.0 {
                xs.push(x)
            }
        });
        let (lo, hi) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        let scaled = font.as_scaled(size);
        let mut advance = 0.0;
        let mut prev = None;
        for c in "Pick-and-Draw".chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                advance += scaled.kern(p, id);
            }
            advance += scaled.h_advance(id);
            prev = Some(id);
        }
        assert!((0..=3).contains(&lo), "ink starts at {lo}");
        assert!(
            (hi as f32) <= advance + 1.0 && (hi as f32) >= advance - 4.0,
            "ink ends at {hi}, advance {advance}"
        );
    }
}

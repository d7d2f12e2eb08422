//! A figure's geometry and its three renderings: the PNG (DejaVu Sans drawn into the pixels),
//! the SVG (the same cells embedded as base64 PNG, the same text as SVG `<text>`) and the LaTeX
//! snippet.
//!
//! Geometry, at the figure's dpi: the PNG is `width × dpi` pixels wide; the columns share it with
//! a gap of 2 pt between them; a header holds the column titles (wrapped to two lines and shrunk
//! to fit a column), and under each row of square cells is its prompt (shrunk to fit the width).

use super::spec::FigureSpec;
use super::FigureError;
use crate::report::text::{draw_centered, text_width, EM_HEIGHT};
use image::{imageops, Rgb, RgbImage};
use std::path::Path;

/// A figure's geometry in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    pub dpi: u32,
    /// Side of a (square) cell.
    pub cell: u32,
    /// Space between columns and between rows.
    pub gap: u32,
    /// Left edge of the first column (the width's remainder, split on both sides).
    pub left: u32,
    /// Height of the column titles above the first row.
    pub header: u32,
    /// Height of the prompt line under each row.
    pub label: u32,
    pub columns: usize,
    pub rows: usize,
    /// The em of the text in pixels (the spec's `font_size` at the dpi).
    pub em: f64,
    /// Each column's title as drawn: its lines and their em.
    pub titles: Vec<(Vec<String>, f64)>,
}

impl Layout {
    pub fn new(fig: &FigureSpec, titles: &[String]) -> Self {
        let dpi = fig.dpi;
        let px = |pt: f64| pt * dpi as f64 / 72.0;
        let width = (fig.width_in() * dpi as f64).round() as u32;
        let n = fig.columns.len() as u32;
        let gap = px(2.0).round().max(1.0) as u32;
        let cell = (width - (n - 1) * gap) / n;
        let left = (width - n * cell - (n - 1) * gap) / 2;
        let em = px(fig.font_size);
        let line = (em * 1.25).ceil();
        // A gap's width inside the column too, so that two titles never touch.
        // All titles at one size: the largest at which each fits.
        let room = (cell - gap) as f64;
        let size = titles
            .iter()
            .map(|t| fit_lines(t, room, em, 2).1)
            .fold(em, f64::min);
        let titles: Vec<(Vec<String>, f64)> =
            titles.iter().map(|t| fit_lines(t, room, size, 2)).collect();
        let most = titles.iter().map(|(l, _)| l.len()).max().unwrap_or(1) as f64;
        let header = (most * line + em * 0.4).ceil() as u32;
        let label = (em * 1.6).ceil() as u32;
        let rows = fig.rows.len() as u32;
        let height = header + rows * (cell + label) + (rows - 1) * gap;
        Self {
            width,
            height,
            dpi,
            cell,
            gap,
            left,
            header,
            label,
            columns: n as usize,
            rows: rows as usize,
            em,
            titles,
        }
    }

    /// Top left corner of a cell.
    pub fn cell_origin(&self, row: usize, column: usize) -> (u32, u32) {
        (
            self.left + column as u32 * (self.cell + self.gap),
            self.header + row as u32 * (self.cell + self.label + self.gap),
        )
    }

    /// The texts as drawn: (text, center x, baseline y, em).
    pub fn texts(&self, prompts: &[String]) -> Vec<(String, f64, f64, f64)> {
        let mut out = Vec::new();
        let line = (self.em * 1.25).ceil();
        for (c, (lines, em)) in self.titles.iter().enumerate() {
            let center = self.cell_origin(0, c).0 as f64 + self.cell as f64 / 2.0;
            // Bottom-aligned above the first row: the last line's descent clears the images.
            let last = self.header as f64 - self.em * 0.4;
            for (i, l) in lines.iter().enumerate() {
                let baseline = last - (lines.len() - 1 - i) as f64 * line;
                out.push((l.clone(), center, baseline, *em));
            }
        }
        for (r, p) in prompts.iter().enumerate() {
            let (_, top) = self.cell_origin(r, 0);
            // At the titles' size (one size for all text), smaller if it must.
            let start = self.titles.first().map_or(self.em, |t| t.1);
            let (lines, em) = fit_lines(p, self.width as f64 - 2.0 * self.gap as f64, start, 1);
            let text = lines.join(" ");
            let baseline = (top + self.cell) as f64 + em * 1.15;
            out.push((text, self.width as f64 / 2.0, baseline, em));
        }
        out
    }
}

/// `text` in at most `max_lines` (1 or 2) lines of at most `width` px: wrapped at a space,
/// shrunk (down to 0.6 of `em`) until it fits; at 0.6 em it is left as one line, too wide.
/// Returns the lines and their em.
fn fit_lines(text: &str, width: f64, em: f64, max_lines: usize) -> (Vec<String>, f64) {
    let mut size = em;
    loop {
        let fits = |s: &str| text_width(s, size * EM_HEIGHT) <= width;
        if fits(text) {
            return (vec![text.to_string()], size);
        }
        // Two lines: of the splits at a space whose halves both fit, the most balanced.
        let words: Vec<&str> = text.split(' ').collect();
        let splits = if max_lines >= 2 { 1..words.len() } else { 0..0 };
        let mut best: Option<(f64, Vec<String>)> = None;
        for k in splits {
            let (a, b) = (words[..k].join(" "), words[k..].join(" "));
            if fits(&a) && fits(&b) {
                let worst = text_width(&a, size * EM_HEIGHT).max(text_width(&b, size * EM_HEIGHT));
                if best.as_ref().is_none_or(|(w, _)| worst < *w) {
                    best = Some((worst, vec![a, b]));
                }
            }
        }
        if let Some((_, lines)) = best {
            return (lines, size);
        }
        if size <= em * 0.6 {
            return (vec![text.to_string()], size);
        }
        size *= 0.95;
    }
}

/// An image as a cell: center-cropped to a square and resized to `side` (Lanczos3).
pub fn cell_image(path: &Path, side: u32) -> Result<RgbImage, FigureError> {
    let img = image::open(path)
        .map_err(|cause| FigureError::Image {
            path: path.into(),
            cause,
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let s = w.min(h);
    let crop = imageops::crop_imm(&img, (w - s) / 2, (h - s) / 2, s, s).to_image();
    if s == side {
        return Ok(crop);
    }
    Ok(imageops::resize(
        &crop,
        side,
        side,
        imageops::FilterType::Lanczos3,
    ))
}

/// The figure's pixels.
pub fn raster(
    layout: &Layout,
    cells: &[Vec<RgbImage>],
    prompts: &[String],
) -> anyhow::Result<RgbImage> {
    let mut img = RgbImage::from_pixel(layout.width, layout.height, Rgb([255, 255, 255]));
    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (x, y) = layout.cell_origin(r, c);
            imageops::replace(&mut img, cell, x as i64, y as i64);
        }
    }
    for (text, center, baseline, em) in layout.texts(prompts) {
        draw_centered(&mut img, &text, (center, baseline), em * EM_HEIGHT)?;
    }
    Ok(img)
}

/// The figure as PNG bytes, with its print resolution recorded (a `pHYs` chunk), so that a
/// document that includes it at its natural size prints it `width` inches wide.
pub fn png(
    layout: &Layout,
    cells: &[Vec<RgbImage>],
    prompts: &[String],
) -> anyhow::Result<Vec<u8>> {
    let img = raster(layout, cells, prompts)?;
    let bytes = encode_png(&img)?;
    Ok(with_dpi(bytes, layout.dpi))
}

fn encode_png(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out))?;
    Ok(out)
}

/// Inserts a `pHYs` chunk (pixels per metre) after the PNG's `IHDR`.
fn with_dpi(png: Vec<u8>, dpi: u32) -> Vec<u8> {
    // Signature (8 bytes), then IHDR: length (4), type (4), 13 bytes of data, CRC (4).
    const AFTER_IHDR: usize = 8 + 4 + 4 + 13 + 4;
    let ppm = (dpi as f64 / 0.0254).round() as u32;
    let mut data = Vec::with_capacity(9);
    data.extend_from_slice(&ppm.to_be_bytes());
    data.extend_from_slice(&ppm.to_be_bytes());
    data.push(1); // unit: metre
    let mut chunk = Vec::with_capacity(21);
    chunk.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let typed: Vec<u8> = b"pHYs".iter().chain(&data).copied().collect();
    chunk.extend_from_slice(&typed);
    chunk.extend_from_slice(&crc32(&typed).to_be_bytes());
    let mut out = png;
    out.splice(AFTER_IHDR..AFTER_IHDR, chunk);
    out
}

/// CRC-32 (ISO-HDLC, PNG's), bit by bit: a chunk of a few bytes needs no table.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Standard base64 with padding (RFC 4648), for the SVG's embedded images.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The same figure as SVG: its size in inches (so it prints as wide as the PNG), a viewBox in the
/// PNG's pixels, each cell an `<image>` of its PNG, each title and prompt a `<text>`.
pub fn svg(layout: &Layout, cells: &[Vec<RgbImage>], prompts: &[String]) -> anyhow::Result<String> {
    let inches = |px: u32| px as f64 / layout.dpi as f64;
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         xmlns:xlink=\"http://www.w3.org/1999/xlink\" width=\"{:.4}in\" height=\"{:.4}in\" \
         viewBox=\"0 0 {} {}\">\n<rect width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>\n",
        inches(layout.width),
        inches(layout.height),
        layout.width,
        layout.height,
        layout.width,
        layout.height
    );
    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (x, y) = layout.cell_origin(r, c);
            let data = base64(&encode_png(cell)?);
            s += &format!(
                "<image x=\"{x}\" y=\"{y}\" width=\"{0}\" height=\"{0}\" preserveAspectRatio=\"none\" \
                 xlink:href=\"data:image/png;base64,{data}\"/>\n",
                layout.cell
            );
        }
    }
    for (text, center, baseline, em) in layout.texts(prompts) {
        s += &format!(
            "<text x=\"{center:.1}\" y=\"{baseline:.1}\" font-family=\"DejaVu Sans, Verdana, sans-serif\" \
             font-size=\"{em:.2}\" text-anchor=\"middle\" fill=\"#000000\">{}</text>\n",
            crate::report::html::escape(&text)
        );
    }
    s += "</svg>\n";
    Ok(s)
}

/// The LaTeX `figure` (or `figure*`) that includes the PNG at its printed width, with the
/// spec's caption and label; the SVG's `\includesvg` is given as a comment.
pub fn latex(fig: &FigureSpec, layout: &Layout, spec_file: &str) -> String {
    let env = if fig.wide { "figure*" } else { "figure" };
    let width = if fig.wide {
        "\\textwidth"
    } else {
        "\\columnwidth"
    };
    let name = fig.name();
    format!(
        "% {name}: written by `pnd figures` from '{spec_file}'.\n\
         % {name}.png is {w} x {h} px at {dpi} dpi ({wi:.2} x {hi:.2} in); {name}.svg is the same\n\
         % figure with its text as text: \\usepackage{{svg}} and \\includesvg[width={width}]{{{name}}}.\n\
         \\begin{{{env}}}[t]\n  \\centering\n  \\includegraphics[width={width}]{{{name}.png}}\n  \
         \\caption{{{caption}}}\n  \\label{{{label}}}\n\\end{{{env}}}\n",
        w = layout.width,
        h = layout.height,
        dpi = layout.dpi,
        wi = layout.width as f64 / layout.dpi as f64,
        hi = layout.height as f64 / layout.dpi as f64,
        caption = fig.caption.trim(),
        label = fig.latex_label(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_crc32_match_their_standards() {
        // RFC 4648 §10 test vectors.
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        // The CRC of IEND (every PNG ends with it) and the check value of "123456789".
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn titles_wrap_to_two_lines_and_prompts_shrink_on_one() {
        let em = 30.0;
        let text = "DreamBooth + Pick-and-Draw";
        let wide = text_width(text, em * EM_HEIGHT);
        // Room for about 60% of it: a title wraps at full size, a prompt shrinks to fit.
        let room = wide * 0.6;
        let (lines, size) = fit_lines(text, room, em, 2);
        assert_eq!((lines.len(), size), (2, em), "{lines:?}");
        assert!(lines.iter().all(|l| text_width(l, em * EM_HEIGHT) <= room));
        assert_eq!(lines.join(" "), text);
        let room = wide * 0.8;
        let (lines, size) = fit_lines(text, room, em, 1);
        assert_eq!(lines, [text]);
        assert!(
            size < em && text_width(text, size * EM_HEIGHT) <= room,
            "{size}"
        );
        // What cannot fit at 0.6 em stays one line at that size.
        let (lines, size) = fit_lines(text, wide * 0.3, em, 1);
        assert_eq!(lines.len(), 1);
        assert!(size <= em * 0.6 && size > em * 0.55, "{size}");
    }

    #[test]
    fn the_png_records_its_dpi_and_still_decodes() {
        let img = RgbImage::from_pixel(3, 2, Rgb([10, 20, 30]));
        let png = with_dpi(encode_png(&img).unwrap(), 300);
        let at = png.windows(4).position(|w| w == b"pHYs").unwrap();
        assert_eq!(&png[at + 4..at + 8], &11811u32.to_be_bytes());
        assert_eq!(png[at + 12], 1);
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
}

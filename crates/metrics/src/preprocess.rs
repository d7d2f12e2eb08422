//! Image preprocessing of the DreamBooth protocol (SPEC §5): decode → RGB → resize the shortest side
//! (bicubic, PIL) → center crop → `x / 255` → `(x − mean) / std`, CHW f32.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images
//! (<https://github.com/python-pillow/Pillow/blob/01f132fb086af790cbd67cfb0ad9aaac607ef567/src/libImaging/Resample.c>:
//! `precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`,
//! `ImagingResampleVertical_8bpc`, `ImagingResampleInner`): separable passes (horizontal first),
//! support scaled by the downscale factor (antialiasing), bicubic a = −0.5, coefficients in 22-bit
//! fixed point, rounding and clipping to 8 bits after each pass. It is bit-exact to PIL's output
//! (measured on all 158 DreamBench images by the fixture tests). The output size and crop offsets
//! follow torchvision (`_compute_resized_output_size`: `int(size · long / short)`;
//! `center_crop`: `int(round((h − crop) / 2))` with Python's round-half-to-even).

use crate::MetricsError;
use image::RgbImage;
use std::path::Path;

/// One preprocessing recipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Target of the shortest side.
    pub resize: u32,
    /// Side of the square center crop.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// DINO: shortest side 256, crop 224, ImageNet statistics.
    pub const DINO: Preprocess = Preprocess {
        resize: 256,
        crop: 224,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// CLIP: shortest side 224, crop 224, CLIP statistics (as published; f32 rounds them).
    #[allow(clippy::excessive_precision)]
    pub const CLIP: Preprocess = Preprocess {
        resize: 224,
        crop: 224,
        mean: [0.48145466, 0.4578275, 0.40821073],
        std: [0.26862954, 0.26130258, 0.27577711],
    };

    /// A stable description, part of the embedding cache key.
    pub fn tag(&self) -> String {
        format!(
            "pil-bicubic-shortest{}-crop{}-mean{:?}-std{:?}",
            self.resize, self.crop, self.mean, self.std
        )
    }

    /// Resize + crop, 8-bit.
    pub fn crop_u8(&self, img: &RgbImage) -> RgbImage {
        center_crop(&resize_shortest(img, self.resize), self.crop)
    }

    /// The model input, CHW f32 (`crop × crop × 3` values).
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        self.normalize(&self.crop_u8(img))
    }

    /// `ToTensor` + `Normalize` in f32: `(v / 255 − mean) / std`, CHW.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (p.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// Decodes an image file to 8-bit RGB (baseline JPEGs bit-exactly as PIL/libjpeg-turbo, see
/// [`crate::jpeg`]; other files with the `image` crate); a file that cannot be read, is not an image, or is truncated
/// is one error naming it.
pub fn load_rgb(path: &Path) -> Result<RgbImage, MetricsError> {
    let bytes = std::fs::read(path).map_err(|e| MetricsError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_rgb(&bytes, path)
}

/// As [`load_rgb`], from bytes already read (`path` names them in errors).
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, MetricsError> {
    let bad = |reason: String| MetricsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let format = image::guess_format(bytes).map_err(|e| bad(e.to_string()))?;
    // The JPEG decoders fill a truncated scan with grey instead of failing; PIL refuses such a
    // file ("image file is truncated"), and so do we: the scan must be followed by EOI.
    if format == image::ImageFormat::Jpeg && !jpeg_has_eoi(bytes) {
        return Err(bad(
            "truncated JPEG (no end-of-image marker after the image data)".into(),
        ));
    }
    if format == image::ImageFormat::Jpeg {
        if let Some(img) = crate::jpeg::decode_baseline(bytes) {
            return Ok(img);
        }
    }
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| bad(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Whether the main image's scan is followed by an EOI marker (`FF D9`): the last EOI comes after the
/// last start-of-scan (`FF DA`). Neither can occur inside entropy-coded data (0xFF is stuffed), an
/// embedded EXIF thumbnail sits before the main scan, and trailing bytes after EOI are allowed.
fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xD9), last(0xDA)) {
        (Some(eoi), Some(sos)) => eoi > sos,
        _ => false,
    }
}

/// Output size of torchvision's `Resize(size)` (an int): shortest side to `size`, the long side
/// `int(size · long / short)`.
pub fn shortest_side_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((size as u64 * long as u64) as f64 / short as f64) as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision `Resize(size)` on a PIL image: PIL bicubic to [`shortest_side_size`].
pub fn resize_shortest(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = shortest_side_size(w, h, size);
    resize_bicubic(img, nw, nh)
}

/// torchvision `center_crop` of an image at least `size` on both sides.
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    assert!(
        w >= size && h >= size,
        "center crop {size} of a {w}×{h} image"
    );
    let top = ((h - size) as f64 / 2.0).round_ties_even() as u32;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(img, left, top, size, size).to_image()
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps of one pass: for output `i`, input `start[i]..start[i] + len[i]` with
/// weights `k[i * ksize ..]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` (box `0..in_size`) followed by `normalize_coeffs_8bpc`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    let (in0, in1) = (0f32, in_size as f32);
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            *wx = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..xmax {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1i64 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        start.push(xmin);
        len.push(xmax);
    }
    Taps {
        ksize,
        start,
        len,
        k,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((w, h), Image.BICUBIC)` for an RGB image (no `reducing_gap`), bit-exact.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    use rayon::prelude::*;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if (ow, oh) == (w, h) {
        return img.clone();
    }
    let src = img.as_raw();
    let vt = taps(h, oh);
    // Horizontal pass over only the rows the vertical pass reads, as `ImagingResampleInner` does.
    let (first, last) = if oh != h {
        (vt.start[0], vt.start[oh - 1] + vt.len[oh - 1])
    } else {
        (0, h)
    };
    let round = 1i32 << (PRECISION_BITS - 1);
    let (tmp, tmp_w): (Vec<u8>, usize) = if ow != w {
        let ht = taps(w, ow);
        let mut tmp = vec![0u8; (last - first) * ow * 3];
        tmp.par_chunks_mut(ow * 3).enumerate().for_each(|(r, out)| {
            let row = &src[(first + r) * w * 3..(first + r + 1) * w * 3];
            for xx in 0..ow {
                let k = &ht.k[xx * ht.ksize..xx * ht.ksize + ht.len[xx]];
                let base = ht.start[xx] * 3;
                let (mut s0, mut s1, mut s2) = (round, round, round);
                for (x, &kx) in k.iter().enumerate() {
                    let p = base + x * 3;
                    s0 += row[p] as i32 * kx;
                    s1 += row[p + 1] as i32 * kx;
                    s2 += row[p + 2] as i32 * kx;
                }
                out[xx * 3] = clip8(s0);
                out[xx * 3 + 1] = clip8(s1);
                out[xx * 3 + 2] = clip8(s2);
            }
        });
        (tmp, ow)
    } else {
        (src[first * w * 3..last * w * 3].to_vec(), w)
    };
    if oh == h {
        return RgbImage::from_raw(out_w, out_h, tmp).expect("buffer size");
    }
    let row_len = tmp_w * 3;
    let mut out = vec![0u8; oh * row_len];
    out.par_chunks_mut(row_len).enumerate().for_each(|(yy, o)| {
        let k = &vt.k[yy * vt.ksize..yy * vt.ksize + vt.len[yy]];
        let y0 = vt.start[yy] - first;
        for (i, v) in o.iter_mut().enumerate() {
            let mut s = round;
            for (y, &ky) in k.iter().enumerate() {
                s += tmp[(y0 + y) * row_len + i] as i32 * ky;
            }
            *v = clip8(s);
        }
    });
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eoi_must_follow_the_last_scan() {
        let sos = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 3];
        assert!(!jpeg_has_eoi(&sos));
        let mut done = sos.to_vec();
        done.extend([0xFF, 0xD9]);
        assert!(jpeg_has_eoi(&done));
        done.extend(b"trailing bytes");
        assert!(jpeg_has_eoi(&done));
        // An EOI that belongs to an embedded thumbnail (before the main scan) does not count.
        let thumb = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 5, 6];
        assert!(!jpeg_has_eoi(&thumb));
    }

    #[test]
    fn sizes_and_crop_offsets_follow_torchvision() {
        assert_eq!(shortest_side_size(2048, 2048, 256), (256, 256));
        assert_eq!(shortest_side_size(640, 480, 224), (298, 224));
        assert_eq!(shortest_side_size(480, 641, 256), (256, 341));
        // (257 − 224) / 2 = 16.5 rounds to 16 (half to even); (259 − 224) / 2 = 17.5 → 18.
        let img = RgbImage::from_fn(257, 259, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = center_crop(&img, 224);
        assert_eq!(c.get_pixel(0, 0).0, [16, 18, 0]);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point_and_identity_when_not_resizing() {
        let t = taps(2048, 256);
        assert_eq!(t.ksize, 33);
        for i in 0..256 {
            let s: i32 = t.k[i * t.ksize..i * t.ksize + t.len[i]].iter().sum();
            assert!((s - (1 << PRECISION_BITS)).abs() <= 33, "{s}");
        }
        let img = RgbImage::from_fn(5, 7, |x, y| image::Rgb([x as u8 * 40, y as u8 * 30, 7]));
        assert_eq!(resize_bicubic(&img, 5, 7), img);
        // A constant image stays constant through both passes.
        let flat = RgbImage::from_pixel(300, 200, image::Rgb([200, 13, 255]));
        let r = resize_bicubic(&flat, 97, 61);
        assert!(r.pixels().all(|p| p.0 == [200, 13, 255]));
    }
}

//! BLIP-Diffusion's image processor (diffusers 0.32.2
//! `pipelines/blip_diffusion/blip_image_processing.py`, `BlipImageProcessor.preprocess`): convert to
//! RGB, resize to exactly `size` (PIL bicubic, aspect ratio not kept), rescale by 1/255, normalize
//! with the pipeline's mean/std; the center crop that follows is a no-op at that size.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images (`libImaging/Resample.c`:
//! `precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc` /
//! `ImagingResampleVertical_8bpc`): separable, horizontal pass first, fixed-point coefficients with
//! 22 fractional bits and a u8 intermediate, so the pixels equal PIL's bit for bit.

use candle_core::{Device, Result, Tensor};
use serde::Deserialize;

/// Pillow's fixed-point precision for 8-bit images (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (`bicubic_filter`, a = -0.5), support 2.
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

/// Per output pixel: the first input index and the fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input range.
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C truncation toward zero, then clamped, as Pillow does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let fixed = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        bounds.push((xmin, n));
        weights.push(fixed);
    }
    Coeffs { bounds, weights }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` of an RGB image, bit-exact.
pub fn resize_bicubic(img: &image::RgbImage, width: u32, height: u32) -> image::RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let src = img.as_raw();
    let need_h = w1 != w0;
    let need_v = h1 != h0;
    let vert = coeffs(h0, h1);
    // Rows the vertical pass reads; the horizontal pass only produces those.
    let (y_first, y_last) = if need_v {
        let (f, _) = vert.bounds[0];
        let (l, n) = vert.bounds[h1 - 1];
        (f, l + n)
    } else {
        (0, h0)
    };
    let rows = y_last - y_first;
    let half = 1i64 << (PRECISION_BITS - 1);
    let temp: Vec<u8> = if need_h {
        let hor = coeffs(w0, w1);
        let mut out = vec![0u8; rows * w1 * 3];
        for y in 0..rows {
            let row = &src[(y + y_first) * w0 * 3..(y + y_first + 1) * w0 * 3];
            for (xx, ((xmin, n), k)) in hor.bounds.iter().zip(&hor.weights).enumerate() {
                let mut ss = [half; 3];
                for (x, &kx) in k.iter().enumerate().take(*n) {
                    let p = (xmin + x) * 3;
                    for c in 0..3 {
                        ss[c] += row[p + c] as i64 * kx as i64;
                    }
                }
                for c in 0..3 {
                    out[(y * w1 + xx) * 3 + c] = clip8(ss[c]);
                }
            }
        }
        out
    } else {
        src[y_first * w0 * 3..y_last * w0 * 3].to_vec()
    };
    let out: Vec<u8> = if need_v {
        let mut out = vec![0u8; h1 * w1 * 3];
        for (yy, ((ymin, n), k)) in vert.bounds.iter().zip(&vert.weights).enumerate() {
            let ymin = ymin - y_first;
            for x in 0..w1 {
                let mut ss = [half; 3];
                for (y, &ky) in k.iter().enumerate().take(*n) {
                    let p = ((ymin + y) * w1 + x) * 3;
                    for c in 0..3 {
                        ss[c] += temp[p + c] as i64 * ky as i64;
                    }
                }
                for c in 0..3 {
                    out[(yy * w1 + x) * 3 + c] = clip8(ss[c]);
                }
            }
        }
        out
    } else {
        temp
    };
    image::RgbImage::from_raw(width, height, out).expect("buffer size matches the dimensions")
}

fn d_true() -> bool {
    true
}
fn d_resample() -> u32 {
    3
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}
fn d_size() -> ImageSize {
    ImageSize {
        height: 224,
        width: 224,
    }
}

/// `{"height": h, "width": w}` (transformers' size dict).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct ImageSize {
    pub height: u32,
    pub width: u32,
}

/// OpenAI CLIP's normalization, `BlipImageProcessor`'s default.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `image_processor/preprocessor_config.json` (field names as transformers writes them).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BlipImageProcessorConfig {
    #[serde(default = "d_true")]
    pub do_resize: bool,
    #[serde(default = "d_size")]
    pub size: ImageSize,
    /// PIL resampling filter id; only 3 (bicubic) is supported.
    #[serde(default = "d_resample")]
    pub resample: u32,
    #[serde(default = "d_true")]
    pub do_rescale: bool,
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    #[serde(default)]
    pub image_mean: Option<Vec<f32>>,
    #[serde(default)]
    pub image_std: Option<Vec<f32>>,
    #[serde(default = "d_true")]
    pub do_center_crop: bool,
}

impl Default for BlipImageProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// The image processor with its normalization resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipImageProcessor {
    pub cfg: BlipImageProcessorConfig,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

fn three(v: &[f32], what: &str) -> Result<[f32; 3]> {
    match v {
        [a, b, c] => Ok([*a, *b, *c]),
        [a] => Ok([*a; 3]),
        _ => candle_core::bail!("image processor: {what} needs 1 or 3 values, got {v:?}"),
    }
}

impl BlipImageProcessor {
    /// `mean`/`std` override the config's, as the pipeline passes its own `config.mean`/`config.std`
    /// into `preprocess` (`None` there falls back to the processor's, then to OpenAI CLIP's).
    pub fn new(
        cfg: &BlipImageProcessorConfig,
        mean: Option<&[f32]>,
        std: Option<&[f32]>,
    ) -> Result<Self> {
        if cfg.do_resize && cfg.resample != 3 {
            candle_core::bail!(
                "image processor: resample = {} is not supported (3, bicubic)",
                cfg.resample
            );
        }
        if cfg.size.height == 0 || cfg.size.width == 0 {
            candle_core::bail!("image processor: size {:?} is empty", cfg.size);
        }
        let mean = match mean.or(cfg.image_mean.as_deref()) {
            Some(m) => three(m, "image_mean")?,
            None => OPENAI_CLIP_MEAN,
        };
        let std = match std.or(cfg.image_std.as_deref()) {
            Some(s) => three(s, "image_std")?,
            None => OPENAI_CLIP_STD,
        };
        if std.contains(&0.0) {
            candle_core::bail!("image processor: image_std {std:?} has a zero");
        }
        Ok(Self {
            cfg: cfg.clone(),
            mean,
            std,
        })
    }

    /// Pixel values of one RGB image.
    ///
    /// # Shapes
    /// Output `[1, 3, size.height, size.width]` (f32; the image's own size without `do_resize`).
    pub fn preprocess(&self, img: &image::RgbImage, device: &Device) -> Result<Tensor> {
        let resized;
        let img = if self.cfg.do_resize {
            resized = resize_bicubic(img, self.cfg.size.width, self.cfg.size.height);
            &resized
        } else {
            img
        };
        if self.cfg.do_center_crop
            && (img.width() < self.cfg.size.width || img.height() < self.cfg.size.height)
        {
            candle_core::bail!(
                "image processor: a {}x{} image cannot be center-cropped to {:?} without do_resize",
                img.width(),
                img.height(),
                self.cfg.size
            );
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (cw, ch) = if self.cfg.do_center_crop {
            (self.cfg.size.width as usize, self.cfg.size.height as usize)
        } else {
            (w, h)
        };
        // transformers' center_crop: top = (h - ch) // 2, left = (w - cw) // 2.
        let (top, left) = ((h - ch) / 2, (w - cw) / 2);
        let mut out = vec![0f32; 3 * ch * cw];
        let raw = img.as_raw();
        for c in 0..3 {
            for y in 0..ch {
                for x in 0..cw {
                    let v = raw[((y + top) * w + x + left) * 3 + c];
                    // rescale computes in f64 and stores f32; normalize runs in f32.
                    let mut v = if self.cfg.do_rescale {
                        (v as f64 * self.cfg.rescale_factor) as f32
                    } else {
                        v as f32
                    };
                    if self.cfg.do_normalize {
                        v = (v - self.mean[c]) / self.std[c];
                    }
                    out[(c * ch + y) * cw + x] = v;
                }
            }
        }
        Tensor::from_vec(out, (1, 3, ch, cw), device)
    }
}

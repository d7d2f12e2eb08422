//! BLIP-Diffusion's image processor (diffusers 0.32.2
//! `pipelines/blip_diffusion/blip_image_processing.py`, `BlipImageProcessor.preprocess`): convert to
//! RGB, resize to exactly `size` (PIL bicubic, aspect ratio not kept), rescale by 1/255, normalize
//! with the pipeline's mean/std; the center crop that follows is a no-op at that size.
//!
//! The resize is Pillow's bicubic resample, bit-exact ([`imaging::resize_bicubic`]), so the pixels
//! equal PIL's bit for bit; the reference is decoded as PIL does by [`super::pipeline::read_reference`].

use candle_core::{Device, Result, Tensor};
use imaging::resize_bicubic;
use serde::Deserialize;

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

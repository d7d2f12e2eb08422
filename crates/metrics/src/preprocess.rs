//! Image preprocessing of the DreamBooth protocol (SPEC §5): decode → RGB → resize the shortest side
//! (bicubic, PIL) → center crop → `x / 255` → `(x − mean) / std`, CHW f32.
//!
//! Decoding, the resample and the crop geometry are the [`imaging`] crate's (PIL/libjpeg-turbo and
//! torchvision exact; bit-exact to PIL on all 158 DreamBench images by the fixture tests).

use crate::MetricsError;
use image::RgbImage;
use std::path::Path;

pub use imaging::{center_crop, resize_bicubic, resize_shortest, shortest_side_size};

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

/// Decodes an image file to 8-bit RGB as PIL does ([`imaging::load_rgb`]); a file that cannot be
/// read, is not an image, or is truncated is one error naming it.
pub fn load_rgb(path: &Path) -> Result<RgbImage, MetricsError> {
    Ok(imaging::load_rgb(path)?)
}

/// As [`load_rgb`], from bytes already read (`path` names them in errors).
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, MetricsError> {
    Ok(imaging::decode_rgb(bytes, path)?)
}

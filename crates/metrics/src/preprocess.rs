//! Image preprocessing of the metric protocols (SPEC §5): decode → RGB → resize the shortest side
//! (bicubic, PIL) → center crop → `x / 255` → `(x − mean) / std`, CHW f32; the crop offset and the
//! rescale follow torchvision (the DreamBooth protocol) or transformers' image processors.
//!
//! Decoding, the resample and the crop geometry are the [`imaging`] crate's (PIL/libjpeg-turbo and
//! torchvision exact; bit-exact to PIL on all 158 DreamBench images by the fixture tests).

pub use crate::protocol::{CropOffset, Rescale};
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
    /// Rounding of the crop window's start (torchvision rounds, transformers floors).
    pub crop_offset: CropOffset,
    /// How 8-bit values become floats (torchvision divides in f32, transformers multiplies in f64).
    pub rescale: Rescale,
}

impl Preprocess {
    /// DINO: shortest side 256, crop 224, ImageNet statistics.
    pub const DINO: Preprocess = Preprocess {
        resize: 256,
        crop: 224,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        crop_offset: CropOffset::Round,
        rescale: Rescale::DivideF32,
    };
    /// CLIP: shortest side 224, crop 224, CLIP statistics (as published; f32 rounds them).
    #[allow(clippy::excessive_precision)]
    pub const CLIP: Preprocess = Preprocess {
        resize: 224,
        crop: 224,
        mean: [0.48145466, 0.4578275, 0.40821073],
        std: [0.26862954, 0.26130258, 0.27577711],
        crop_offset: CropOffset::Round,
        rescale: Rescale::DivideF32,
    };

    /// A stable description, part of the embedding cache key.
    /// The torchvision recipe keeps the tag it always had (cache entries stay valid).
    pub fn tag(&self) -> String {
        let mut tag = format!(
            "pil-bicubic-shortest{}-crop{}-mean{:?}-std{:?}",
            self.resize, self.crop, self.mean, self.std
        );
        if self.crop_offset == CropOffset::Floor {
            tag.push_str("-cropfloor");
        }
        if self.rescale == Rescale::MultiplyF64 {
            tag.push_str("-rescalef64");
        }
        tag
    }

    /// Resize + crop, 8-bit.
    pub fn crop_u8(&self, img: &RgbImage) -> RgbImage {
        let resized = resize_shortest(img, self.resize);
        match self.crop_offset {
            CropOffset::Round => center_crop(&resized, self.crop),
            CropOffset::Floor => center_crop_floor(&resized, self.crop),
        }
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
                let x = match self.rescale {
                    Rescale::DivideF32 => p.0[c] as f32 / 255.0,
                    Rescale::MultiplyF64 => (p.0[c] as f64 * (1.0 / 255.0)) as f32,
                };
                out[c * plane + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// transformers' `center_crop` of an image at least `size` on both sides: the window starts at
/// `(h − size) // 2`, `(w − size) // 2`.
pub fn center_crop_floor(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    assert!(
        w >= size && h >= size,
        "center crop {size} of a {w}×{h} image"
    );
    image::imageops::crop_imm(img, (w - size) / 2, (h - size) / 2, size, size).to_image()
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

//! Training images and their transforms, as the two example scripts build them.
//!
//! - Textual Inversion (`TextualInversionDataset`): PIL bicubic resize to `size × size` (no aspect
//!   kept, no crop by default), a random horizontal flip (p = 0.5), `image / 127.5 − 1` computed
//!   in f64 and stored as f32; a random prompt from the small ImageNet templates.
//! - DreamBooth (`DreamBoothDataset`): torchvision `Resize(size, BILINEAR)` (shortest side),
//!   `RandomCrop(size)` (top then left, each uniform), `ToTensor()` (`v / 255` in f32) and
//!   `Normalize([0.5], [0.5])`.

use crate::rng::{rng, Stream};
use crate::TrainError;
use candle_core::{Device, Result, Tensor};
use image::RgbImage;
use rand::Rng;
use std::path::{Path, PathBuf};

/// `imagenet_templates_small` of diffusers' `textual_inversion.py` (objects).
pub const OBJECT_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// The image files of a folder, sorted by name (the scripts take `os.listdir` order; a sorted
/// list makes our runs independent of the file system).
pub fn list_images(dir: &Path) -> std::result::Result<Vec<PathBuf>, TrainError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::Images {
        dir: dir.into(),
        reason: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TrainError::Images {
            dir: dir.into(),
            reason: format!(
                "no images ({}) in the folder; put the subject's images there or point --images at their folder",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    Ok(files)
}

/// Decodes every image once and applies the deterministic part of a transform (the resize).
pub fn load_resized(
    files: &[PathBuf],
    resize: impl Fn(&RgbImage) -> RgbImage,
) -> std::result::Result<Vec<RgbImage>, TrainError> {
    files
        .iter()
        .map(|f| {
            imaging::load_rgb(f)
                .map(|img| resize(&img))
                .map_err(|e| TrainError::Images {
                    dir: f.clone(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Textual Inversion's resize: PIL bicubic to `size × size`.
pub fn ti_resize(img: &RgbImage, size: u32) -> RgbImage {
    imaging::resize_bicubic(img, size, size)
}

/// DreamBooth's resize: torchvision `Resize(size, BILINEAR)` (shortest side to `size`).
pub fn dreambooth_resize(img: &RgbImage, size: u32) -> RgbImage {
    imaging::resize_shortest_with(img, size, imaging::Filter::Bilinear)
}

/// Textual Inversion's pixels: optional horizontal flip, `v / 127.5 − 1` (f64, stored as f32).
///
/// # Shapes
/// Output `[3, h, w]`.
pub fn ti_pixels(img: &RgbImage, flip: bool, device: &Device) -> Result<Tensor> {
    let img = if flip {
        image::imageops::flip_horizontal(img)
    } else {
        img.clone()
    };
    chw(&img, |v| (v as f64 / 127.5 - 1.0) as f32, device)
}

/// DreamBooth's pixels: the `size × size` crop at `(top, left)`, `(v / 255 − 0.5) / 0.5` in f32.
///
/// # Shapes
/// Output `[3, size, size]`.
pub fn dreambooth_pixels(
    img: &RgbImage,
    size: u32,
    (top, left): (u32, u32),
    device: &Device,
) -> Result<Tensor> {
    let crop = image::imageops::crop_imm(img, left, top, size, size).to_image();
    chw(&crop, |v| (v as f32 / 255.0 - 0.5) / 0.5, device)
}

fn chw(img: &RgbImage, f: impl Fn(u8) -> f32, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * h * w];
    for c in 0..3 {
        for i in 0..h * w {
            out[c * h * w + i] = f(raw[i * 3 + c]);
        }
    }
    Tensor::from_vec(out, (3, h, w), device)
}

/// The random choices of one Textual Inversion sample: template index and flip.
pub fn ti_augment(seed: u64, position: u64) -> (usize, bool) {
    let mut r = rng(seed, Stream::Augment, position);
    let template = r.random_range(0..OBJECT_TEMPLATES.len());
    (template, r.random_bool(0.5))
}

/// `RandomCrop(size).get_params`: `(top, left)` uniform over the valid offsets, for the image
/// of `(w, h)`; `salt` separates the instance and class crops of one sample.
pub fn random_crop(
    seed: u64,
    position: u64,
    salt: u64,
    (w, h): (u32, u32),
    size: u32,
) -> (u32, u32) {
    let mut r = rng(
        seed,
        Stream::Augment,
        position.wrapping_mul(2).wrapping_add(salt),
    );
    let top = r.random_range(0..=h - size);
    let left = r.random_range(0..=w - size);
    (top, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_follow_the_scripts_scaling_and_flip() {
        let img = RgbImage::from_fn(2, 1, |x, _| {
            image::Rgb([if x == 0 { 0 } else { 255 }, 51, 128])
        });
        let t = ti_pixels(&img, true, &Device::Cpu).unwrap();
        let v = t.to_vec3::<f32>().unwrap();
        assert_eq!(v[0][0], vec![1.0, -1.0]);
        assert_eq!(v[1][0][0], (51.0f64 / 127.5 - 1.0) as f32);
        let d = dreambooth_pixels(&img, 1, (0, 1), &Device::Cpu).unwrap();
        assert_eq!(d.to_vec3::<f32>().unwrap()[0][0], vec![1.0]);
        assert_eq!(
            d.to_vec3::<f32>().unwrap()[2][0][0],
            (128f32 / 255.0 - 0.5) / 0.5
        );
    }

    #[test]
    fn an_empty_folder_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let e = list_images(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no images"), "{e}");
    }

    #[test]
    fn crops_stay_inside_and_draws_repeat() {
        for p in 0..50 {
            let (t, l) = random_crop(7, p, 0, (40, 30), 30);
            assert_eq!(t, 0);
            assert!(l <= 10);
            assert_eq!(random_crop(7, p, 0, (40, 30), 30), (t, l));
        }
        assert_eq!(ti_augment(3, 9), ti_augment(3, 9));
    }
}

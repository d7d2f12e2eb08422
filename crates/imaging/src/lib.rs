//! PIL-exact image inputs, shared by every crate that must see the pixels the Python reference sees
//! (the metrics, BLIP-Diffusion's image processor, the Pick-and-Draw reference image):
//!
//! - [`load_rgb`] / [`decode_rgb`]: a file to 8-bit RGB as PIL's `Image.open(p).convert("RGB")`
//!   (baseline JPEGs bit-exactly as libjpeg-turbo, [`jpeg`]; other files with the `image` crate);
//! - [`resize_bicubic`] / [`resize_bilinear`]: Pillow's `Image.resize(size, Image.BICUBIC / BILINEAR)`,
//!   bit-exact ([`resample`]);
//! - [`resize_shortest`] / [`center_crop`]: torchvision's `Resize(int)` and `CenterCrop` geometry
//!   ([`transforms`]).

pub mod jpeg;
pub mod resample;
pub mod transforms;

pub use resample::{resize, resize_bicubic, resize_bilinear, Filter};
pub use transforms::{center_crop, resize_shortest, resize_shortest_with, shortest_side_size};

use image::RgbImage;
use std::path::{Path, PathBuf};

/// An image file that cannot be read, is not an image, or is truncated.
#[derive(Debug, thiserror::Error)]
#[error("reading image '{path}': {reason}")]
pub struct ImageError {
    pub path: PathBuf,
    pub reason: String,
}

/// Decodes an image file to 8-bit RGB, as PIL's `Image.open(path).convert("RGB")` (alpha dropped,
/// grey replicated); baseline JPEGs bit-exactly as PIL/libjpeg-turbo ([`jpeg`]), other files with
/// the `image` crate.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_rgb(&bytes, path)
}

/// As [`load_rgb`], from bytes already read (`path` names them in errors).
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, ImageError> {
    let bad = |reason: String| ImageError {
        path: path.to_path_buf(),
        reason,
    };
    let format = image::guess_format(bytes).map_err(|e| bad(e.to_string()))?;
    if format == image::ImageFormat::Jpeg {
        // The JPEG decoders fill a truncated scan with grey instead of failing; PIL refuses such a
        // file ("image file is truncated"), and so do we: the scan must be followed by EOI.
        if !jpeg_has_eoi(bytes) {
            return Err(bad(
                "truncated JPEG (no end-of-image marker after the image data)".into(),
            ));
        }
        if let Some(img) = jpeg::decode_baseline(bytes) {
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
    fn bad_files_are_one_error_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = load_rgb(&missing).unwrap_err();
        assert_eq!(err.path, missing);
        assert!(err.to_string().contains("missing.png"), "{err}");

        let text = dir.path().join("notes.jpg");
        std::fs::write(&text, b"not an image at all").unwrap();
        let err = load_rgb(&text).unwrap_err().to_string();
        assert!(err.contains("notes.jpg"), "{err}");

        // A baseline JPEG cut inside its scan.
        let img = RgbImage::from_fn(32, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 9, 90]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .unwrap();
        let whole = dir.path().join("whole.jpg");
        std::fs::write(&whole, &jpeg).unwrap();
        assert_eq!(load_rgb(&whole).unwrap().dimensions(), (32, 24));
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &jpeg[..jpeg.len() - 40]).unwrap();
        let err = load_rgb(&cut).unwrap_err().to_string();
        assert!(
            err.contains("cut.jpg") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn png_alpha_is_dropped_and_grey_replicated_as_pil_convert_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let rgba = dir.path().join("rgba.png");
        image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]))
            .save(&rgba)
            .unwrap();
        assert!(load_rgb(&rgba)
            .unwrap()
            .pixels()
            .all(|p| p.0 == [10, 20, 30]));
        let grey = dir.path().join("grey.png");
        image::GrayImage::from_pixel(3, 2, image::Luma([77]))
            .save(&grey)
            .unwrap();
        assert!(load_rgb(&grey).unwrap().pixels().all(|p| p.0 == [77; 3]));
    }
}

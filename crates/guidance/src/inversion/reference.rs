//! The reference image as the VAE sees it: read, center-cropped to the generation aspect ratio,
//! resized, and encoded to the scaled posterior mean.

use crate::error::{Error, Result};
use candle_core::Tensor;
use diffusion::pipeline::StableDiffusion;
use std::path::Path;

/// The reference image center-cropped to the generation aspect ratio and resized to
/// `width × height`, as the VAE sees it: decoded and resized (bicubic) as PIL does ([`imaging`]).
pub fn load_reference_image(path: &Path, height: usize, width: usize) -> Result<image::RgbImage> {
    let img = imaging::load_rgb(path).map_err(|e| Error::Image {
        path: e.path,
        reason: e.reason,
    })?;
    let (w, h) = img.dimensions();
    // Largest centered crop with the target aspect ratio.
    let (tw, th) = (width as f64, height as f64);
    let scale = (w as f64 / tw).min(h as f64 / th);
    let (cw, ch) = (
        ((tw * scale).round() as u32).clamp(1, w),
        ((th * scale).round() as u32).clamp(1, h),
    );
    let (x0, y0) = ((w - cw) / 2, (h - ch) / 2);
    let crop = image::imageops::crop_imm(&img, x0, y0, cw, ch).to_image();
    Ok(imaging::resize_bicubic(&crop, width as u32, height as u32))
}

/// Scaled VAE posterior mean of an image (no sampling).
///
/// # Shapes
/// Output `[1, 4, h/8, w/8]` in the model's dtype.
pub fn encode_image(sd: &StableDiffusion, img: &image::RgbImage) -> Result<Tensor> {
    let x = diffusion::vae::image_to_tensor(img, sd.device())?.to_dtype(sd.dtype())?;
    Ok(sd.vae.encode_latents(&x)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_image_is_center_cropped_and_resized() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // 40×20: left quarter red, middle half green, right quarter blue.
        let img = image::RgbImage::from_fn(40, 20, |x, _| match x {
            0..10 => image::Rgb([255, 0, 0]),
            10..30 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        img.save(&path).unwrap();
        let out = load_reference_image(&path, 8, 8)?;
        assert_eq!(out.dimensions(), (8, 8));
        assert!(
            out.pixels().all(|p| p.0 == [0, 255, 0]),
            "the crop is the centre"
        );
        let err = load_reference_image(&dir.path().join("missing.png"), 8, 8).unwrap_err();
        assert!(err.to_string().contains("missing.png"), "{err}");
        Ok(())
    }
}

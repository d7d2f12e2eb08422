//! torchvision's resize and crop geometry on PIL images: `Resize(size)` with an int size
//! (`_compute_resized_output_size`: shortest side to `size`, the long side `int(size · long /
//! short)`), then Pillow's bicubic resample; `CenterCrop(size)` (`center_crop`: offsets
//! `int(round((h − crop) / 2))` with Python's round-half-to-even).

use crate::{resize, Filter};
use image::RgbImage;

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
    resize_shortest_with(img, size, Filter::Bicubic)
}

/// torchvision `Resize(size, interpolation)` on a PIL image: PIL's `filter` to
/// [`shortest_side_size`].
pub fn resize_shortest_with(img: &RgbImage, size: u32, filter: Filter) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = shortest_side_size(w, h, size);
    resize(img, nw, nh, filter)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

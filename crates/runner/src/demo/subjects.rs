//! The demo's mini benchmark: a few DreamBench subjects stood in for by procedurally drawn images
//! (simple shapes with varied pose, size and background), so the whole pipeline runs offline.
//! They are not photographs of the subjects and make no claim to look like them.

use image::{Rgb, RgbImage};
use std::path::Path;

/// Subjects of the mini benchmark (DreamBench names, so prompts and classes are the real ones).
pub const DEMO_SUBJECTS: [&str; 3] = ["dog", "teapot", "backpack"];

/// Small deterministic generator (SplitMix64) so the drawings are the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
}

fn ellipse(img: &mut RgbImage, cx: f32, cy: f32, rx: f32, ry: f32, color: [u8; 3]) {
    let (w, h) = img.dimensions();
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
            if dx * dx + dy * dy <= 1.0 {
                img.put_pixel(x, y, Rgb(color));
            }
        }
    }
}

fn rect(img: &mut RgbImage, x0: f32, y0: f32, x1: f32, y1: f32, color: [u8; 3]) {
    let (w, h) = img.dimensions();
    for y in (y0.max(0.0) as u32)..(y1.min(h as f32) as u32) {
        for x in (x0.max(0.0) as u32)..(x1.min(w as f32) as u32) {
            img.put_pixel(x, y, Rgb(color));
        }
    }
}

/// One drawing of a subject: the subject's shape in its colors, pose and background varied by `variant`.
pub fn draw(subject: &str, variant: u64, size: u32) -> RgbImage {
    let mut rng = Rng(variant.wrapping_mul(1_000_003)
        ^ subject
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131) ^ b as u64));
    let s = size as f32;
    let bg = [
        rng.range(150.0, 240.0) as u8,
        rng.range(150.0, 240.0) as u8,
        rng.range(150.0, 240.0) as u8,
    ];
    let mut img = RgbImage::from_pixel(size, size, Rgb(bg));
    // A floor line for some depth.
    let floor = [bg[0] / 2 + 40, bg[1] / 2 + 40, bg[2] / 2 + 30];
    rect(&mut img, 0.0, s * rng.range(0.7, 0.85), s, s, floor);
    let (cx, cy, k) = (
        s * rng.range(0.38, 0.62),
        s * rng.range(0.45, 0.6),
        rng.range(0.8, 1.1),
    );
    match subject {
        "dog" => {
            let fur = [190, 120, 60];
            ellipse(
                &mut img,
                cx,
                cy + 0.08 * s * k,
                0.26 * s * k,
                0.17 * s * k,
                fur,
            ); // body
            ellipse(
                &mut img,
                cx + 0.2 * s * k,
                cy - 0.1 * s * k,
                0.12 * s * k,
                0.11 * s * k,
                fur,
            ); // head
            ellipse(
                &mut img,
                cx + 0.14 * s * k,
                cy - 0.2 * s * k,
                0.04 * s * k,
                0.07 * s * k,
                [120, 70, 30],
            ); // ear
            ellipse(
                &mut img,
                cx + 0.25 * s * k,
                cy - 0.12 * s * k,
                0.015 * s * k,
                0.015 * s * k,
                [20, 20, 20],
            ); // eye
            ellipse(
                &mut img,
                cx + 0.31 * s * k,
                cy - 0.07 * s * k,
                0.025 * s * k,
                0.02 * s * k,
                [30, 20, 20],
            ); // nose
            for dx in [-0.16f32, -0.06, 0.08, 0.17] {
                rect(
                    &mut img,
                    cx + dx * s * k,
                    cy + 0.18 * s * k,
                    cx + (dx + 0.05) * s * k,
                    cy + 0.3 * s * k,
                    fur,
                );
            }
        }
        "teapot" => {
            let glaze = [60, 110, 190];
            ellipse(&mut img, cx, cy, 0.22 * s * k, 0.17 * s * k, glaze);
            rect(
                &mut img,
                cx - 0.05 * s * k,
                cy - 0.24 * s * k,
                cx + 0.05 * s * k,
                cy - 0.15 * s * k,
                glaze,
            );
            ellipse(
                &mut img,
                cx,
                cy - 0.25 * s * k,
                0.04 * s * k,
                0.025 * s * k,
                [230, 230, 240],
            );
            rect(
                &mut img,
                cx + 0.2 * s * k,
                cy - 0.1 * s * k,
                cx + 0.33 * s * k,
                cy - 0.05 * s * k,
                glaze,
            ); // spout
            ellipse(
                &mut img,
                cx - 0.25 * s * k,
                cy,
                0.06 * s * k,
                0.09 * s * k,
                [40, 80, 150],
            ); // handle
            ellipse(
                &mut img,
                cx - 0.05 * s * k,
                cy - 0.05 * s * k,
                0.05 * s * k,
                0.03 * s * k,
                [200, 220, 250],
            ); // shine
        }
        _ => {
            let canvas = [200, 40, 50];
            rect(
                &mut img,
                cx - 0.18 * s * k,
                cy - 0.2 * s * k,
                cx + 0.18 * s * k,
                cy + 0.22 * s * k,
                canvas,
            );
            rect(
                &mut img,
                cx - 0.14 * s * k,
                cy + 0.02 * s * k,
                cx + 0.14 * s * k,
                cy + 0.16 * s * k,
                [160, 30, 40],
            ); // pocket
            rect(
                &mut img,
                cx - 0.08 * s * k,
                cy - 0.28 * s * k,
                cx + 0.08 * s * k,
                cy - 0.2 * s * k,
                [60, 40, 40],
            ); // handle
            rect(
                &mut img,
                cx - 0.13 * s * k,
                cy - 0.2 * s * k,
                cx - 0.1 * s * k,
                cy + 0.22 * s * k,
                [60, 40, 40],
            ); // strap
        }
    }
    img
}

/// Writes `images` drawings per demo subject under `root/<subject>/NN.png`.
pub fn write_mini_benchmark(root: &Path, images: usize, size: u32) -> anyhow::Result<()> {
    for subject in DEMO_SUBJECTS {
        let dir = root.join(subject);
        std::fs::create_dir_all(&dir)?;
        for i in 0..images {
            draw(subject, i as u64, size).save(dir.join(format!("{i:02}.png")))?;
        }
    }
    Ok(())
}

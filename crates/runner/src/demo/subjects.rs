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

/// A part of a drawing, in units of the subject's size around its center.
enum Shape {
    /// Center x, y and radii.
    Ellipse(f32, f32, f32, f32),
    /// Corners x0, y0, x1, y1.
    Rect(f32, f32, f32, f32),
}
use Shape::{Ellipse, Rect};

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
    let fur = [190, 120, 60];
    let glaze = [60, 110, 190];
    let canvas = [200, 40, 50];
    let dark = [60, 40, 40];
    let mut shapes = match subject {
        "dog" => vec![
            (Ellipse(0.0, 0.08, 0.26, 0.17), fur),              // body
            (Ellipse(0.2, -0.1, 0.12, 0.11), fur),              // head
            (Ellipse(0.14, -0.2, 0.04, 0.07), [120, 70, 30]),   // ear
            (Ellipse(0.25, -0.12, 0.015, 0.015), [20, 20, 20]), // eye
            (Ellipse(0.31, -0.07, 0.025, 0.02), [30, 20, 20]),  // nose
        ],
        "teapot" => vec![
            (Ellipse(0.0, 0.0, 0.22, 0.17), glaze),
            (Rect(-0.05, -0.24, 0.05, -0.15), glaze),
            (Ellipse(0.0, -0.25, 0.04, 0.025), [230, 230, 240]),
            (Rect(0.2, -0.1, 0.33, -0.05), glaze), // spout
            (Ellipse(-0.25, 0.0, 0.06, 0.09), [40, 80, 150]), // handle
            (Ellipse(-0.05, -0.05, 0.05, 0.03), [200, 220, 250]), // shine
        ],
        _ => vec![
            (Rect(-0.18, -0.2, 0.18, 0.22), canvas),
            (Rect(-0.14, 0.02, 0.14, 0.16), [160, 30, 40]), // pocket
            (Rect(-0.08, -0.28, 0.08, -0.2), dark),         // handle
            (Rect(-0.13, -0.2, -0.1, 0.22), dark),          // strap
        ],
    };
    if subject == "dog" {
        for dx in [-0.16f32, -0.06, 0.08, 0.17] {
            shapes.push((Rect(dx, 0.18, dx + 0.05, 0.3), fur)); // legs
        }
    }
    // Offsets and sizes are in units of the subject's size `s·k`, around its center (cx, cy).
    let u = |a: f32| a * s * k;
    for (shape, color) in shapes {
        match shape {
            Ellipse(x, y, rx, ry) => ellipse(&mut img, cx + u(x), cy + u(y), u(rx), u(ry), color),
            Rect(x0, y0, x1, y1) => rect(
                &mut img,
                cx + u(x0),
                cy + u(y0),
                cx + u(x1),
                cy + u(y1),
                color,
            ),
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

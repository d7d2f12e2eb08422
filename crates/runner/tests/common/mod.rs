//! What the runner's integration tests share: where the repository and the shared data are,
//! running `pnd`, comparing tensors.
#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared DreamBench copy beside the checkout.
pub fn shared_dreambench() -> PathBuf {
    repo().join("../shared/dreambench")
}

/// The diffusion crate's tiny diffusers pipeline fixture (model, latents, expected outputs).
pub fn sd_fixtures() -> PathBuf {
    repo().join("crates/diffusion/tests/fixtures/pipeline")
}

/// The tiny CLIP tokenizer of that fixture.
pub fn fixture_tokenizer() -> PathBuf {
    sd_fixtures().join("model/tokenizer")
}

/// `pnd ARGS` as a command to adjust (stdio, folder) before running.
pub fn pnd_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pnd"));
    c.args(args);
    c
}

/// Runs `pnd ARGS` to the end.
pub fn pnd(args: &[&str]) -> Output {
    pnd_command(args).output().unwrap()
}

/// Runs `pnd ARGS` in `cwd`: whether it succeeded, and stdout followed by stderr.
pub fn pnd_in(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = pnd_command(args).current_dir(cwd).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest difference of one channel between two images of one size (asserted), in 1/255.
pub fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// A 40×48 reference image (an orange disc on a gradient) at `path`.
pub fn write_reference_image(path: &Path) {
    image::RgbImage::from_fn(40, 48, |x, y| {
        let (dx, dy) = (x as f64 - 20.0, y as f64 - 24.0);
        if dx * dx + dy * dy < 120.0 {
            image::Rgb([240, 170, 50])
        } else {
            image::Rgb([(x * 5) as u8, 30, (y * 4) as u8])
        }
    })
    .save(path)
    .unwrap();
}

/// Writes `dir/guidance.toml`: the guidance windows scaled to an 8-step schedule (2 layout + 2
/// appearance steps, 3 updates each), one null-text iteration per step; returns its path.
pub fn write_short_guidance(dir: &Path) -> PathBuf {
    use guidance::config::{GuidanceConfig, InversionConfig, Window};
    let cfg = GuidanceConfig {
        layout_window: Window { start: 0, end: 2 },
        appearance_window: Window { start: 2, end: 4 },
        inversion: InversionConfig {
            inner_steps: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let path = dir.join("guidance.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    path
}

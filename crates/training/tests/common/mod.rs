//! What the training crate's integration tests share: the fixture folders.
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/step`: the training images and the parity fixtures of `train_step.py`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step")
}

/// The tiny pipeline model of the diffusion crate's fixtures (`sd_pipeline.py`).
pub fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures/pipeline/model")
        .to_string_lossy()
        .into_owned()
}

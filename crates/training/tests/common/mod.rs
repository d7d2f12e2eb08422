//! What the training crate's integration tests share: the fixture folders.
#![allow(dead_code)]

use candle_core::Tensor;
use std::path::PathBuf;
use training::train_loop::{MicroBatch, Objective, StepInputs};

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

/// An objective that feeds micro-batch k the fixture's inputs k (the script's draws) and records
/// each loss.
pub struct Fixed<'a> {
    pub loss_of: &'a dyn Fn(&StepInputs) -> training::Result<Tensor>,
    pub inputs: Vec<StepInputs>,
    pub losses: Vec<f64>,
}

impl Objective for Fixed<'_> {
    fn loss(&mut self, mb: &MicroBatch) -> candle_core::Result<Tensor> {
        let l = (self.loss_of)(&self.inputs[mb.micro as usize])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.losses.push(l.to_scalar::<f32>()? as f64);
        Ok(l)
    }
}

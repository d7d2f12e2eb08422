//! The loop both trainers share, as the scripts run it under `accelerate`:
//!
//! - the dataset (images × repeats) is visited in a fresh random order every epoch, in
//!   micro-batches of `batch` (the last one of an epoch may be smaller, `drop_last=False`);
//! - each micro-batch's loss is divided by `grad_accum` before its backward (as
//!   `accelerator.backward` does) and the gradients add up;
//! - the optimizer steps after every `grad_accum` micro-batches, counted from the start of each
//!   epoch, and at the end of an epoch (accelerate syncs at the end of the dataloader);
//! - before the step, gradients are clipped to `max_grad_norm` when set (DreamBooth);
//! - with `loss_scaling` (f16 compute), torch's `GradScaler` as accelerate uses it: the loss is
//!   multiplied by a scale (65536 at first) before the backward and the gradients divided by it
//!   before clipping; a step whose gradients are not finite is skipped and halves the scale
//!   (the step still counts, as in the scripts), and 2000 good steps in a row double it;
//! - every `checkpoint_every` steps the parameters, the optimizer state and the position in the
//!   data are written to `checkpoint_dir/checkpoint-<step>/` (the tensors with a checksum of
//!   them and of `state.json`); a new run with the same settings resumes from the latest
//!   readable one (an unreadable one is passed over and reported in [`Outcome`]) and reaches the
//!   same weights as an uninterrupted run.

use crate::adamw::{clip_grad_norm, AdamW};
use crate::rng::permutation;
use crate::{Result, TrainError};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use weights::files::{load_checked, save_checked, sha256_hex, write_atomic, MissingChecksum};

/// The metadata key of the SHA-256 of a checkpoint's `state.json`.
const STATE_SHA256: &str = "state.sha256";

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Optimizer steps (`--max_train_steps`).
    pub steps: usize,
    pub grad_accum: usize,
    pub batch: usize,
    /// Samples per epoch (images × repeats, or DreamBooth's dataset length).
    pub dataset_len: usize,
    pub seed: u64,
    pub max_grad_norm: Option<f64>,
    pub checkpoint_every: Option<usize>,
    pub checkpoint_dir: PathBuf,
    /// A JSONL file, one line per optimizer step.
    pub trace: Option<PathBuf>,
    /// Everything that decides the result (JSON); a checkpoint resumes only under the same.
    pub fingerprint: String,
    /// Stops after this optimizer step as if the process were killed there (tests of resume).
    pub stop_after: Option<usize>,
    /// Dynamic loss scaling (for f16 compute).
    pub loss_scaling: bool,
}

/// torch's `GradScaler` state (init scale 2^16, growth 2 every 2000 good steps, backoff 0.5).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: usize,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

/// One micro-batch: dataset indices (into images × repeats) and their positions in the whole
/// sample stream (which seed the per-sample augmentations).
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// Micro-batches before this one in the run (seeds its noise and timesteps).
    pub micro: u64,
    pub indices: Vec<usize>,
    pub positions: Vec<u64>,
}

/// The inputs of one micro-batch after every random draw: what the parity tests feed both sides.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// `[n, 3, r, r]` in [-1, 1].
    pub pixels: Tensor,
    /// `[n, 77]` u32.
    pub ids: Tensor,
    /// `[n, c, r/8, r/8]`: the VAE posterior's noise.
    pub posterior_noise: Tensor,
    /// `[n, c, r/8, r/8]`: ε.
    pub noise: Tensor,
    pub timesteps: Vec<usize>,
    /// The prompts of `ids` (for tests and traces).
    pub prompts: Vec<String>,
}

impl StepInputs {
    /// Stacks the per-sample pixels and ids and draws the micro-batch's noises and timesteps
    /// (latents of `latent` = `[c, h, w]` per entry, timesteps in `0..num_train_timesteps`).
    pub fn draw(
        pixels: &[Tensor],
        ids: &[Tensor],
        prompts: Vec<String>,
        (seed, micro): (u64, u64),
        latent: [usize; 3],
        num_train_timesteps: usize,
    ) -> candle_core::Result<Self> {
        use crate::rng::{normal, timesteps, Stream};
        let n = pixels.len();
        let device = pixels
            .first()
            .map(|p| p.device().clone())
            .ok_or_else(|| candle_core::Error::Msg("an empty micro-batch".into()))?;
        let shape = [n, latent[0], latent[1], latent[2]];
        Ok(Self {
            pixels: Tensor::stack(pixels, 0)?,
            ids: Tensor::stack(ids, 0)?,
            posterior_noise: normal(seed, Stream::Posterior, micro, &shape, &device)?,
            noise: normal(seed, Stream::Noise, micro, &shape, &device)?,
            timesteps: timesteps(seed, micro, n, num_train_timesteps),
            prompts,
        })
    }
}

/// What a trainer computes for a micro-batch.
pub trait Objective {
    /// The loss of one micro-batch, in the graph of the optimizer's parameters.
    fn loss(&mut self, mb: &MicroBatch) -> candle_core::Result<Tensor>;
}

/// One optimizer step, as the progress display and the trace see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    /// The mean loss of the step's micro-batches (before the division by `grad_accum`).
    pub loss: f64,
    pub lr: f64,
    /// The gradient norm before clipping (when clipping).
    pub grad_norm: Option<f64>,
    /// The loss scale used (with loss scaling), and whether the step was skipped for non-finite
    /// gradients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    pub seconds: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub resumed_from: Option<usize>,
    pub steps_done: usize,
    /// All `steps` done (false when `stop_after` cut the run short).
    pub finished: bool,
    /// Checkpoints newer than the one resumed from that could not be read, newest first (for the
    /// caller to warn about; the run rewrites them as it passes their steps).
    pub unreadable_checkpoints: Vec<UnreadableCheckpoint>,
}

/// A checkpoint passed over on resuming: truncated, failing its checksum, or incomplete.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableCheckpoint {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for UnreadableCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint '{}' is unreadable ({}); passed over",
            self.path.display(),
            self.reason
        )
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointInfo {
    step: usize,
    micro: u64,
    fingerprint: String,
    #[serde(default)]
    loss_scale: Option<LossScale>,
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.into(),
        reason: e.to_string(),
    }
}

/// The checkpoints of `dir`, by step.
fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn save_checkpoint(
    opt: &AdamW,
    s: &LoopSettings,
    step: usize,
    micro: u64,
    loss_scale: Option<LossScale>,
) -> Result<()> {
    let dir = &s.checkpoint_dir;
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let tmp = dir.join(format!(".tmp-checkpoint-{step}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| write_err(&tmp, e))?;
    let mut tensors: HashMap<String, Tensor> = opt.state()?;
    for (name, p) in opt.params() {
        tensors.insert(format!("param.{name}"), p.as_tensor().clone());
    }
    let info = CheckpointInfo {
        step,
        micro,
        fingerprint: s.fingerprint.clone(),
        loss_scale,
    };
    let json = tmp.join("state.json");
    let text = serde_json::to_string_pretty(&info).expect("json");
    write_atomic(&json, text.as_bytes())?;
    let state = tmp.join("state.safetensors");
    let meta = BTreeMap::from([(STATE_SHA256.to_string(), sha256_hex(text.as_bytes()))]);
    save_checked(&tensors, &meta, &state)?;
    let final_dir = dir.join(format!("checkpoint-{step}"));
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| write_err(&final_dir, e))?;
    // Keep the two latest.
    let all = checkpoints(dir);
    for (_, old) in all.iter().take(all.len().saturating_sub(2)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// A checkpoint read and checked against the optimizer's parameters, not yet applied.
struct Checkpoint {
    info: CheckpointInfo,
    tensors: HashMap<String, Tensor>,
}

/// Reads the checkpoint folder `dir`: its tensors (checksum verified where the file has one, as
/// every checkpoint written since it was added does; older ones are read unverified), its
/// `state.json` (against the checksum recorded with the tensors), and every tensor `opt` needs,
/// with its shape. The reason it is unreadable otherwise.
fn read_checkpoint(dir: &Path, opt: &AdamW) -> std::result::Result<Checkpoint, String> {
    let device = opt.params()[0].1.device().clone();
    let file = load_checked(
        &dir.join("state.safetensors"),
        &device,
        MissingChecksum::Accept,
    )
    .map_err(|e| e.to_string())?;
    let json = dir.join("state.json");
    let text = std::fs::read(&json).map_err(|e| format!("reading '{}': {e}", json.display()))?;
    if let Some(want) = file.metadata.get(STATE_SHA256) {
        if *want != sha256_hex(&text) {
            return Err(format!(
                "'{}' is not the state.json its tensors were saved with",
                json.display()
            ));
        }
    }
    let info: CheckpointInfo =
        serde_json::from_slice(&text).map_err(|e| format!("parsing '{}': {e}", json.display()))?;
    for (name, p) in opt.params() {
        for key in [
            format!("param.{name}"),
            format!("m.{name}"),
            format!("v.{name}"),
        ] {
            match file.tensors.get(&key) {
                Some(t) if t.dims() == p.dims() => {}
                Some(t) => {
                    return Err(format!(
                        "'{key}' has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.dims()
                    ))
                }
                None => return Err(format!("no tensor '{key}'")),
            }
        }
    }
    Ok(Checkpoint {
        info,
        tensors: file.tensors,
    })
}

/// A resumed run's position: `(step, micro, loss scale)`.
type Position = (usize, u64, Option<LossScale>);

/// Loads the latest readable checkpoint of `s.checkpoint_dir` into `opt`: its position (or
/// `None`) and the newer checkpoints that could not be read.
fn resume(
    opt: &mut AdamW,
    s: &LoopSettings,
) -> Result<(Option<Position>, Vec<UnreadableCheckpoint>)> {
    let mut unreadable = Vec::new();
    for (_, path) in checkpoints(&s.checkpoint_dir).into_iter().rev() {
        let ck = match read_checkpoint(&path, opt) {
            Ok(ck) => ck,
            Err(reason) => {
                unreadable.push(UnreadableCheckpoint { path, reason });
                continue;
            }
        };
        if ck.info.fingerprint != s.fingerprint {
            return Err(TrainError::CheckpointMismatch {
                dir: s.checkpoint_dir.clone(),
                reason: format!("saved {}, now {}", ck.info.fingerprint, s.fingerprint),
            });
        }
        for (name, p) in opt.params() {
            p.set(&ck.tensors[&format!("param.{name}")].to_dtype(p.dtype())?)?;
        }
        opt.load_state(&ck.tensors, ck.info.step)?;
        let info = ck.info;
        return Ok((Some((info.step, info.micro, info.loss_scale)), unreadable));
    }
    Ok((None, unreadable))
}

/// Keeps the trace's lines up to `step` (a resumed run rewrites what the killed one wrote past
/// its last checkpoint).
fn truncate_trace(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| write_err(path, e))
}

/// Runs (or resumes) the loop; `on_step` sees every optimizer step.
pub fn run(
    opt: &mut AdamW,
    objective: &mut dyn Objective,
    s: &LoopSettings,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<Outcome> {
    for (what, v) in [
        ("steps", s.steps),
        ("grad_accum", s.grad_accum),
        ("batch", s.batch),
        ("the dataset", s.dataset_len),
    ] {
        if v == 0 {
            return Err(TrainError::Zero { what });
        }
    }
    let (resumed, unreadable_checkpoints) = resume(opt, s)?;
    let (mut step, mut micro, saved_scale) = resumed.unwrap_or((0, 0, None));
    let mut scaler = s.loss_scaling.then(|| saved_scale.unwrap_or_default());
    if let Some(t) = &s.trace {
        if resumed.is_some() {
            truncate_trace(t, step)?;
        } else {
            let _ = std::fs::remove_file(t);
        }
    }
    let n = s.dataset_len;
    let per_epoch = n.div_ceil(s.batch) as u64;
    let mut order: Option<(u64, Vec<usize>)> = None;
    let params: Vec<Tensor> = opt
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut losses = Vec::new();
    let mut started = Instant::now();
    while step < s.steps {
        let (epoch, bi) = (micro / per_epoch, micro % per_epoch);
        if order.as_ref().map(|o| o.0) != Some(epoch) {
            order = Some((epoch, permutation(s.seed, epoch, n)));
        }
        let perm = &order.as_ref().expect("order").1;
        let lo = bi as usize * s.batch;
        let hi = (lo + s.batch).min(n);
        let mb = MicroBatch {
            micro,
            indices: perm[lo..hi].to_vec(),
            positions: (lo..hi).map(|i| epoch * n as u64 + i as u64).collect(),
        };
        let loss = objective.loss(&mb)?;
        losses.push(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
        let factor = scaler.map_or(1.0, |c| c.scale) / s.grad_accum as f64;
        let grads = (loss * factor)?.backward()?;
        for (a, p) in acc.iter_mut().zip(&params) {
            if let Some(g) = grads.get(p) {
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        micro += 1;
        let sync = (bi + 1) % s.grad_accum as u64 == 0 || bi + 1 == per_epoch;
        if !sync {
            continue;
        }
        let mut skipped = false;
        let used_scale = scaler.map(|c| c.scale);
        if let Some(c) = scaler.as_mut() {
            // Unscale, then skip the update (and back off) when anything overflowed.
            for a in acc.iter_mut().flatten() {
                *a = (&*a / c.scale)?;
            }
            let mut finite = true;
            for a in acc.iter().flatten() {
                let total = a
                    .to_dtype(candle_core::DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                finite &= total.is_finite();
            }
            if finite {
                c.good_steps += 1;
                if c.good_steps == 2000 {
                    c.scale *= 2.0;
                    c.good_steps = 0;
                }
            } else {
                skipped = true;
                c.scale *= 0.5;
                c.good_steps = 0;
            }
        }
        let grad_norm = match s.max_grad_norm {
            Some(max) if !skipped => Some(clip_grad_norm(&mut acc, max)?),
            _ => None,
        };
        if !skipped {
            opt.step(&acc)?;
        }
        acc.iter_mut().for_each(|a| *a = None);
        step += 1;
        let report = StepReport {
            step,
            steps: s.steps,
            loss: losses.iter().sum::<f64>() / losses.len() as f64,
            lr: opt.config().lr,
            grad_norm,
            loss_scale: used_scale,
            skipped,
            seconds: started.elapsed().as_secs_f64(),
        };
        losses.clear();
        started = Instant::now();
        if let Some(t) = &s.trace {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(t)
                .map_err(|e| write_err(t, e))?;
            writeln!(f, "{}", serde_json::to_string(&report).expect("json"))
                .map_err(|e| write_err(t, e))?;
        }
        on_step(&report);
        if s.checkpoint_every.is_some_and(|k| step % k == 0) && step < s.steps {
            save_checkpoint(opt, s, step, micro, scaler)?;
        }
        if s.stop_after == Some(step) && step < s.steps {
            return Ok(Outcome {
                resumed_from: resumed.map(|r| r.0),
                steps_done: step,
                finished: false,
                unreadable_checkpoints,
            });
        }
    }
    Ok(Outcome {
        resumed_from: resumed.map(|r| r.0),
        steps_done: step,
        finished: true,
        unreadable_checkpoints,
    })
}

/// Removes the checkpoints of a finished run.
pub fn clear_checkpoints(dir: &Path) {
    for (_, p) in checkpoints(dir) {
        let _ = std::fs::remove_dir_all(p);
    }
    let _ = std::fs::remove_dir(dir);
}

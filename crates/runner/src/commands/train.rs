//! `pnd train textual-inversion` and `pnd train dreambooth` (issue 14): one subject's baseline,
//! trained as diffusers' example scripts train it (see the `training` crate), with progress,
//! a JSONL trace, checkpoints every N steps and automatic resume.
//!
//! Checkpoints live beside the output, in `<out>.checkpoints/`: a run whose output does not exist
//! yet resumes from the latest checkpoint there when it was made with the same settings, and
//! removes them when it finishes. An output that exists is an error without `--overwrite` (which
//! also drops the checkpoints).

use crate::progress::{ProgressMode, TrainProgress};
use crate::runtime::{open_device, DeviceSpec, Precision};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use training::train_loop::{self, LoopSettings, Objective, Outcome};

#[derive(Debug, clap::Subcommand)]
pub enum TrainCommand {
    /// Textual Inversion of one subject (diffusers' textual_inversion.py): a new token's embedding.
    TextualInversion(Box<TiArgs>),
    /// DreamBooth of one subject (diffusers' train_dreambooth.py): a fine-tuned UNet (and text encoder).
    Dreambooth(Box<DbArgs>),
    /// Every training of a training experiment (experiments/train-baselines.toml): resumable per
    /// subject (existing outputs are kept, interrupted ones resume) and shardable.
    Baselines(BaselinesArgs),
}

#[derive(Debug, clap::Args)]
pub struct BaselinesArgs {
    /// The training experiment file.
    pub experiment: PathBuf,
    /// Run only shard i of n (0-based) of the trainings, e.g. `--shard 0/4`.
    #[arg(long)]
    pub shard: Option<crate::sweep::Shard>,
    /// List what would be trained and what already exists; train nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Go on with the next training when one fails (the failures are listed at the end).
    #[arg(long)]
    pub keep_going: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Compute precision of every training (f32, f16 or bf16; trained weights stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

/// What both trainers take.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Base model: a diffusers folder or Hugging Face repo id (needs its scheduler config).
    #[arg(long)]
    pub model: String,
    /// Folder of the subject's images.
    #[arg(long)]
    pub images: PathBuf,
    /// Optimizer steps [default: 3000 for textual-inversion, 800 for dreambooth].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Learning rate [default: 5e-4 for textual-inversion (before --scale_lr), 5e-6 for dreambooth].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Micro-batch size [default: 1].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step [default: 4 for textual-inversion, 1 for dreambooth].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Training resolution (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Seed of the data order, noise and timesteps (our generator, see the training crate's `rng`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a resumable checkpoint every N optimizer steps (0: never).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Write one JSON line per optimizer step (step, loss, lr, grad_norm, seconds) to this file
    /// (none without it; `pnd train baselines` writes `<out>.trace.jsonl`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Replace an existing output (and drop its checkpoints).
    #[arg(long)]
    pub overwrite: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Compute precision: f32 (the scripts' default), or f16/bf16 as their --mixed_precision
    /// (trained weights stay f32; f16 adds dynamic loss scaling).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Stop after this optimizer step as if killed (tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct TiArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The new placeholder token, e.g. `<dog>` (must not be in the vocabulary).
    #[arg(long)]
    pub token: String,
    /// A single-token word whose embedding starts the new one, e.g. `dog`.
    #[arg(long)]
    pub init_token: String,
    /// Do not multiply the learning rate by grad_accum × batch (the script's --scale_lr, on in its README).
    #[arg(long)]
    pub no_scale_lr: bool,
    /// Times each image occurs per epoch.
    #[arg(long, default_value_t = 100)]
    pub repeats: usize,
    /// Output `learned_embeds.safetensors` ({token: [1, dim]}).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt of the subject's images, e.g. "a photo of sks dog".
    #[arg(long)]
    pub instance_prompt: String,
    /// Prompt of the class images, e.g. "a photo of dog" (needed with --prior-preservation).
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Add the prior-preservation loss on class images made by the base model.
    #[arg(long)]
    pub prior_preservation: bool,
    /// Number of class images.
    #[arg(long, default_value_t = 200)]
    pub class_images: usize,
    /// Where the class images are cached (default: checkpoints/class-images/<model>/<class prompt>-<resolution>).
    #[arg(long)]
    pub class_dir: Option<PathBuf>,
    /// Weight of the prior-preservation loss.
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Train the text encoder too.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Output diffusers folder (unet/, text_encoder/ when trained, model_index.json).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(cmd: TrainCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TrainCommand::TextualInversion(a) => run_ti(*a, false),
        TrainCommand::Dreambooth(a) => run_db(*a, false),
        TrainCommand::Baselines(a) => run_baselines(a),
    }
}

/// `<out>.checkpoints` beside the output.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".checkpoints");
    out.with_file_name(name)
}

/// Refuses an existing output without `--overwrite` (before anything else, so that a refused run
/// writes nothing).
fn check_output(out: &Path, overwrite: bool) -> anyhow::Result<()> {
    if out.exists() && !overwrite {
        return Err(training::TrainError::OutputExists(out.into()).into());
    }
    crate::commands::common::check_writable(out)
}

/// Once the inputs are known to be good: with `--overwrite` removes an existing output and its
/// checkpoints, and creates the output's folder.
fn prepare_output(out: &Path, overwrite: bool) -> anyhow::Result<()> {
    check_output(out, overwrite)?;
    if out.exists() {
        if out.is_dir() {
            std::fs::remove_dir_all(out)
        } else {
            std::fs::remove_file(out)
        }
        .with_context(|| format!("removing '{}'", out.display()))?;
        train_loop::clear_checkpoints(&checkpoint_dir(out));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating '{}'", parent.display()))?;
    }
    Ok(())
}

fn open(common: &CommonArgs) -> anyhow::Result<candle_core::Device> {
    let (device, label) = open_device(common.device)?;
    eprintln!(
        "device: {label} (requested {}), compute {}{}",
        common.device,
        common.dtype,
        if common.dtype == Precision::F32 {
            ""
        } else {
            " (f32 master weights)"
        }
    );
    Ok(device)
}

/// The image file names of a folder (part of the fingerprint: other images, other run).
fn image_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(training::data::list_images(dir)?
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect())
}

/// Runs the loop with a progress bar; says how it went.
fn drive(
    what: &str,
    objective: &mut dyn Objective,
    opt: &mut training::adamw::AdamW,
    settings: &LoopSettings,
) -> anyhow::Result<Outcome> {
    let mode = ProgressMode::detect(true);
    let mut progress: Option<TrainProgress> = None;
    let started = std::time::Instant::now();
    let outcome = train_loop::run(opt, objective, settings, &mut |r| {
        let p = progress.get_or_insert_with(|| TrainProgress::new(what, r.step - 1, r.steps, mode));
        p.step(r.step, r.steps, r.loss);
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    for u in &outcome.unreadable_checkpoints {
        eprintln!("warning: {what}: {u}");
    }
    if let Some(from) = outcome.resumed_from {
        eprintln!("{what}: resumed from the checkpoint of step {from}");
    }
    eprintln!(
        "{what}: {} of {} steps in {:.1}s{}",
        outcome.steps_done,
        settings.steps,
        started.elapsed().as_secs_f64(),
        progress
            .as_ref()
            .map(|p| format!(", running loss {:.4}", p.running_loss()))
            .unwrap_or_default()
    );
    Ok(outcome)
}

/// Optimizer steps, micro-batch size and accumulation steps of a run.
struct Schedule {
    steps: usize,
    batch: usize,
    grad_accum: usize,
}

fn loop_settings(
    common: &CommonArgs,
    out: &Path,
    Schedule {
        steps,
        batch,
        grad_accum,
    }: Schedule,
    dataset_len: usize,
    max_grad_norm: Option<f64>,
    fingerprint: serde_json::Value,
) -> LoopSettings {
    LoopSettings {
        steps,
        grad_accum,
        batch,
        dataset_len,
        seed: common.seed,
        max_grad_norm,
        checkpoint_every: (common.checkpoint_every > 0).then_some(common.checkpoint_every),
        checkpoint_dir: checkpoint_dir(out),
        trace: common.trace.clone(),
        fingerprint: fingerprint.to_string(),
        stop_after: common.stop_after,
        loss_scaling: common.dtype == Precision::F16,
    }
}

/// Trains a Textual Inversion into `a.out`; `wait`: see [`claim_output`].
fn run_ti(a: TiArgs, wait: bool) -> anyhow::Result<ExitCode> {
    // Textual Inversion's live set is the frozen models and one row: the inference settings
    // (freed buffers kept for reuse) are the fast ones. Measured on SD 1.5 at 256x256 on the CPU:
    // 10.6-11.3 s per micro-batch with the training settings against 5.9-6.5 s (load 0.9-1.5).
    layers::allocator::tune_for_tensors();
    let c = &a.common;
    check_output(&a.out, c.overwrite)?;
    let device = open(c)?;
    let mut s = training::textual_inversion::TiSettings::new(&a.token, &a.init_token);
    s.steps = c.steps.unwrap_or(s.steps);
    s.lr = c.lr.unwrap_or(s.lr);
    s.scale_lr = !a.no_scale_lr;
    s.batch = c.batch.unwrap_or(s.batch);
    s.grad_accum = c.grad_accum.unwrap_or(s.grad_accum);
    s.resolution = c.resolution;
    s.seed = c.seed;
    s.repeats = a.repeats;
    let mut ti = training::textual_inversion::TextualInversion::new(
        &c.model,
        &c.images,
        s.clone(),
        &device,
    )?;
    let Some(_claim) = claim_output(&a.out, wait)? else {
        eprintln!(
            "'{}' was trained by another process meanwhile",
            a.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    prepare_output(&a.out, c.overwrite)?;
    eprintln!(
        "textual inversion: token '{}' (id {}) from '{}', {} images x {} repeats, {} steps of {} x {} at lr {}",
        s.token,
        ti.token_id(),
        s.init_token,
        ti.dataset_len() / s.repeats,
        s.repeats,
        s.steps,
        s.batch,
        s.grad_accum,
        s.effective_lr()
    );
    let fingerprint = serde_json::json!({
        "trainer": "textual-inversion",
        "model": c.model,
        "images": image_names(&c.images)?,
        "settings": s,
    });
    let sched = Schedule {
        steps: s.steps,
        batch: s.batch,
        grad_accum: s.grad_accum,
    };
    let ls = loop_settings(c, &a.out, sched, ti.dataset_len(), None, fingerprint);
    let mut opt = ti.optimizer()?;
    let outcome = drive("textual inversion", &mut ti, &mut opt, &ls)?;
    if !outcome.finished {
        eprintln!(
            "stopped after step {} as asked; the checkpoints in '{}' resume it",
            outcome.steps_done,
            ls.checkpoint_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tmp = a.out.with_extension("safetensors.tmp");
    ti.save(&tmp)?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing '{}'", a.out.display()))?;
    train_loop::clear_checkpoints(&ls.checkpoint_dir);
    eprintln!(
        "wrote '{}' ({{\"{}\": [1, {}]}})",
        a.out.display(),
        s.token,
        ti.learned()?.dim(1)?
    );
    Ok(ExitCode::SUCCESS)
}

/// A file-name-safe slug: lowercase alphanumerics, others as '-'.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// The default class-image cache of a (model, class prompt, resolution).
pub fn default_class_dir(model: &str, class_prompt: &str, resolution: u32) -> PathBuf {
    PathBuf::from("checkpoints/class-images")
        .join(slug(model))
        .join(format!("{}-{resolution}", slug(class_prompt)))
}

/// Trains a DreamBooth model into `a.out`; `wait`: see [`claim_output`].
fn run_db(a: DbArgs, wait: bool) -> anyhow::Result<ExitCode> {
    // Weights, gradients and two moments of the whole UNet: return freed buffers to the system.
    layers::allocator::tune_for_training();
    let c = &a.common;
    if a.prior_preservation && a.class_prompt.is_none() {
        anyhow::bail!("--prior-preservation needs --class-prompt (e.g. \"a photo of dog\")");
    }
    check_output(&a.out, c.overwrite)?;
    training::check_resolution(c.resolution)?;
    // The subject's images before any class image is generated.
    training::data::list_images(&c.images)?;
    let device = open(c)?;
    let mut s = training::dreambooth::DbSettings::new(&a.instance_prompt);
    s.class_prompt = a.class_prompt.clone();
    s.prior_preservation = a.prior_preservation;
    s.class_images = a.class_images;
    s.prior_loss_weight = a.prior_loss_weight;
    s.steps = c.steps.unwrap_or(s.steps);
    s.lr = c.lr.unwrap_or(s.lr);
    s.batch = c.batch.unwrap_or(s.batch);
    s.grad_accum = c.grad_accum.unwrap_or(s.grad_accum);
    s.train_text_encoder = a.train_text_encoder;
    s.resolution = training::check_resolution(c.resolution)?;
    s.seed = c.seed;
    let class_dir = match (&a.class_prompt, a.prior_preservation) {
        (Some(prompt), true) => {
            let dir = a
                .class_dir
                .clone()
                .unwrap_or_else(|| default_class_dir(&c.model, prompt, s.resolution));
            // As the script: class images in f16 on a GPU, f32 on the CPU.
            let opts = diffusion::pipeline::LoadOptions {
                device: device.clone(),
                dtype: if device.is_cuda() {
                    candle_core::DType::F16
                } else {
                    candle_core::DType::F32
                },
                ..Default::default()
            };
            let base = training::load_base(&c.model, &opts)?;
            let mut progress = crate::progress::StepProgress::new(
                &format!("class images '{prompt}'"),
                a.class_images,
                ProgressMode::detect(true),
            );
            training::dreambooth::ensure_class_images(
                &base,
                prompt,
                a.class_images,
                s.resolution,
                &dir,
                &mut |i, n| progress.step(i, n),
            )?;
            progress.finish();
            eprintln!("class images: {} in '{}'", a.class_images, dir.display());
            Some(dir)
        }
        _ => None,
    };
    let mut db = training::dreambooth::DreamBooth::with_precision(
        &c.model,
        &c.images,
        class_dir.as_deref(),
        s.clone(),
        &device,
        c.dtype.dtype(),
    )?;
    let Some(_claim) = claim_output(&a.out, wait)? else {
        eprintln!(
            "'{}' was trained by another process meanwhile",
            a.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    prepare_output(&a.out, c.overwrite)?;
    eprintln!(
        "dreambooth: '{}'{}, {} steps of {} x {} at lr {}, {} parameters{}",
        s.instance_prompt,
        if s.prior_preservation {
            format!(
                " with prior preservation on '{}'",
                s.class_prompt.as_deref().unwrap_or("")
            )
        } else {
            String::new()
        },
        s.steps,
        s.batch,
        s.grad_accum,
        s.lr,
        db.params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        if s.train_text_encoder {
            " (UNet and text encoder)"
        } else {
            " (UNet)"
        }
    );
    let fingerprint = serde_json::json!({
        "trainer": "dreambooth",
        "model": c.model,
        "images": image_names(&c.images)?,
        "class_images": class_dir.as_deref().map(image_names).transpose()?,
        "settings": s,
        "dtype": c.dtype.to_string(),
    });
    let sched = Schedule {
        steps: s.steps,
        batch: s.batch,
        grad_accum: s.grad_accum,
    };
    let ls = loop_settings(
        c,
        &a.out,
        sched,
        db.dataset_len(),
        Some(s.max_grad_norm),
        fingerprint,
    );
    let mut opt = db.optimizer()?;
    let outcome = drive("dreambooth", &mut db, &mut opt, &ls)?;
    if !outcome.finished {
        eprintln!(
            "stopped after step {} as asked; the checkpoints in '{}' resume it",
            outcome.steps_done,
            ls.checkpoint_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut tmp_name = a.out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = a.out.with_file_name(tmp_name);
    let _ = std::fs::remove_dir_all(&tmp);
    db.save(&c.model, &tmp)?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing '{}'", a.out.display()))?;
    train_loop::clear_checkpoints(&ls.checkpoint_dir);
    eprintln!("wrote '{}'", a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// The latest checkpoint step of an output, if an interrupted run left one.
fn checkpoint_step(out: &Path) -> Option<usize> {
    std::fs::read_dir(checkpoint_dir(out))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .max()
}

/// The contiguous slice of `units` of a shard (the sweep's rule: item k of n goes to shard
/// `floor(k · count / n)`).
fn shard_slice<T>(units: &[T], shard: crate::sweep::Shard) -> &[T] {
    let n = units.len();
    &units[shard.index * n / shard.count..(shard.index + 1) * n / shard.count]
}

/// The Textual Inversion initializer for a subject: the filled `init_token` when it is one token,
/// else its last word (`stuffed animal` → `animal`).
fn init_token(
    model: &str,
    template: &str,
    subject: &dreambench::Subject,
) -> anyhow::Result<String> {
    let word = crate::train_plan::fill(template, subject, "");
    let src = weights::ModelSource::parse(model)?;
    let tok = diffusion::tokenizer::ClipTokenizer::from_source(&src, "tokenizer")?;
    let count = |w: &str| -> anyhow::Result<usize> { Ok(tok.encode(w)?.len_unpadded() - 2) };
    if count(&word)? == 1 {
        return Ok(word);
    }
    let last = word.split_whitespace().last().unwrap_or(&word).to_string();
    if count(&last)? == 1 {
        return Ok(last);
    }
    anyhow::bail!(
        "subject '{}': no single-token initializer in '{word}'; set init_token in [textual_inversion]",
        subject.name
    )
}

fn run_baselines(a: BaselinesArgs) -> anyhow::Result<ExitCode> {
    use crate::train_plan::{fill, Method, TrainExperiment};
    let exp = TrainExperiment::load(&a.experiment)?;
    let shard = a.shard.unwrap_or(crate::sweep::Shard::ALL);
    let all = exp.units();
    let units = shard_slice(&all, shard);
    let methods = [exp.textual_inversion.is_some(), exp.dreambooth.is_some()]
        .iter()
        .filter(|m| **m)
        .count();
    println!(
        "training experiment '{}': {} trainings ({} subjects x {methods} methods), shard {shard}: {}",
        exp.name,
        all.len(),
        exp.subjects().len(),
        units.len()
    );
    let status = |out: &Path| -> String {
        if out.exists() {
            "exists".into()
        } else if let Some(step) = checkpoint_step(out) {
            format!("resumes from step {step}")
        } else {
            "to train".into()
        }
    };
    if a.dry_run {
        let mut exist = 0;
        for u in units {
            let st = status(&u.out);
            exist += usize::from(st == "exists");
            println!(
                "{:<18} {:<26} {:<18} {}",
                u.method,
                u.subject.name,
                st,
                u.out.display()
            );
        }
        println!("{exist} exist, {} to train", units.len() - exist);
        return Ok(ExitCode::SUCCESS);
    }
    if !exp.data.is_dir() {
        anyhow::bail!(
            "DreamBench not found at '{}' (the experiment's `data`); get it with `pnd dataset fetch --dest {}`",
            exp.data.display(),
            exp.data.display()
        );
    }
    let mut failures = Vec::new();
    for (i, u) in units.iter().enumerate() {
        let st = status(&u.out);
        eprintln!(
            "[{}/{}] {} {}: {st} ({})",
            i + 1,
            units.len(),
            u.method,
            u.subject.name,
            u.out.display()
        );
        if st == "exists" {
            continue;
        }
        let common = |k: crate::train_plan::Knobs| CommonArgs {
            model: exp.models.base.clone(),
            images: exp.data.join(u.subject.name),
            steps: Some(k.steps),
            lr: Some(k.lr),
            batch: Some(k.batch),
            grad_accum: Some(k.grad_accum),
            resolution: k.resolution,
            seed: k.seed,
            checkpoint_every: k.checkpoint_every,
            trace: Some(trace_path(&u.out)),
            overwrite: false,
            device: a.device,
            dtype: a.dtype,
            stop_after: None,
        };
        let result = match u.method {
            Method::TextualInversion => {
                let c = exp.textual_inversion.as_ref().expect("unit implies config");
                init_token(&exp.models.base, &c.init_token, u.subject).and_then(|init| {
                    run_ti(
                        TiArgs {
                            common: common(c.knobs()),
                            token: fill(&c.token, u.subject, ""),
                            init_token: init,
                            no_scale_lr: !c.scale_lr,
                            repeats: c.repeats,
                            out: u.out.clone(),
                        },
                        true,
                    )
                })
            }
            Method::Dreambooth => {
                let c = exp.dreambooth.as_ref().expect("unit implies config");
                run_db(
                    DbArgs {
                        common: common(c.knobs()),
                        instance_prompt: fill(&c.instance_prompt, u.subject, &c.identifier),
                        class_prompt: Some(fill(&c.class_prompt, u.subject, &c.identifier)),
                        prior_preservation: c.prior_preservation,
                        class_images: c.class_images,
                        class_dir: None,
                        prior_loss_weight: c.prior_loss_weight,
                        train_text_encoder: c.train_text_encoder,
                        out: u.out.clone(),
                    },
                    true,
                )
            }
        };
        if let Err(e) = result {
            let msg = format!(
                "{} {}: {}",
                u.method,
                u.subject.name,
                crate::error_chain(&e)
            );
            if !a.keep_going {
                return Err(anyhow::anyhow!(msg));
            }
            eprintln!("failed: {msg}");
            failures.push(format!("{} {}", u.method, u.subject.name));
        }
    }
    if !failures.is_empty() {
        // Each error was printed once, as it happened; here only which trainings.
        eprintln!(
            "{} of {} trainings failed (errors above): {}",
            failures.len(),
            units.len(),
            failures.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("all {} trainings of shard {shard} are done", units.len());
    Ok(ExitCode::SUCCESS)
}

/// `<out>.lock` beside the output: the claim of the process training into it.
pub fn lock_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    out.with_file_name(name)
}

/// Claims an output for this process (`<out>.lock`, see [`crate::sweep::claim`]), so that two
/// `pnd train` on one output never train side by side (both would write its checkpoints, and the
/// trace would get every step twice). A claim dies with its process: a killed run's output is
/// free at once. Without `wait` a held claim is an error; with it (`pnd train baselines`, where a
/// requeued task may meet a live one) the claim is waited for, and `None` returned when the other
/// process finished the output meanwhile.
fn claim_output(out: &Path, wait: bool) -> anyhow::Result<Option<crate::sweep::claim::Claim>> {
    use crate::sweep::claim;
    let lock = lock_path(out);
    if let Some(c) = claim::try_claim(&lock)? {
        return Ok(Some(c));
    }
    if !wait {
        anyhow::bail!(
            "another process is training into '{}' (it holds '{}'); wait for it to end, or choose another --out",
            out.display(),
            lock.display()
        );
    }
    eprintln!(
        "waiting for another process training into '{}' (it holds '{}')",
        out.display(),
        lock.display()
    );
    let c = claim::claim(&lock)?;
    Ok((!out.exists()).then_some(c))
}

/// `<out>.trace.jsonl` beside the output.
fn trace_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".trace.jsonl");
    out.with_file_name(name)
}

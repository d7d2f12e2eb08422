//! The DreamBench job runner behind `pnd sweep` (SPEC §8): for each job, render the method's
//! prompt, generate with the method's model (with or without Pick-and-Draw), write the PNG, score
//! it (DINO and CLIP-I against the subject's real images, CLIP-T against the class prompt) and
//! return its row. Everything a job needs is checked before the first job starts. Jobs that differ
//! only by seed are generated together, `[runtime] batch` at a time ([`batch_size`]).
//!
//! - [`models`]: which model serves a method and subject, and the models kept loaded;
//! - [`validate`](validate()): the checks before any work;
//! - `generate`: one job's image;
//! - [`images`]: or an image another program made (baseline `images`, `pnd eval`);
//! - `score`: its scores and row.

mod generate;
pub mod images;
mod models;
mod score;
mod validate;

pub use models::{guidance_config, model_for, must_be_local, ModelChoice};
pub use score::{dino_max, max_pair};
pub use validate::{open_dataset, validate, validate_with};

use crate::experiment::{Experiment, MethodSpec};
use crate::report::rows::{ImageRow, OracleRow};
use crate::runtime::Runtime;
use crate::sweep::{write_file_atomic, JobOutput, JobRunner};
use anyhow::Context;
use dreambench::{clip_t_prompt, Dataset, Job, Subject};
use metrics::{Scorer, ScorerOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything one job is about, resolved from its id.
pub(crate) struct JobSpec<'a> {
    job: &'a Job,
    method: MethodSpec,
    subject: &'static Subject,
    /// The prompt the image is generated from (the method's prompt style).
    prompt: String,
    /// The prompt CLIP-T scores against.
    clip_prompt: String,
    reference: PathBuf,
    choice: ModelChoice,
}

/// Images per batch of an experiment: `[runtime] batch`, else 4 (the seeds of a prompt) when the
/// models run on a CUDA device and 1 otherwise (a batch buys little on the CPU).
pub fn batch_size(exp: &Experiment, on_cuda: bool) -> usize {
    match exp.runtime.batch {
        Some(n) => n,
        None if on_cuda => 4,
        None => 1,
    }
}

/// Runs DreamBench jobs: models are loaded on first use and kept while consecutive jobs share them.
pub struct DreamBenchJobs {
    exp: Experiment,
    dataset: Dataset,
    scorer: Scorer,
    models: models::LoadedModels,
    /// Inversions and reference palettes, computed once per subject and model.
    palette_cache: PathBuf,
    /// Show a per-step progress bar inside each job.
    pub step_progress: bool,
    /// The device and precision every model runs on.
    runtime: Runtime,
    /// Images per batch (see [`batch_size`]).
    pub batch: usize,
    /// Where the images of each method of baseline `images` are, by method name.
    image_sources: std::collections::BTreeMap<String, images::ImageSources>,
}

impl DreamBenchJobs {
    /// `cache_dir` holds real-image embeddings and reference palettes (the per-subject shared work).
    /// The models run where the experiment's `[runtime]` table says.
    pub fn new(exp: Experiment, cache_dir: &Path) -> anyhow::Result<Self> {
        let runtime = Runtime::open(&exp.runtime)?;
        Self::with_runtime(exp, cache_dir, runtime)
    }

    /// As [`DreamBenchJobs::new`], on an opened device.
    pub fn with_runtime(
        exp: Experiment,
        cache_dir: &Path,
        runtime: Runtime,
    ) -> anyhow::Result<Self> {
        let dataset = open_dataset(&exp)?;
        let options = ScorerOptions {
            cache: Some(metrics::EmbeddingCache::new(cache_dir.join("embeddings"))),
            device: runtime.device.clone(),
            ..Default::default()
        };
        let scorer = Scorer::load_scoring(
            &exp.metrics.dino,
            &exp.metrics.clip,
            exp.metrics.scoring.clone(),
            options,
        )
        .with_context(|| {
            format!(
                "loading metric models '{}' and '{}'",
                exp.metrics.dino, exp.metrics.clip
            )
        })?;
        anyhow::ensure!(
            exp.runtime.batch != Some(0),
            "[runtime] batch = 0: a batch holds at least one image"
        );
        let mut image_sources = std::collections::BTreeMap::new();
        for m in exp
            .methods
            .iter()
            .filter(|m| m.baseline == crate::experiment::Baseline::Images)
        {
            let sources =
                images::ImageSources::open(m).with_context(|| format!("method '{}'", m.name))?;
            image_sources.insert(m.name.clone(), sources);
        }
        Ok(Self {
            image_sources,
            batch: batch_size(&exp, runtime.device.is_cuda()),
            models: models::LoadedModels::new(exp.models.base.clone(), runtime.clone()),
            exp,
            dataset,
            scorer,
            palette_cache: cache_dir.join("palettes"),
            step_progress: false,
            runtime,
        })
    }

    /// The oracle row over the experiment's subjects (each real image against the others).
    pub fn oracle(&self) -> anyhow::Result<OracleRow> {
        score::oracle_row(&self.dataset, &self.scorer, &self.exp.subjects())
    }

    /// Writes `run_dir/oracle.json` unless it is there.
    pub fn write_oracle(&self, run_dir: &Path) -> anyhow::Result<()> {
        let path = run_dir.join("oracle.json");
        if path.is_file() {
            return Ok(());
        }
        eprintln!(
            "oracle: embedding the real images of {}",
            crate::lists::count(self.exp.subjects().len(), "subject")
        );
        let oracle = self.oracle()?;
        write_file_atomic(&path, serde_json::to_string_pretty(&oracle)?.as_bytes())?;
        Ok(())
    }

    fn spec<'a>(&self, job: &'a Job) -> anyhow::Result<JobSpec<'a>> {
        let method = self
            .exp
            .method(&job.method)
            .with_context(|| format!("unknown method '{}'", job.method))?
            .clone();
        let subject = dreambench::subject(&job.subject)
            .with_context(|| format!("unknown subject '{}'", job.subject))?;
        let template = subject.prompts()[job.prompt_index];
        let prompt = method.style(subject).render(template, subject.class)?;
        let reference = self
            .dataset
            .reference_image(subject.name, &self.exp.metrics.reference)?
            .to_path_buf();
        let choice = model_for(&self.exp, &method, subject)?;
        Ok(JobSpec {
            job,
            method,
            subject,
            prompt,
            clip_prompt: clip_t_prompt(template, subject.class),
            reference,
            choice,
        })
    }
}

impl DreamBenchJobs {
    /// The images of a batch of jobs (see [`generate::batchable`]) and each one's share of the
    /// generation time.
    fn generate(
        &mut self,
        specs: &[JobSpec],
        outs: &[JobOutput],
    ) -> anyhow::Result<(Vec<image::RgbImage>, crate::report::rows::Phases)> {
        let started = Instant::now();
        let bar = if self.step_progress {
            indicatif::ProgressBar::new(self.exp.generation.steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut generator = generate::Generator {
            exp: &self.exp,
            models: &mut self.models,
            palette_cache: &self.palette_cache,
        };
        let (images, mut phases) =
            generator.images(specs, outs, &mut |i, _| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        phases.seconds = started.elapsed().as_secs_f64();
        Ok((images, phases.share(specs.len())))
    }
}

impl DreamBenchJobs {
    /// A job of baseline `images`: the image's bytes are copied into the job's folder (so the
    /// run folder holds what it scored, and a JPEG is decoded exactly as the sweep's own images
    /// are) and scored there.
    fn read_image(&self, job: &Job, out: &JobOutput) -> anyhow::Result<ImageRow> {
        let spec = self.spec(job)?;
        let (source, prompt) = self.image_sources[&job.method].source(job)?;
        let ext = source
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| "png".into());
        let bytes = std::fs::read(&source)
            .with_context(|| format!("reading image '{}'", source.display()))?;
        let copy = out.write(&format!("image.{ext}"), &bytes)?;
        let mut row = score::scored_row(&self.dataset, &self.scorer, &spec, out, &copy)
            .with_context(|| format!("scoring image '{}'", source.display()))?;
        row.prompt = prompt.unwrap_or_default();
        // Made elsewhere: the device and precision of its generation are unknown.
        row.device = "external".into();
        Ok(row)
    }
}

impl JobRunner for DreamBenchJobs {
    type Row = ImageRow;

    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<ImageRow> {
        if self.image_sources.contains_key(&job.method) {
            return self.read_image(job, out);
        }
        let spec = self.spec(job)?;
        let (mut images, phases) =
            self.generate(std::slice::from_ref(&spec), std::slice::from_ref(out))?;
        let runtime = self.runtime.record();
        let image = images.remove(0);
        score::image_row(
            &self.dataset,
            &self.scorer,
            &spec,
            out,
            image,
            &phases,
            &runtime,
        )
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn batchable(&self, first: &Job, job: &Job) -> bool {
        match (self.spec(first), self.spec(job)) {
            (Ok(a), Ok(b)) => generate::batchable(&a, &b),
            _ => false,
        }
    }

    /// One generation for the batch, then each image scored on its own: a failed generation fails
    /// every job of the batch with its error, a failed scoring only its job.
    fn run_batch(&mut self, jobs: &[&Job], outs: &[JobOutput]) -> Vec<anyhow::Result<ImageRow>> {
        let specs = match jobs
            .iter()
            .map(|j| self.spec(j))
            .collect::<anyhow::Result<Vec<_>>>()
        {
            Ok(s) => s,
            Err(e) => {
                let e = crate::error_chain(&e);
                return jobs.iter().map(|_| Err(anyhow::anyhow!("{e}"))).collect();
            }
        };
        match self.generate(&specs, outs) {
            Ok((images, phases)) => {
                let runtime = self.runtime.record();
                specs
                    .iter()
                    .zip(outs)
                    .zip(images)
                    .map(|((spec, out), image)| {
                        let (dataset, scorer) = (&self.dataset, &self.scorer);
                        score::image_row(dataset, scorer, spec, out, image, &phases, &runtime)
                    })
                    .collect()
            }
            Err(e) => {
                let ids: Vec<String> = jobs.iter().map(|j| j.id().0).collect();
                jobs.iter()
                    .map(|_| {
                        Err(anyhow::anyhow!(
                            "{} (batch of {})",
                            crate::error_chain(&e),
                            ids.join(", ")
                        ))
                    })
                    .collect()
            }
        }
    }
}

//! The DreamBench job runner behind `pnd sweep` (SPEC §8): for each job, render the method's
//! prompt, generate with the method's model (with or without Pick-and-Draw), write the PNG, score
//! it (DINO and CLIP-I against the subject's real images, CLIP-T against the class prompt) and
//! return its row. Everything a job needs is checked before the first job starts.

use crate::experiment::{Baseline, Experiment, MethodSpec};
use crate::report::rows::{ImageRow, OracleRow};
use crate::sweep::{JobOutput, JobRunner};
use anyhow::{bail, Context};
use diffusion::blip::{blip_text_prompt, BlipDiffusionPipeline, BlipRequest};
use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use dreambench::{clip_t_prompt, Dataset, Job};
use guidance::blip::{pick_and_draw_blip, BlipPickAndDrawRequest};
use guidance::pipeline::{pick_and_draw, PickAndDrawRequest};
use guidance::GuidanceConfig;
use metrics::{Scorer, ScorerOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Whether a model string must be a local path: `./x`, `../x`, `/x`, or three or more path parts
/// (`checkpoints/dreambooth/dog`). Two parts (`owner/name`) that do not exist locally are a
/// Hugging Face repo id.
fn must_be_local(model: &str) -> bool {
    model.starts_with("./")
        || model.starts_with("../")
        || model.starts_with('/')
        || model.split('/').count() >= 3
}

/// What generates a method's images for one subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelChoice {
    pub model: String,
    /// Components a DreamBooth folder lacks come from here.
    pub base: Option<String>,
    /// Textual Inversion embedding file.
    pub embeddings: Option<PathBuf>,
}

/// The model of a method for a subject, or why there is none.
pub fn model_for(
    exp: &Experiment,
    method: &MethodSpec,
    subject: &str,
) -> anyhow::Result<ModelChoice> {
    let m = &exp.models;
    Ok(match method.baseline {
        Baseline::StableDiffusion => ModelChoice {
            model: m.base.clone(),
            base: None,
            embeddings: None,
        },
        Baseline::Dreambooth => {
            let Some(path) = m.for_subject(Baseline::Dreambooth, subject) else {
                bail!("method '{}' is DreamBooth but the experiment sets no [models] dreambooth = \"path/{{subject}}\"", method.name)
            };
            ModelChoice {
                model: path,
                base: Some(m.base.clone()),
                embeddings: None,
            }
        }
        Baseline::TextualInversion => {
            let Some(path) = m.for_subject(Baseline::TextualInversion, subject) else {
                bail!(
                    "method '{}' is Textual Inversion but the experiment sets no [models] textual_inversion = \"path/{{subject}}/learned_embeds.safetensors\"",
                    method.name
                )
            };
            ModelChoice {
                model: m.base.clone(),
                base: None,
                embeddings: Some(PathBuf::from(path)),
            }
        }
        Baseline::BlipDiffusion => {
            let model = m
                .blip_diffusion
                .clone()
                .unwrap_or_else(|| "Salesforce/blipdiffusion".into());
            ModelChoice {
                model,
                base: None,
                embeddings: None,
            }
        }
    })
}

/// A method's guidance settings: the experiment's `[guidance]`, then the method's own keys on top.
pub fn guidance_config(exp: &Experiment, method: &MethodSpec) -> anyhow::Result<GuidanceConfig> {
    let mut table = exp.guidance.clone();
    for (k, v) in &method.guidance {
        table.insert(k.clone(), v.clone());
    }
    let text = toml::to_string(&table)?;
    let cfg =
        GuidanceConfig::from_toml_str(&text, &format!("[guidance] of method '{}'", method.name))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Checks everything the jobs will need before any work starts: the dataset and its subjects,
/// every model location that must be local, every embedding file, and the metric models.
pub fn validate(exp: &Experiment) -> anyhow::Result<()> {
    open_dataset(exp)?;
    let mut problems = Vec::new();
    for method in &exp.methods {
        if method.pick_and_draw {
            if let Err(e) = guidance_config(exp, method) {
                problems.push(format!("method '{}': {e:#}", method.name));
            }
        }
        for subject in exp.subjects() {
            match model_for(exp, method, subject.name) {
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    break;
                }
                Ok(choice) => {
                    if must_be_local(&choice.model) && !Path::new(&choice.model).exists() {
                        problems.push(format!(
                            "method '{}', subject '{}': model path '{}' does not exist",
                            method.name, subject.name, choice.model
                        ));
                    }
                    if let Some(e) = &choice.embeddings {
                        if !e.is_file() {
                            problems.push(format!(
                                "method '{}', subject '{}': Textual Inversion embeddings '{}' do not exist",
                                method.name,
                                subject.name,
                                e.display()
                            ));
                        }
                    }
                }
            }
        }
    }
    for (what, model) in [("DINO", &exp.metrics.dino), ("CLIP", &exp.metrics.clip)] {
        if must_be_local(model) && !Path::new(model).exists() {
            problems.push(format!(
                "[metrics] {what} model path '{model}' does not exist"
            ));
        }
    }
    problems.dedup();
    if !problems.is_empty() {
        bail!("the experiment cannot run:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// The experiment's dataset: only the subjects it uses need to be there.
pub fn open_dataset(exp: &Experiment) -> anyhow::Result<Dataset> {
    let names: Vec<&str> = exp.subjects().iter().map(|s| s.name).collect();
    Dataset::open_subjects(&exp.metrics.data, &names).with_context(|| {
        format!(
            "opening the dataset of [metrics] data = '{}'",
            exp.metrics.data
        )
    })
}

/// Runs DreamBench jobs: models are loaded on first use and kept while consecutive jobs share them.
pub struct BenchRunner {
    exp: Experiment,
    dataset: Dataset,
    scorer: Scorer,
    loaded: Option<(ModelChoice, StableDiffusion)>,
    /// The base model, kept for the layout template of guided personalized methods.
    base: Option<StableDiffusion>,
    blip: Option<(String, BlipDiffusionPipeline)>,
    /// Inversions and reference palettes, computed once per subject and model.
    palette_cache: PathBuf,
    /// Show a per-step progress bar inside each job.
    pub step_progress: bool,
}

impl BenchRunner {
    /// `cache_dir` holds real-image embeddings and reference palettes (the per-subject shared work).
    pub fn new(exp: Experiment, cache_dir: &Path) -> anyhow::Result<Self> {
        let dataset = open_dataset(&exp)?;
        let options = ScorerOptions {
            cache: Some(metrics::EmbeddingCache::new(cache_dir.join("embeddings"))),
            ..Default::default()
        };
        let scorer =
            Scorer::load(&exp.metrics.dino, &exp.metrics.clip, options).with_context(|| {
                format!(
                    "loading metric models '{}' and '{}'",
                    exp.metrics.dino, exp.metrics.clip
                )
            })?;
        Ok(Self {
            exp,
            dataset,
            scorer,
            loaded: None,
            base: None,
            blip: None,
            palette_cache: cache_dir.join("palettes"),
            step_progress: false,
        })
    }

    fn ensure_base(&mut self) -> anyhow::Result<()> {
        if self.base.is_none() {
            let base = &self.exp.models.base;
            self.base = Some(
                StableDiffusion::load(base, &LoadOptions::default())
                    .with_context(|| format!("loading base model '{base}'"))?,
            );
        }
        Ok(())
    }

    fn pipeline(&mut self, choice: &ModelChoice) -> anyhow::Result<&StableDiffusion> {
        if self.loaded.as_ref().map(|(c, _)| c) != Some(choice) {
            // Drop the previous model first: two SD models at once would double peak memory.
            self.loaded = None;
            let opts = LoadOptions {
                base: choice.base.clone(),
                embeddings: choice.embeddings.clone(),
                ..Default::default()
            };
            let sd = StableDiffusion::load(&choice.model, &opts)
                .with_context(|| format!("loading model '{}'", choice.model))?;
            self.loaded = Some((choice.clone(), sd));
        }
        Ok(&self.loaded.as_ref().expect("just loaded").1)
    }

    /// BLIP-Diffusion: the reference image and the class condition the prompt; with Pick-and-Draw
    /// the palette comes from the same reference and the layout template from the base model.
    #[allow(clippy::too_many_arguments)]
    fn run_blip(
        &mut self,
        job: &Job,
        out: &JobOutput,
        method: &MethodSpec,
        subject: &'static dreambench::Subject,
        prompt: String,
        clip_prompt: String,
        reference: PathBuf,
        choice: &ModelChoice,
        started: Instant,
        bar: indicatif::ProgressBar,
    ) -> anyhow::Result<ImageRow> {
        if method.pick_and_draw {
            self.ensure_base()?;
        }
        if self.blip.as_ref().map(|(m, _)| m) != Some(&choice.model) {
            self.blip = None;
            self.loaded = None;
            let pipe = BlipDiffusionPipeline::load(
                &choice.model,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .with_context(|| format!("loading BLIP-Diffusion '{}'", choice.model))?;
            self.blip = Some((choice.model.clone(), pipe));
        }
        let pipe = &self.blip.as_ref().expect("loaded above").1;
        let g = &self.exp.generation;
        let req = BlipRequest {
            reference: reference.clone(),
            subject_category: subject.class.to_string(),
            target_category: None,
            prompt: blip_text_prompt(&prompt, subject.class),
            negative_prompt: g.negative_prompt.clone(),
            steps: g.steps,
            cfg_scale: g.cfg_scale,
            height: g.height,
            width: g.width,
            seed: job.seed,
            init_latents: None,
            ..Default::default()
        };
        let image = if method.pick_and_draw {
            let cfg = guidance_config(&self.exp, method)?;
            let base = self.base.as_ref().expect("loaded above");
            let preq = BlipPickAndDrawRequest {
                blip: req,
                template_prompt: Some(prompt.clone()),
                model_key: choice.model.clone(),
                cache_dir: self.palette_cache.clone(),
                trace: Some(out.path("trace.jsonl")),
            };
            let out = pick_and_draw_blip(pipe, base, &cfg, &preq, &mut |i, _| {
                bar.set_position(i as u64)
            })?;
            for skipped in &out.skipped_updates {
                eprintln!("warning: {skipped}");
            }
            pipe.sd.decode_images(&out.latents)?.remove(0)
        } else {
            pipe.generate(&req, &mut |i, _| bar.set_position(i as u64))?
                .image
        };
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        self.finish(
            job,
            out,
            method,
            subject,
            prompt,
            clip_prompt,
            &reference,
            image,
            seconds,
        )
    }

    /// Writes the image atomically, scores it and makes its row.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        job: &Job,
        out: &JobOutput,
        method: &MethodSpec,
        subject: &'static dreambench::Subject,
        prompt: String,
        clip_prompt: String,
        reference: &Path,
        image: image::RgbImage,
        seconds: f64,
    ) -> anyhow::Result<ImageRow> {
        let tmp = out.temp_path("image.png");
        image
            .save(&tmp)
            .with_context(|| format!("writing '{}'", tmp.display()))?;
        let path = out.path("image.png");
        std::fs::rename(&tmp, &path).with_context(|| format!("writing '{}'", path.display()))?;
        let real = self.dataset.images(subject.name)?.to_vec();
        let scores = self
            .scorer
            .score(std::slice::from_ref(&path), &real, &clip_prompt)?;
        let run_dir = out
            .dir()
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        Ok(ImageRow {
            id: job.id().0,
            method: job.method.clone(),
            baseline: serde_json::to_value(method.baseline)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
            guided: method.pick_and_draw,
            subject: job.subject.clone(),
            prompt_index: job.prompt_index,
            seed: job.seed,
            prompt,
            clip_t_prompt: clip_prompt,
            image: path
                .strip_prefix(run_dir)
                .unwrap_or(&path)
                .display()
                .to_string(),
            reference: reference.display().to_string(),
            dino: scores.dino,
            clip_i: scores.clip_i,
            clip_t: scores.clip_t,
            seconds,
        })
    }

    /// The oracle row over the experiment's subjects (each real image against the others).
    pub fn oracle(&self) -> anyhow::Result<OracleRow> {
        let subjects: Vec<(String, Vec<PathBuf>)> = self
            .exp
            .subjects()
            .iter()
            .map(|s| Ok((s.name.to_string(), self.dataset.images(s.name)?.to_vec())))
            .collect::<anyhow::Result<_>>()?;
        let report = self.scorer.oracle(&subjects)?;
        Ok(OracleRow {
            dino: report.dino,
            clip_i: report.clip_i,
            per_subject: report
                .per_subject
                .iter()
                .map(|(k, v)| (k.clone(), v.dino, v.clip_i))
                .collect(),
        })
    }
}

impl JobRunner for BenchRunner {
    type Row = ImageRow;

    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<ImageRow> {
        let method = self
            .exp
            .method(&job.method)
            .with_context(|| format!("unknown method '{}'", job.method))?
            .clone();
        let subject = dreambench::subject(&job.subject)
            .with_context(|| format!("unknown subject '{}'", job.subject))?;
        let template = subject.prompts()[job.prompt_index];
        let prompt = method.style(subject).render(template, subject.class)?;
        let clip_prompt = clip_t_prompt(template, subject.class);
        let reference = self
            .dataset
            .reference_image(subject.name, &self.exp.metrics.reference)?
            .to_path_buf();
        let choice = model_for(&self.exp, &method, subject.name)?;
        let g = self.exp.generation.clone();
        let started = Instant::now();
        let step_progress = self.step_progress;
        let bar = if step_progress {
            indicatif::ProgressBar::new(g.steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if method.baseline == Baseline::BlipDiffusion {
            return self.run_blip(
                job,
                out,
                &method,
                subject,
                prompt,
                clip_prompt,
                reference,
                &choice,
                started,
                bar,
            );
        }
        let personalized = choice.model != self.exp.models.base || choice.embeddings.is_some();
        if method.pick_and_draw && personalized {
            self.ensure_base()?;
        }
        self.pipeline(&choice)?;
        let sd = &self.loaded.as_ref().expect("loaded above").1;
        let init = sd.initial_latents(g.height, g.width, job.seed)?;
        let latents = if method.pick_and_draw {
            let cfg = guidance_config(&self.exp, &method)?;
            let style = method.style(subject);
            let identifier = match method.baseline {
                Baseline::Dreambooth => Some(style.identifier.clone()),
                Baseline::TextualInversion => style.token.clone(),
                Baseline::StableDiffusion | Baseline::BlipDiffusion => None,
            };
            let req = PickAndDrawRequest {
                prompt: prompt.clone(),
                negative_prompt: g.negative_prompt.clone(),
                steps: g.steps,
                cfg_scale: g.cfg_scale,
                height: g.height,
                width: g.width,
                init,
                reference: reference.clone(),
                class: subject.class.to_string(),
                identifier,
                template_prompt: None,
                model_key: format!("{}|{:?}", choice.model, choice.embeddings),
                cache_dir: self.palette_cache.clone(),
                trace: Some(out.path("trace.jsonl")),
            };
            let base = if personalized {
                self.base.as_ref()
            } else {
                None
            };
            let out = pick_and_draw(sd, base, &cfg, &req, &mut |i, _| bar.set_position(i as u64))?;
            for skipped in &out.skipped_updates {
                eprintln!("warning: {skipped}");
            }
            out.latents
        } else {
            let req = SampleRequest {
                prompt: prompt.clone(),
                negative_prompt: g.negative_prompt.clone(),
                steps: g.steps,
                cfg_scale: g.cfg_scale,
                height: g.height,
                width: g.width,
                seed: job.seed,
                init_latents: Some(init),
            };
            sd.sample(&req, &mut |i, _| bar.set_position(i as u64))?
        };
        bar.finish_and_clear();
        let image = sd.decode_images(&latents)?.remove(0);
        let seconds = started.elapsed().as_secs_f64();
        self.finish(
            job,
            out,
            &method,
            subject,
            prompt,
            clip_prompt,
            &reference,
            image,
            seconds,
        )
    }
}

//! Generation: the images of a batch of jobs that differ only by seed (one job alone is a batch
//! of one), from their Stable Diffusion or BLIP-Diffusion model, with or without Pick-and-Draw.
//! BLIP-Diffusion runs one job at a time.

use super::models::{guidance_config, LoadedModels};
use super::JobSpec;
use crate::experiment::{Baseline, Experiment};
use crate::report::rows::Phases;
use crate::requests;
use crate::sweep::JobOutput;
use anyhow::Context;
use diffusion::ip_adapter::with_image_tokens;
use diffusion::pipeline::SampleRequest;
use guidance::blip::{pick_and_draw_blip, BlipPickAndDrawRequest};
use guidance::pipeline::{pick_and_draw, pick_and_draw_ip_adapter, PickAndDraw};
use std::path::Path;
use std::time::Instant;

/// What a job generates with: the experiment's settings, its loaded models and its palette cache.
pub(super) struct Generator<'a> {
    pub exp: &'a Experiment,
    pub models: &'a mut LoadedModels,
    /// Inversions and reference palettes, computed once per subject and model.
    pub palette_cache: &'a Path,
}

/// Guided updates skipped for a non-finite gradient, and unusable cache entries that were
/// recomputed, are said on stderr, not dropped.
fn warn_skipped(out: &PickAndDraw, specs: &[JobSpec]) {
    for w in &out.timings.cache_warnings {
        eprintln!("warning: {w}");
    }
    for skipped in &out.skipped_updates {
        match specs.get(skipped.image).filter(|_| specs.len() > 1) {
            Some(spec) => eprintln!("warning: job {}: {skipped}", spec.job.id()),
            None => eprintln!("warning: {skipped}"),
        }
    }
}

/// The phases Pick-and-Draw timed (its sampling includes the guidance passes).
fn guided_phases(phases: &mut Phases, out: &PickAndDraw) {
    let t = &out.timings;
    phases.inversion_s = Some(t.inversion_s);
    phases.palette_s = Some(t.palette_s);
    phases.template_s = Some(t.template_s);
    phases.sampling_s = Some(t.sampling_s);
}

/// The experiment's sampling settings for the job's prompt and seed.
fn sample_request(exp: &Experiment, spec: &JobSpec) -> SampleRequest {
    let g = &exp.generation;
    SampleRequest {
        prompt: spec.prompt.clone(),
        negative_prompt: g.negative_prompt.clone(),
        steps: g.steps,
        cfg_scale: g.cfg_scale,
        height: g.height,
        width: g.width,
        seed: spec.job.seed,
        init_latents: None,
    }
}

/// Whether two jobs can share a batch: the same method, subject and prompt (so the same model,
/// prompt and settings), Stable Diffusion with or without Pick-and-Draw (BLIP-Diffusion runs one
/// job at a time). A guided batch gives each image its own loss terms and update; its rows agree
/// with batch-1 rows up to summation order, except where the layout loss starts at float noise
/// (plain Stable Diffusion with Pick-and-Draw: the template is the generation, and the gradient of
/// ‖·‖_F has unit size whatever the noise), where the first update follows the rounding.
pub(super) fn batchable(a: &JobSpec, b: &JobSpec) -> bool {
    a.job.method == b.job.method
        && a.job.subject == b.job.subject
        && a.job.prompt_index == b.job.prompt_index
        && a.method.baseline != Baseline::BlipDiffusion
        && a.method.baseline != Baseline::Images
}

impl Generator<'_> {
    /// The images of a batch of jobs (one per job, in order; see [`batchable`]), each in its own
    /// output folder `outs`; `on_step` sees each denoising step of the batch.
    pub fn images(
        &mut self,
        specs: &[JobSpec],
        outs: &[JobOutput],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<(Vec<image::RgbImage>, Phases)> {
        let first = specs.first().context("an empty batch of jobs")?;
        if let Some(other) = specs[1..].iter().find(|s| !batchable(first, s)) {
            anyhow::bail!(
                "jobs {} and {} cannot share a batch (another method, subject or prompt, or BLIP-Diffusion)",
                first.job.id(),
                other.job.id()
            );
        }
        if first.method.baseline == Baseline::BlipDiffusion {
            let (image, phases) = self.blip_diffusion(first, &outs[0], on_step)?;
            Ok((vec![image], phases))
        } else {
            self.stable_diffusion(specs, outs, on_step)
        }
    }

    /// Stable Diffusion (plain, DreamBooth, Textual Inversion, IP-Adapter) of a batch of seeds;
    /// guided personalized models take the layout templates from the base model (IP-Adapter:
    /// the model with its adapter detached, the same vanilla weights).
    fn stable_diffusion(
        &mut self,
        specs: &[JobSpec],
        outs: &[JobOutput],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<(Vec<image::RgbImage>, Phases)> {
        let spec = &specs[0];
        let mut phases = Phases::default();
        let (exp, method, choice) = (self.exp, &spec.method, &spec.choice);
        let g = &exp.generation;
        let personalized = choice.model != exp.models.base || choice.embeddings.is_some();
        // IP-Adapter: the image prompt is the subject's reference image.
        let (sd, base, image_tokens) = self.models.stable_diffusion(
            choice,
            method.pick_and_draw && personalized,
            &spec.reference,
        )?;
        let seeds: Vec<u64> = specs.iter().map(|s| s.job.seed).collect();
        let init = sd.seeded_latents(g.height, g.width, &seeds)?;
        let latents = if method.pick_and_draw {
            let cfg = guidance_config(exp, method)?;
            let style = method.style(spec.subject);
            let identifier = match method.baseline {
                Baseline::Dreambooth => Some(style.identifier.clone()),
                Baseline::TextualInversion => style.token.clone(),
                Baseline::StableDiffusion
                | Baseline::BlipDiffusion
                | Baseline::IpAdapter
                | Baseline::Images => None,
            };
            let guided = requests::Guided {
                reference: spec.reference.clone(),
                class: spec.subject.class.to_string(),
                identifier,
                template_prompt: None,
                model_key: choice.cache_key(),
                cache_dir: self.palette_cache.to_path_buf(),
                trace: outs.iter().map(|o| o.path("trace.jsonl")).collect(),
            };
            let req = requests::pick_and_draw(sample_request(exp, spec), init, guided);
            let out = match &image_tokens {
                Some(tokens) => pick_and_draw_ip_adapter(sd, tokens, base, &cfg, &req, on_step)?,
                None => pick_and_draw(sd, base, &cfg, &req, on_step)?,
            };
            warn_skipped(&out, specs);
            guided_phases(&mut phases, &out);
            out.latents
        } else {
            let req = SampleRequest {
                init_latents: Some(init),
                ..sample_request(exp, spec)
            };
            let started = Instant::now();
            let latents = match &image_tokens {
                Some(tokens) => {
                    let text = sd.encode_prompts(&req.prompt, &req.negative_prompt)?;
                    sd.sample_embeddings(&with_image_tokens(&text, tokens)?, &req, on_step)?
                }
                None => sd.sample(&req, on_step)?,
            };
            phases.sampling_s = Some(started.elapsed().as_secs_f64());
            latents
        };
        let started = Instant::now();
        let images = sd.decode_images(&latents)?;
        phases.decode_s = Some(started.elapsed().as_secs_f64());
        Ok((images, phases))
    }

    /// BLIP-Diffusion: the reference image and the class condition the prompt; with Pick-and-Draw
    /// the palette comes from the same reference and the layout template from the base model.
    fn blip_diffusion(
        &mut self,
        spec: &JobSpec,
        out: &JobOutput,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<(image::RgbImage, Phases)> {
        let (exp, method) = (self.exp, &spec.method);
        let mut phases = Phases::default();
        let (pipe, base) = self
            .models
            .blip_diffusion(&spec.choice.model, method.pick_and_draw)?;
        let req = requests::blip(
            sample_request(exp, spec),
            spec.reference.clone(),
            spec.subject.class.to_string(),
        );
        match base {
            Some(base) => {
                let cfg = guidance_config(exp, method)?;
                let preq = BlipPickAndDrawRequest {
                    blip: req,
                    template_prompt: Some(spec.prompt.clone()),
                    model_key: spec.choice.model.clone(),
                    cache_dir: self.palette_cache.to_path_buf(),
                    trace: Some(out.path("trace.jsonl")),
                };
                let out = pick_and_draw_blip(pipe, base, &cfg, &preq, on_step)?;
                warn_skipped(&out, std::slice::from_ref(spec));
                guided_phases(&mut phases, &out);
                let started = Instant::now();
                let image = pipe.sd.decode_images(&out.latents)?.remove(0);
                phases.decode_s = Some(started.elapsed().as_secs_f64());
                Ok((image, phases))
            }
            None => {
                // BLIP-Diffusion decodes inside its generation: one sampling figure.
                let started = Instant::now();
                let image = pipe.generate(&req, on_step)?.image;
                phases.sampling_s = Some(started.elapsed().as_secs_f64());
                Ok((image, phases))
            }
        }
    }
}

//! Generation: one job's image, from its Stable Diffusion or BLIP-Diffusion model, with or
//! without Pick-and-Draw.

use super::models::{guidance_config, LoadedModels};
use super::JobSpec;
use crate::experiment::{Baseline, Experiment};
use crate::requests;
use crate::sweep::JobOutput;
use diffusion::pipeline::SampleRequest;
use guidance::blip::{pick_and_draw_blip, BlipPickAndDrawRequest};
use guidance::pipeline::{pick_and_draw, PickAndDraw};
use std::path::Path;

/// What a job generates with: the experiment's settings, its loaded models and its palette cache.
pub(super) struct Generator<'a> {
    pub exp: &'a Experiment,
    pub models: &'a mut LoadedModels,
    /// Inversions and reference palettes, computed once per subject and model.
    pub palette_cache: &'a Path,
}

/// Guided updates skipped for a non-finite gradient are said on stderr, not dropped.
fn warn_skipped(out: &PickAndDraw) {
    for skipped in &out.skipped_updates {
        eprintln!("warning: {skipped}");
    }
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

impl Generator<'_> {
    /// The job's image; `on_step` sees each denoising step.
    pub fn image(
        &mut self,
        spec: &JobSpec,
        out: &JobOutput,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<image::RgbImage> {
        if spec.method.baseline == Baseline::BlipDiffusion {
            self.blip_diffusion(spec, out, on_step)
        } else {
            self.stable_diffusion(spec, out, on_step)
        }
    }

    /// Stable Diffusion (plain, DreamBooth, Textual Inversion); guided personalized models take
    /// the layout template from the base model.
    fn stable_diffusion(
        &mut self,
        spec: &JobSpec,
        out: &JobOutput,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<image::RgbImage> {
        let (exp, method, choice) = (self.exp, &spec.method, &spec.choice);
        let g = &exp.generation;
        let personalized = choice.model != exp.models.base || choice.embeddings.is_some();
        let (sd, base) = self
            .models
            .stable_diffusion(choice, method.pick_and_draw && personalized)?;
        let init = sd.initial_latents(g.height, g.width, spec.job.seed)?;
        let latents = if method.pick_and_draw {
            let cfg = guidance_config(exp, method)?;
            let style = method.style(spec.subject);
            let identifier = match method.baseline {
                Baseline::Dreambooth => Some(style.identifier.clone()),
                Baseline::TextualInversion => style.token.clone(),
                Baseline::StableDiffusion | Baseline::BlipDiffusion => None,
            };
            let guided = requests::Guided {
                reference: spec.reference.clone(),
                class: spec.subject.class.to_string(),
                identifier,
                template_prompt: None,
                model_key: choice.cache_key(),
                cache_dir: self.palette_cache.to_path_buf(),
                trace: Some(out.path("trace.jsonl")),
            };
            let req = requests::pick_and_draw(sample_request(exp, spec), init, guided);
            let out = pick_and_draw(sd, base, &cfg, &req, on_step)?;
            warn_skipped(&out);
            out.latents
        } else {
            let req = SampleRequest {
                init_latents: Some(init),
                ..sample_request(exp, spec)
            };
            sd.sample(&req, on_step)?
        };
        Ok(sd.decode_images(&latents)?.remove(0))
    }

    /// BLIP-Diffusion: the reference image and the class condition the prompt; with Pick-and-Draw
    /// the palette comes from the same reference and the layout template from the base model.
    fn blip_diffusion(
        &mut self,
        spec: &JobSpec,
        out: &JobOutput,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<image::RgbImage> {
        let (exp, method) = (self.exp, &spec.method);
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
                warn_skipped(&out);
                Ok(pipe.sd.decode_images(&out.latents)?.remove(0))
            }
            None => Ok(pipe.generate(&req, on_step)?.image),
        }
    }
}

//! `pnd generate --method blip-diffusion`: one BLIP-Diffusion image from a reference image and
//! its subject category (SPEC §6), optionally guided with Pick-and-Draw (`--pick-and-draw`,
//! SPEC §7: palette from the same reference image, layout template from vanilla Stable Diffusion,
//! `--base-model` or SD 1.5).

use super::args::GenerateArgs;
use super::shared::{step_progress, write_outputs};
use crate::commands::common::{load_guidance_config, load_model, print_outcome, EmbeddingArgs};
use crate::experiment::SD15;
use crate::requests;
use crate::runtime::Runtime;
use anyhow::Context;
use diffusion::blip::{BlipDiffusionPipeline, BlipRequest};
use guidance::blip::{pick_and_draw_blip, BlipPickAndDrawRequest};
use guidance::pipeline::default_cache_dir;
use std::process::ExitCode;

/// BLIP-Diffusion's default image side (its diffusers pipeline's `height = 512, width = 512`).
const BLIP_SIZE: usize = 512;

/// The request of `args`: `--prompt` with a leading `a {category}` removed, since the pipeline
/// prepends it itself (see [`requests::blip`]).
pub fn blip_request(
    args: &GenerateArgs,
    pipe: &BlipDiffusionPipeline,
) -> anyhow::Result<BlipRequest> {
    if args.base.is_some() || args.ti.embeddings.is_some() {
        anyhow::bail!(
            "--base and --embeddings apply to Stable Diffusion models, not --method blip-diffusion"
        );
    }
    if args.pnd.identifier.is_some() {
        anyhow::bail!(
            "--identifier does not apply to --method blip-diffusion (its prompt names the class)"
        );
    }
    let reference = args
        .pnd
        .reference
        .clone()
        .context("--method blip-diffusion needs --reference IMG")?;
    let category = args
        .subject_category
        .clone()
        .or_else(|| args.pnd.class.clone())
        .context("--method blip-diffusion needs --subject-category C (or --class)")?;
    if category.trim().is_empty() {
        anyhow::bail!("--subject-category is empty");
    }
    // diffusers' BlipDiffusionPipeline.__call__ defaults to 512×512 whatever the UNet's size.
    Ok(requests::blip(
        args.sample_request_sized(&pipe.sd, BLIP_SIZE)?,
        reference,
        category,
    ))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    if args.seeds.is_some() {
        anyhow::bail!(
            "--seeds applies to Stable Diffusion models; --method blip-diffusion takes one --seed"
        );
    }
    let runtime = Runtime::resolve(&args.runtime, &Default::default())?;
    eprintln!("{}", runtime.describe());
    let pipe = BlipDiffusionPipeline::load(&args.model, runtime.dtype, &runtime.device)
        .with_context(|| format!("loading BLIP-Diffusion '{}'", args.model))?;
    let req = blip_request(&args, &pipe)?;
    let mut progress = step_progress(&args);
    let mut on_step = |i: usize, n: usize| progress.step(i, n);
    let latents = if args.pnd.pick_and_draw {
        let pnd = &args.pnd;
        let cfg = load_guidance_config(pnd.guidance_config.as_deref())?;
        for w in cfg.schedule_warnings(req.steps) {
            eprintln!("warning: {w}");
        }
        // The template comes from vanilla Stable Diffusion, not from BLIP-Diffusion's UNet.
        let template_model = pnd.base_model.as_deref().unwrap_or(SD15);
        let base = load_model(template_model, None, &EmbeddingArgs::default(), &runtime)
            .context("loading the layout template's model (--base-model)")?;
        eprintln!("pick-and-draw: layout template from '{template_model}'");
        let greq = BlipPickAndDrawRequest {
            blip: req,
            template_prompt: pnd.template_prompt.clone(),
            model_key: args.model.clone(),
            cache_dir: pnd.palette_cache.clone().unwrap_or_else(default_cache_dir),
            trace: pnd.trace.clone(),
        };
        let out = pick_and_draw_blip(&pipe, &base, &cfg, &greq, &mut on_step)?;
        print_outcome(&out, &[args.seed]);
        out.latents
    } else {
        let init = pipe.initial_latents(&req)?;
        let conditioning = pipe.condition(&req)?;
        pipe.sample(&conditioning, &init, req.steps, req.cfg_scale, &mut on_step)?
    };
    progress.finish();
    write_outputs(&args, &pipe.sd, &latents)?;
    Ok(ExitCode::SUCCESS)
}

//! `pnd generate --method blip-diffusion`: one BLIP-Diffusion image from a reference image and
//! its subject category (SPEC §6), optionally guided with Pick-and-Draw (`--pick-and-draw`,
//! SPEC §7: palette from the same reference image, layout template from `--base-model`).

use super::generate::{save_png, GenerateArgs};
use anyhow::Context;
use candle_core::{DType, Device};
use diffusion::blip::{blip_text_prompt, BlipDiffusionPipeline, BlipRequest};
use diffusion::pipeline::{write_latents, LoadOptions, StableDiffusion};
use guidance::blip::{pick_and_draw_blip, BlipPickAndDrawRequest};
use guidance::config::GuidanceConfig;
use guidance::pipeline::default_cache_dir;
use std::process::ExitCode;

/// The request of `args`: `--prompt` with a leading `a {category}` removed, since the pipeline
/// prepends it itself (see [`blip_text_prompt`]).
pub fn blip_request(
    args: &GenerateArgs,
    pipe: &BlipDiffusionPipeline,
) -> anyhow::Result<BlipRequest> {
    if args.base.is_some() || args.embeddings.is_some() {
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
    let init_latents = match &args.init_latents {
        Some(p) => Some(pipe.sd.read_init_latents(p, args.height, args.width)?),
        None => None,
    };
    Ok(BlipRequest {
        reference,
        prompt: blip_text_prompt(&args.prompt, &category),
        subject_category: category,
        target_category: None,
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        height: args.height,
        width: args.width,
        seed: args.seed,
        init_latents,
        ..Default::default()
    })
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let pipe = BlipDiffusionPipeline::load(&args.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading BLIP-Diffusion '{}'", args.model))?;
    let req = blip_request(&args, &pipe)?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(args.steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} steps, ETA {eta}",
            )
            .expect("static template"),
        );
        b.set_message("denoising");
        b
    };
    let mut on_step = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    };
    let latents = if args.pnd.pick_and_draw {
        let pnd = &args.pnd;
        let cfg = match &pnd.guidance_config {
            Some(p) => GuidanceConfig::from_toml_file(p)?,
            None => GuidanceConfig::default(),
        };
        let base = match &pnd.base_model {
            Some(b) => Some(
                StableDiffusion::load(b, &LoadOptions::default())
                    .with_context(|| format!("loading base model '{b}'"))?,
            ),
            None => None,
        };
        let greq = BlipPickAndDrawRequest {
            blip: req,
            template_prompt: pnd.template_prompt.clone(),
            model_key: args.model.clone(),
            cache_dir: pnd.palette_cache.clone().unwrap_or_else(default_cache_dir),
            trace: pnd.trace.clone(),
        };
        let base = base.as_ref().unwrap_or(&pipe.sd);
        let out = pick_and_draw_blip(&pipe, base, &cfg, &greq, &mut on_step)?;
        for skipped in &out.skipped_updates {
            eprintln!("warning: {skipped}");
        }
        let (z, t) = (out.latents, out.timings);
        eprintln!(
            "pick-and-draw: inversion {:.1}s, palette {:.1}s (cache {}), template {:.1}s, guided sampling {:.1}s",
            t.inversion_s,
            t.palette_s,
            if t.cache_hit { "hit" } else { "miss" },
            t.template_s,
            t.sampling_s
        );
        z
    } else {
        let init = pipe.initial_latents(&req)?;
        let conditioning = pipe.condition(&req)?;
        pipe.sample(&conditioning, &init, req.steps, req.cfg_scale, &mut on_step)?
    };
    bar.finish_and_clear();
    if let Some(p) = &args.save_latents {
        write_latents(p, &latents).with_context(|| format!("writing latents '{}'", p.display()))?;
    }
    let img = pipe.sd.decode_images(&latents)?.remove(0);
    save_png(&img, &args.out)?;
    Ok(ExitCode::SUCCESS)
}

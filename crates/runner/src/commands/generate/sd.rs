//! `pnd generate` with a Stable Diffusion model (plain, DreamBooth or Textual Inversion),
//! optionally guided with Pick-and-Draw (SPEC §6, §7).

use super::args::{seed_path, GenerateArgs, PickAndDrawArgs};
use super::shared::{step_progress, write_outputs};
use crate::commands::common::{load_guidance_config, load_model, print_outcome, EmbeddingArgs};
use crate::requests;
use crate::runtime::{runtime_of, Runtime};
use anyhow::Context;
use candle_core::Tensor;
use diffusion::ip_adapter::ImageTokens;
use diffusion::pipeline::{SampleRequest, StableDiffusion};
use guidance::pipeline::{default_cache_dir, pick_and_draw, pick_and_draw_ip_adapter};
use std::process::ExitCode;

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    if args.subject_category.is_some() {
        anyhow::bail!("--subject-category applies to --method blip-diffusion only");
    }
    if !args.pnd.pick_and_draw && (args.pnd.reference.is_some() || args.pnd.class.is_some()) {
        anyhow::bail!(
            "--reference and --class need --pick-and-draw with a Stable Diffusion model \
             (or --method blip-diffusion)"
        );
    }
    let runtime = Runtime::resolve(&args.runtime, &Default::default())?;
    eprintln!("{}", runtime.describe());
    let sd = load_model(&args.model, args.base.clone(), &args.ti, &runtime)?;
    let (seeds, mut req, init) = batch_request(&args, &sd)?;
    let mut progress = step_progress(&args);
    let mut on_step = |i: usize, n: usize| progress.step(i, n);
    let latents = if args.pnd.pick_and_draw {
        guided_latents(&sd, &args, req, init, &seeds, None, &mut on_step)?
    } else {
        req.init_latents = Some(init);
        sd.sample(&req, &mut on_step)?
    };
    progress.finish();
    write_outputs(&args, &sd, &latents)?;
    Ok(ExitCode::SUCCESS)
}

/// The seeds, the sampling request (its initial latents taken out) and the batch's initial
/// latents: `--init-latents`, else each seed's noise. The seeds of a batch share every UNet call;
/// each image is its seed's image alone.
pub(super) fn batch_request(
    args: &GenerateArgs,
    sd: &StableDiffusion,
) -> anyhow::Result<(Vec<u64>, SampleRequest, Tensor)> {
    let seeds = args.seeds()?;
    let mut req = args.sample_request(sd)?;
    let init = match req.init_latents.take() {
        Some(l) => l,
        None => sd.seeded_latents(req.height, req.width, &seeds)?,
    };
    Ok((seeds, req, init))
}

/// Pick-and-Draw guided sampling of `sample`'s prompt, schedule and size from `init` (one image
/// per seed); returns the final latents. With `ip` (IP-Adapter: the reference's image tokens and
/// what names the adapter in the cache key), `sd` has the adapter attached.
pub(super) fn guided_latents(
    sd: &StableDiffusion,
    args: &GenerateArgs,
    sample: SampleRequest,
    init: Tensor,
    seeds: &[u64],
    ip: Option<(&ImageTokens, &str)>,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Tensor> {
    let pnd: &PickAndDrawArgs = &args.pnd;
    let cfg = load_guidance_config(pnd.guidance_config.as_deref())?;
    for w in cfg.schedule_warnings(sample.steps) {
        eprintln!("warning: {w}");
    }
    let reference = pnd
        .reference
        .clone()
        .context("--pick-and-draw needs --reference IMG")?;
    let class = pnd
        .class
        .clone()
        .context("--pick-and-draw needs --class NOUN")?;
    let model = &args.model;
    // The template comes from vanilla Stable Diffusion: a DreamBooth folder's base, else the
    // model itself (a Textual Inversion token is not in the identifier-free template prompt).
    let template_model = pnd.base_model.as_ref().or(args.base.as_ref());
    let base = match template_model {
        Some(b) if b != model => Some(load_model(
            b,
            None,
            &EmbeddingArgs::default(),
            &runtime_of(sd),
        )?),
        _ => None,
    };
    eprintln!(
        "pick-and-draw: layout template from '{}'",
        template_model.unwrap_or(model)
    );
    let model_key = args.ti.model_key(model);
    let model_key = match ip {
        Some((_, adapter)) => format!("{model_key}+{adapter}"),
        None => model_key,
    };
    let guided = requests::Guided {
        reference,
        class,
        identifier: pnd.identifier.clone(),
        template_prompt: pnd.template_prompt.clone(),
        model_key,
        cache_dir: pnd.palette_cache.clone().unwrap_or_else(default_cache_dir),
        trace: match (&pnd.trace, &args.seeds) {
            (Some(t), Some(_)) => seeds.iter().map(|&s| seed_path(t, s, "jsonl")).collect(),
            (t, None) => t.iter().cloned().collect(),
            (None, _) => vec![],
        },
    };
    let req = requests::pick_and_draw(sample, init, guided);
    let out = match ip {
        Some((tokens, _)) => {
            pick_and_draw_ip_adapter(sd, tokens, base.as_ref(), &cfg, &req, on_step)?
        }
        None => pick_and_draw(sd, base.as_ref(), &cfg, &req, on_step)?,
    };
    print_outcome(&out, seeds);
    Ok(out.latents)
}

//! `pnd generate --method ip-adapter`: Stable Diffusion 1.5 (`--model`) with an IP-Adapter image
//! prompt from `--reference` (issue 28), optionally guided with Pick-and-Draw (layout template
//! from vanilla Stable Diffusion, `--base-model` or the model without the adapter; palette from
//! the inversion of the reference under the IP-Adapter model, see
//! `guidance::pipeline::pick_and_draw_ip_adapter`).

use super::args::GenerateArgs;
use super::sd::{batch_request, guided_latents};
use super::shared::{step_progress, write_outputs};
use crate::commands::common::{load_model, EmbeddingArgs};
use crate::runtime::Runtime;
use anyhow::Context;
use diffusion::ip_adapter::{
    pipeline_processor, with_image_tokens, IpAdapter, IpAdapterKind, IpAdapterSource,
};
use diffusion::unet::IpAdapterScale;
use std::process::ExitCode;

/// The adapter of `args` (`--ip-adapter`, `--ip-adapter-kind`) and its scale (`--ip-scale`).
pub fn adapter_of(args: &GenerateArgs) -> anyhow::Result<(IpAdapterSource, IpAdapterScale)> {
    let kind = IpAdapterKind::parse(&args.ip.ip_adapter_kind).with_context(|| {
        format!(
            "--ip-adapter-kind '{}': expected plain or plus",
            args.ip.ip_adapter_kind
        )
    })?;
    let scale = match &args.ip.ip_scale {
        Some(s) => IpAdapterScale::parse(s).map_err(|e| anyhow::anyhow!("--ip-scale: {e}"))?,
        None => IpAdapterScale::default(),
    };
    Ok((
        IpAdapterSource {
            repo: args.ip.ip_adapter.clone(),
            kind,
        },
        scale,
    ))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    if args.subject_category.is_some() {
        anyhow::bail!("--subject-category applies to --method blip-diffusion only");
    }
    if args.base.is_some() || args.ti.embeddings.is_some() {
        anyhow::bail!(
            "--base and --embeddings do not apply to --method ip-adapter (the adapter goes on \
             Stable Diffusion 1.5, --model)"
        );
    }
    let reference = args
        .pnd
        .reference
        .clone()
        .context("--method ip-adapter needs --reference IMG (the image prompt)")?;
    let (source, scale) = adapter_of(&args)?;
    let runtime = Runtime::resolve(&args.runtime, &Default::default())?;
    eprintln!("{}", runtime.describe());
    let mut sd = load_model(&args.model, None, &EmbeddingArgs::default(), &runtime)?;
    let processor = pipeline_processor(&args.model)
        .with_context(|| format!("reading the image processor of '{}'", args.model))?;
    let ip =
        IpAdapter::load_source(&source, processor, &mut sd.unet, &scale).with_context(|| {
            format!(
                "loading IP-Adapter '{}' ({}) onto '{}'",
                source.repo, source.kind, args.model
            )
        })?;
    let image = metrics::preprocess::load_rgb(&reference)?;
    let tokens = ip
        .image_tokens(&image)
        .with_context(|| format!("encoding the image prompt '{}'", reference.display()))?;
    let (seeds, mut req, init) = batch_request(&args, &sd)?;
    let mut progress = step_progress(&args);
    let mut on_step = |i: usize, n: usize| progress.step(i, n);
    let latents = if args.pnd.pick_and_draw {
        let key = format!(
            "ip-adapter:{}:{}@{:?}",
            source.repo,
            source.kind,
            sd.unet.ip_adapter().map(|l| l.scales())
        );
        guided_latents(
            &sd,
            &args,
            req,
            init,
            &seeds,
            Some((&tokens, &key)),
            &mut on_step,
        )?
    } else {
        let emb = with_image_tokens(
            &sd.encode_prompts(&req.prompt, &req.negative_prompt)?,
            &tokens,
        )?;
        req.init_latents = Some(init);
        sd.sample_embeddings(&emb, &req, &mut on_step)?
    };
    progress.finish();
    write_outputs(&args, &sd, &latents)?;
    Ok(ExitCode::SUCCESS)
}

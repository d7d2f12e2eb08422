//! `pnd invert`: null-text inversion of a reference image (SPEC §7).

use super::common::{load_guidance_config, load_model, EmbeddingArgs};
use crate::runtime::{DeviceSpec, Precision, Runtime, RuntimeArgs};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct InvertArgs {
    /// Diffusers model folder or Hugging Face repo id.
    #[arg(long)]
    pub model: String,
    /// Where components the model lacks come from.
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub ti: EmbeddingArgs,
    /// Reference image (center-cropped and resized to the generation size).
    #[arg(long)]
    pub image: PathBuf,
    /// Inversion prompt, e.g. `a sks dog`.
    #[arg(long)]
    pub prompt: String,
    /// DDIM steps of the inversion (the generation's schedule).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Generation height the reference is resized to (default: the model's, as `pnd generate`).
    #[arg(long)]
    pub height: Option<usize>,
    /// Generation width (default as --height).
    #[arg(long)]
    pub width: Option<usize>,
    /// TOML with guidance settings, at the top level or in a `[guidance]` table (its
    /// `inversion` settings are used).
    #[arg(long)]
    pub guidance_config: Option<PathBuf>,
    /// Output safetensors: `latents` (z_T) and `null_embeddings`; the report goes to FILE.json.
    #[arg(long)]
    pub out: PathBuf,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// The UNet's precision during the inversion (default f32 on every device: the null-text
    /// optimization's Adam steps are small, and f16 rounds them away).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

pub fn run(args: InvertArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_guidance_config(args.guidance_config.as_deref())?;
    let runtime = Runtime::resolve(
        &RuntimeArgs {
            device: args.device,
            dtype: Some(args.dtype),
        },
        &Default::default(),
    )?;
    eprintln!("{}", runtime.describe());
    let sd = load_model(&args.model, args.base.clone(), &args.ti, &runtime)?;
    let size = sd.default_size();
    let (height, width) = (args.height.unwrap_or(size), args.width.unwrap_or(size));
    let img = guidance::inversion::load_reference_image(&args.image, height, width)?;
    // The inversion reports no steps; a log still shows what runs, and the end line its result.
    eprintln!(
        "invert: null-text inversion of '{}', {} steps of up to {} optimization steps each",
        args.image.display(),
        args.steps,
        cfg.inversion.inner_steps
    );
    let inv = guidance::inversion::invert(&sd, &img, &args.prompt, args.steps, &cfg.inversion)
        .with_context(|| format!("inverting '{}'", args.image.display()))?;
    guidance::inversion::write_inversion(&args.out, &inv)?;
    let r = &inv.report;
    println!("{}", serde_json::to_string_pretty(r)?);
    eprintln!(
        "PSNR {:.2} dB (plain DDIM inversion {:.2} dB); wrote '{}'",
        r.psnr,
        r.psnr_ddim,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

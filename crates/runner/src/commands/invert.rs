//! `pnd invert`: null-text inversion of a reference image (SPEC §7), and the Pick-and-Draw flags
//! of `pnd generate`.

use anyhow::Context;
use candle_core::Tensor;
use diffusion::pipeline::{LoadOptions, StableDiffusion};
use guidance::config::GuidanceConfig;
use guidance::pipeline::{default_cache_dir, pick_and_draw, PickAndDrawRequest};
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
    /// Textual Inversion embedding.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Reference image (center-cropped and resized to the generation size).
    #[arg(long)]
    pub image: PathBuf,
    /// Inversion prompt, e.g. `a sks dog`.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// TOML with guidance settings (its `[inversion]` table is used).
    #[arg(long)]
    pub guidance_config: Option<PathBuf>,
    /// Output safetensors: `latents` (z_T) and `null_embeddings`; the report goes to FILE.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: InvertArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(args.guidance_config.as_ref())?;
    let sd = load_model(&args.model, args.base.clone(), args.embeddings.clone())?;
    let img = guidance::inversion::load_reference_image(&args.image, args.height, args.width)?;
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

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<GuidanceConfig> {
    Ok(match path {
        Some(p) => GuidanceConfig::from_toml_file(p)?,
        None => GuidanceConfig::default(),
    })
}

fn load_model(
    model: &str,
    base: Option<String>,
    embeddings: Option<PathBuf>,
) -> anyhow::Result<StableDiffusion> {
    let opts = LoadOptions {
        base,
        embeddings,
        ..Default::default()
    };
    StableDiffusion::load(model, &opts).with_context(|| format!("loading model '{model}'"))
}

/// The Pick-and-Draw flags of `pnd generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct PickAndDrawArgs {
    /// Guide the sampling with Pick-and-Draw (needs --reference and --class).
    #[arg(long)]
    pub pick_and_draw: bool,
    /// Reference image of the subject (also BLIP-Diffusion's conditioning image).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// The subject's class noun (its last token is the subject token).
    #[arg(long)]
    pub class: Option<String>,
    /// Word removed from the prompt to make the template prompt (e.g. `sks`).
    #[arg(long, requires = "pick_and_draw")]
    pub identifier: Option<String>,
    /// Template prompt (default: the prompt without the identifier).
    #[arg(long, requires = "pick_and_draw")]
    pub template_prompt: Option<String>,
    /// Model of the template (default: --model).
    #[arg(long, requires = "pick_and_draw")]
    pub base_model: Option<String>,
    /// Writes one JSON line per guided update.
    #[arg(long, requires = "pick_and_draw")]
    pub trace: Option<PathBuf>,
    /// TOML with guidance settings (defaults: the paper's).
    #[arg(long, requires = "pick_and_draw")]
    pub guidance_config: Option<PathBuf>,
    /// Folder of cached inversions and palettes (default $PND_CACHE or ~/.cache/pnd/palettes).
    #[arg(long, requires = "pick_and_draw")]
    pub palette_cache: Option<PathBuf>,
}

/// Guided sampling for `pnd generate --pick-and-draw`; returns the final latents.
#[allow(clippy::too_many_arguments)]
pub fn generate_latents(
    sd: &StableDiffusion,
    pnd: &PickAndDrawArgs,
    model: &str,
    embeddings: Option<&PathBuf>,
    prompt: &str,
    negative_prompt: &str,
    steps: usize,
    cfg_scale: f64,
    height: usize,
    width: usize,
    init: Tensor,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Tensor> {
    let cfg = load_config(pnd.guidance_config.as_ref())?;
    let reference = pnd
        .reference
        .clone()
        .context("--pick-and-draw needs --reference IMG")?;
    let class = pnd
        .class
        .clone()
        .context("--pick-and-draw needs --class NOUN")?;
    let base = match &pnd.base_model {
        Some(b) if b != model => Some(load_model(b, None, None)?),
        _ => None,
    };
    let model_key = match embeddings {
        Some(e) => format!("{model}+{}", e.display()),
        None => model.to_string(),
    };
    let req = PickAndDrawRequest {
        prompt: prompt.to_string(),
        negative_prompt: negative_prompt.to_string(),
        steps,
        cfg_scale,
        height,
        width,
        init,
        reference,
        class,
        identifier: pnd.identifier.clone(),
        template_prompt: pnd.template_prompt.clone(),
        model_key,
        cache_dir: pnd.palette_cache.clone().unwrap_or_else(default_cache_dir),
        trace: pnd.trace.clone(),
    };
    let out = pick_and_draw(sd, base.as_ref(), &cfg, &req, on_step)?;
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
    Ok(z)
}

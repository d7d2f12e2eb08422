//! `pnd maps`: the cross-attention maps of every UNet layer at one sampling step, with the
//! appearance loss's masks and the layout loss's smoothed maps (the paper's Fig. 3), of one
//! generation or of the reference's inverted replay ([`guidance::inspect`], drawn by
//! [`crate::report::maps`]).

use super::common::{check_writable, load_guidance_config, load_model, EmbeddingArgs};
use crate::report::maps::{write_maps, SheetOptions};
use crate::runtime::{Runtime, RuntimeArgs};
use anyhow::Context;
use guidance::inspect::{attention_maps, check_step, MapsRequest, MapsSource};
use guidance::pipeline::default_cache_dir;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct MapsArgs {
    /// Diffusers model folder or Hugging Face repo id.
    #[arg(long)]
    pub model: String,
    /// Where components the model lacks come from (e.g. a DreamBooth folder with only `unet/`).
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub ti: EmbeddingArgs,
    /// The prompt of the generation (unguided CFG sampling, as the layout template), e.g. "a photo of sks dog in the jungle" (not with
    /// --reference, whose prompt is the inversion prompt `a [IDENTIFIER] CLASS`).
    #[arg(
        long,
        required_unless_present = "reference",
        conflicts_with = "reference"
    )]
    pub prompt: Option<String>,
    /// The classifier-free guidance's negative prompt (empty: the unconditional branch).
    #[arg(long, default_value = "", conflicts_with = "reference")]
    pub negative_prompt: String,
    /// The subject's class noun: its last token is the subject token whose maps are drawn.
    #[arg(long)]
    pub class: String,
    /// The identifier in the prompt (e.g. `sks`, a Textual Inversion token).
    #[arg(long)]
    pub identifier: Option<String>,
    /// Seed of the initial noise (as `pnd generate`).
    #[arg(long, default_value_t = 0, conflicts_with = "reference")]
    pub seed: u64,
    /// DDIM sampling steps of the schedule.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// The sampling step (0-based) whose maps are drawn (10: the paper's first appearance step).
    #[arg(long, default_value_t = 10)]
    pub step: usize,
    /// Image side in pixels (default: the model's, as `pnd generate`).
    #[arg(long)]
    pub size: Option<usize>,
    /// Classifier-free guidance scale of the generation.
    #[arg(long, default_value_t = 7.5, conflicts_with = "reference")]
    pub cfg_scale: f64,
    /// Draw the maps of the reference image's null-text inversion replay (the one the appearance
    /// palette is captured from) instead of a generation's.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Folder of cached inversions and palettes, shared with `pnd generate --pick-and-draw`
    /// (default $PND_CACHE or ~/.cache/pnd/palettes).
    #[arg(long, requires = "reference")]
    pub palette_cache: Option<PathBuf>,
    /// TOML with guidance settings (τ, the appearance layers, the smoothing), at the top level or
    /// in a `[guidance]` table; defaults: the paper's.
    #[arg(long)]
    pub guidance_config: Option<PathBuf>,
    /// Also draw the maps over the decoded image.
    #[arg(long)]
    pub overlay: bool,
    /// Output folder: maps.png, maps.safetensors, maps.json, image.png.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: MapsArgs) -> anyhow::Result<ExitCode> {
    check_step(args.step, args.steps)?;
    check_writable(&args.out.join("maps.png"))?;
    let config = load_guidance_config(args.guidance_config.as_deref())?;
    let runtime = Runtime::resolve(&args.runtime, &Default::default())?;
    eprintln!("{}", runtime.describe());
    let sd = load_model(&args.model, args.base.clone(), &args.ti, &runtime)?;
    let side = args.size.unwrap_or_else(|| sd.default_size());
    let (source, described) = match (&args.reference, &args.prompt) {
        (Some(image), _) => (
            MapsSource::Reference {
                image: image.clone(),
                model_key: args.ti.model_key(&args.model),
                cache_dir: args.palette_cache.clone().unwrap_or_else(default_cache_dir),
            },
            format!("replay of the inverted reference '{}'", image.display()),
        ),
        (None, Some(prompt)) => (
            MapsSource::Generation {
                prompt: prompt.clone(),
                negative_prompt: args.negative_prompt.clone(),
                init: sd.seeded_latents(side, side, &[args.seed])?,
                cfg_scale: args.cfg_scale,
            },
            format!("generation, seed {}, CFG {}", args.seed, args.cfg_scale),
        ),
        (None, None) => anyhow::bail!("pnd maps needs --prompt P or --reference IMG"),
    };
    if args.reference.is_some() {
        eprintln!("maps: the reference's null-text inversion (from the palette cache when there)");
    }
    let req = MapsRequest {
        source,
        class: args.class.clone(),
        identifier: args.identifier.clone(),
        steps: args.steps,
        step: args.step,
        height: side,
        width: side,
    };
    let maps = attention_maps(&sd, &config, &req).context("capturing the attention maps")?;
    for w in &maps.cache_warnings {
        eprintln!("warning: {w}");
    }
    let image = sd.decode_images(&maps.latents)?.remove(0);
    let smoothing = format!(
        "3×3 Gaussian σ = {} ({})",
        config.sigma,
        format!("{:?}", config.kernel).to_lowercase()
    );
    let out = write_maps(
        &args.out,
        &maps,
        &image,
        &SheetOptions {
            overlay: args.overlay,
            source: described,
            smoothing,
        },
    )?;
    let appearance: Vec<String> = maps
        .layers
        .iter()
        .filter(|l| l.mask.is_some())
        .map(|l| l.order.to_string())
        .collect();
    let c = &maps.context;
    println!(
        "{} cross-attention layers at step {} (t = {}), subject token '{}' at position {}; masks at layers {}",
        maps.layers.len(),
        c.step,
        c.timestep,
        c.subject_word,
        c.subject_token,
        appearance.join(", ")
    );
    for p in [&out.sheet, &out.tensors, &out.index, &out.image] {
        println!("wrote '{}'", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! `pnd generate`: one image from a Stable Diffusion model (plain, DreamBooth or Textual
//! Inversion), and `pnd tiny-model`: write the built-in tiny model (SPEC §1, §6).

use anyhow::Context;
use diffusion::pipeline::{write_latents, LoadOptions, SampleRequest, StableDiffusion};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Diffusers model folder or Hugging Face repo id.
    #[arg(long)]
    pub model: String,
    /// Where components the model lacks come from (e.g. a DreamBooth folder with only `unet/`).
    #[arg(long)]
    pub base: Option<String>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the initial noise (our generator, see the diffusion crate's `noise` module).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Safetensors file with tensor `latents` [1, 4, H/8, W/8]; replaces the seeded noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Writes the final latents (tensor `latents`) before VAE decoding.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Textual Inversion embedding (`learned_embeds.safetensors` or `.bin`).
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub pnd: super::invert::PickAndDrawArgs,
    /// The baseline: a Stable Diffusion model (plain, DreamBooth, Textual Inversion) or
    /// BLIP-Diffusion (zero-shot from --reference and --subject-category).
    #[arg(long, value_enum, default_value_t = Method::StableDiffusion)]
    pub method: Method,
    /// BLIP-Diffusion: the reference's category, the Q-Former's text input (default: --class).
    #[arg(long)]
    pub subject_category: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    StableDiffusion,
    BlipDiffusion,
}

#[derive(Debug, clap::Args)]
pub struct TinyModelArgs {
    /// Folder to write the diffusers-layout model to.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with the CLIP tokenizer files to copy; default: ../shared/clip-tokenizer, the
    /// Hugging Face cache's openai/clip-vit-base-patch32, else the vocabulary built into pnd.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Also write `learned_embeds.safetensors` with a tiny Textual Inversion vector for this token.
    #[arg(long)]
    pub embedding_token: Option<String>,
}

/// Writes a PNG through a temporary file and a rename, so a crash never leaves half an image.
pub(crate) fn save_png(img: &image::RgbImage, out: &Path) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating '{}'", dir.display()))?;
    }
    let tmp = out.with_extension("png.partial");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing '{}'", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing '{}'", out.display()))?;
    Ok(())
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    if args.method == Method::BlipDiffusion {
        return super::generate_blip::run(args);
    }
    if args.subject_category.is_some() {
        anyhow::bail!("--subject-category applies to --method blip-diffusion only");
    }
    if !args.pnd.pick_and_draw && (args.pnd.reference.is_some() || args.pnd.class.is_some()) {
        anyhow::bail!(
            "--reference and --class need --pick-and-draw with a Stable Diffusion model \
             (or --method blip-diffusion)"
        );
    }
    let opts = LoadOptions {
        base: args.base.clone(),
        embeddings: args.embeddings.clone(),
        ..Default::default()
    };
    let sd = StableDiffusion::load(&args.model, &opts)
        .with_context(|| format!("loading model '{}'", args.model))?;
    let init_latents = match &args.init_latents {
        Some(p) => Some(sd.read_init_latents(p, args.height, args.width)?),
        None => None,
    };
    let req = SampleRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        height: args.height,
        width: args.width,
        seed: args.seed,
        init_latents,
    };
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
        let init = match req.init_latents.clone() {
            Some(l) => l,
            None => sd.initial_latents(args.height, args.width, args.seed)?,
        };
        let (model, emb) = (&args.model, args.embeddings.as_ref());
        let (p, n) = (&args.prompt, &args.negative_prompt);
        super::invert::generate_latents(
            &sd,
            &args.pnd,
            model,
            emb,
            p,
            n,
            args.steps,
            args.cfg_scale,
            args.height,
            args.width,
            init,
            &mut on_step,
        )?
    } else {
        sd.sample(&req, &mut on_step)?
    };
    bar.finish_and_clear();
    if let Some(p) = &args.save_latents {
        write_latents(p, &latents).with_context(|| format!("writing latents '{}'", p.display()))?;
    }
    let img = sd.decode_images(&latents)?.remove(0);
    save_png(&img, &args.out)?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_tiny_model(args: TinyModelArgs) -> anyhow::Result<ExitCode> {
    let spec = tiny::TinySpec::default();
    let scratch = tempfile::tempdir().context("creating a temporary folder")?;
    let tokenizer = crate::demo::find_tokenizer(args.tokenizer.as_deref(), scratch.path())?;
    tiny::write_tiny_model(&args.out, args.seed, &tokenizer, &spec)?;
    if let Some(token) = &args.embedding_token {
        let path = args.out.join("learned_embeds.safetensors");
        tiny::write_tiny_embedding(&path, token, args.seed.wrapping_add(100), &spec)?;
    }
    eprintln!("wrote tiny model to '{}'", args.out.display());
    Ok(ExitCode::SUCCESS)
}

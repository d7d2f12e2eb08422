//! The flags of `pnd generate` and `pnd tiny-model`.

use crate::commands::common::{check_writable, EmbeddingArgs, ImageFormat};
use diffusion::pipeline::{SampleRequest, StableDiffusion};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Diffusers model folder or Hugging Face repo id.
    #[arg(long)]
    pub model: String,
    /// Where components the model lacks come from (e.g. a DreamBooth folder with only `unet/`).
    #[arg(long)]
    pub base: Option<String>,
    /// The text prompt, e.g. "a photo of sks dog in the jungle".
    #[arg(long)]
    pub prompt: String,
    /// The classifier-free guidance's negative prompt (empty: the unconditional branch).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the initial noise (our generator, see the diffusion crate's `noise` module).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Several seeds sampled as one batch (one UNet call per step); writes `<out stem>-s<seed>.png`
    /// per seed next to --out. Each image is the one `--seed` alone gives.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "seed")]
    pub seeds: Option<Vec<u64>>,
    /// DDIM sampling steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub cfg_scale: f64,
    /// Image height in pixels (default: the model's, `unet` `sample_size` × the VAE's
    /// down-sampling factor, as diffusers: 512 for SD 1.5, 64 for `pnd tiny-model`; 512 for
    /// BLIP-Diffusion, whose diffusers pipeline fixes it).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default as --height).
    #[arg(long)]
    pub width: Option<usize>,
    /// Safetensors file with tensor `latents` [N, 4, H/8, W/8] (N: the number of --seeds, else 1);
    /// replaces the seeded noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Writes the final latents (tensor `latents`, [N, 4, H/8, W/8]) before VAE decoding.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    #[command(flatten)]
    pub ti: EmbeddingArgs,
    /// Output image: `.png`, or `.jpg`/`.jpeg` (JPEG, quality 95).
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub pnd: PickAndDrawArgs,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
    /// The baseline: a Stable Diffusion model (plain, DreamBooth, Textual Inversion),
    /// BLIP-Diffusion (zero-shot from --reference and --subject-category), or IP-Adapter on
    /// --model (an image prompt from --reference, see --ip-adapter).
    #[arg(long, value_enum, default_value_t = Method::StableDiffusion)]
    pub method: Method,
    /// BLIP-Diffusion: the reference's category, the Q-Former's text input (default: --class).
    #[arg(long)]
    pub subject_category: Option<String>,
    #[command(flatten)]
    pub ip: IpAdapterArgs,
}

/// The IP-Adapter flags of `pnd generate --method ip-adapter`.
#[derive(Debug, Clone, clap::Args)]
pub struct IpAdapterArgs {
    /// IP-Adapter: a folder or Hugging Face repo laid out as h94/IP-Adapter
    /// (`models/ip-adapter_sd15.*`, `models/ip-adapter-plus_sd15.*`, `models/image_encoder/`).
    #[arg(long, default_value = "h94/IP-Adapter")]
    pub ip_adapter: String,
    /// IP-Adapter: `plain` (ip-adapter_sd15, 4 tokens) or `plus` (ip-adapter-plus_sd15, 16 tokens).
    #[arg(long, value_parser = ["plain", "plus"], default_value = "plain")]
    pub ip_adapter_kind: String,
    /// IP-Adapter: the image prompt's scale, one number (default 1.0) or diffusers'
    /// `set_ip_adapter_scale` per-block JSON, e.g. '{"up": {"block_0": [0.0, 1.0, 0.0]}}'.
    #[arg(long)]
    pub ip_scale: Option<String>,
}

impl GenerateArgs {
    /// The seeds of the batch: `--seeds`, else `--seed` alone.
    pub fn seeds(&self) -> anyhow::Result<Vec<u64>> {
        let Some(seeds) = &self.seeds else {
            return Ok(vec![self.seed]);
        };
        crate::lists::check_unique("--seeds", "seed", seeds).map_err(anyhow::Error::msg)?;
        Ok(seeds.clone())
    }

    /// Where the image of `seed` goes: `--out`, or `<out stem>-s<seed>.<ext>` beside it with
    /// `--seeds` (the extension of `--out`).
    pub fn image_path(&self, seed: u64) -> PathBuf {
        match self.seeds {
            Some(_) => {
                let ext = self.out.extension().unwrap_or_default().to_string_lossy();
                seed_path(&self.out, seed, &ext)
            }
            None => self.out.clone(),
        }
    }

    /// What can be checked before any model is loaded: the seeds, the output's format and that
    /// its folder (and the `--save-latents`/`--trace` folders) can be written.
    pub fn check_cheap(&self) -> anyhow::Result<()> {
        self.seeds()?;
        ImageFormat::of(&self.out)?;
        check_writable(&self.out)?;
        for p in [&self.save_latents, &self.pnd.trace].into_iter().flatten() {
            check_writable(p)?;
        }
        Ok(())
    }

    /// `(height, width)`: the flags, else `default` for each.
    pub fn size(&self, default: usize) -> (usize, usize) {
        (
            self.height.unwrap_or(default),
            self.width.unwrap_or(default),
        )
    }

    /// The sampling request of these flags at `sd`'s default size (see [`GenerateArgs::size`]),
    /// with `--init-latents` checked against `sd`'s shape (one image per seed).
    pub fn sample_request(&self, sd: &StableDiffusion) -> anyhow::Result<SampleRequest> {
        self.sample_request_sized(sd, sd.default_size())
    }

    /// As [`GenerateArgs::sample_request`], sizes that the flags leave open set to `default`.
    pub fn sample_request_sized(
        &self,
        sd: &StableDiffusion,
        default: usize,
    ) -> anyhow::Result<SampleRequest> {
        let batch = self.seeds()?.len();
        let (height, width) = self.size(default);
        let init_latents = match &self.init_latents {
            Some(p) => Some(sd.read_init_latents(p, height, width, batch)?),
            None => None,
        };
        Ok(SampleRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            height,
            width,
            seed: self.seed,
            init_latents,
        })
    }
}

/// `<stem>-s<seed>.<ext>` in the folder of `path`.
pub fn seed_path(path: &Path, seed: u64, ext: &str) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{stem}-s{seed}.{ext}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    StableDiffusion,
    BlipDiffusion,
    /// Stable Diffusion 1.5 with an IP-Adapter image prompt from --reference.
    IpAdapter,
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
    /// Vanilla model that draws the layout template, as in the paper (default: --base for a
    /// DreamBooth folder; the model itself for plain Stable Diffusion and Textual Inversion, whose
    /// identifier-free template prompt is vanilla Stable Diffusion; Stable Diffusion 1.5 from the
    /// hub for BLIP-Diffusion).
    #[arg(long, requires = "pick_and_draw")]
    pub base_model: Option<String>,
    /// Writes one JSON line per guided update (`<stem>-s<seed>.jsonl` per seed with --seeds).
    #[arg(long, requires = "pick_and_draw")]
    pub trace: Option<PathBuf>,
    /// TOML with guidance settings, at the top level or in a `[guidance]` table (e.g.
    /// configs/guidance/paper.toml); defaults: the paper's.
    #[arg(long, requires = "pick_and_draw")]
    pub guidance_config: Option<PathBuf>,
    /// Folder of cached inversions and palettes (default $PND_CACHE or ~/.cache/pnd/palettes).
    #[arg(long, requires = "pick_and_draw")]
    pub palette_cache: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct TinyModelArgs {
    /// Folder to write the diffusers-layout model to.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the tiny model's random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with the CLIP tokenizer files to copy; default: ../shared/clip-tokenizer, the
    /// Hugging Face cache's openai/clip-vit-base-patch32, else the vocabulary built into pnd.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Also write `learned_embeds.safetensors` with a tiny Textual Inversion vector for this token.
    #[arg(long)]
    pub embedding_token: Option<String>,
    /// Also write a tiny IP-Adapter for this model to this folder, laid out as h94/IP-Adapter
    /// (both adapters and the image encoder), for `pnd generate --method ip-adapter --ip-adapter DIR`.
    #[arg(long)]
    pub ip_adapter: Option<PathBuf>,
}

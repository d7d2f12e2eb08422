//! The flags of `pnd generate` and `pnd tiny-model`.

use crate::commands::common::EmbeddingArgs;
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
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the initial noise (our generator, see the diffusion crate's `noise` module).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Several seeds sampled as one batch (one UNet call per step); writes `<out stem>-s<seed>.png`
    /// per seed next to --out. Each image is the one `--seed` alone gives.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "seed")]
    pub seeds: Option<Vec<u64>>,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Safetensors file with tensor `latents` [N, 4, H/8, W/8] (N: the number of --seeds, else 1);
    /// replaces the seeded noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Writes the final latents (tensor `latents`, [N, 4, H/8, W/8]) before VAE decoding.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    #[command(flatten)]
    pub ti: EmbeddingArgs,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub pnd: PickAndDrawArgs,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
    /// The baseline: a Stable Diffusion model (plain, DreamBooth, Textual Inversion) or
    /// BLIP-Diffusion (zero-shot from --reference and --subject-category).
    #[arg(long, value_enum, default_value_t = Method::StableDiffusion)]
    pub method: Method,
    /// BLIP-Diffusion: the reference's category, the Q-Former's text input (default: --class).
    #[arg(long)]
    pub subject_category: Option<String>,
}

impl GenerateArgs {
    /// The seeds of the batch: `--seeds`, else `--seed` alone.
    pub fn seeds(&self) -> anyhow::Result<Vec<u64>> {
        let Some(seeds) = &self.seeds else {
            return Ok(vec![self.seed]);
        };
        for (i, s) in seeds.iter().enumerate() {
            if let Some(j) = seeds[..i].iter().position(|x| x == s) {
                anyhow::bail!(
                    "--seeds lists seed {s} twice (positions {} and {})",
                    j + 1,
                    i + 1
                );
            }
        }
        Ok(seeds.clone())
    }

    /// Where the image of `seed` goes: `--out`, or `<out stem>-s<seed>.png` beside it with
    /// `--seeds`.
    pub fn image_path(&self, seed: u64) -> PathBuf {
        match self.seeds {
            Some(_) => seed_path(&self.out, seed, "png"),
            None => self.out.clone(),
        }
    }

    /// The sampling request of these flags, with `--init-latents` checked against `sd`'s shape
    /// (one image per seed).
    pub fn sample_request(&self, sd: &StableDiffusion) -> anyhow::Result<SampleRequest> {
        let batch = self.seeds()?.len();
        let init_latents = match &self.init_latents {
            Some(p) => Some(sd.read_init_latents(p, self.height, self.width, batch)?),
            None => None,
        };
        Ok(SampleRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            height: self.height,
            width: self.width,
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

//! `pnd score`: DINO, CLIP-I and CLIP-T of generated images against a subject's real images and a
//! CLIP-T prompt (SPEC §5).

use anyhow::Context;
use clap::Args;
use metrics::{list_images, EmbeddingCache, Scorer, ScorerOptions, DEFAULT_CLIP, DEFAULT_DINO};
use std::path::PathBuf;
use std::process::ExitCode;

/// Model and cache options shared by `pnd score` and `pnd oracle`.
#[derive(Debug, Args)]
pub struct MetricModels {
    /// DINO model: a local `ViTModel` folder or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_DINO)]
    pub dino: String,
    /// CLIP model: a local `CLIPModel` folder or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_CLIP)]
    pub clip: String,
    /// Images per inference batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Embedding cache folder (default: $PND_CACHE, $XDG_CACHE_HOME/pnd or ~/.cache/pnd, + /embeddings).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Do not read or write the embedding cache.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub device: crate::runtime::DeviceArgs,
}

impl MetricModels {
    pub fn load(&self) -> anyhow::Result<Scorer> {
        let cache = if self.no_cache {
            None
        } else {
            Some(EmbeddingCache::new(
                self.cache
                    .clone()
                    .unwrap_or_else(EmbeddingCache::default_dir),
            ))
        };
        let options = ScorerOptions {
            batch_size: self.batch_size,
            cache,
            device: self.device.open()?,
            ..Default::default()
        };
        Scorer::load(&self.dino, &self.clip, options).with_context(|| {
            format!(
                "loading metric models '{}' (DINO) and '{}' (CLIP)",
                self.dino, self.clip
            )
        })
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Generated images: a folder (all its .jpg/.jpeg/.png, sorted by name) or one image file.
    #[arg(long)]
    pub generated: PathBuf,
    /// Real images of the subject: a folder or one image file.
    #[arg(long)]
    pub real: PathBuf,
    /// The CLIP-T prompt (class noun, no identifier), e.g. "a dog in the jungle".
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub models: MetricModels,
    /// Print one JSON object (dino, clip_i, clip_t, n_generated, n_real, summaries, per image).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let generated = list_images(&args.generated)
        .with_context(|| format!("listing --generated '{}'", args.generated.display()))?;
    let real = list_images(&args.real)
        .with_context(|| format!("listing --real '{}'", args.real.display()))?;
    let scorer = args.models.load()?;
    eprintln!(
        "score: embedding {} generated and {} real images",
        generated.len(),
        real.len()
    );
    let report = scorer.score(&generated, &real, &args.prompt)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} generated vs {} real images, prompt \"{}\"",
            report.n_generated, report.n_real, report.prompt
        );
        for (name, s) in [
            ("DINO", &report.dino_summary),
            ("CLIP-I", &report.clip_i_summary),
            ("CLIP-T", &report.clip_t_summary),
        ] {
            println!(
                "{name:<7} {:.4}  (std {:.4}, 95% CI [{:.4}, {:.4}])",
                s.mean, s.std, s.ci95[0], s.ci95[1]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

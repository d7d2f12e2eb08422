//! `pnd score`: DINO, CLIP-I and CLIP-T of generated images against a subject's real images and a
//! CLIP-T prompt (SPEC §5), under the DreamBooth protocol or a profile of `configs/protocol/`
//! (`--protocol NAME|FILE|all`).

use crate::commands::eval::{all_protocols, load_protocol};
use crate::experiment::MetricProtocol;
use anyhow::Context;
use clap::Args;
use dreambench::ReferenceRule;
use metrics::{
    list_images, EmbeddingCache, ScoreReport, Scorer, ScorerOptions, Scoring, DEFAULT_CLIP,
    DEFAULT_DINO,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Model and cache options shared by `pnd score` and `pnd oracle`.
#[derive(Debug, Args)]
pub struct MetricModels {
    /// DINO model: a local `ViTModel` folder or a Hugging Face repo id (default: the protocol's;
    /// facebook/dino-vits16).
    #[arg(long)]
    pub dino: Option<String>,
    /// CLIP model: a local `CLIPModel` folder or a Hugging Face repo id (default: the protocol's;
    /// openai/clip-vit-base-patch32).
    #[arg(long)]
    pub clip: Option<String>,
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
    /// The models under the DreamBooth protocol.
    pub fn load(&self) -> anyhow::Result<Scorer> {
        self.load_with(None)
    }

    /// The models and scoring of `protocol` (the DreamBooth protocol's when `None`); `--dino` and
    /// `--clip` replace the protocol's models (a local copy of the same weights, a tiny model).
    pub fn load_with(&self, protocol: Option<&MetricProtocol>) -> anyhow::Result<Scorer> {
        let dino = (self.dino.clone())
            .or_else(|| protocol.map(|p| p.dino.clone()))
            .unwrap_or_else(|| DEFAULT_DINO.into());
        let clip = (self.clip.clone())
            .or_else(|| protocol.map(|p| p.clip.clone()))
            .unwrap_or_else(|| DEFAULT_CLIP.into());
        let scoring = protocol
            .map(|p| p.scoring.clone())
            .unwrap_or_else(Scoring::dreambooth);
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
        Scorer::load_scoring(&dino, &clip, scoring, options)
            .with_context(|| format!("loading metric models '{dino}' (DINO) and '{clip}' (CLIP)"))
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
    /// The metric protocol: a name (configs/protocol/NAME.toml, looked up from the current
    /// folder upward), a protocol file, or `all` (every profile there, one after the other,
    /// sharing the embedding cache). Default: the DreamBooth protocol.
    #[arg(long)]
    pub protocol: Option<String>,
    /// The image the generated ones were conditioned on, for a profile's one-to-one pairing
    /// (DreamBench++); default: the one of --real the profile's `reference` names (the first
    /// in file-name order).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    #[command(flatten)]
    pub models: MetricModels,
    /// Print one JSON object (dino, clip_i, clip_t, n_generated, n_real, summaries, per image).
    #[arg(long)]
    pub json: bool,
}

/// The reference image of `real` (sorted by name) under `rule`.
fn reference_of(real: &[PathBuf], rule: &ReferenceRule) -> anyhow::Result<PathBuf> {
    let found = match rule {
        ReferenceRule::First => real.first(),
        ReferenceRule::Index(i) => real.get(*i),
        ReferenceRule::File(name) => real
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == name.as_str())),
    };
    found
        .cloned()
        .with_context(|| format!("--real has no image {rule} to pair with (give --reference)"))
}

/// Scores under one protocol (`None`: the DreamBooth protocol).
fn score_under(
    args: &ScoreArgs,
    protocol: Option<&MetricProtocol>,
    generated: &[PathBuf],
    real: &[PathBuf],
) -> anyhow::Result<ScoreReport> {
    let scorer = args.models.load_with(protocol)?;
    let rule = protocol.map(|p| p.reference.clone()).unwrap_or_default();
    let reference = match &args.reference {
        Some(r) => r.clone(),
        None => reference_of(real, &rule)?,
    };
    Ok(scorer.score_with_reference(generated, real, &[reference], &args.prompt)?)
}

/// The protocols of `--protocol`, by name: `[(None, DreamBooth)]` without it.
pub fn protocols(
    spec: Option<&str>,
    from: &Path,
) -> anyhow::Result<Vec<(String, Option<MetricProtocol>)>> {
    Ok(match spec {
        None => vec![("dreambooth".into(), None)],
        Some("all") => all_protocols(from)?
            .into_iter()
            .map(|(name, spec)| {
                let (_, m) = load_protocol(&spec, from)?;
                Ok((name, Some(m)))
            })
            .collect::<anyhow::Result<_>>()?,
        Some(spec) => {
            let (_, m) = load_protocol(spec, from)?;
            vec![(m.scoring.profile.clone(), Some(m))]
        }
    })
}

fn print_text(report: &ScoreReport) {
    println!(
        "{} generated vs {} real images, prompt \"{}\"",
        report.n_generated, report.n_real, report.prompt
    );
    let extra = report.extra_summary.iter().map(|(k, s)| (k.as_str(), s));
    for (name, s) in [
        ("DINO", &report.dino_summary),
        ("CLIP-I", &report.clip_i_summary),
        ("CLIP-T", &report.clip_t_summary),
    ]
    .into_iter()
    .chain(extra)
    {
        println!(
            "{name:<7} {:.4}  (std {:.4}, 95% CI [{:.4}, {:.4}])",
            s.mean, s.std, s.ci95[0], s.ci95[1]
        );
    }
}

pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let generated = list_images(&args.generated)
        .with_context(|| format!("listing --generated '{}'", args.generated.display()))?;
    let real = list_images(&args.real)
        .with_context(|| format!("listing --real '{}'", args.real.display()))?;
    let protocols = protocols(args.protocol.as_deref(), &std::env::current_dir()?)?;
    eprintln!(
        "score: embedding {} generated and {} real images",
        generated.len(),
        real.len()
    );
    let mut reports = Vec::new();
    for (name, protocol) in &protocols {
        let report = score_under(&args, protocol.as_ref(), &generated, &real)
            .with_context(|| format!("under protocol '{name}'"))?;
        reports.push((name.clone(), report));
    }
    let all = args.protocol.as_deref() == Some("all");
    if args.json {
        if all {
            // One object per profile, by name.
            let map: serde_json::Map<String, serde_json::Value> = reports
                .iter()
                .map(|(n, r)| Ok((n.clone(), serde_json::to_value(r)?)))
                .collect::<anyhow::Result<_>>()?;
            println!("{}", serde_json::to_string_pretty(&map)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&reports[0].1)?);
        }
    } else {
        for (name, report) in &reports {
            if all || args.protocol.is_some() {
                println!("protocol '{name}':");
            }
            print_text(report);
        }
    }
    Ok(ExitCode::SUCCESS)
}

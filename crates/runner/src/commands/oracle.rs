//! `pnd oracle`: the "Real Images (Oracle)" row: each real image against the other real images of
//! its subject, mean over all pairs, and per subject (SPEC §5).

use crate::commands::score::MetricModels;
use anyhow::Context;
use clap::Args;
use dreambench::{Dataset, SUBJECTS};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct OracleArgs {
    /// The DreamBench folder (one sub-folder of images per subject).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub models: MetricModels,
    /// Print one JSON object: dino, clip_i, n_images, n_pairs, per_subject {subject: {dino, clip_i}}.
    #[arg(long)]
    pub json: bool,
    /// Only these subjects, comma-separated (default: all 30), e.g. on a partial copy such as
    /// the demo's `pnd-demo/dreambench`. The paper's oracle (0.774 / 0.885) is over all 30.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub subjects: Option<Vec<String>>,
}

pub fn run(args: OracleArgs) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = match &args.subjects {
        Some(list) => {
            crate::lists::check_unique("--subjects", "subject", list)
                .map_err(anyhow::Error::msg)?;
            list.iter().map(String::as_str).collect()
        }
        None => SUBJECTS.iter().map(|s| s.name).collect(),
    };
    let data = Dataset::open_subjects(&args.data, &names)
        .with_context(|| format!("opening DreamBench at '{}'", args.data.display()))?;
    let subjects: Vec<(String, Vec<PathBuf>)> = data
        .subjects()
        .map(|s| Ok((s.name.to_string(), data.images(s.name)?.to_vec())))
        .collect::<anyhow::Result<_>>()?;
    let scorer = args.models.load()?;
    let images: usize = subjects.iter().map(|(_, v)| v.len()).sum();
    eprintln!(
        "oracle: embedding {images} real images of {}",
        crate::lists::count(subjects.len(), "subject")
    );
    let report = scorer.oracle(&subjects)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "Real images (oracle), {} images, {} pairs: DINO {:.4}, CLIP-I {:.4}",
            report.n_images, report.n_pairs, report.dino, report.clip_i
        );
        for (name, s) in &report.per_subject {
            println!(
                "  {name:<22} DINO {:.4}  CLIP-I {:.4}  ({} images)",
                s.dino, s.clip_i, s.n_images
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `pnd dataset fetch | check | list`.

use anyhow::Context;
use clap::Subcommand;
use dreambench::{dataset::DEFAULT_URL, Dataset, FetchOptions, SUBJECTS};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Clone google/dreambooth, keep its dataset/ folder and verify it.
    Fetch {
        /// Where the dataset folder goes.
        #[arg(long, default_value = "dreambench")]
        dest: PathBuf,
        /// Git URL or local path of the repository.
        #[arg(long, default_value = DEFAULT_URL)]
        from: String,
    },
    /// Verify a copy against the project's SHA-256 list of all 158 images.
    Check {
        /// The DreamBench folder to check (one sub-folder of images per subject).
        #[arg(long)]
        data: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print subjects, classes, kinds, image counts and prompts.
    List {
        /// The DreamBench folder (one sub-folder of images per subject).
        #[arg(long)]
        data: PathBuf,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Fetch { dest, from } => {
            eprintln!("cloning {from} ...");
            let report = dreambench::fetch(&FetchOptions {
                dest: dest.clone(),
                from: from.clone(),
            })
            .with_context(|| {
                format!(
                    "fetching DreamBench from '{from}' into '{}'",
                    dest.display()
                )
            })?;
            print_check(&report);
            Ok(exit_for(&report))
        }
        DatasetCommand::Check { data, json } => {
            let report = dreambench::check(&data)
                .with_context(|| format!("checking DreamBench copy '{}'", data.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_check(&report);
            }
            Ok(exit_for(&report))
        }
        DatasetCommand::List { data, json } => {
            let ds = Dataset::open(&data)
                .with_context(|| format!("opening DreamBench '{}'", data.display()))?;
            if json {
                let subjects: Vec<serde_json::Value> = SUBJECTS
                    .iter()
                    .map(|s| {
                        let images: Vec<String> = ds
                            .images(s.name)
                            .unwrap_or_default()
                            .iter()
                            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                            .collect();
                        serde_json::json!({
                            "name": s.name, "class": s.class, "kind": s.kind,
                            "images": images.len(), "files": images,
                            "prompts": s.prompts().iter().map(|p| dreambench::clip_t_prompt(p, s.class)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "root": ds.root, "subjects": subjects, "images": ds.image_count(),
                        "object_prompts": dreambench::OBJECT_PROMPTS, "live_prompts": dreambench::LIVE_PROMPTS,
                    }))?
                );
            } else {
                println!(
                    "{:<20} {:<16} {:<7} {:>6}",
                    "subject", "class", "kind", "images"
                );
                for s in SUBJECTS.iter() {
                    let kind = match s.kind {
                        dreambench::Kind::Live => "live",
                        dreambench::Kind::Object => "object",
                    };
                    println!(
                        "{:<20} {:<16} {:<7} {:>6}",
                        s.name,
                        s.class,
                        kind,
                        ds.images(s.name)?.len()
                    );
                }
                println!(
                    "\n{} subjects, {} images\n",
                    SUBJECTS.len(),
                    ds.image_count()
                );
                println!(
                    "object prompts ({{subject}} = identifier + class for personalized methods):"
                );
                for (i, p) in dreambench::OBJECT_PROMPTS.iter().enumerate() {
                    println!("  {i:>2}  {p}");
                }
                println!("live-subject prompts:");
                for (i, p) in dreambench::LIVE_PROMPTS.iter().enumerate() {
                    println!("  {i:>2}  {p}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_check(report: &dreambench::CheckReport) {
    for p in &report.problems {
        println!("{p}");
    }
    if report.is_ok() {
        println!(
            "ok: {} of {} images verified in '{}'",
            report.verified,
            report.expected,
            report.root.display()
        );
    } else {
        println!(
            "FAILED: {} problem(s); {} of {} images verified in '{}'",
            report.problems.len(),
            report.verified,
            report.expected,
            report.root.display()
        );
    }
}

fn exit_for(report: &dreambench::CheckReport) -> ExitCode {
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

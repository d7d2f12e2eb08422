//! Command-line interface of `pnd`. Each subcommand lives in `commands/<name>.rs` with its own
//! `Args` and `run`; this file only lists them.

use crate::commands;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "pnd",
    version = crate::provenance::version_line(),
    about = "Pick-and-Draw reference implementation and DreamBench harness"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline offline on tiny models and a mini benchmark (minutes on a laptop).
    Demo(commands::demo::DemoArgs),
    /// Fetch, verify and list the DreamBench dataset.
    #[command(subcommand)]
    Dataset(commands::dataset::DatasetCommand),
    /// Run an experiment: generation and scoring jobs, resumable and shardable.
    Sweep(commands::sweep::SweepArgs),
    /// Join the run folders of an experiment's shards.
    Merge(commands::sweep::MergeArgs),
    /// Tables, Pareto plots, per-subject bars, image grids and index.html of a run (or of several in one table).
    Report(commands::report::ReportArgs),
    /// The paper's qualitative figures (Figs. 1, 4, 6-8) from a figure file: PNG, SVG and LaTeX.
    Figures(commands::figures::FiguresArgs),
    /// Score a folder of images made by any method into a run folder, under a metric protocol.
    Eval(Box<commands::eval::EvalArgs>),
    /// Generate one image: Stable Diffusion (plain, DreamBooth, Textual Inversion) or BLIP-Diffusion.
    Generate(Box<commands::generate::GenerateArgs>),
    /// Write the built-in tiny Stable Diffusion model (tests, demo).
    TinyModel(commands::generate::TinyModelArgs),
    /// Null-text inversion of a reference image (Pick-and-Draw's appearance palette).
    Invert(commands::invert::InvertArgs),
    /// Cross-attention maps of every UNet layer at one step, with the appearance masks and the
    /// layout loss's smoothed maps (the paper's Fig. 3), of a generation or the inverted reference.
    Maps(Box<commands::maps::MapsArgs>),
    /// DINO, CLIP-I and CLIP-T of generated images against real images and a prompt.
    Score(commands::score::ScoreArgs),
    /// The real-image oracle row (each real image against the others of its subject).
    Oracle(commands::oracle::OracleArgs),
    /// Train a baseline for one subject: Textual Inversion or DreamBooth.
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Dataset(cmd) => commands::dataset::run(cmd),
        Command::Sweep(args) => commands::sweep::run(args),
        Command::Merge(args) => commands::sweep::merge_run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Figures(args) => commands::figures::run(args),
        Command::Eval(args) => commands::eval::run(*args),
        Command::Generate(args) => commands::generate::run(*args),
        Command::TinyModel(args) => commands::generate::run_tiny_model(args),
        Command::Invert(args) => commands::invert::run(args),
        Command::Maps(args) => commands::maps::run(*args),
        Command::Score(args) => commands::score::run(args),
        Command::Oracle(args) => commands::oracle::run(args),
        Command::Train(cmd) => commands::train::run(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `(command path, flag)` of every argument of `cmd` and its subcommands without help text.
    fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" || a.is_hide_set() {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} --{}", a.get_long().unwrap_or(id)));
            }
            assert!(
                !a.is_hide_default_value_set(),
                "{path} --{id} hides its default"
            );
        }
        for sub in cmd.get_subcommands() {
            without_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_has_help_text() {
        let mut missing = vec![];
        without_help(&Cli::command(), "pnd", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }

    /// The help's stated defaults of `pnd train`'s per-method flags are the trainers' own.
    #[test]
    fn train_help_states_the_trainers_defaults() {
        let ti = training::textual_inversion::TiSettings::new("<x>", "dog");
        let db = training::dreambooth::DbSettings::new("a photo of sks dog");
        let cmd = Cli::command();
        let train = cmd.find_subcommand("train").unwrap();
        let ti_cmd = train.find_subcommand("textual-inversion").unwrap();
        let help = |name: &str| {
            ti_cmd
                .get_arguments()
                .find(|a| a.get_id().as_str() == name)
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap()
        };
        assert!(help("steps").contains(&format!(
            "{} for textual-inversion, {} for dreambooth",
            ti.steps, db.steps
        )));
        assert!(help("lr").contains(&format!("{:e} for textual-inversion", ti.lr)));
        assert!(help("lr").contains(&format!("{:e} for dreambooth", db.lr)));
        assert!(help("grad_accum").contains(&format!(
            "{} for textual-inversion, {} for dreambooth",
            ti.grad_accum, db.grad_accum
        )));
        assert_eq!(ti.batch, db.batch);
        assert!(help("batch").contains(&format!("[default: {}]", ti.batch)));
    }
}

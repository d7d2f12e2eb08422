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
    /// Score a folder of images made by any method into a run folder, under a metric protocol.
    Eval(Box<commands::eval::EvalArgs>),
    /// Generate one image: Stable Diffusion (plain, DreamBooth, Textual Inversion) or BLIP-Diffusion.
    Generate(Box<commands::generate::GenerateArgs>),
    /// Write the built-in tiny Stable Diffusion model (tests, demo).
    TinyModel(commands::generate::TinyModelArgs),
    /// Null-text inversion of a reference image (Pick-and-Draw's appearance palette).
    Invert(commands::invert::InvertArgs),
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
        Command::Eval(args) => commands::eval::run(*args),
        Command::Generate(args) => commands::generate::run(*args),
        Command::TinyModel(args) => commands::generate::run_tiny_model(args),
        Command::Invert(args) => commands::invert::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Oracle(args) => commands::oracle::run(args),
        Command::Train(cmd) => commands::train::run(cmd),
    }
}

//! `pnd demo [--out DIR] [--tokenizer DIR]`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where models, data, the run and the report go.
    #[arg(long, default_value = "pnd-demo")]
    pub out: PathBuf,
    /// A CLIP tokenizer folder (vocab.json + merges.txt); default: ../shared/clip-tokenizer, or
    /// openai/clip-vit-base-patch32 from the Hugging Face cache, else the vocabulary built into pnd.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Instead of the demo's run: the shipped Table 1 and ablation experiments' methods (every
    /// baseline with and without Pick-and-Draw, the loss and EMD ablations) on tiny models over
    /// four cells of the mini benchmark, then every figure of experiments/figures/paper.toml from
    /// those runs (OUT/runs/, OUT/figures/).
    #[arg(long)]
    pub paper: bool,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.paper {
        return run_paper(args);
    }
    eprintln!("pnd demo: tiny random models on a procedurally drawn mini benchmark.");
    eprintln!("The numbers below are meaningless: they show that the pipeline runs end to end.\n");
    let out = crate::demo::run_demo(&args.out, args.tokenizer.as_deref(), true, &args.runtime)?;
    print!("{}", out.table_markdown);
    println!(
        "\nrun folder: {}\nreport (tables, Pareto plots, per-subject bars, image grids; index.html shows them all, explore.html every image): {}",
        out.run_dir.display(),
        out.report_dir.display()
    );
    println!("(tiny random models: the scores carry no meaning)");
    Ok(ExitCode::SUCCESS)
}

fn run_paper(args: DemoArgs) -> anyhow::Result<ExitCode> {
    eprintln!("pnd demo --paper: the paper's figures from tiny random models (the images mean nothing).\n");
    let out = crate::demo::paper::run_paper_demo(
        &args.out,
        args.tokenizer.as_deref(),
        true,
        &args.runtime,
    )?;
    for r in &out.runs {
        println!("run folder: {}", r.display());
    }
    println!("figure file: {}", out.spec.display());
    for w in &out.figures {
        println!(
            "{}: {} x {} px at {} dpi: {}, {}, {}",
            w.name,
            w.layout.width,
            w.layout.height,
            w.layout.dpi,
            w.png.display(),
            w.svg.display(),
            w.tex.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

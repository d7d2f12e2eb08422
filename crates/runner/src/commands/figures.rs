//! `pnd figures RUN_DIR... --spec FILE --out DIR`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct FiguresArgs {
    /// Run folders written by `pnd sweep`, `pnd merge` or `pnd eval` (e.g. results/runs/table1
    /// results/runs/ablation-losses results/runs/ablation-emd); a figure's columns name their methods.
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// The figure file (TOML): each figure's rows (subject, prompt, seed), columns (`reference`
    /// or a method, with titles), caption and print size; see experiments/figures/paper.toml.
    #[arg(long)]
    pub spec: PathBuf,
    /// Where the figures go: NAME.png (print resolution), NAME.svg and NAME.tex per figure.
    #[arg(long, default_value = "figures")]
    pub out: PathBuf,
}

pub fn run(args: FiguresArgs) -> anyhow::Result<ExitCode> {
    let written = crate::figures::write_figures(&args.run_dirs, &args.spec, &args.out)?;
    for w in &written {
        let l = &w.layout;
        println!(
            "{}: {} x {} images, {} x {} px at {} dpi ({:.2} x {:.2} in): {}, {}, {}",
            w.name,
            l.rows,
            l.columns,
            l.width,
            l.height,
            l.dpi,
            l.width as f64 / l.dpi as f64,
            l.height as f64 / l.dpi as f64,
            w.png.display(),
            w.svg.display(),
            w.tex.display()
        );
    }
    println!(
        "{} figures written to '{}'",
        written.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

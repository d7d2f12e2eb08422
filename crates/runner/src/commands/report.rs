//! `pnd report RUN_DIR... [--out DIR] [--strict]`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run folders written by `pnd sweep`, `pnd merge` or `pnd eval`; several share one table
    /// (same metric models, different method names; --out required).
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// Where the report goes (default: RUN_DIR/report of a single run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fail when the oracle gate fails: under the published metric models, a real-image oracle
    /// more than 0.01 from the paper's DINO 0.774 / CLIP-I 0.885 (a warning otherwise).
    #[arg(long)]
    pub strict: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let options = crate::report::ReportOptions {
        strict: args.strict,
    };
    let report = crate::report::write_report_with(&args.run_dirs, args.out.as_deref(), &options)?;
    print!("{}\n{}", report.header, report.table_markdown);
    println!(
        "\n{} files written to '{}'",
        report.files.len(),
        report.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

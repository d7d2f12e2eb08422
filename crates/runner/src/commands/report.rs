//! `pnd report RUN_DIR [--out DIR]`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A run folder written by `pnd sweep` (or a merge of its shards).
    pub run_dir: PathBuf,
    /// Where the report goes (default: RUN_DIR/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let report = crate::report::write_report(&args.run_dir, args.out.as_deref())?;
    print!("{}\n{}", report.header, report.table_markdown);
    println!(
        "\n{} files written to '{}'",
        report.files.len(),
        report.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

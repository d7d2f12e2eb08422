//! `pnd sweep EXPERIMENT.toml [--out DIR] [--shard i/n] [--resume] [--dry-run]` and
//! `pnd merge SHARD_DIR... --out DIR`.

use crate::bench::{validate, BenchRunner};
use crate::experiment::Experiment;
use crate::report::rows::ImageRow;
use crate::sweep::{merge, run_jobs, write_file_atomic, Plan, RunStore, Shard};
use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment file (see experiments/).
    pub experiment: PathBuf,
    /// Run folder (default: results/runs/<experiment name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only shard i of n (0-based), e.g. `--shard 0/4`.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Continue a run folder that already has results (finished jobs are skipped).
    #[arg(long)]
    pub resume: bool,
    /// List the jobs and the per-subject shared work, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Cache of per-subject shared work: real-image embeddings, inversions, reference palettes
    /// (default: RUN_DIR/cache; point shards at one shared folder to compute them once).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Run folders of the shards of one experiment.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// The merged run folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// The plan of an experiment: its resolved config (saved in the run folder) and its jobs.
pub fn plan_of(exp: &Experiment) -> anyhow::Result<Plan> {
    Ok(Plan {
        experiment: exp.name.clone(),
        config: serde_json::to_value(exp)?,
        jobs: exp.jobs(),
    })
}

pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let exp = Experiment::load(&args.experiment)?;
    let plan = plan_of(&exp)?;
    let shard = args.shard.unwrap_or(Shard::ALL);
    if args.dry_run {
        print!("{}", dry_run_listing(&exp, &plan, shard));
        return Ok(ExitCode::SUCCESS);
    }
    validate(&exp).with_context(|| format!("checking '{}'", args.experiment.display()))?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("results/runs").join(&exp.name));
    if out.join("rows").is_dir()
        && std::fs::read_dir(out.join("rows"))?.next().is_some()
        && !args.resume
    {
        bail!("run folder '{}' already has results: pass --resume to continue it, or choose another --out", out.display());
    }
    let store = RunStore::create(&out, &plan)?;
    let cache = args.cache.clone().unwrap_or_else(|| out.join("cache"));
    let mut runner = BenchRunner::new(exp.clone(), &cache)?;
    if !out.join("oracle.json").is_file() {
        eprintln!(
            "oracle: embedding the real images of {} subjects",
            exp.subjects().len()
        );
        let oracle = runner.oracle()?;
        write_file_atomic(
            &out.join("oracle.json"),
            serde_json::to_string_pretty(&oracle)?.as_bytes(),
        )?;
    }
    eprintln!(
        "sweep '{}': {} jobs, shard {shard}, run folder '{}'",
        exp.name,
        plan.jobs.len(),
        out.display()
    );
    let summary = run_jobs(&store, &plan.jobs, shard, &mut runner, true)?;
    println!(
        "{} jobs in this shard: {} done now, {} already done; rows in '{}'",
        summary.selected,
        summary.completed,
        summary.skipped,
        out.join("results.csv").display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn merge_run(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let merged = merge::<ImageRow>(&args.shards, &args.out)?;
    for shard in &args.shards {
        let oracle = shard.join("oracle.json");
        if oracle.is_file() && !args.out.join("oracle.json").is_file() {
            std::fs::copy(&oracle, args.out.join("oracle.json"))?;
        }
    }
    let plan = merged.plan()?;
    let done = plan.jobs.iter().filter(|j| merged.is_done(&j.id())).count();
    println!(
        "merged {} shard(s) into '{}': {done} of {} jobs done",
        args.shards.len(),
        args.out.display(),
        plan.jobs.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// What a dry run prints: job counts per method, the per-subject shared work, the first job ids.
pub fn dry_run_listing(exp: &Experiment, plan: &Plan, shard: Shard) -> String {
    use std::fmt::Write;
    let selected = shard.select(&plan.jobs);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "experiment '{}': {} generation jobs ({} in shard {shard})",
        exp.name,
        plan.jobs.len(),
        selected.len()
    );
    for m in &exp.methods {
        let n = plan.jobs.iter().filter(|j| j.method == m.name).count();
        let guided = if m.pick_and_draw {
            " + Pick-and-Draw"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  {:<24} {:>6} jobs  ({:?}{guided})",
            m.name, n, m.baseline
        );
    }
    let subjects = exp.subjects();
    let guided_baselines: Vec<_> = exp
        .methods
        .iter()
        .filter(|m| m.pick_and_draw)
        .map(|m| m.name.clone())
        .collect();
    let _ = writeln!(s, "per-subject shared work ({} subjects):", subjects.len());
    let _ = writeln!(
        s,
        "  real-image embeddings (DINO, CLIP): {} subjects, once per model",
        subjects.len()
    );
    let _ = writeln!(s, "  oracle: 1");
    if !guided_baselines.is_empty() {
        let _ = writeln!(
            s,
            "  null-text inversion + reference palette: {} (subject × guided method: {})",
            subjects.len() * guided_baselines.len(),
            guided_baselines.join(", ")
        );
        let _ = writeln!(
            s,
            "  layout templates: {} distinct (subject × prompt × seed; today recomputed inside each guided job)",
            subjects.len() * exp.prompt_indices().len() * exp.seeds.len()
        );
    }
    let _ = writeln!(s, "first jobs:");
    for j in selected.iter().take(5) {
        let _ = writeln!(s, "  {}", j.id());
    }
    s
}

//! `pnd sweep EXPERIMENT.toml [--out DIR] [--shard i/n] [--cache DIR] [--resume] [--keep-going]
//! [--dry-run] [--devices D,D,...]` and
//! `pnd merge SHARD_DIR... --out DIR [--partial]`.

use crate::experiment::Experiment;
use crate::jobs::{validate, DreamBenchJobs};
use crate::progress::ProgressMode;
use crate::provenance::Provenance;
use crate::report::rows::ImageRow;
use crate::runtime::{DeviceSpec, Runtime, RuntimeArgs, RuntimeRecord};
use crate::sweep::{merge, run_jobs_with, Plan, RunOptions, RunStore, Shard};
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
    /// Continue a run folder that already has results (finished jobs are skipped, failed ones
    /// retried).
    #[arg(long)]
    pub resume: bool,
    /// Record a failing job in RUN_DIR/failures.csv and go on (default: stop at the first error).
    #[arg(long)]
    pub keep_going: bool,
    /// List the jobs and the per-subject shared work, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop before the first job when the oracle gate fails (under the published metric models,
    /// a real-image oracle more than 0.01 from the paper's); a warning otherwise.
    #[arg(long)]
    pub strict: bool,
    /// Cache of per-subject shared work: real-image embeddings, inversions, reference palettes
    /// (default: RUN_DIR/cache; point shards at one shared folder to compute them once).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// One worker process per device over the one run folder, sharing one cache, e.g.
    /// `cuda:0,cuda:1` or `cpu,cpu`; `all`: every CUDA GPU this binary sees (an error in a build
    /// without CUDA or with no GPU answering). The workers claim jobs, so each runs once.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Run folders of the shards of one experiment.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// The merged run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Merge even when some jobs have no row in any shard (a shard missing or unfinished).
    #[arg(long)]
    pub partial: bool,
}

/// The plan of an experiment: its resolved config (saved in the run folder) and its jobs. The
/// `[runtime]` table is left out: where and in what precision the images are made does not change
/// the work, so shards on CPUs and GPUs share one plan (the provenance and every row record the
/// device and dtype).
pub fn plan_of(exp: &Experiment) -> anyhow::Result<Plan> {
    let mut config = serde_json::to_value(exp)?;
    if let Some(table) = config.as_object_mut() {
        table.remove("runtime");
    }
    Ok(Plan {
        experiment: exp.name.clone(),
        config,
        jobs: exp.jobs(),
        provenance: None,
    })
}

/// The plan with its provenance (build, model revisions, dataset checksum, protocol); `cache`
/// keeps the hashes of local weight files.
pub fn plan_with_provenance(
    exp: &Experiment,
    cache: &Path,
    runtime: &RuntimeRecord,
) -> anyhow::Result<Plan> {
    Ok(Plan {
        provenance: Some(
            Provenance::collect(exp, cache, runtime).context("recording the provenance")?,
        ),
        ..plan_of(exp)?
    })
}

/// Opens or creates the run folder of `plan`. A resumed run keeps the provenance it was started
/// with; a different build resuming it is said on stderr.
pub fn open_run(out: &Path, plan: &Plan) -> anyhow::Result<RunStore> {
    let store = RunStore::create(out, plan)?;
    let recorded = store.plan()?.provenance;
    if let (Some(was), Some(now)) = (&recorded, &plan.provenance) {
        if was != now {
            eprintln!(
                "note: '{}' was started by {} with other models or data than this {}; plan.json keeps the first",
                out.display(),
                was.build_line(),
                now.build_line()
            );
        }
    }
    Ok(store)
}

pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let mut exp = Experiment::load(&args.experiment)?;
    exp.runtime = args.runtime.over(&exp.runtime);
    let plan = plan_of(&exp)?;
    let shard = args.shard.unwrap_or(Shard::ALL);
    if args.dry_run {
        print!("{}", dry_run_listing(&exp, &plan, shard));
        return Ok(ExitCode::SUCCESS);
    }
    // The workers' devices before any work: `all` on a build without CUDA is one early error.
    let workers = args.devices.as_deref().map(worker_devices).transpose()?;
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
    let cache = args.cache.clone().unwrap_or_else(|| out.join("cache"));
    if let Some(devices) = &workers {
        return run_workers(&args, devices, &out, &cache);
    }
    let runtime = Runtime::open(&exp.runtime)?;
    eprintln!("{}", runtime.describe());
    let plan = plan_with_provenance(&exp, &cache, &runtime.record())?;
    let store = open_run(&out, &plan)?;
    let mut runner = DreamBenchJobs::with_runtime(exp.clone(), &cache, runtime)?;
    runner.write_oracle(&out)?;
    crate::report::gate::check_run(
        &out,
        &exp.metrics.scoring.profile,
        &exp.metrics.dino,
        &exp.metrics.clip,
        args.strict,
    )?;
    eprintln!(
        "sweep '{}': {} jobs, shard {shard}, {} image(s) per batch, run folder '{}'",
        exp.name,
        plan.jobs.len(),
        runner.batch,
        out.display()
    );
    let options = RunOptions {
        progress: ProgressMode::detect(true),
        keep_going: args.keep_going,
    };
    let summary = run_jobs_with(&store, &plan.jobs, shard, &mut runner, options)?;
    let failed = summary.failed.len();
    let elsewhere = match summary.elsewhere {
        0 => String::new(),
        n => format!(", {n} by another process"),
    };
    println!(
        "{} jobs in this shard: {} done now, {} already done{elsewhere}, {failed} failed; rows in '{}'",
        summary.selected,
        summary.completed,
        summary.skipped,
        out.join("results.csv").display()
    );
    if failed > 0 {
        println!(
            "{failed} failed jobs are listed in '{}'; rerun with --resume to retry them",
            out.join("failures.csv").display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The devices of `--devices`: a list, or `all` (every CUDA GPU that answers).
pub fn worker_devices(list: &[String]) -> anyhow::Result<Vec<DeviceSpec>> {
    if list.len() == 1 && list[0].trim() == "all" {
        if !cfg!(feature = "cuda") {
            bail!("--devices all: this pnd was built without CUDA, so it sees no GPU; build it with --features cuda, or list the devices (e.g. --devices cpu)");
        }
        // Opening a device answers whether it is there; each is closed again at once.
        let n = (0..64)
            .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
            .count();
        if n == 0 {
            bail!("--devices all: no CUDA GPU answers (CUDA_VISIBLE_DEVICES, driver?)");
        }
        return Ok((0..n).map(DeviceSpec::Cuda).collect());
    }
    let devices = list
        .iter()
        .map(|d| d.parse::<DeviceSpec>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--devices")?;
    if devices.is_empty() {
        bail!("--devices: no device given");
    }
    Ok(devices)
}

/// `pnd sweep --devices`: one `pnd sweep` process per device on the one run folder and cache.
/// Jobs are claimed (see [`crate::sweep::claim`]), so each runs in one worker; a worker whose
/// remaining jobs are all claimed waits for them, so when every worker has ended the folder is
/// complete and its `results.csv` written, as a single process would leave it.
fn run_workers(
    args: &SweepArgs,
    devices: &[DeviceSpec],
    out: &Path,
    cache: &Path,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the pnd binary to start workers")?;
    let mut children = Vec::new();
    for (k, device) in devices.iter().enumerate() {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("sweep")
            .arg(&args.experiment)
            .arg("--out")
            .arg(out)
            .arg("--cache")
            .arg(cache)
            .arg("--resume")
            .arg("--device")
            .arg(device.to_string());
        if let Some(shard) = args.shard {
            cmd.arg("--shard").arg(shard.to_string());
        }
        if let Some(dtype) = args.runtime.dtype {
            cmd.arg("--dtype").arg(dtype.to_string());
        }
        if args.keep_going {
            cmd.arg("--keep-going");
        }
        if args.strict {
            cmd.arg("--strict");
        }
        eprintln!("worker {k}: {device}");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting worker {k} ({device}): '{}'", exe.display()))?;
        children.push((k, *device, child));
    }
    let mut failed = Vec::new();
    for (k, device, mut child) in children {
        let status = child
            .wait()
            .with_context(|| format!("waiting for worker {k} ({device})"))?;
        if !status.success() {
            failed.push(format!("worker {k} ({device}): {status}"));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} workers failed ({}); the finished jobs are kept in '{}': rerun with --resume",
            failed.len(),
            devices.len(),
            failed.join("; "),
            out.display()
        );
    }
    let store = RunStore::open(out)?;
    let plan = store.plan()?;
    let done = plan.jobs.iter().filter(|j| store.is_done(&j.id())).count();
    println!(
        "{} workers ({}): {done} of {} jobs done; rows in '{}'",
        devices.len(),
        devices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        plan.jobs.len(),
        out.join("results.csv").display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn merge_run(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let merged = merge::<ImageRow>(&args.shards, &args.out, args.partial)?;
    for shard in &args.shards {
        let oracle = shard.join("oracle.json");
        let to = args.out.join("oracle.json");
        if oracle.is_file() && !to.is_file() {
            let bytes = std::fs::read(&oracle)
                .with_context(|| format!("reading '{}'", oracle.display()))?;
            crate::sweep::write_file_atomic(&to, &bytes)?;
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

/// The per-subject shared work a list of jobs needs.
struct SharedWork {
    jobs: usize,
    subjects: usize,
    /// Null-text inversions (with their reference palettes): one per subject and guided method.
    inversions: usize,
    /// Layout templates: one per subject, prompt and seed of a guided job.
    templates: usize,
}

fn shared_work(exp: &Experiment, jobs: &[&dreambench::Job]) -> SharedWork {
    use std::collections::BTreeSet;
    let guided = |j: &&&dreambench::Job| exp.method(&j.method).is_some_and(|m| m.pick_and_draw);
    SharedWork {
        jobs: jobs.len(),
        subjects: jobs
            .iter()
            .map(|j| &j.subject)
            .collect::<BTreeSet<_>>()
            .len(),
        inversions: jobs
            .iter()
            .filter(guided)
            .map(|j| (&j.subject, &j.method))
            .collect::<BTreeSet<_>>()
            .len(),
        templates: jobs
            .iter()
            .filter(guided)
            .map(|j| (&j.subject, j.prompt_index, j.seed))
            .collect::<BTreeSet<_>>()
            .len(),
    }
}

/// What a dry run prints: job counts per method, the per-subject shared work, the shared work of
/// each shard (when sharded), the first job ids.
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
            "  layout templates: {} distinct (subject × prompt × seed, shared by the guided methods)",
            subjects.len() * exp.prompt_indices().len() * exp.seeds.len()
        );
    }
    if shard.count > 1 {
        let _ = writeln!(
            s,
            "shards (a subject's jobs stay together, so its shared work is done in one or two shards):"
        );
        for index in 0..shard.count {
            let this = Shard {
                index,
                count: shard.count,
            };
            let work = shared_work(exp, &this.select(&plan.jobs));
            let mark = if this == shard { "  <- this shard" } else { "" };
            let _ = writeln!(
                s,
                "  {this}: {} jobs, {} subjects, {} inversions, {} layout templates{mark}",
                work.jobs, work.subjects, work.inversions, work.templates
            );
        }
    }
    let _ = writeln!(s, "first jobs:");
    for j in selected.iter().take(5) {
        let _ = writeln!(s, "  {}", j.id());
    }
    s
}

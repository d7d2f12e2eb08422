//! `pnd eval IMAGES --name METHOD [--protocol NAME|FILE] [--out RUN_DIR] [--data DIR]`: scores the
//! images another program made, under one of the harness' protocols, into a run folder that
//! `pnd report` and `pnd merge` treat like a sweep's.
//!
//! IMAGES is a folder laid out as `<subject>/<prompt index>-s<seed>.<png|jpg>`, or a manifest CSV
//! (`subject,prompt_index,seed,path[,prompt]`). The expected set is `--subjects` × `--prompts` ×
//! `--seeds` (default: every subject, every prompt, the seeds found); missing and extra images are
//! listed (and written to `missing.csv` and `extra.csv` in the run folder), the rest is scored,
//! and the report states the coverage. The run is an experiment with one method of baseline
//! `images` whose manifest (`images.csv` in the run folder) names the file of each job.

use crate::commands::sweep::{open_run, plan_with_provenance};
use crate::experiment::{Baseline, Experiment, Generation, MethodSpec, MetricProtocol, Models};
use crate::jobs::images::{check_readable, read_manifest, scan_folder, ImageEntry};
use crate::jobs::{validate_with, DreamBenchJobs};
use crate::progress::ProgressMode;
use crate::runtime::{DeviceArgs, Runtime, RuntimeConfig};
use crate::sweep::{parse_toml, run_jobs_with, write_file_atomic, RunOptions, Shard};
use anyhow::{bail, Context};
use clap::Args;
use dreambench::Job;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A folder laid out as <subject>/<prompt index>-s<seed>.<png|jpg>, or a manifest CSV with
    /// the columns subject,prompt_index,seed,path[,prompt] (paths relative to the manifest).
    pub images: PathBuf,
    /// The method's name in tables and job ids (lowercase letters, digits, '-', '+', '_').
    #[arg(long)]
    pub name: String,
    /// How tables and plots name the method (default: the name).
    #[arg(long)]
    pub label: Option<String>,
    /// The method the report compares this one with, pair by pair (delta, bootstrap interval,
    /// permutation p, arrow, grid), e.g. the harness' `dreambooth` when these images are another
    /// program's guided DreamBooth; it may be in another run of the same `pnd report`.
    #[arg(long)]
    pub compare_to: Option<String>,
    /// The metric protocol: a name (configs/protocol/NAME.toml, looked up from the current
    /// folder upward), a protocol file, or `all`: every profile of that folder, each into
    /// RUN_DIR/<profile> with one shared embedding cache, side by side in RUN_DIR/report.
    #[arg(long, default_value = "dreambooth")]
    pub protocol: String,
    /// Run folder (default: results/runs/eval-<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The DreamBench folder (default: the protocol's `[metrics] data`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Expected subjects, comma-separated (default: all 30).
    #[arg(long, value_delimiter = ',')]
    pub subjects: Option<Vec<String>>,
    /// Expected prompt indices, comma-separated (default: all 25).
    #[arg(long, value_delimiter = ',')]
    pub prompts: Option<Vec<usize>>,
    /// Expected seeds, comma-separated (default: the seeds of the images found).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// DINO model replacing the protocol's: a local `ViTModel` folder or a Hugging Face repo id
    /// (a local copy of the same weights, a tiny model); recorded in the run's plan.
    #[arg(long)]
    pub dino: Option<String>,
    /// CLIP model replacing the protocol's (as --dino).
    #[arg(long)]
    pub clip: Option<String>,
    /// Embedding cache (default: RUN_DIR/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Continue a run folder that already has results.
    #[arg(long)]
    pub resume: bool,
    /// Fail when the oracle gate fails (see `pnd report --strict`).
    #[arg(long)]
    pub strict: bool,
    /// Score what can be scored: an image that does not decode, or a job that fails, is recorded
    /// in RUN_DIR/failures.csv and the run goes on (default: one error before anything is
    /// written, naming every unreadable image).
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The input side of the metric models (DINO ViT-S/16, CLIP ViT-B/32): a smaller image is
/// upscaled before it is scored.
const METRIC_INPUT: u32 = 224;

/// The shipped profiles, built into the binary for a run outside a checkout (no `configs/` to
/// find): `--protocol NAME` and `--protocol all` work from any folder. A `configs/protocol` folder
/// found from the current folder upward wins.
pub const BUILTIN_PROFILES: [(&str, &str); 4] = [
    (
        "dreambooth",
        include_str!("../../../../configs/protocol/dreambooth.toml"),
    ),
    (
        "custom-diffusion",
        include_str!("../../../../configs/protocol/custom-diffusion.toml"),
    ),
    (
        "dreambench-plus",
        include_str!("../../../../configs/protocol/dreambench-plus.toml"),
    ),
    (
        "torchmetrics",
        include_str!("../../../../configs/protocol/torchmetrics.toml"),
    ),
];

fn builtin_profile(name: &str) -> Option<&'static str> {
    BUILTIN_PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// A protocol file: its `[metrics]` table is what scoring uses; its other tables (the generation
/// settings a profile pins for sweeps) do not concern images made elsewhere, and are skipped.
#[derive(serde::Deserialize)]
struct ProtocolFile {
    metrics: Option<MetricProtocol>,
}

/// The metric protocol of `--protocol`: a file path, or a name looked up as
/// `configs/protocol/NAME.toml` in `from` and its parents (the built-in profile of that name when
/// none is found, [`BUILTIN_PROFILES`]). Returns where it came from and the protocol.
pub fn load_protocol(spec: &str, from: &Path) -> anyhow::Result<(String, MetricProtocol)> {
    let as_path = Path::new(spec);
    let (source, text) = if as_path.is_file() {
        let text = std::fs::read_to_string(as_path)
            .with_context(|| format!("reading protocol '{spec}'"))?;
        (spec.to_string(), text)
    } else if spec.contains('/') || spec.contains('\\') || spec.ends_with(".toml") {
        bail!("protocol file '{spec}' does not exist");
    } else {
        let rel = Path::new("configs/protocol").join(format!("{spec}.toml"));
        let found = from.ancestors().map(|d| d.join(&rel)).find(|p| p.is_file());
        match found {
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading protocol '{}'", p.display()))?;
                (p.display().to_string(), text)
            }
            None => match builtin_profile(spec) {
                Some(text) => (format!("built-in {spec}"), text.into()),
                None => {
                    let known = match all_protocols(from) {
                        Ok(found) => found
                            .into_iter()
                            .map(|(name, _)| name)
                            .collect::<Vec<_>>()
                            .join(", "),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!(
                    "no protocol '{spec}': looked for {} in '{}' and its parents; known: {known} (or `all`, or a protocol file)",
                    rel.display(),
                    from.display()
                )
                }
            },
        }
    };
    let file: ProtocolFile = parse_toml(&text, &source)?;
    let metrics = file
        .metrics
        .with_context(|| format!("protocol '{source}' has no [metrics] table"))?;
    Ok((source, metrics))
}

/// `--protocol all`: the profiles of the `configs/protocol/` folder found in `from` or its
/// parents, by name (file stem), `dreambooth` first, then in name order; without such a folder,
/// the built-in profiles. Each comes with the `--protocol` value that loads it (its file, or its
/// name for a built-in one).
pub fn all_protocols(from: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let rel = Path::new("configs/protocol");
    let Some(dir) = from.ancestors().map(|d| d.join(rel)).find(|p| p.is_dir()) else {
        return Ok(BUILTIN_PROFILES
            .iter()
            .map(|(n, _)| (n.to_string(), n.to_string()))
            .collect());
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing '{}'", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            found.push((name, path.display().to_string()));
        }
    }
    found.sort_by_key(|(name, _)| (name != "dreambooth", name.clone()));
    if found.is_empty() {
        bail!("--protocol all: no profile (*.toml) in '{}'", dir.display());
    }
    Ok(found)
}

/// The images found, split against the expected set.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    /// Images of expected jobs: these are scored.
    pub present: Vec<ImageEntry>,
    /// Expected jobs without an image.
    pub missing: Vec<Job>,
    /// Images outside the expected set: listed, not scored.
    pub extra: Vec<ImageEntry>,
    pub expected: usize,
}

/// Splits `entries` against the expected jobs of `method` (`subjects` × `prompts` × `seeds`).
pub fn coverage(
    method: &str,
    entries: Vec<ImageEntry>,
    subjects: &[String],
    prompts: &[usize],
    seeds: &[u64],
) -> Coverage {
    let mut cov = Coverage {
        expected: subjects.len() * prompts.len() * seeds.len(),
        ..Default::default()
    };
    let mut have = BTreeSet::new();
    for e in entries {
        if subjects.contains(&e.subject)
            && prompts.contains(&e.prompt_index)
            && seeds.contains(&e.seed)
        {
            have.insert((e.subject.clone(), e.prompt_index, e.seed));
            cov.present.push(e);
        } else {
            cov.extra.push(e);
        }
    }
    for s in subjects {
        for &p in prompts {
            for &seed in seeds {
                if !have.contains(&(s.clone(), p, seed)) {
                    cov.missing.push(Job {
                        method: method.into(),
                        subject: s.clone(),
                        prompt_index: p,
                        seed,
                    });
                }
            }
        }
    }
    cov
}

fn list<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    let mut v: Vec<String> = items.iter().take(10).map(show).collect();
    if items.len() > 10 {
        v.push(format!("... ({} more)", items.len() - 10));
    }
    v.join(", ")
}

/// The expected subjects and prompts of the arguments, checked.
fn expected_sets(
    args: &EvalArgs,
    found: &[ImageEntry],
) -> anyhow::Result<(Vec<String>, Vec<usize>, Vec<u64>)> {
    use crate::lists::check_unique;
    let unique = |r: Result<(), String>| r.map_err(anyhow::Error::msg);
    let subjects = match &args.subjects {
        Some(list) => {
            unique(check_unique("--subjects", "subject", list))?;
            for s in list {
                if dreambench::subject(s).is_none() {
                    bail!("--subjects: unknown subject '{s}' (see `pnd dataset list`)");
                }
            }
            list.clone()
        }
        None => dreambench::SUBJECTS
            .iter()
            .map(|s| s.name.to_string())
            .collect(),
    };
    let prompts = match &args.prompts {
        Some(list) => {
            unique(check_unique("--prompts", "prompt", list))?;
            if let Some(p) = list.iter().find(|p| **p >= 25) {
                bail!("--prompts: prompt index {p} out of range 0..25");
            }
            list.clone()
        }
        None => (0..25).collect(),
    };
    let seeds = match &args.seeds {
        Some(list) => {
            unique(check_unique("--seeds", "seed", list))?;
            list.clone()
        }
        None => found
            .iter()
            .map(|e| e.seed)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    Ok((subjects, prompts, seeds))
}

fn write_manifest(path: &Path, entries: &[ImageEntry]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["subject", "prompt_index", "seed", "path", "prompt"])?;
    for e in entries {
        let abs = std::path::absolute(&e.path)
            .with_context(|| format!("resolving '{}'", e.path.display()))?;
        w.write_record([
            e.subject.clone(),
            e.prompt_index.to_string(),
            e.seed.to_string(),
            abs.display().to_string(),
            e.prompt.clone().unwrap_or_default(),
        ])?;
    }
    write_file_atomic(path, &w.into_inner()?)?;
    Ok(())
}

/// What `pnd eval` did.
pub struct EvalOutput {
    pub run_dir: PathBuf,
    pub coverage: Coverage,
    pub report: crate::report::ReportOutput,
    /// Jobs that failed under `--keep-going` (listed in `failures.csv`).
    pub failed: usize,
}

/// Runs `pnd eval`: finds the images, scores those of the expected set into the run folder,
/// writes the report.
pub fn eval(args: &EvalArgs) -> anyhow::Result<EvalOutput> {
    if !dreambench::jobs::valid_name(&args.name) {
        bail!(
            "--name '{}': lowercase letters, digits, '-', '+', '_' (no '__')",
            args.name
        );
    }
    let cwd = std::env::current_dir()?;
    let (protocol_source, mut metrics) = load_protocol(&args.protocol, &cwd)?;
    if let Some(data) = &args.data {
        metrics.data = data.display().to_string();
    }
    if let Some(dino) = &args.dino {
        metrics.dino = dino.clone();
    }
    if let Some(clip) = &args.clip {
        metrics.clip = clip.clone();
    }
    let found = if args.images.is_file() {
        read_manifest(&args.images)?
    } else if args.images.is_dir() {
        scan_folder(&args.images)?.entries
    } else if !args.images.exists() {
        bail!(
            "'{}' does not exist (a folder of images or a manifest CSV)",
            args.images.display()
        );
    } else {
        bail!(
            "'{}' is neither a folder of images nor a manifest CSV",
            args.images.display()
        );
    };
    let (subjects, prompts, seeds) = expected_sets(args, &found)?;
    let cov = coverage(&args.name, found, &subjects, &prompts, &seeds);
    eprintln!(
        "eval '{}': {} image(s) of {} expected ({:.1}% coverage), {} missing, {} extra (not scored)",
        args.name,
        cov.present.len(),
        cov.expected,
        100.0 * cov.present.len() as f64 / cov.expected.max(1) as f64,
        cov.missing.len(),
        cov.extra.len()
    );
    if !cov.missing.is_empty() {
        eprintln!("missing: {}", list(&cov.missing, |j| j.id().0));
    }
    if !cov.extra.is_empty() {
        eprintln!(
            "extra (outside --subjects/--prompts/--seeds): {}",
            list(&cov.extra, |e| e.path.display().to_string())
        );
    }
    if cov.present.is_empty() {
        bail!(
            "none of the {} image(s) of '{}' is in the expected set (subjects {}, prompts {}, seeds {:?})",
            cov.extra.len(),
            args.images.display(),
            list(&subjects, String::clone),
            list(&prompts, usize::to_string),
            seeds
        );
    }
    // Every image decodes before the run folder is touched (a corrupt body would otherwise stop
    // the run partway). Under --keep-going the images that do not decode are left out of the
    // manifest (so that the experiment validates) and their jobs recorded as failed.
    let mut undecoded: Vec<(ImageEntry, String)> = Vec::new();
    let mut small = Vec::new();
    for e in &cov.present {
        match check_readable(&e.path) {
            Ok((w, h)) if w.min(h) < METRIC_INPUT => {
                small.push(format!("'{}' ({w}x{h})", e.path.display()))
            }
            Ok(_) => {}
            Err(err) => undecoded.push((e.clone(), crate::error_chain(&err))),
        }
    }
    if !small.is_empty() {
        eprintln!(
            "warning: {} image(s) smaller than the metric models' {METRIC_INPUT}x{METRIC_INPUT} input are upscaled to it for scoring: {}",
            small.len(),
            list(&small, String::clone)
        );
    }
    if !undecoded.is_empty() {
        let errors: Vec<&str> = undecoded.iter().map(|(_, e)| e.as_str()).collect();
        if !args.keep_going {
            bail!(
                "{} of {} image(s) do not decode, nothing written (pass --keep-going to score the rest): {}",
                undecoded.len(),
                cov.present.len(),
                errors.join("; ")
            );
        }
        eprintln!(
            "warning: {} image(s) do not decode; their jobs fail (failures.csv): {}",
            undecoded.len(),
            errors.join("; ")
        );
    }
    let scorable: Vec<ImageEntry> = cov
        .present
        .iter()
        .filter(|e| !undecoded.iter().any(|(u, _)| u.key() == e.key()))
        .cloned()
        .collect();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("results/runs").join(format!("eval-{}", args.name)));
    if out.join("rows").is_dir()
        && std::fs::read_dir(out.join("rows"))?.next().is_some()
        && !args.resume
    {
        bail!(
            "run folder '{}' already has results: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating '{}'", out.display()))?;
    let out = out.canonicalize()?;
    let manifest = out.join("images.csv");
    write_manifest(&manifest, &scorable)?;
    let mut missing = csv::Writer::from_writer(Vec::new());
    missing.write_record(["subject", "prompt_index", "seed"])?;
    for j in &cov.missing {
        missing.write_record([
            j.subject.clone(),
            j.prompt_index.to_string(),
            j.seed.to_string(),
        ])?;
    }
    write_file_atomic(&out.join("missing.csv"), &missing.into_inner()?)?;
    write_manifest(&out.join("extra.csv"), &cov.extra)?;

    let exp = Experiment {
        name: format!("eval-{}", args.name),
        description: Some(format!(
            "pnd eval of '{}' under protocol {protocol_source}",
            args.images.display()
        )),
        subjects: Some(subjects),
        prompts: Some(prompts),
        seeds,
        methods: vec![MethodSpec {
            name: args.name.clone(),
            baseline: Baseline::Images,
            label: args.label.clone(),
            pick_and_draw: false,
            prompt_style: None,
            guidance: toml::Table::new(),
            images: Some(manifest.display().to_string()),
            compare_to: args.compare_to.clone(),
        }],
        models: Models::default(),
        generation: Generation::default(),
        metrics,
        runtime: RuntimeConfig {
            device: args.device.device,
            dtype: None,
            batch: None,
        },
        guidance: toml::Table::new(),
    };
    validate_with(&exp, true)?;
    let cache = args.cache.clone().unwrap_or_else(|| out.join("cache"));
    let runtime = Runtime::open(&exp.runtime)?;
    eprintln!("{}", runtime.describe());
    let mut plan = plan_with_provenance(&exp, &cache, &runtime.record())?;
    if let Some(p) = plan.provenance.as_mut() {
        // The images were made elsewhere: no generation settings of this run made them.
        p.protocol["generation"] = serde_json::Value::Null;
        p.protocol["source"] = protocol_source.clone().into();
    }
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
    let present: BTreeSet<(String, usize, u64)> = scorable.iter().map(ImageEntry::key).collect();
    let mut undecoded_failed = 0;
    if !undecoded.is_empty() {
        let _lock = store.lock_folder()?;
        let mut failures = store.failures()?;
        for (e, error) in &undecoded {
            let id = Job {
                method: args.name.clone(),
                subject: e.subject.clone(),
                prompt_index: e.prompt_index,
                seed: e.seed,
            }
            .id();
            if store.is_done(&id) {
                continue; // scored before (--resume): its row stands
            }
            undecoded_failed += 1;
            failures.retain(|f| f.id != id.0);
            failures.push(crate::sweep::Failure {
                id: id.0,
                error: error.clone(),
            });
        }
        store.write_failures(&failures)?;
    }
    let jobs: Vec<Job> = plan
        .jobs
        .iter()
        .filter(|j| present.contains(&(j.subject.clone(), j.prompt_index, j.seed)))
        .cloned()
        .collect();
    let options = RunOptions {
        progress: ProgressMode::detect(true),
        keep_going: args.keep_going,
    };
    let summary = run_jobs_with(&store, &jobs, Shard::ALL, &mut runner, options)?;
    // Two evals on one folder write the report one after the other (its plots are not written
    // atomically).
    let _report_lock = crate::sweep::claim::claim(&out.join("claims").join("report.lock"))?;
    let report = crate::report::write_report_with(
        std::slice::from_ref(&out),
        None,
        &crate::report::ReportOptions {
            strict: args.strict,
        },
    )?;
    Ok(EvalOutput {
        run_dir: out,
        coverage: cov,
        report,
        failed: summary.failed.len() + undecoded_failed,
    })
}

/// What `pnd eval --protocol all` did: one run per profile, and the side-by-side report.
pub struct EvalAllOutput {
    pub run_dir: PathBuf,
    pub runs: Vec<crate::report::protocols::ProfileRun>,
    /// `protocols.md`, `protocols.csv`, `index.html` in RUN_DIR/report.
    pub files: Vec<PathBuf>,
    pub markdown: String,
    /// With `--keep-going`: the profiles that failed, with their errors (the others ran).
    pub failed: Vec<(String, String)>,
}

/// `pnd eval --protocol all`: scores the images under every profile of `configs/protocol/`, each
/// into its own run folder `RUN_DIR/<profile>` (a complete run that `pnd report` and `pnd merge`
/// take), all with one embedding cache (RUN_DIR/cache or `--cache`): a (model, preprocessing)
/// that several profiles share is embedded once. The oracle gate applies under `dreambooth` only
/// (see [`crate::report::gate`]). The profiles are then reported side by side in RUN_DIR/report.
pub fn eval_all(args: &EvalArgs) -> anyhow::Result<EvalAllOutput> {
    if !dreambench::jobs::valid_name(&args.name) {
        bail!(
            "--name '{}': lowercase letters, digits, '-', '+', '_' (no '__')",
            args.name
        );
    }
    let profiles = all_protocols(&std::env::current_dir()?)?;
    let root = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("results/runs").join(format!("eval-{}", args.name)));
    let cache = args.cache.clone().unwrap_or_else(|| root.join("cache"));
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for (profile, spec) in profiles {
        eprintln!("\n== protocol '{profile}' ({spec})");
        let mut one = args.clone();
        one.protocol = spec;
        one.out = Some(root.join(&profile));
        one.cache = Some(cache.clone());
        let out = match eval(&one).with_context(|| format!("under protocol '{profile}'")) {
            Ok(out) => out,
            // --keep-going: a profile that fails (its model missing, say) does not stop the
            // others; it is listed at the end and the exit status is a failure.
            Err(e) if args.keep_going => {
                let msg = crate::error_chain(&e);
                eprintln!("error: {msg} (going on with the next profile: --keep-going)");
                failed.push((profile, msg));
                continue;
            }
            Err(e) => return Err(e),
        };
        if out.failed > 0 {
            failed.push((profile.clone(), format!("{} failed jobs", out.failed)));
        }
        runs.push(crate::report::protocols::ProfileRun {
            profile,
            run_dir: out.run_dir,
            report: out.report,
        });
    }
    anyhow::ensure!(
        !runs.is_empty(),
        "no profile could be scored: {}",
        failed
            .iter()
            .map(|(p, e)| format!("'{p}': {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let root = root.canonicalize()?;
    let title = format!("Protocols side by side: eval of '{}'", args.name);
    let files = crate::report::protocols::write(&root.join("report"), &title, &runs)?;
    Ok(EvalAllOutput {
        run_dir: root,
        markdown: crate::report::protocols::markdown(&runs),
        runs,
        files,
        failed,
    })
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.protocol == "all" {
        let out = eval_all(&args)?;
        println!("\n{}", out.markdown);
        println!(
            "runs in '{}'/<profile>, the profiles side by side in '{}'",
            out.run_dir.display(),
            out.run_dir.join("report").display()
        );
        if !out.failed.is_empty() {
            for (profile, e) in &out.failed {
                eprintln!("failed under protocol '{profile}': {e}");
            }
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = eval(&args)?;
    print!("{}\n{}", out.report.header, out.report.table_markdown);
    println!(
        "\nrows in '{}', report in '{}'",
        out.run_dir.join("results.csv").display(),
        out.report.dir.display()
    );
    if out.failed > 0 {
        println!(
            "{} failed jobs are listed in '{}'; rerun with --resume to retry them",
            out.failed,
            out.run_dir.join("failures.csv").display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subject: &str, p: usize, seed: u64) -> ImageEntry {
        ImageEntry {
            subject: subject.into(),
            prompt_index: p,
            seed,
            path: format!("{subject}/{p}-s{seed}.png").into(),
            prompt: None,
        }
    }

    #[test]
    fn coverage_lists_missing_and_extra_images() {
        let found = vec![
            entry("dog", 0, 0),
            entry("dog", 1, 0),
            entry("cat", 0, 0),
            entry("dog", 0, 7),
        ];
        let cov = coverage("m", found, &["dog".into(), "cat".into()], &[0, 1], &[0]);
        assert_eq!(cov.expected, 4);
        assert_eq!(cov.present.len(), 3);
        let missing: Vec<String> = cov.missing.iter().map(|j| j.id().0).collect();
        assert_eq!(missing, ["m__cat__p01__s0"]);
        assert_eq!(cov.extra, vec![entry("dog", 0, 7)]);
    }

    #[test]
    fn all_protocols_lists_the_profiles_dreambooth_first() {
        let tmp = tempfile::tempdir().unwrap();
        // Outside a checkout: the built-in profiles, each loading by its name.
        let builtin = all_protocols(tmp.path()).unwrap();
        let names: Vec<&str> = builtin.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "dreambooth",
                "custom-diffusion",
                "dreambench-plus",
                "torchmetrics"
            ]
        );
        for (name, spec) in &builtin {
            let (src, m) = load_protocol(spec, tmp.path()).unwrap();
            assert_eq!(src, format!("built-in {name}"));
            assert_eq!(&m.scoring.profile, name);
        }
        let dir = tmp.path().join("configs/protocol");
        std::fs::create_dir_all(&dir).unwrap();
        let e = format!("{:#}", all_protocols(tmp.path()).unwrap_err());
        assert!(e.contains("no profile"), "{e}");
        for f in ["b.toml", "dreambooth.toml", "a.toml", "notes.md"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let nested = tmp.path().join("x/y");
        std::fs::create_dir_all(&nested).unwrap();
        let names: Vec<String> = all_protocols(&nested)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["dreambooth", "a", "b"]);
    }

    #[test]
    fn protocols_are_found_by_name_or_file_and_bad_ones_are_one_error() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a/b");
        std::fs::create_dir_all(&nested).unwrap();
        // Outside a checkout, `dreambooth` is the built-in profile.
        let (src, m) = load_protocol("dreambooth", &nested).unwrap();
        assert_eq!(src, "built-in dreambooth");
        assert_eq!(
            (m.dino.as_str(), m.clip.as_str()),
            ("facebook/dino-vits16", "openai/clip-vit-base-patch32")
        );
        // The repository's profile, found from a folder below it.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (src, shipped) = load_protocol("dreambooth", repo).unwrap();
        assert!(src.ends_with("configs/protocol/dreambooth.toml"), "{src}");
        assert_eq!(shipped, m);
        // A name in configs/protocol/ of a parent folder, and a file.
        std::fs::create_dir_all(tmp.path().join("configs/protocol")).unwrap();
        let file = tmp.path().join("configs/protocol/mine.toml");
        std::fs::write(
            &file,
            "[generation]\nsteps = 5\n[metrics]\ndino = \"d\"\nclip = \"c\"\n",
        )
        .unwrap();
        let (_, mine) = load_protocol("mine", &nested).unwrap();
        assert_eq!((mine.dino.as_str(), mine.clip.as_str()), ("d", "c"));
        assert_eq!(
            load_protocol(file.to_str().unwrap(), &nested).unwrap().1,
            mine
        );
        let e = format!("{:#}", load_protocol("nope", &nested).unwrap_err());
        assert!(
            e.contains("no protocol 'nope'")
                && e.contains("nope.toml")
                && e.contains("known: mine"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load_protocol("x/missing.toml", &nested).unwrap_err()
        );
        assert!(e.contains("does not exist"), "{e}");
        std::fs::write(&file, "[metrics]\ndinoo = \"d\"\n").unwrap();
        let e = format!("{:#}", load_protocol("mine", &nested).unwrap_err());
        assert!(e.contains("mine.toml:2:1") && e.contains("dinoo"), "{e}");
        std::fs::write(&file, "[generation]\nsteps = 5\n").unwrap();
        let e = format!("{:#}", load_protocol("mine", &nested).unwrap_err());
        assert!(e.contains("no [metrics] table"), "{e}");
    }
}

//! `pnd demo`: the whole pipeline offline on built-in tiny models and a built-in mini benchmark
//! (SPEC §1): tiny random-weight Stable Diffusion, DINO and CLIP models, a few procedurally drawn
//! subjects, generation with and without Pick-and-Draw, scoring, the table and the plots.
//! Tiny random models make meaningless numbers: the demo shows that the pipeline works.

pub mod paper;
pub mod subjects;

use crate::commands::sweep::{open_run, plan_with_provenance};
use crate::experiment::Experiment;
use crate::jobs::{validate, DreamBenchJobs};
use crate::report::write_report;
use crate::runtime::{Runtime, RuntimeArgs, RuntimeConfig};
use crate::sweep::{run_jobs, write_file_atomic, Shard};
use anyhow::Context;
use std::path::{Path, PathBuf};
use tiny::{write_tiny_metric_models, write_tiny_model, TinySpec};

/// The CLIP tokenizer folder of the tiny models (they use the real vocabulary): `explicit`, else
/// `../shared/clip-tokenizer` or `shared/clip-tokenizer`, else `openai/clip-vit-base-patch32`'s
/// `vocab.json` + `merges.txt` from the Hugging Face cache (or hub), else the vocabulary built into
/// the binary ([`clip_tokenizer::write_builtin`], the same files) written to `builtin_dir`.
pub fn find_tokenizer(explicit: Option<&Path>, builtin_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(
            p.join("vocab.json").is_file() || p.join("tokenizer.json").is_file(),
            "'{}' holds no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)",
            p.display()
        );
        return Ok(p.into());
    }
    let has_files = |p: &Path| p.join("vocab.json").is_file() && p.join("merges.txt").is_file();
    for dir in ["../shared/clip-tokenizer", "shared/clip-tokenizer"] {
        if has_files(Path::new(dir)) {
            return Ok(dir.into());
        }
    }
    let hub = weights::ModelSource::parse("openai/clip-vit-base-patch32")
        .and_then(|src| Ok((src.file(&["vocab.json"])?, src.file(&["merges.txt"])?)));
    match hub {
        Ok((vocab, merges)) if vocab.parent() == merges.parent() => {
            return Ok(vocab.parent().expect("a file in a folder").into())
        }
        Ok(_) => eprintln!(
            "CLIP tokenizer: the hub cache holds vocab.json and merges.txt of different revisions"
        ),
        Err(e) => eprintln!("CLIP tokenizer: none from the hub ({e})"),
    }
    eprintln!(
        "CLIP tokenizer: using the built-in vocabulary (written to '{}')",
        builtin_dir.display()
    );
    if !has_files(builtin_dir) {
        clip_tokenizer::write_builtin(builtin_dir)?;
    }
    Ok(builtin_dir.into())
}

/// The demo's methods: Stable Diffusion without and with Pick-and-Draw.
pub const DEMO_METHODS: &str = r#"[[methods]]
name = "sd"
baseline = "stable-diffusion"

[[methods]]
name = "sd+pnd"
baseline = "stable-diffusion"
pick_and_draw = true
"#;

/// The demo experiment over the mini benchmark and the tiny models under `root`.
pub fn demo_experiment_toml(root: &Path) -> String {
    let p = |s: &str| root.join(s).display().to_string().replace('\\', "/");
    format!(
        r#"# Written by `pnd demo`: the mini benchmark on tiny random models. The numbers mean nothing.
name = "demo"
description = "Tiny random-weight models on a mini benchmark of three stand-in subjects: the numbers mean nothing. The demo shows that the pipeline runs end to end."
subjects = {subjects:?}
prompts = [0, 20]
seeds = [0]

[models]
base = "{sd}"

[generation]
steps = 20
cfg_scale = 7.5
height = 64
width = 64

[metrics]
data = "{data}"
dino = "{dino}"
clip = "{clip}"

[guidance]
layout_window = [0, 4]
appearance_window = [4, 8]

{DEMO_METHODS}"#,
        subjects = subjects::DEMO_SUBJECTS,
        sd = p("models/sd"),
        data = p("data"),
        dino = p("models/dino"),
        clip = p("models/clip"),
    )
}

/// What the demo wrote.
pub struct DemoOutput {
    pub run_dir: PathBuf,
    pub report_dir: PathBuf,
    pub table_markdown: String,
}

/// Writes what the demo runs on under `root`, where it is missing: the tiny Stable Diffusion
/// (`models/sd`) and metric models (`models/dino`, `models/clip`) and the mini benchmark
/// (`data`). Returns the canonical root and the CLIP tokenizer folder the models were made with.
pub fn demo_inputs(root: &Path, tokenizer: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(root).with_context(|| format!("creating '{}'", root.display()))?;
    let root = root.canonicalize()?;
    let tokenizer = find_tokenizer(tokenizer, &root.join("models/clip-tokenizer"))?;
    let models = root.join("models");
    if !models.join("sd/model_index.json").is_file() {
        eprintln!("demo: writing tiny models to '{}'", models.display());
        write_tiny_model(&models.join("sd"), 0, &tokenizer, &TinySpec::default())?;
    }
    if !models.join("clip/model.safetensors").is_file() {
        write_tiny_metric_models(&models, &tokenizer, 0)?;
    }
    if !root.join("data").is_dir() {
        subjects::write_mini_benchmark(&root.join("data"), 3, 128)?;
    }
    Ok((root, tokenizer))
}

/// Runs the demo into `root` (models, data, run, report). Rerunning resumes.
pub fn run_demo(
    root: &Path,
    tokenizer: Option<&Path>,
    progress: bool,
    runtime: &RuntimeArgs,
) -> anyhow::Result<DemoOutput> {
    // The device first (the demo experiment has no `[runtime]` table, so the flags alone decide
    // it): a GPU that does not answer is one error before anything is written.
    let requested = runtime.over(&RuntimeConfig::default());
    let opened = Runtime::open(&requested)?;
    let (root, _) = demo_inputs(root, tokenizer)?;
    let exp_path = root.join("demo.toml");
    write_file_atomic(&exp_path, demo_experiment_toml(&root).as_bytes())?;
    let mut exp = Experiment::load(&exp_path)?;
    // demo.toml was just written without a `[runtime]` table: the flags' runtime, already open.
    exp.runtime = requested;
    validate(&exp)?;
    let runtime = opened;
    eprintln!("demo: {}", runtime.describe());
    let cache = root.join("cache");
    let plan = plan_with_provenance(&exp, &cache, &runtime.record())?;
    let run_dir = root.join("run");
    let store = open_run(&run_dir, &plan)?;
    let mut runner = DreamBenchJobs::with_runtime(exp.clone(), &cache, runtime)?;
    runner.write_oracle(&run_dir)?;
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, progress)?;
    let report = write_report(&run_dir, None)?;
    Ok(DemoOutput {
        run_dir,
        report_dir: report.dir,
        table_markdown: report.table_markdown,
    })
}

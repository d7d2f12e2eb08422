//! `pnd demo --paper`: the paper's figures end to end on tiny models. The shipped Table 1 and
//! ablation experiments' methods (`experiments/table1.toml`, `ablation-losses.toml`,
//! `ablation-emd.toml`: every baseline with and without Pick-and-Draw, the loss components, EMD
//! against UREMD) run on tiny random models (Stable Diffusion, a "DreamBooth" model per subject
//! that is another tiny model, a tiny Textual Inversion vector per subject, tiny
//! BLIP-Diffusion) over a few cells of the mini benchmark; then the figures of
//! `experiments/figures/paper.toml`, their rows moved onto those cells (columns, titles and
//! captions as shipped), are drawn from the three runs. The images mean nothing: this shows that
//! the figure file, the experiments' method names and `pnd figures` fit together.

use crate::commands::sweep::{open_run, plan_with_provenance};
use crate::experiment::Experiment;
use crate::figures::spec::{FigureFile, RowSpec, SpecSource};
use crate::jobs::{validate, DreamBenchJobs};
use crate::runtime::{Runtime, RuntimeArgs, RuntimeConfig};
use crate::sweep::{run_jobs, write_file_atomic, Shard};
use anyhow::Context;
use std::path::{Path, PathBuf};
use tiny::{write_tiny_embedding, write_tiny_metric_models, write_tiny_model, TinySpec};
use toml::Spanned;

/// The shipped figure file and the experiments whose method names it uses.
pub const PAPER_FIGURES: &str = include_str!("../../../../experiments/figures/paper.toml");
pub const EXPERIMENTS: [(&str, &str); 3] = [
    (
        "table1",
        include_str!("../../../../experiments/table1.toml"),
    ),
    (
        "ablation-losses",
        include_str!("../../../../experiments/ablation-losses.toml"),
    ),
    (
        "ablation-emd",
        include_str!("../../../../experiments/ablation-emd.toml"),
    ),
];

/// The cells of the tiny runs (subject, prompt index, seed): a live subject and an object of the
/// mini benchmark, a context prompt and a property prompt. Each run is the product of these
/// subjects, prompts and seeds.
pub const CELLS: [(&str, usize, u64); 4] = [
    ("dog", 0, 0),
    ("teapot", 20, 0),
    ("dog", 20, 0),
    ("teapot", 0, 0),
];

/// The shipped figures with their rows moved onto `cells` (in order, as many as each figure has
/// rows, at most all cells): columns, titles, captions and sizes stay as shipped.
pub fn on_cells(file: &FigureFile, cells: &[(&str, usize, u64)]) -> FigureFile {
    let mut out = file.clone();
    for fig in &mut out.figures {
        let n = fig.rows.len().min(cells.len());
        fig.rows = cells[..n]
            .iter()
            .map(|&(s, p, seed)| RowSpec {
                subject: Spanned::new(0..0, s.to_string()),
                prompt: Spanned::new(0..0, p),
                seed,
                label: None,
            })
            .collect();
    }
    out
}

/// The tiny experiment of one shipped experiment: its name and methods over the tiny models,
/// the mini benchmark's `cells`, few steps and a small size.
pub fn tiny_experiment(shipped: &str, root: &Path) -> anyhow::Result<String> {
    let table: toml::Table = toml::from_str(shipped).context("parsing a shipped experiment")?;
    let p = |s: &str| root.join(s).display().to_string().replace('\\', "/");
    let mut subjects: Vec<&str> = CELLS.iter().map(|c| c.0).collect();
    let mut prompts: Vec<usize> = CELLS.iter().map(|c| c.1).collect();
    let mut seeds: Vec<u64> = CELLS.iter().map(|c| c.2).collect();
    for v in [&mut subjects] {
        v.sort();
        v.dedup();
    }
    prompts.sort();
    prompts.dedup();
    seeds.sort();
    seeds.dedup();
    let base = format!(
        r#"subjects = {subjects:?}
prompts = {prompts:?}
seeds = {seeds:?}

[models]
base = "{sd}"
dreambooth = "{db}/{{subject}}"
textual_inversion = "{ti}/{{subject}}/learned_embeds.safetensors"
blip_diffusion = "{blip}"

[generation]
steps = 6
height = 64
width = 64

[metrics]
data = "{data}"
dino = "{dino}"
clip = "{clip}"

[guidance]
layout_window = [0, 2]
appearance_window = [2, 4]
"#,
        sd = p("models/sd"),
        db = p("models/dreambooth"),
        ti = p("models/textual-inversion"),
        blip = p("models/blip"),
        data = p("data"),
        dino = p("models/dino"),
        clip = p("models/clip"),
    );
    let mut tiny: toml::Table = toml::from_str(&base).expect("the tiny settings parse");
    for key in ["name", "methods"] {
        let v = table
            .get(key)
            .with_context(|| format!("a shipped experiment has no `{key}`"))?;
        tiny.insert(key.into(), v.clone());
    }
    Ok(format!(
        "# Written by `pnd demo --paper`: the shipped experiment's methods on tiny random models.\n{}",
        toml::to_string(&tiny)?
    ))
}

/// What `pnd demo --paper` wrote.
pub struct PaperDemo {
    pub runs: Vec<PathBuf>,
    pub spec: PathBuf,
    pub figures: Vec<crate::figures::Written>,
}

/// Writes the tiny models, runs the three experiments into `root/runs/<name>` and draws the
/// figures into `root/figures` (the figure file as used: `root/figures.toml`). Rerunning resumes.
pub fn run_paper_demo(
    root: &Path,
    tokenizer: Option<&Path>,
    progress: bool,
    runtime: &RuntimeArgs,
) -> anyhow::Result<PaperDemo> {
    let requested = runtime.over(&RuntimeConfig::default());
    Runtime::open(&requested)?;
    std::fs::create_dir_all(root).with_context(|| format!("creating '{}'", root.display()))?;
    let root = root.canonicalize()?;
    let tokenizer = super::find_tokenizer(tokenizer, &root.join("models/clip-tokenizer"))?;
    let models = root.join("models");
    let spec = TinySpec::default();
    if !models.join("sd/model_index.json").is_file() {
        eprintln!("demo: writing tiny models to '{}'", models.display());
        write_tiny_model(&models.join("sd"), 0, &tokenizer, &spec)?;
    }
    if !models.join("clip/model.safetensors").is_file() {
        write_tiny_metric_models(&models, &tokenizer, 0)?;
    }
    if !models.join("blip/model_index.json").is_file() {
        tiny::blip::write_tiny_blip_model(
            &models.join("blip"),
            2,
            &tokenizer,
            &tiny::blip::TinyBlipSpec::default(),
        )?;
    }
    let mut subjects: Vec<&str> = CELLS.iter().map(|c| c.0).collect();
    subjects.sort();
    subjects.dedup();
    for (i, s) in subjects.iter().enumerate() {
        // A subject's "DreamBooth model" is another tiny model, so its images and layout
        // template differ from the base model's; its "Textual Inversion vector" a tiny vector.
        let db = models.join("dreambooth").join(s);
        if !db.join("model_index.json").is_file() {
            write_tiny_model(&db, 10 + i as u64, &tokenizer, &spec)?;
        }
        let ti = models
            .join("textual-inversion")
            .join(s)
            .join("learned_embeds.safetensors");
        if !ti.is_file() {
            std::fs::create_dir_all(ti.parent().expect("a folder"))?;
            write_tiny_embedding(&ti, &format!("<{s}>"), 20 + i as u64, &spec)?;
        }
    }
    if !root.join("data").is_dir() {
        super::subjects::write_mini_benchmark(&root.join("data"), 3, 128)?;
    }
    let cache = root.join("cache");
    let mut runs = Vec::new();
    for (name, shipped) in EXPERIMENTS {
        let exp_path = root.join(format!("{name}.toml"));
        write_file_atomic(&exp_path, tiny_experiment(shipped, &root)?.as_bytes())?;
        let mut exp = Experiment::load(&exp_path)?;
        exp.runtime = requested.clone();
        validate(&exp)?;
        let opened = Runtime::open(&requested)?;
        eprintln!(
            "demo --paper: {name} ({} jobs), {}",
            exp.jobs().len(),
            opened.describe()
        );
        let plan = plan_with_provenance(&exp, &cache, &opened.record())?;
        let run_dir = root.join("runs").join(name);
        let store = open_run(&run_dir, &plan)?;
        let mut runner = DreamBenchJobs::with_runtime(exp.clone(), &cache, opened)?;
        runner.write_oracle(&run_dir)?;
        run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, progress)?;
        runs.push(run_dir);
    }
    let shipped = FigureFile::parse(PAPER_FIGURES, "experiments/figures/paper.toml")?;
    let text = format!(
        "# Written by `pnd demo --paper`: experiments/figures/paper.toml with its rows moved onto the\n\
         # cells of the tiny runs (columns, titles and captions as shipped).\n{}",
        on_cells(&shipped, &CELLS).to_toml()
    );
    let spec_path = root.join("figures.toml");
    write_file_atomic(&spec_path, text.as_bytes())?;
    let file = spec_path.display().to_string();
    let figures_spec = FigureFile::parse(&text, &file)?;
    let figures = crate::figures::write_figures_from(
        &runs,
        &figures_spec,
        &SpecSource { file, text },
        &root.join("figures"),
    )?;
    Ok(PaperDemo {
        runs,
        spec: spec_path,
        figures,
    })
}

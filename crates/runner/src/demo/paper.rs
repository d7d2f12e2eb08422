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
use tiny::{write_tiny_embedding, write_tiny_model, TinySpec};
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

/// The tiny experiment of one shipped experiment: its name and methods over the demo's tiny
/// models, data and metric models (`pnd demo`'s experiment), the per-subject models of
/// [`run_paper_demo`], the subjects, prompts and seeds of [`CELLS`], and fewer steps.
pub fn tiny_experiment(shipped: &str, root: &Path) -> anyhow::Result<String> {
    let table: toml::Table = toml::from_str(shipped).context("parsing a shipped experiment")?;
    let p = |s: &str| root.join(s).display().to_string().replace('\\', "/");
    let mut tiny: toml::Table =
        toml::from_str(&super::demo_experiment_toml(root)).expect("the demo experiment parses");
    tiny.remove("description");
    let unique = |v: Vec<toml::Value>| {
        let mut out: Vec<toml::Value> = Vec::new();
        for x in v {
            if !out.contains(&x) {
                out.push(x);
            }
        }
        toml::Value::Array(out)
    };
    let column = |f: fn(&(&str, usize, u64)) -> toml::Value| unique(CELLS.iter().map(f).collect());
    tiny.insert("subjects".into(), column(|c| c.0.into()));
    tiny.insert("prompts".into(), column(|c| (c.1 as i64).into()));
    tiny.insert("seeds".into(), column(|c| (c.2 as i64).into()));
    // Over the demo's settings: the per-subject models, fewer steps, the windows within them.
    let settings = format!(
        "[models]\ndreambooth = \"{}\"\ntextual_inversion = \"{}\"\nblip_diffusion = \"{}\"\n\
         [generation]\nsteps = 6\n\
         [guidance]\nlayout_window = [0, 2]\nappearance_window = [2, 4]\n",
        p("models/dreambooth/{subject}"),
        p("models/textual-inversion/{subject}/learned_embeds.safetensors"),
        p("models/blip"),
    );
    let settings: toml::Table = toml::from_str(&settings).expect("the tiny settings parse");
    crate::experiment::merge(&mut tiny, settings);
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
    let (root, tokenizer) = super::demo_inputs(root, tokenizer)?;
    let models = root.join("models");
    let spec = TinySpec::default();
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

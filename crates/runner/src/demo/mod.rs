//! `pnd demo`: the whole pipeline offline on built-in tiny models and a built-in mini benchmark
//! (SPEC §1): tiny random-weight Stable Diffusion, DINO and CLIP models, a few procedurally drawn
//! subjects, generation with and without Pick-and-Draw, scoring, the table and the plots.
//! Tiny random models make meaningless numbers: the demo shows that the pipeline works.

pub mod subjects;

use crate::bench::{validate, BenchRunner};
use crate::commands::sweep::plan_of;
use crate::experiment::Experiment;
use crate::report::write_report;
use crate::sweep::{run_jobs, write_file_atomic, RunStore, Shard};
use anyhow::Context;
use diffusion::tiny::{make_weights, write_tiny_model, TinySpec};
use std::path::{Path, PathBuf};

/// Where the real CLIP tokenizer is looked for (the tiny models use the real vocabulary).
pub fn find_tokenizer(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(
            p.join("vocab.json").is_file() || p.join("tokenizer.json").is_file(),
            "'{}' holds no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)",
            p.display()
        );
        return Ok(p.into());
    }
    let mut candidates: Vec<PathBuf> = vec![
        "../shared/clip-tokenizer".into(),
        "shared/clip-tokenizer".into(),
    ];
    if let Ok(src) = weights::ModelSource::parse("openai/clip-vit-base-patch32") {
        if let Ok(vocab) = src.file(&["vocab.json"]) {
            if let Some(dir) = vocab.parent() {
                candidates.push(dir.into());
            }
        }
    }
    candidates
        .into_iter()
        .find(|p| p.join("vocab.json").is_file() && p.join("merges.txt").is_file())
        .context("no CLIP tokenizer found: pass --tokenizer DIR (a folder with vocab.json and merges.txt, e.g. from openai/clip-vit-base-patch32)")
}

fn save_tensors(
    path: &Path,
    tensors: std::collections::BTreeMap<String, candle_core::Tensor>,
) -> anyhow::Result<()> {
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing '{}'", path.display()))
}

/// Tiny DINO (ViT, HF `ViTModel` layout) and CLIP (HF `CLIPModel` layout) folders, seeded.
pub fn write_tiny_metric_models(
    dir: &Path,
    tokenizer: &Path,
    seed: u64,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dino = dir.join("dino");
    let clip = dir.join("clip");
    std::fs::create_dir_all(&dino)?;
    std::fs::create_dir_all(&clip)?;
    let vit_json = serde_json::json!({
        "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": true
    });
    write_file_atomic(
        &dino.join("config.json"),
        serde_json::to_string_pretty(&vit_json)?.as_bytes(),
    )?;
    let vit_cfg: metrics::vit::VitConfig = serde_json::from_value(vit_json)?;
    save_tensors(
        &dino.join("model.safetensors"),
        make_weights(seed, |vb| metrics::vit::Vit::new(&vit_cfg, vb))?,
    )?;

    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(tokenizer.join("vocab.json"))
            .context("reading the tokenizer's vocab.json")?,
    )?;
    let clip_json = serde_json::json!({
        "model_type": "clip", "projection_dim": 16,
        "text_config": {"vocab_size": vocab.len(), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": 49407},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    });
    write_file_atomic(
        &clip.join("config.json"),
        serde_json::to_string_pretty(&clip_json)?.as_bytes(),
    )?;
    let clip_cfg: metrics::clip::ClipConfig = serde_json::from_value(clip_json)?;
    let tensors = make_weights(seed.wrapping_add(1), |vb| {
        metrics::clip::ClipVision::new(&clip_cfg, vb.clone())?;
        metrics::clip::ClipText::new(&clip_cfg, vb)
    })?;
    save_tensors(&clip.join("model.safetensors"), tensors)?;
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if tokenizer.join(f).is_file() {
            std::fs::copy(tokenizer.join(f), clip.join(f))
                .with_context(|| format!("copying tokenizer file {f}"))?;
        }
    }
    Ok((dino, clip))
}

/// The demo experiment over the mini benchmark and the tiny models under `root`.
pub fn demo_experiment_toml(root: &Path) -> String {
    let p = |s: &str| root.join(s).display().to_string().replace('\\', "/");
    format!(
        r#"# Written by `pnd demo`: the mini benchmark on tiny random models. The numbers mean nothing.
name = "demo"
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

[[methods]]
name = "sd"
baseline = "stable-diffusion"

[[methods]]
name = "sd+pnd"
baseline = "stable-diffusion"
pick_and_draw = true
"#,
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

/// Runs the demo into `root` (models, data, run, report). Rerunning resumes.
pub fn run_demo(
    root: &Path,
    tokenizer: Option<&Path>,
    progress: bool,
) -> anyhow::Result<DemoOutput> {
    std::fs::create_dir_all(root).with_context(|| format!("creating '{}'", root.display()))?;
    let root = root.canonicalize()?;
    let tokenizer = find_tokenizer(tokenizer)?;
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
    let exp_path = root.join("demo.toml");
    write_file_atomic(&exp_path, demo_experiment_toml(&root).as_bytes())?;
    let exp = Experiment::load(&exp_path)?;
    validate(&exp)?;
    let plan = plan_of(&exp)?;
    let run_dir = root.join("run");
    let store = RunStore::create(&run_dir, &plan)?;
    let mut runner = BenchRunner::new(exp.clone(), &root.join("cache"))?;
    if !run_dir.join("oracle.json").is_file() {
        let oracle = runner.oracle()?;
        write_file_atomic(
            &run_dir.join("oracle.json"),
            serde_json::to_string_pretty(&oracle)?.as_bytes(),
        )?;
    }
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, progress)?;
    let report = write_report(&run_dir, None)?;
    Ok(DemoOutput {
        run_dir,
        report_dir: report.dir,
        table_markdown: report.table_markdown,
    })
}

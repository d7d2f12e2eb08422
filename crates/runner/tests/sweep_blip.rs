//! A BLIP-Diffusion row through the sweep on tiny models: generated, scored, reported.

use runner::commands::sweep::plan_of;
use runner::demo::subjects::write_mini_benchmark;
use runner::experiment::Experiment;
use runner::jobs::{validate, DreamBenchJobs};
use runner::report::rows::ImageRow;
use runner::sweep::{run_jobs, RunStore, Shard};
use std::path::Path;
use tiny::blip::{write_tiny_blip_model, TinyBlipSpec};
use tiny::write_tiny_metric_models;

#[test]
fn blip_diffusion_rows_are_generated_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The vocabulary built into pnd: no tokenizer files needed.
    let tokenizer = root.join("clip-tokenizer");
    clip_tokenizer::write_builtin(&tokenizer).unwrap();
    write_tiny_blip_model(&root.join("blip"), 0, &tokenizer, &TinyBlipSpec::default()).unwrap();
    write_tiny_metric_models(&root.join("models"), &tokenizer, 0).unwrap();
    write_mini_benchmark(&root.join("data"), 2, 64).unwrap();
    let p = |s: &str| root.join(s).display().to_string();
    let text = format!(
        "name = \"blip\"\nsubjects = [\"dog\"]\nprompts = [0]\nseeds = [0]\n[models]\nblip_diffusion = \"{}\"\n\
         [generation]\nsteps = 4\nheight = 64\nwidth = 64\n[metrics]\ndata = \"{}\"\ndino = \"{}\"\nclip = \"{}\"\n\
         [[methods]]\nname = \"blip\"\nbaseline = \"blip-diffusion\"\n",
        p("blip"),
        p("data"),
        p("models/dino"),
        p("models/clip")
    );
    let exp = Experiment::parse(&text, "blip.toml").unwrap();
    validate(&exp).unwrap();
    let plan = plan_of(&exp).unwrap();
    let store = RunStore::create(&root.join("run"), &plan).unwrap();
    let mut runner = DreamBenchJobs::new(exp.clone(), &root.join("cache")).unwrap();
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap();
    let rows: Vec<ImageRow> = store.rows().unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (r.baseline.as_str(), r.guided, r.prompt.as_str()),
        ("blip-diffusion", false, "a dog in the jungle")
    );
    assert!(r.dino.is_finite() && r.clip_i.is_finite() && r.clip_t.is_finite());
    let img = image::open(root.join("run").join(&r.image)).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // Guided BLIP-Diffusion: the palette from the same reference, the template from the base SD.
    write_tiny_model_for_base(root, &tokenizer);
    let guided_text = text
        .replace("[models]\n", &format!("[models]\nbase = \"{}\"\n", p("sd")))
        .replace(
            "[metrics]",
            "[guidance]\nlayout_window = [0, 2]\nappearance_window = [2, 3]\n[metrics]",
        )
        .replace(
            "name = \"blip\"\nbaseline = \"blip-diffusion\"\n",
            "name = \"blip+pnd\"\nbaseline = \"blip-diffusion\"\npick_and_draw = true\n",
        );
    let guided = Experiment::parse(&guided_text, "g.toml").unwrap();
    validate(&guided).unwrap();
    let plan = plan_of(&guided).unwrap();
    let store = RunStore::create(&root.join("run-guided"), &plan).unwrap();
    let mut runner = DreamBenchJobs::new(guided.clone(), &root.join("cache")).unwrap();
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap();
    let rows: Vec<ImageRow> = store.rows().unwrap();
    assert_eq!((rows.len(), rows[0].guided), (1, true));
    let trace =
        std::fs::read_to_string(store.files_dir(&plan.jobs[0].id()).join("trace.jsonl")).unwrap();
    // Steps 0-1 layout and step 2 appearance, 3 updates each.
    assert_eq!(trace.lines().count(), 9, "{trace}");
}

fn write_tiny_model_for_base(root: &Path, tokenizer: &Path) {
    tiny::write_tiny_model(&root.join("sd"), 1, tokenizer, &tiny::TinySpec::default()).unwrap();
}

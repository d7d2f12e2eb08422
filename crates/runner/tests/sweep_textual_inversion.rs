//! A Textual Inversion row through the sweep on tiny models (issue 11 item 4): the file's vector
//! is bound to the token the method's prompts use (`<dog>` of the default `<{subject}>` style),
//! whatever key the file names, and the run's provenance records both.

use diffusion::pipeline::{LoadOptions, SampleRequest, StableDiffusion};
use runner::commands::sweep::plan_with_provenance;
use runner::demo::subjects::write_mini_benchmark;
use runner::experiment::Experiment;
use runner::jobs::{validate, DreamBenchJobs};
use runner::provenance::TokenBinding;
use runner::report::rows::ImageRow;
use runner::runtime::Runtime;
use runner::sweep::{run_jobs, RunStore, Shard};
use std::path::Path;
use tiny::{write_tiny_embedding, write_tiny_metric_models, write_tiny_model, TinySpec};

/// The experiment: one Textual Inversion job on the tiny model, embeddings at `ti`.
fn experiment(root: &Path, ti: &str) -> Experiment {
    let p = |s: &str| root.join(s).display().to_string();
    let text = format!(
        "name = \"ti\"\nsubjects = [\"dog\"]\nprompts = [0]\nseeds = [0]\n\
         [models]\nbase = \"{}\"\ntextual_inversion = \"{ti}\"\n\
         [generation]\nsteps = 2\nheight = 64\nwidth = 64\n\
         [metrics]\ndata = \"{}\"\ndino = \"{}\"\nclip = \"{}\"\n\
         [[methods]]\nname = \"ti\"\nbaseline = \"textual-inversion\"\n",
        p("sd"),
        p("data"),
        p("models/dino"),
        p("models/clip")
    );
    Experiment::parse(&text, "ti.toml").unwrap()
}

/// The image the tiny model draws for the job's prompt with the vector bound to `token`.
fn image_with_binding(root: &Path, file: &Path, token: Option<&str>, prompt: &str) -> Vec<u8> {
    let opts = LoadOptions {
        embeddings: Some(file.to_path_buf()),
        embedding_token: token.map(str::to_string),
        ..Default::default()
    };
    let sd = StableDiffusion::load(root.join("sd").to_str().unwrap(), &opts).unwrap();
    let req = SampleRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps: 2,
        cfg_scale: 7.5,
        height: 64,
        width: 64,
        seed: 0,
        init_latents: Some(sd.initial_latents(64, 64, 0).unwrap()),
    };
    let latents = sd.sample(&req, &mut |_, _| {}).unwrap();
    sd.decode_images(&latents).unwrap().remove(0).into_raw()
}

#[test]
fn sweep_binds_the_vector_to_the_prompts_token_and_records_the_files_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The vocabulary built into pnd: no tokenizer files needed.
    let tokenizer = root.join("tokenizer");
    clip_tokenizer::write_builtin(&tokenizer).unwrap();
    let spec = TinySpec::default();
    write_tiny_model(&root.join("sd"), 0, &tokenizer, &spec).unwrap();
    write_tiny_metric_models(&root.join("models"), &tokenizer, 0).unwrap();
    write_mini_benchmark(&root.join("data"), 2, 64).unwrap();
    let file = root.join("ti/dog/learned_embeds.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    write_tiny_embedding(&file, "<tiny-key>", 7, &spec).unwrap();

    let template = root
        .join("ti/{subject}/learned_embeds.safetensors")
        .display()
        .to_string();
    let exp = experiment(root, &template);
    validate(&exp).unwrap();
    let cache = root.join("cache");
    let runtime = Runtime::open(&exp.runtime).unwrap();
    let plan = plan_with_provenance(&exp, &cache, &runtime.record()).unwrap();
    let store = RunStore::create(&root.join("run"), &plan).unwrap();
    let mut runner = DreamBenchJobs::new(exp.clone(), &cache).unwrap();
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap();
    let rows: Vec<ImageRow> = store.rows().unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (row.baseline.as_str(), row.prompt.as_str()),
        ("textual-inversion", "a <dog> dog in the jungle")
    );

    // The row's image is the one drawn with the vector under `<dog>`, not under the file's key.
    let png = image::open(root.join("run").join(&row.image))
        .unwrap()
        .to_rgb8()
        .into_raw();
    let bound = image_with_binding(root, &file, Some("<dog>"), &row.prompt);
    assert_eq!(png, bound, "the sweep's image is the prompt token's");
    let by_key = image_with_binding(root, &file, None, &row.prompt);
    assert_ne!(
        png, by_key,
        "bound to '<tiny-key>', '<dog>' would be plain text"
    );

    // The provenance (plan.json and the report's header) shows the file's key and the token.
    let prov = store.plan().unwrap().provenance.unwrap();
    let entry = prov
        .models
        .iter()
        .find(|m| m.model == file.display().to_string())
        .unwrap_or_else(|| panic!("{:?}", prov.models));
    assert_eq!(entry.role, "textual-inversion (dog)");
    assert_eq!(
        entry.binding,
        Some(TokenBinding {
            token: "<dog>".into(),
            file_key: "<tiny-key>".into(),
        })
    );
    let header = runner::report::header::header(&store.plan().unwrap(), 1, &[]);
    assert!(
        header.contains("(vector of file key '<tiny-key>' bound to token '<dog>')"),
        "{header}"
    );

    // A file with two vectors is refused before any job runs, naming the file.
    let bad = root.join("bad/dog/learned_embeds.safetensors");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let v = candle_core::Tensor::zeros(
        (2, spec.text_hidden_size),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("<a>".to_string(), v)]),
        &bad,
    )
    .unwrap();
    let bad_exp = experiment(
        root,
        &root
            .join("bad/{subject}/learned_embeds.safetensors")
            .display()
            .to_string(),
    );
    let err = format!("{:#}", validate(&bad_exp).unwrap_err());
    assert!(
        err.contains("method 'ti', subject 'dog'")
            && err.contains(&bad.display().to_string())
            && err.contains("2 vectors"),
        "{err}"
    );
}

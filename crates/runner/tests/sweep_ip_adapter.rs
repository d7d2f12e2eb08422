//! IP-Adapter rows through the sweep on tiny models (issue 28): `ip-adapter` and
//! `ip-adapter+pnd` generated from the subject's reference image, scored and in the report's
//! table as "IP-Adapter" and "IP-Adapter + Pick-and-Draw"; an adapter that does not fit the base
//! model is one error before any job.

use runner::commands::sweep::plan_of;
use runner::demo::subjects::write_mini_benchmark;
use runner::experiment::Experiment;
use runner::jobs::{validate, DreamBenchJobs};
use runner::report::rows::ImageRow;
use runner::report::write_report;
use runner::sweep::{run_jobs, RunStore, Shard};
use tiny::write_tiny_metric_models;

#[test]
fn ip_adapter_rows_are_generated_scored_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let tokenizer = root.join("clip-tokenizer");
    clip_tokenizer::write_builtin(&tokenizer).unwrap();
    let spec = tiny::TinySpec::default();
    tiny::write_tiny_model(&root.join("sd"), 1, &tokenizer, &spec).unwrap();
    tiny::write_tiny_ip_adapter(&root.join("ip"), 5, &spec).unwrap();
    write_tiny_metric_models(&root.join("models"), &tokenizer, 0).unwrap();
    write_mini_benchmark(&root.join("data"), 2, 64).unwrap();
    let p = |s: &str| root.join(s).display().to_string();
    let text = format!(
        "name = \"ipa\"\nsubjects = [\"dog\"]\nprompts = [0]\nseeds = [0, 1]\n\
         [models]\nbase = \"{}\"\nip_adapter = \"{}\"\nip_scale = 0.8\n\
         [generation]\nsteps = 4\nheight = 64\nwidth = 64\n\
         [guidance]\nlayout_window = [0, 2]\nappearance_window = [2, 3]\n\
         [metrics]\ndata = \"{}\"\ndino = \"{}\"\nclip = \"{}\"\n\
         [[methods]]\nname = \"ip-adapter\"\nbaseline = \"ip-adapter\"\n\
         [[methods]]\nname = \"ip-adapter+pnd\"\nbaseline = \"ip-adapter\"\npick_and_draw = true\n",
        p("sd"),
        p("ip"),
        p("data"),
        p("models/dino"),
        p("models/clip")
    );
    let exp = Experiment::parse(&text, "ipa.toml").unwrap();
    validate(&exp).unwrap();
    let plan = plan_of(&exp).unwrap();
    assert_eq!(plan.jobs.len(), 4);
    let store = RunStore::create(&root.join("run"), &plan).unwrap();
    let mut runner = DreamBenchJobs::new(exp.clone(), &root.join("cache")).unwrap();
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap();
    let rows: Vec<ImageRow> = store.rows().unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.baseline, "ip-adapter");
        // The class noun, as for Stable Diffusion.
        assert_eq!(r.prompt, "a dog in the jungle");
        assert!(r.dino.is_finite() && r.clip_i.is_finite() && r.clip_t.is_finite());
    }
    assert_eq!(rows.iter().filter(|r| r.guided).count(), 2);
    let guided = plan
        .jobs
        .iter()
        .find(|j| j.method == "ip-adapter+pnd")
        .unwrap();
    let trace = std::fs::read_to_string(store.files_dir(&guided.id()).join("trace.jsonl")).unwrap();
    assert_eq!(trace.lines().count(), 9, "{trace}");

    let report = write_report(&root.join("run"), None).unwrap();
    let labels: Vec<&str> = report.table.iter().map(|r| r.label.as_str()).collect();
    assert!(labels.contains(&"IP-Adapter"), "{labels:?}");
    assert!(labels.contains(&"IP-Adapter + Pick-and-Draw"), "{labels:?}");
    assert!(report.table_markdown.contains("IP-Adapter + Pick-and-Draw"));

    // An adapter made for another text width does not fit: one error before any job.
    let other = tiny::TinySpec {
        text_hidden_size: 16,
        ..spec.clone()
    };
    tiny::write_tiny_ip_adapter(&root.join("ip16"), 5, &other).unwrap();
    let bad = Experiment::parse(&text.replace(&p("ip"), &p("ip16")), "bad.toml").unwrap();
    let e = format!("{:#}", validate(&bad).unwrap_err());
    assert!(e.contains("method 'ip-adapter'"), "{e}");
    assert!(e.contains("ip-adapter_sd15.safetensors"), "{e}");
    assert!(e.contains("cross_attention_dim 32"), "{e}");
    // A missing image encoder is named.
    std::fs::remove_dir_all(root.join("ip/models/image_encoder")).unwrap();
    let e = format!("{:#}", validate(&exp).unwrap_err());
    assert!(e.contains("models/image_encoder/config.json"), "{e}");
}

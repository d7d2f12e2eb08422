//! `pnd train baselines`: the shipped experiment lists the 60 trainings of Table 1 where the
//! sweep's model templates read them; a tiny experiment (2 subjects, both methods, prior
//! preservation with generated class images) trains everything, keeps what exists when run again,
//! and shards without overlap.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pnd(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_experiment_lists_60_trainings_where_table1_reads_them() {
    let exp = repo().join("experiments/train-baselines.toml");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = pnd(
        &["train", "baselines", exp.to_str().unwrap(), "--dry-run"],
        dir.path(),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("60 trainings (30 subjects x 2 methods)"),
        "{out}"
    );
    let is_row = |l: &str| l.starts_with("textual-inversion") || l.starts_with("dreambooth");
    let rows: Vec<&str> = out.lines().filter(|l| is_row(l)).collect();
    assert!(rows.iter().all(|r| r.contains("to train")));
    assert_eq!(rows.len(), 60, "{out}");
    assert!(out.contains("0 exist, 60 to train"), "{out}");
    // The paths configs/models/sd15.toml gives the sweep.
    assert!(out.contains("checkpoints/textual-inversion/dog/learned_embeds.safetensors"));
    assert!(out.contains("checkpoints/dreambooth/dog"));
    // Shards split the 60 without overlap.
    let mut seen = Vec::new();
    for i in 0..4 {
        let (ok, out, _) = pnd(
            &[
                "train",
                "baselines",
                exp.to_str().unwrap(),
                "--dry-run",
                "--shard",
                &format!("{i}/4"),
            ],
            dir.path(),
        );
        assert!(ok);
        seen.extend(out.lines().filter(|l| is_row(l)).map(String::from));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 60);
}

#[test]
fn a_bad_experiment_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(
        &f,
        "name = \"x\"\nsubjects = [\"unicorn\"]\n[textual_inversion]\ntoken = \"<x>\"\n",
    )
    .unwrap();
    let (ok, _, err) = pnd(
        &["train", "baselines", f.to_str().unwrap(), "--dry-run"],
        dir.path(),
    );
    assert!(!ok);
    assert!(
        err.contains("missing field") || err.contains("init_token"),
        "{err}"
    );
    std::fs::write(&f, "name = \"x\"\n").unwrap();
    let (ok, _, err) = pnd(
        &["train", "baselines", f.to_str().unwrap(), "--dry-run"],
        dir.path(),
    );
    assert!(!ok);
    assert!(
        err.contains("no [textual_inversion] or [dreambooth] table"),
        "{err}"
    );
}

#[test]
fn a_tiny_experiment_trains_every_subject_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = repo().join("crates/training/tests/fixtures/step/images");
    for subject in ["dog", "cat"] {
        let d = root.join("data").join(subject);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["a.png", "b.png"] {
            std::fs::copy(images.join(f), d.join(f)).unwrap();
        }
    }
    let model = repo().join("crates/diffusion/tests/fixtures/pipeline/model");
    let exp = format!(
        r#"name = "tiny-train"
subjects = ["dog", "cat"]
data = "data"
[models]
base = "{}"
textual_inversion = "out/ti/{{subject}}/learned_embeds.safetensors"
dreambooth = "out/db/{{subject}}"
[textual_inversion]
token = "<{{subject}}>"
init_token = "{{class}}"
steps = 2
lr = 5e-3
scale_lr = true
batch = 1
grad_accum = 2
resolution = 64
repeats = 2
seed = 0
checkpoint_every = 1
[dreambooth]
identifier = "sks"
instance_prompt = "a photo of {{identifier}} {{class}}"
class_prompt = "a photo of {{class}}"
prior_preservation = true
class_images = 2
prior_loss_weight = 1.0
steps = 2
lr = 1e-4
batch = 1
grad_accum = 1
train_text_encoder = false
resolution = 64
seed = 0
checkpoint_every = 1
"#,
        model.display()
    );
    std::fs::write(root.join("exp.toml"), exp).unwrap();
    let (ok, _, err) = pnd(&["train", "baselines", "exp.toml", "--device", "cpu"], root);
    assert!(ok, "{err}");
    for s in ["dog", "cat"] {
        assert!(root
            .join(format!("out/ti/{s}/learned_embeds.safetensors"))
            .is_file());
        assert!(root
            .join(format!(
                "out/db/{s}/unet/diffusion_pytorch_model.safetensors"
            ))
            .is_file());
        assert!(root.join(format!("out/db/{s}/unet/config.json")).is_file());
        assert!(!root.join(format!("out/db/{s}.checkpoints")).exists());
        let trace = std::fs::read_to_string(root.join(format!("out/db/{s}.trace.jsonl"))).unwrap();
        assert_eq!(trace.lines().count(), 2);
    }
    // Both subjects' class ("dog", "cat") images were made once each, 2 per class.
    let classes = root.join("checkpoints/class-images");
    let count = walk(&classes)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(count, 4, "{:?}", walk(&classes));
    let (ok, out, err) = pnd(&["train", "baselines", "exp.toml", "--dry-run"], root);
    assert!(ok, "{err}");
    assert!(out.contains("4 exist, 0 to train"), "{out}");
    let (ok, _, err) = pnd(&["train", "baselines", "exp.toml", "--device", "cpu"], root);
    assert!(ok, "{err}");
    assert_eq!(err.matches(": exists (").count(), 4, "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

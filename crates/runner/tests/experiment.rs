//! Experiment files with included config blocks.

use runner::experiment::{Baseline, Experiment};
use std::path::Path;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn tree() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "configs/models/local.toml",
        "[models]\nbase = \"models/sd\"\ndreambooth = \"db/{subject}\"\n",
    );
    write(
        tmp.path(),
        "configs/protocol/fast.toml",
        "[generation]\nsteps = 10\nheight = 64\n\n[metrics]\ndino = \"tiny/dino\"\n",
    );
    write(
        tmp.path(),
        "configs/guidance/paper.toml",
        "[guidance]\neta = 10.0\nalpha = 10.0\n",
    );
    tmp
}

#[test]
fn includes_merge_in_order_and_the_file_wins() {
    let tmp = tree();
    write(
        tmp.path(),
        "experiments/x.toml",
        r#"name = "x"
include = ["models/local", "protocol/fast", "guidance/paper"]
subjects = ["dog"]
seeds = [0]

[generation]
width = 64

[guidance]
alpha = 5.0

[[methods]]
name = "db"
baseline = "dreambooth"

[[methods]]
name = "db+pnd"
baseline = "dreambooth"
pick_and_draw = true
guidance = { resolution = 16 }
"#,
    );
    let exp = Experiment::load(&tmp.path().join("experiments/x.toml")).unwrap();
    assert_eq!(exp.models.base, "models/sd");
    assert_eq!(
        exp.models
            .for_subject(Baseline::Dreambooth, "dog7")
            .as_deref(),
        Some("db/dog7")
    );
    assert_eq!(
        (
            exp.generation.steps,
            exp.generation.height,
            exp.generation.width
        ),
        (10, 64, 64)
    );
    assert_eq!(exp.generation.cfg_scale, 7.5);
    assert_eq!(exp.metrics.dino, "tiny/dino");
    assert_eq!(exp.metrics.clip, "openai/clip-vit-base-patch32");
    assert_eq!(exp.guidance["eta"].as_float(), Some(10.0));
    assert_eq!(exp.guidance["alpha"].as_float(), Some(5.0));
    assert_eq!(exp.methods[1].guidance["resolution"].as_integer(), Some(16));
    assert_eq!(exp.jobs().len(), 2 * 25);
}

#[test]
fn errors_point_into_the_file_that_has_them() {
    let tmp = tree();
    write(
        tmp.path(),
        "configs/protocol/bad.toml",
        "[generation]\nsteps = 10\nstep_count = 3\n",
    );
    write(tmp.path(), "experiments/a.toml", "name = \"a\"\ninclude = [\"protocol/bad\"]\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n");
    let err = Experiment::load(&tmp.path().join("experiments/a.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("configs/protocol/bad.toml:3:1:") && err.contains("step_count"),
        "{err}"
    );

    write(tmp.path(), "experiments/b.toml", "name = \"b\"\ninclude = [\"protocol/nope\"]\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n");
    let err = Experiment::load(&tmp.path().join("experiments/b.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("experiments/b.toml:2:12:") && err.contains("protocol/nope"),
        "{err}"
    );

    write(tmp.path(), "configs/loop.toml", "include = [\"loop\"]\n");
    write(tmp.path(), "experiments/c.toml", "name = \"c\"\ninclude = [\"loop\"]\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n");
    let err = Experiment::load(&tmp.path().join("experiments/c.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("includes itself"), "{err}");

    write(
        tmp.path(),
        "experiments/d.toml",
        "name = \"d\"\n[[methods]]\nname = \"SD\"\nbaseline = \"stable-diffusion\"\n",
    );
    let err = Experiment::load(&tmp.path().join("experiments/d.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d.toml:3:8:") && err.contains("method name 'SD'"),
        "{err}"
    );
}

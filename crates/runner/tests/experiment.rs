//! Experiment files with included config blocks.

use runner::experiment::{Baseline, Experiment};
use runner::sweep::{ConfigError, Problem};
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

/// Callers tell the cases apart by variant, not by parsing the message.
#[test]
fn config_errors_are_typed() {
    let tmp = tree();
    let problem = |rel: &str, text: &str| {
        write(tmp.path(), rel, text);
        Experiment::load(&tmp.path().join(rel))
            .unwrap_err()
            .problem()
            .cloned()
    };
    let methods = "[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n";
    assert_eq!(
        problem(
            "experiments/e.toml",
            &format!("name = \"e\"\ninclude = [\"protocol/nope\"]\n{methods}")
        ),
        Some(Problem::MissingInclude("protocol/nope".into()))
    );
    assert_eq!(
        problem(
            "experiments/f.toml",
            &format!("name = \"f\"\nsubjects = [\"unicorn\"]\n{methods}")
        ),
        Some(Problem::UnknownSubject("unicorn".into()))
    );
    assert_eq!(
        problem(
            "experiments/g.toml",
            &format!("name = \"g\"\nprompts = [30]\n{methods}")
        ),
        Some(Problem::PromptOutOfRange(30))
    );
    assert_eq!(
        problem(
            "experiments/h.toml",
            &format!("name = \"h\"\n{methods}{methods}")
        ),
        Some(Problem::DuplicateMethod("sd".into()))
    );
    assert_eq!(
        problem("experiments/i.toml", "name = \"i\"\nmethods = []\n"),
        Some(Problem::NoMethods)
    );
    assert!(matches!(
        problem("experiments/j.toml", &format!("name = \"j\"\nsedes = 1\n{methods}")),
        Some(Problem::Schema(m)) if m.contains("sedes")
    ));
    let missing = Experiment::load(&tmp.path().join("experiments/none.toml")).unwrap_err();
    assert!(matches!(missing, ConfigError::Io { .. }) && missing.problem().is_none());
}

/// A method's guidance overrides are checked in the user's file: errors point at its line and
/// column, not at re-serialized text.
#[test]
fn guidance_override_errors_point_into_the_users_file() {
    let tmp = tree();
    let exp = |body: &str| {
        format!("name = \"g\"\n[[methods]]\nname = \"sd+pnd\"\nbaseline = \"stable-diffusion\"\npick_and_draw = true\n{body}")
    };
    write(
        tmp.path(),
        "experiments/g.toml",
        &exp("guidance = { resolutoin = 16 }\n"),
    );
    let err = Experiment::load(&tmp.path().join("experiments/g.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("experiments/g.toml:6:") && msg.contains("resolutoin"),
        "{msg}"
    );
    write(
        tmp.path(),
        "experiments/h.toml",
        &exp("guidance = { resolution = 17 }\n"),
    );
    let err = Experiment::load(&tmp.path().join("experiments/h.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("experiments/h.toml:6:12:") && msg.contains("resolution"),
        "{msg}"
    );
    assert!(matches!(err.problem(), Some(Problem::Guidance(_))), "{msg}");
    write(
        tmp.path(),
        "configs/guidance/bad.toml",
        "[guidance]\neta = 1.0\ntau = 2.0\n",
    );
    write(
        tmp.path(),
        "experiments/i.toml",
        &exp("").replace("[[methods]]", "include = [\"guidance/bad\"]\n[[methods]]"),
    );
    let msg = Experiment::load(&tmp.path().join("experiments/i.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("configs/guidance/bad.toml:") && msg.contains("tau"),
        "{msg}"
    );
}

/// Baseline `images`: a path template (or a manifest) is required, checked, and belongs to that
/// baseline only; errors point at the line.
#[test]
fn images_methods_need_a_valid_template() {
    let head = "name = \"x\"\nsubjects = [\"dog\"]\n\n[[methods]]\nname = \"ext\"\nbaseline = \"images\"\n";
    let ok = Experiment::parse(
        &format!("{head}images = \"out/{{subject}}/{{prompt}}-s{{seed}}.png\"\n"),
        "x.toml",
    )
    .unwrap();
    assert_eq!(ok.methods[0].baseline, Baseline::Images);
    assert_eq!(
        ok.methods[0].images.as_deref(),
        Some("out/{subject}/{prompt}-s{seed}.png")
    );
    let err = |text: &str| Experiment::parse(text, "x.toml").unwrap_err().to_string();
    let e = err(head);
    assert!(
        e.starts_with("x.toml:5:8:") && e.contains("no `images`"),
        "{e}"
    );
    let e = err(&format!(
        "{head}images = \"out/{{subject}}/{{prompt}}.png\"\n"
    ));
    assert!(e.starts_with("x.toml:7:10:") && e.contains("{seed}"), "{e}");
    let e = err(&format!(
        "{head}images = \"out/{{who}}/{{prompt}}-s{{seed}}.png\"\n"
    ));
    assert!(e.contains("unknown placeholder {who}"), "{e}");
    let e = err(&format!("{head}images = \"l.csv\"\npick_and_draw = true\n"));
    assert!(e.contains("cannot be generated with Pick-and-Draw"), "{e}");
    let e = err("name = \"x\"\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\nimages = \"a.csv\"\n");
    assert!(
        e.starts_with("x.toml:5:10:") && e.contains("belongs to baseline \"images\" only"),
        "{e}"
    );
}

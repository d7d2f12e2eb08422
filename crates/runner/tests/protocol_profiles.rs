//! The protocol profiles of `configs/protocol/` as experiments include them: every one loads with
//! its `[metrics.scoring]`, and a wrong key inside it is an error located in the profile file.

use runner::experiment::Experiment;
use std::path::Path;

const PROFILES: [&str; 4] = [
    "dreambooth",
    "custom-diffusion",
    "dreambench-plus",
    "torchmetrics",
];

fn tree() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/protocol");
    std::fs::create_dir_all(tmp.path().join("configs/protocol")).unwrap();
    std::fs::create_dir_all(tmp.path().join("experiments")).unwrap();
    for p in PROFILES {
        std::fs::copy(
            root.join(format!("{p}.toml")),
            tmp.path().join(format!("configs/protocol/{p}.toml")),
        )
        .unwrap();
    }
    tmp
}

fn experiment(tmp: &Path, profile: &str) -> std::path::PathBuf {
    let path = tmp.join(format!("experiments/{profile}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"e\"\ninclude = [\"protocol/{profile}\"]\nsubjects = [\"dog\"]\n\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn every_profile_loads_with_its_scoring() {
    let tmp = tree();
    for p in PROFILES {
        let exp = Experiment::load(&experiment(tmp.path(), p)).unwrap();
        assert_eq!(exp.metrics.scoring.profile, p);
        exp.metrics.scoring.validate().unwrap();
    }
    let exp = Experiment::load(&experiment(tmp.path(), "dreambench-plus")).unwrap();
    assert_eq!(exp.metrics.dino, "facebook/dino-vits8");
    assert_eq!(
        exp.metrics.scoring.extra["dinov2"].model,
        "facebook/dinov2-small"
    );
    let exp = Experiment::load(&experiment(tmp.path(), "torchmetrics")).unwrap();
    assert_eq!(exp.metrics.clip, "openai/clip-vit-large-patch14");
    assert_eq!(exp.metrics.scoring.clip_t.scale, 100.0);
}

#[test]
fn an_unknown_scoring_key_is_an_error_in_the_profile_file() {
    let tmp = tree();
    let f = tmp.path().join("configs/protocol/custom-diffusion.toml");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(
        &f,
        text.replace("clamp = \"per-pair\"", "clamp = \"per-pair\"\nweight = 2.5"),
    )
    .unwrap();
    let err = Experiment::load(&experiment(tmp.path(), "custom-diffusion"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("custom-diffusion.toml") && err.contains("weight"),
        "{err}"
    );
}

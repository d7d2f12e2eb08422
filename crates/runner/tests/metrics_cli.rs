//! `pnd oracle` and `pnd score` end to end on the tiny metric fixtures of crates/metrics
//! (reference values from `tools/fixtures/metrics.py`, transformers + PIL).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    root()
        .join("crates/metrics/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("oracle.json")).unwrap()).unwrap()
}

fn pnd(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pnd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn oracle_on_all_158_images_matches_the_reference() {
    let data = testdata::dreambench().display().to_string();
    let (dino, clip) = (fixture("dino_tiny"), fixture("clip_tiny"));
    let got = pnd(&[
        "oracle",
        "--data",
        &data,
        "--dino",
        &dino,
        "--clip",
        &clip,
        "--json",
        "--no-cache",
    ]);
    let want = &reference()["oracle"];
    assert_eq!(got["n_images"], 158);
    for k in ["dino", "clip_i"] {
        let d = (got[k].as_f64().unwrap() - want[k].as_f64().unwrap()).abs();
        assert!(d <= 1e-5, "{k}: {} vs {}", got[k], want[k]);
    }
    let per = got["per_subject"].as_object().unwrap();
    assert_eq!(per.len(), 30);
    for (name, v) in per {
        for k in ["dino", "clip_i"] {
            let w = want["per_subject"][name][k].as_f64().unwrap();
            assert!((v[k].as_f64().unwrap() - w).abs() <= 1e-5, "{name} {k}");
        }
    }
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn score_of_one_generated_image_matches_the_reference() {
    let want = &reference()["score"];
    let data = testdata::dreambench();
    let cache = tempfile::tempdir().unwrap();
    let got = pnd(&[
        "score",
        "--generated",
        data.join("cat/00.jpg").to_str().unwrap(),
        "--real",
        data.join("dog").to_str().unwrap(),
        "--prompt",
        want["prompt"].as_str().unwrap(),
        "--dino",
        &fixture("dino_tiny"),
        "--clip",
        &fixture("clip_tiny"),
        "--cache",
        cache.path().to_str().unwrap(),
        "--json",
    ]);
    for k in ["dino", "clip_i", "clip_t"] {
        let d = (got[k].as_f64().unwrap() - want[k].as_f64().unwrap()).abs();
        assert!(d <= 1e-5, "{k}: {} vs {}", got[k], want[k]);
    }
    assert_eq!(got["n_generated"], 1);
    assert_eq!(got["n_real"], 5);
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn score_with_a_missing_model_folder_fails_naming_it() {
    let data = testdata::dreambench();
    let out = Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args([
            "score",
            "--generated",
            data.join("cat/00.jpg").to_str().unwrap(),
            "--real",
            data.join("dog").to_str().unwrap(),
            "--prompt",
            "a cat",
            "--dino",
            "/no/such/dino",
            "--clip",
            &fixture("clip_tiny"),
            "--no-cache",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/dino"), "{err}");
}

/// The metrics crate's profile fixture (`tools/fixtures/metric_profiles.py`): two generated and
/// three real images, the source computations' scores per profile and prompt.
fn profiles_reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("profiles.json")).unwrap()).unwrap()
}

/// `pnd score` on the profile fixture's images with the prompt "a dog", the tiny DINO ViT-S/16
/// and CLIP (`--dino`/`--clip` replace the profiles' published ones), run from `cwd`.
fn score_profile(cwd: &std::path::Path, protocol: &str, dino: &str) -> std::process::Output {
    let want = profiles_reference();
    Command::new(env!("CARGO_BIN_EXE_pnd"))
        .current_dir(cwd)
        .args([
            "score",
            "--generated",
            &fixture("profile_images/gen"),
            "--real",
            &fixture("profile_images/real"),
            "--prompt",
            want["prompts"]["mixed"].as_str().unwrap(),
            "--protocol",
            protocol,
            "--dino",
            &fixture(dino),
            "--clip",
            &fixture("clip_tiny"),
            "--no-cache",
            "--json",
        ])
        .output()
        .unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_scores(
    what: &str,
    got: &serde_json::Value,
    want: &serde_json::Value,
    keys: &[&str],
    tol: f64,
) {
    for k in keys {
        let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
        assert!((g - w).abs() <= tol, "{what} {k}: {g} vs the source's {w}");
    }
}

/// A copy of `configs/protocol/` in a folder of its own, DreamBench++'s DINOv2 id replaced by the
/// tiny DINOv2 (the other models come from `--dino`/`--clip`).
fn profile_tree() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("configs/protocol");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(root().join("configs/protocol")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "\"facebook/dinov2-small\"",
            &format!("\"{}\"", fixture("dinov2_tiny")),
        );
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    tmp
}

/// `pnd score --protocol NAME` scores as the profile's source does (Custom Diffusion's CLIPScore
/// 2.5 · max(cos, 0); DreamBench++'s 1:1 pairing with the first real image, × 100, DINOv2), and
/// `all` gives each profile's scores in one object; an unknown name is one error listing the
/// known ones.
#[test]
fn score_under_a_named_protocol_matches_its_source() {
    let want = profiles_reference();
    // From the repository: the shipped profile, found by name.
    let got = json_of(&score_profile(&root(), "custom-diffusion", "dino_tiny"));
    assert_scores(
        "custom-diffusion",
        &got,
        &want["custom-diffusion"]["mixed"],
        &["dino", "clip_i", "clip_t"],
        1e-5,
    );
    let tree = profile_tree();
    let plus = json_of(&score_profile(
        tree.path(),
        "dreambench-plus",
        "dino_s8_tiny",
    ));
    assert_scores(
        "dreambench-plus",
        &plus,
        &want["dreambench-plus"],
        &["dino", "clip_i", "clip_t"],
        1e-3,
    );
    let d2 = plus["extra"]["dinov2"].as_f64().unwrap();
    assert!((d2 - want["dreambench-plus"]["extra"]["dinov2"].as_f64().unwrap()).abs() < 1e-3);
    // `all`: one object per profile, each its single-profile result.
    let all = json_of(&score_profile(tree.path(), "all", "dino_tiny"));
    let names: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(all["custom-diffusion"], got);
    assert_scores(
        "torchmetrics",
        &all["torchmetrics"],
        &want["torchmetrics"]["mixed"],
        &["dino", "clip_i", "clip_t"],
        1e-5,
    );
    // The DreamBooth scores do not depend on the prompt's handling; CLIP-T was written for
    // another prompt.
    assert_scores(
        "dreambooth",
        &all["dreambooth"],
        &want["dreambooth"],
        &["dino", "clip_i"],
        1e-5,
    );
    // (--dino replaced DreamBench++'s ViT-S/8 by the S/16 here: not its source's scores.)
    assert!(all["dreambench-plus"]["extra"]["dinov2"].as_f64().unwrap() > 1.0);

    let out = score_profile(&root(), "nonesuch", "dino_tiny");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("no protocol 'nonesuch'")
            && errors[0]
                .contains("known: dreambooth, custom-diffusion, dreambench-plus, torchmetrics"),
        "{err}"
    );
}

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

//! The Q-Former's default BERT vocabulary is found in an offline Hugging Face cache under either of
//! its hub ids, `google-bert/bert-base-uncased` or the old `bert-base-uncased` (issue 11 item 10).
//! Its own test binary: it sets `HF_HOME` and `HF_HUB_OFFLINE` for the whole process.

#![cfg(unix)]
// BlipError is large by design (see src/blip/mod.rs).
#![allow(clippy::result_large_err)]

use candle_core::{DType, Device};
use diffusion::blip::{BlipDiffusion, BlipError};
use std::path::{Path, PathBuf};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip/model")
}

/// The tiny model with no `tokenizer` in `qformer/config.json` (so the default, `bert-base-uncased`,
/// applies) and no tokenizer folder; every other file is a link to the fixture.
fn model_with_default_qformer_tokenizer(dir: &Path) {
    let fixture = fixture_model();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "qformer" {
            std::os::unix::fs::symlink(fixture.join(&name), dir.join(&name)).unwrap();
        }
    }
    let qformer = dir.join("qformer");
    std::fs::create_dir(&qformer).unwrap();
    std::os::unix::fs::symlink(
        fixture.join("qformer/model.safetensors"),
        qformer.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("qformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("tokenizer");
    std::fs::write(qformer.join("config.json"), cfg.to_string()).unwrap();
}

/// A Hugging Face cache (`$HF_HOME/hub`) holding the fixture's BERT vocabulary under `repo`.
fn cache_with(home: &Path, repo: &str) {
    let root = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), "0123abcd").unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(
            fixture_model().join("qformer/tokenizer").join(f),
            snapshot.join(f),
        )
        .unwrap();
    }
}

fn load(model: &Path, hf_home: &Path) -> Result<BlipDiffusion, BlipError> {
    std::env::set_var("HF_HOME", hf_home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    BlipDiffusion::load(
        &weights::ModelSource::Local(model.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
}

#[test]
fn default_bert_vocabulary_is_found_under_either_hub_id() {
    let model = tempfile::tempdir().unwrap();
    model_with_default_qformer_tokenizer(model.path());
    let reference = BlipDiffusion::load(
        &weights::ModelSource::Local(fixture_model()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = reference.qformer_tokenizer.encode("a dog").unwrap();
    for repo in ["bert-base-uncased", "google-bert/bert-base-uncased"] {
        let home = tempfile::tempdir().unwrap();
        cache_with(home.path(), repo);
        let blip = load(model.path(), home.path()).unwrap_or_else(|e| panic!("{repo}: {e}"));
        assert_eq!(
            blip.qformer_tokenizer.encode("a dog").unwrap(),
            want,
            "{repo}"
        );
    }
    let empty = tempfile::tempdir().unwrap();
    let err = load(model.path(), empty.path()).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, BlipError::Tokenizer { .. }), "{msg}");
    assert!(
        msg.contains("'google-bert/bert-base-uncased'") && msg.contains("'bert-base-uncased'"),
        "{msg}"
    );
}

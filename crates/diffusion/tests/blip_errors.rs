//! Missing or mismatched BLIP-Diffusion components: one clear error each, naming the component and
//! the file or value at fault.

// BlipError is large by design (see src/blip/mod.rs).
#![allow(clippy::result_large_err)]

use candle_core::{DType, Device};
use diffusion::blip::pipeline::{read_reference, BlipDiffusionPipeline};
use diffusion::blip::{BlipDiffusion, BlipError};
use std::path::{Path, PathBuf};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip/model")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// A writable copy of the tiny model, changed by `edit`.
fn model_with(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture_model(), dir.path());
    edit(dir.path());
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load(dir: &Path) -> Result<BlipDiffusion, BlipError> {
    BlipDiffusion::load(
        &weights::ModelSource::Local(dir.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
}

fn load_pipeline(dir: &Path) -> Result<BlipDiffusionPipeline, BlipError> {
    BlipDiffusionPipeline::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
}

#[test]
fn the_untouched_copy_loads() {
    let dir = model_with(|_| {});
    load_pipeline(dir.path()).unwrap();
}

#[test]
fn missing_qformer_folder() {
    let dir = model_with(|d| std::fs::remove_dir_all(d.join("qformer")).unwrap());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::MissingComponent {
                component: "qformer",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("qformer") && msg.contains("qformer/config.json"),
        "{msg}"
    );
}

#[test]
fn missing_qformer_weights() {
    let dir = model_with(|d| std::fs::remove_file(d.join("qformer/model.safetensors")).unwrap());
    let msg = load(dir.path()).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(msg.contains("lacks its qformer"), "{msg}");
    assert!(msg.contains("qformer/model.safetensors"), "{msg}");
}

#[test]
fn qformer_config_that_does_not_match_its_weights() {
    let dir = model_with(|d| {
        edit_json(&d.join("qformer/config.json"), |v| {
            v["num_query_tokens"] = 5.into();
        })
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::Weights {
                component: "qformer",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("query_tokens") && msg.contains("qformer/config.json"),
        "{msg}"
    );
}

#[test]
fn qformer_config_inconsistent_with_itself() {
    let dir = model_with(|d| {
        edit_json(&d.join("qformer/config.json"), |v| {
            v["qformer_config"]["encoder_hidden_size"] = 32.into();
        })
    });
    let msg = load(dir.path()).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("encoder_hidden_size 32") && msg.contains("vision_config.hidden_size 24"),
        "{msg}"
    );
}

#[test]
fn malformed_qformer_config() {
    let dir = model_with(|d| std::fs::write(d.join("qformer/config.json"), "{ not json").unwrap());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::Config {
                component: "qformer",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_qformer_tokenizer_folder() {
    let dir = model_with(|d| std::fs::remove_dir_all(d.join("qformer/tokenizer")).unwrap());
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, BlipError::Tokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("qformer/tokenizer") && msg.contains("vocab.txt") && !msg.contains("hub"),
        "{msg}"
    );
}

#[test]
fn qformer_tokenizer_larger_than_the_embedding_table() {
    let dir = model_with(|d| {
        let p = d.join("qformer/tokenizer/vocab.txt");
        let mut v = std::fs::read_to_string(&p).unwrap();
        v.push_str("extra\n");
        std::fs::write(p, v).unwrap();
    });
    let msg = load(dir.path()).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("95 tokens") && msg.contains("vocab_size 94"),
        "{msg}"
    );
}

#[test]
fn missing_text_encoder() {
    let dir = model_with(|d| std::fs::remove_dir_all(d.join("text_encoder")).unwrap());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::MissingComponent {
                component: "text_encoder",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn text_encoder_shape_mismatch() {
    let dir = model_with(|d| {
        edit_json(&d.join("text_encoder/config.json"), |v| {
            v["intermediate_size"] = 48.into();
        })
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::Weights {
                component: "text_encoder",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("fc1"), "{err}");
}

#[test]
fn missing_unet_and_vae() {
    let dir = model_with(|d| std::fs::remove_dir_all(d.join("unet")).unwrap());
    let err = load_pipeline(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::MissingComponent {
                component: "unet",
                ..
            }
        ),
        "{err:?}"
    );
    let dir = model_with(|d| std::fs::remove_dir_all(d.join("vae")).unwrap());
    let err = load_pipeline(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BlipError::MissingComponent {
                component: "vae",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_model_index() {
    let dir = model_with(|d| std::fs::remove_file(d.join("model_index.json")).unwrap());
    let msg = load(dir.path()).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(msg.contains("model_index.json"), "{msg}");
}

#[test]
fn unreadable_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.jpg");
    std::fs::write(&path, [0xff, 0xd8, 0xff, 0xe0, 0x00]).unwrap();
    let err = read_reference(&path).unwrap_err();
    assert!(matches!(err, BlipError::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated.jpg"), "{err}");
}

#[test]
fn initial_latents_of_the_wrong_size() {
    let dir = model_with(|_| {});
    let pipe = load_pipeline(dir.path()).unwrap();
    let req = diffusion::blip::BlipRequest {
        reference: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/blip/pattern.png"),
        subject_category: "dog".into(),
        prompt: "on the beach".into(),
        height: 64,
        width: 96,
        steps: 2,
        init_latents: Some(
            candle_core::Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        ),
        ..Default::default()
    };
    let err = pipe.generate(&req, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("[1, 4, 8, 12]"), "{err}");
    let req = diffusion::blip::BlipRequest {
        init_latents: None,
        subject_category: " ".into(),
        ..req
    };
    let err = pipe.generate(&req, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--subject-category"), "{err}");
}

//! Textual Inversion token binding (issue 11 item 4): the vector is bound to the token the method's
//! prompt uses, as diffusers' `load_textual_inversion(path, token=…)`, the file's own key is kept
//! for the run record, and a file with several keys or several vectors is a clear error.

mod pipeline_support;

use candle_core::{DType, Device, Tensor};
use diffusion::pipeline::{LoadOptions, PipelineError, StableDiffusion};
use diffusion::textual_inversion::{learned_embedding_key, TextualInversionError};
use pipeline_support::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn load(opts: &LoadOptions) -> Result<StableDiffusion, PipelineError> {
    StableDiffusion::load(model_dir().to_str().unwrap(), opts)
}

fn with_embeddings(path: PathBuf, token: Option<&str>) -> LoadOptions {
    LoadOptions {
        embeddings: Some(path),
        embedding_token: token.map(str::to_string),
        ..Default::default()
    }
}

fn save(dir: &Path, name: &str, entries: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = entries
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn vector_is_bound_to_the_prompts_token_and_the_files_key_is_recorded() {
    let f = facts();
    let file_key = f["ti_token"].as_str().unwrap();
    let prompt = f["ti_prompt"].as_str().unwrap();
    let file = fixtures().join("learned_embeds.safetensors");
    let sd = load(&with_embeddings(file.clone(), Some("<dog>"))).unwrap();
    let learned = sd.provenance.learned_token.clone().unwrap();
    assert_eq!(learned.token, "<dog>");
    assert_eq!(learned.file_key, file_key);
    assert_eq!(learned.file, file);
    assert_eq!(learned.id as u64, f["ti_token_id"].as_u64().unwrap());
    // The same vector under the prompt's token gives diffusers' embeddings of the file's prompt.
    let emb = sd
        .encode_prompt(&prompt.replace(file_key, "<dog>"))
        .unwrap();
    let err = max_abs_diff(&emb, &expected()["ti_text_embeddings"]);
    assert!(err <= 1e-4, "{err}");
    // The file's key is then an ordinary string, split by BPE into several tokens.
    assert!(sd.tokenizer.token_to_id(file_key).is_none());

    // Without a token, the file's key is used.
    let sd = load(&with_embeddings(file.clone(), None)).unwrap();
    let learned = sd.provenance.learned_token.clone().unwrap();
    assert_eq!(
        (learned.token.as_str(), learned.file_key.as_str()),
        (file_key, file_key)
    );

    // Loading into an already-loaded model binds the same way and returns the record.
    let mut sd = load(&LoadOptions::default()).unwrap();
    let learned = sd.load_textual_inversion(&file, Some("<cat>")).unwrap();
    assert_eq!(
        (learned.token.as_str(), learned.file_key.as_str()),
        ("<cat>", file_key)
    );
    assert_eq!(sd.provenance.learned_token, Some(learned));
}

#[test]
fn several_keys_or_vectors_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let v = |n: usize| Tensor::zeros((n, 16), DType::F32, &Device::Cpu).unwrap();
    let two_keys = save(
        tmp.path(),
        "two_keys.safetensors",
        &[("<a>", v(1)), ("<b>", v(1))],
    );
    let err = load(&with_embeddings(two_keys, Some("<dog>")))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(&err, PipelineError::TextualInversion(TextualInversionError::SeveralKeys { keys, .. }) if keys == &["<a>", "<b>"]),
        "{msg}"
    );
    assert!(
        msg.contains("two_keys.safetensors") && msg.contains("<a>, <b>"),
        "{msg}"
    );

    let two_vectors = save(tmp.path(), "two_vectors.safetensors", &[("<a>", v(2))]);
    let err = load(&with_embeddings(two_vectors, None)).err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            PipelineError::TextualInversion(TextualInversionError::SeveralVectors { count: 2, .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains("two_vectors.safetensors") && msg.contains("2 vectors"),
        "{msg}"
    );

    let empty = save(tmp.path(), "empty.safetensors", &[]);
    let err = load(&with_embeddings(empty, None)).err().unwrap();
    assert!(
        matches!(
            &err,
            PipelineError::TextualInversion(TextualInversionError::NoVector { .. })
        ),
        "{err}"
    );

    // One [1, dim] vector is fine; a token the vocabulary already has is not.
    let one = save(tmp.path(), "one.safetensors", &[("<a>", v(1))]);
    load(&with_embeddings(one.clone(), None)).unwrap();
    let err = load(&with_embeddings(one, Some("dog</w>")))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dog</w>") && err.contains("already"), "{err}");
}

/// The file's key is readable without a model (for the run record written before any model
/// loads), with the same errors for an empty file or several keys.
#[test]
fn the_files_key_is_read_without_a_model() {
    let file = fixtures().join("learned_embeds.safetensors");
    assert_eq!(
        learned_embedding_key(&file).unwrap(),
        facts()["ti_token"].as_str().unwrap()
    );
    let tmp = tempfile::tempdir().unwrap();
    let v = Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap();
    let two_keys = save(
        tmp.path(),
        "two.safetensors",
        &[("<a>", v.clone()), ("<b>", v.clone())],
    );
    let err = learned_embedding_key(&two_keys).unwrap_err();
    assert!(
        matches!(&err, TextualInversionError::SeveralKeys { keys, .. } if keys == &["<a>", "<b>"]),
        "{err}"
    );
    let two_vectors = save(
        tmp.path(),
        "two_vectors.safetensors",
        &[(
            "<a>",
            Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    assert!(matches!(
        learned_embedding_key(&two_vectors).unwrap_err(),
        TextualInversionError::SeveralVectors { count: 2, .. }
    ));
    let empty = save(tmp.path(), "empty.safetensors", &[]);
    assert!(matches!(
        learned_embedding_key(&empty).unwrap_err(),
        TextualInversionError::NoVector { .. }
    ));
    // The original code's nested format names the file stem.
    let nested = save(
        tmp.path(),
        "cat-toy.safetensors",
        &[("string_to_param.*", v)],
    );
    assert_eq!(learned_embedding_key(&nested).unwrap(), "<cat-toy>");
    // A missing file says which.
    let missing = tmp.path().join("missing.safetensors");
    let err = learned_embedding_key(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
}

//! Textual Inversion embeddings (SPEC §3, §4): diffusers' `learned_embeds.safetensors` (or `.bin`),
//! `{token: [dim]}`, as written by diffusers' `textual_inversion.py` training script. The vector is
//! added to the tokenizer under a token and appended to the text encoder's embedding table, like
//! diffusers' `load_textual_inversion(path, token=…)` (`loaders/textual_inversion.py`) does for a
//! single vector: under the token the caller names (the one its prompts use), else under the file's
//! own key.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TextualInversionError {
    #[error("textual inversion file '{path}': no top-level tensor; expected {{token: vector}} (nested formats such as string_to_param are not supported)")]
    NoVector { path: PathBuf },
    #[error("textual inversion file '{path}': expected exactly one {{token: vector}} entry, found {} ({})", keys.len(), keys.join(", "))]
    SeveralKeys { path: PathBuf, keys: Vec<String> },
    #[error("textual inversion file '{path}': token '{key}' holds {count} vectors; only single-vector embeddings are supported")]
    SeveralVectors {
        path: PathBuf,
        key: String,
        count: usize,
    },
    #[error("textual inversion file '{path}': token '{key}' has shape {dims:?}, expected [{expected}] (one vector of the text encoder's hidden size)")]
    Shape {
        path: PathBuf,
        key: String,
        dims: Vec<usize>,
        expected: usize,
    },
    #[error("textual inversion file '{path}': reading the vector of '{key}': {source}")]
    Tensor {
        path: PathBuf,
        key: String,
        source: Box<candle_core::Error>,
    },
    #[error("textual inversion file '{path}': token '{token}' got tokenizer id {id} but embedding row {row} (the tokenizer and the text encoder's vocabulary sizes differ)")]
    RowMismatch {
        path: PathBuf,
        token: String,
        id: u32,
        row: u32,
    },
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// The vector of a learned-embedding file and the token the file itself names.
#[derive(Debug, Clone)]
pub struct LearnedEmbedding {
    /// The file's key (`<dog7>`), or `<{file stem}>` for the original code's `string_to_param`.
    pub key: String,
    /// `[dim]`, f32.
    pub vector: Tensor,
}

/// A Textual Inversion vector as loaded into a model (for run records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedToken {
    /// The token the vector is bound to (the one prompts use).
    pub token: String,
    /// Its tokenizer id, equal to its row in the text encoder's embedding table.
    pub id: u32,
    /// The file the vector came from.
    pub file: PathBuf,
    /// The token the file itself names ([`LearnedEmbedding::key`]); differs from `token` when the
    /// caller bound the vector to another token.
    pub file_key: String,
}

/// The token a learned-embedding file names (its single key, or `<{file stem}>` for the original
/// code's `string_to_param`), without checking the vector's size: what a run records before any
/// model is loaded. A file without a vector, with several keys or with several vectors is an
/// error, as in [`read_learned_embedding`].
pub fn learned_embedding_key(path: &Path) -> Result<String, TextualInversionError> {
    let (key, t) = read_single_entry(path)?;
    if let [n, _] = t.dims() {
        if *n != 1 {
            return Err(TextualInversionError::SeveralVectors {
                path: path.into(),
                key,
                count: *n,
            });
        }
    }
    Ok(key)
}

/// The single `{key: tensor}` entry of a learned-embedding file, the key as [`LearnedEmbedding::key`].
fn read_single_entry(path: &Path) -> Result<(String, Tensor), TextualInversionError> {
    let tensors = weights::load_tensors(&[path.to_path_buf()], &Device::Cpu)?;
    let mut entries: Vec<(String, Tensor)> = tensors.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if entries.is_empty() {
        return Err(TextualInversionError::NoVector { path: path.into() });
    }
    if entries.len() != 1 {
        return Err(TextualInversionError::SeveralKeys {
            path: path.into(),
            keys: entries.into_iter().map(|(k, _)| k).collect(),
        });
    }
    let (key, t) = entries.pop().expect("one entry");
    let key = if key.starts_with("string_to_param") {
        // The original code stores the vector under "*"; its token is the file stem.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        format!("<{stem}>")
    } else {
        key
    };
    Ok((key, t))
}

/// Reads a learned-embedding file: exactly one `{token: [dim] or [1, dim]}` entry (diffusers'
/// training-script format). The nested `{"string_to_param": {"*": ..}, "name": ..}` pickles of the
/// original textual-inversion code are not supported: they hold no top-level tensor and fail with
/// an error saying so. Several keys or several vectors are an error each.
pub fn read_learned_embedding(
    path: &Path,
    expected_dim: usize,
) -> Result<LearnedEmbedding, TextualInversionError> {
    let path_buf = || path.to_path_buf();
    let (key, t) = read_single_entry(path)?;
    let tensor_err = |key: &str, e: candle_core::Error| TextualInversionError::Tensor {
        path: path_buf(),
        key: key.to_string(),
        source: Box::new(e),
    };
    let vector = match t.dims() {
        [d] if *d == expected_dim => t,
        [1, d] if *d == expected_dim => t.squeeze(0).map_err(|e| tensor_err(&key, e))?,
        [n, d] if *d == expected_dim => {
            return Err(TextualInversionError::SeveralVectors {
                path: path_buf(),
                key,
                count: *n,
            })
        }
        dims => {
            return Err(TextualInversionError::Shape {
                path: path_buf(),
                dims: dims.to_vec(),
                key,
                expected: expected_dim,
            })
        }
    };
    let vector = vector
        .to_dtype(candle_core::DType::F32)
        .map_err(|e| tensor_err(&key, e))?;
    Ok(LearnedEmbedding { key, vector })
}

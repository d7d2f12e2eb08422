//! Textual Inversion embeddings (SPEC §3, §4): diffusers' `learned_embeds.safetensors` (or `.bin`),
//! `{token: [dim]}`, as written by diffusers' `textual_inversion.py` training script. The token is
//! added to the tokenizer and its vector appended to the text encoder's embedding table, like
//! diffusers' `load_textual_inversion` (`loaders/textual_inversion.py`) does for a single vector.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TextualInversionError {
    #[error("textual inversion file '{path}': {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// One learned token and its embedding vector.
#[derive(Debug, Clone)]
pub struct LearnedEmbedding {
    pub token: String,
    /// `[dim]`.
    pub vector: Tensor,
}

/// Reads a learned-embedding file: exactly one `{token: [dim] or [1, dim]}` entry (diffusers'
/// training-script format). The nested `{"string_to_param": {"*": ..}, "name": ..}` pickles of the
/// original textual-inversion code are not supported: they hold no top-level tensor and fail with
/// an error saying so.
pub fn read_learned_embedding(
    path: &Path,
    expected_dim: usize,
) -> Result<LearnedEmbedding, TextualInversionError> {
    let invalid = |reason: String| TextualInversionError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let tensors = weights::load_tensors(&[path.to_path_buf()], &Device::Cpu)?;
    let mut entries: Vec<(String, Tensor)> = tensors.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if entries.is_empty() {
        return Err(invalid(
            "no top-level tensor; expected {token: vector} (nested formats such as string_to_param are not supported)".into(),
        ));
    }
    if entries.len() != 1 {
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        return Err(invalid(format!(
            "expected exactly one {{token: vector}} entry, found {} ({})",
            entries.len(),
            keys.join(", ")
        )));
    }
    let (key, t) = entries.pop().expect("one entry");
    let token = if key.starts_with("string_to_param") {
        // The original code stores the vector under "*"; its token is the file stem.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        format!("<{stem}>")
    } else {
        key
    };
    let vector = match t.dims() {
        [d] if *d == expected_dim => t,
        [1, d] if *d == expected_dim => t.squeeze(0).map_err(|e| invalid(e.to_string()))?,
        dims => {
            return Err(invalid(format!(
                "token '{token}' has shape {dims:?}, expected [{expected_dim}] (one vector of the text encoder's hidden size; multi-vector embeddings are not supported)"
            )))
        }
    };
    let vector = vector
        .to_dtype(candle_core::DType::F32)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(LearnedEmbedding { token, vector })
}

//! The CLIP BPE tokenizer from a model folder ([`clip_tokenizer`]: `tokenizer.json` when present,
//! else built from `vocab.json` + `merges.txt` as transformers' `CLIPTokenizer` builds it), with the
//! metrics' rule: sequences are truncated to the model's `max_position_embeddings` (77), end token
//! kept; no padding.

use crate::protocol::Truncation;
use crate::MetricsError;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

pub use clip_tokenizer::{BOS, EOS};

#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation (the profiles that cut or refuse long prompts).
    untruncated: Tokenizer,
    max_len: usize,
    /// The file(s) it was read from, for error messages.
    pub source: String,
}

impl ClipTokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, max_len: usize) -> Result<Self, MetricsError> {
        let inner = clip_tokenizer::from_tokenizer_json(path)?;
        Self::finish(inner, path.display().to_string(), max_len, path)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(
        vocab: &Path,
        merges: &Path,
        max_len: usize,
    ) -> Result<Self, MetricsError> {
        let inner = clip_tokenizer::from_vocab_merges(vocab, merges)?;
        let source = format!("{} + {}", vocab.display(), merges.display());
        Self::finish(inner, source, max_len, vocab)
    }

    /// `tokenizer.json` in `dir`, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self, MetricsError> {
        let inner = clip_tokenizer::from_folder(dir)?;
        Self::finish(inner, dir.display().to_string(), max_len, dir)
    }

    fn finish(
        mut inner: Tokenizer,
        source: String,
        max_len: usize,
        path: &Path,
    ) -> Result<Self, MetricsError> {
        let untruncated = inner.clone();
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| MetricsError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner,
            untruncated,
            max_len,
            source,
        })
    }

    /// Ids with start and end tokens, truncated to the maximum length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, MetricsError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| MetricsError::Tokenizer {
                path: PathBuf::from(&self.source),
                reason: format!("encoding '{text}': {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids with start and end tokens, a prompt longer than the context handled as `rule` says:
    /// [`Truncation::KeepEnd`] is [`ClipTokenizer::encode`]; [`Truncation::Cut`] keeps the first
    /// `max_len` ids (the end token is lost); [`Truncation::Error`] refuses it.
    pub fn encode_with(&self, text: &str, rule: Truncation) -> Result<Vec<u32>, MetricsError> {
        if rule == Truncation::KeepEnd {
            return self.encode(text);
        }
        let enc = self
            .untruncated
            .encode(text, true)
            .map_err(|e| MetricsError::Tokenizer {
                path: PathBuf::from(&self.source),
                reason: format!("encoding '{text}': {e}"),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            if rule == Truncation::Error {
                return Err(MetricsError::Tokenizer {
                    path: PathBuf::from(&self.source),
                    reason: format!(
                        "prompt '{text}' is {} tokens, more than the model's {}, and the protocol does not truncate",
                        ids.len(),
                        self.max_len
                    ),
                });
            }
            ids.truncate(self.max_len);
        }
        Ok(ids)
    }
}

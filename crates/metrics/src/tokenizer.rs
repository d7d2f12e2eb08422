//! The CLIP BPE tokenizer from a model folder: `tokenizer.json` when present, else built from
//! `vocab.json` + `merges.txt` with the same pipeline transformers' `CLIPTokenizer` builds
//! (`models/clip/tokenization_clip.py`: NFC → collapse whitespace → lowercase; CLIP's split regex then
//! byte-level; BPE with the `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>` around it).
//! Sequences are truncated to the model's `max_position_embeddings` (77), end token kept.

use crate::MetricsError;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The file(s) it was read from, for error messages.
    pub source: String,
}

fn err(path: &Path, reason: impl ToString) -> MetricsError {
    MetricsError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl ClipTokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, max_len: usize) -> Result<Self, MetricsError> {
        let inner = Tokenizer::from_file(path).map_err(|e| err(path, e))?;
        Self::finish(inner, path.display().to_string(), max_len, path)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(
        vocab: &Path,
        merges: &Path,
        max_len: usize,
    ) -> Result<Self, MetricsError> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(|e| err(vocab, e))?;
        let vocab_map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&vocab_text).map_err(|e| err(vocab, e))?;
        let merges_text = std::fs::read_to_string(merges).map_err(|e| err(merges, e))?;
        let merge_list: Vec<serde_json::Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(serde_json::json!([a, b])),
                    _ => Err(err(merges, format!("malformed merge line '{l}'"))),
                }
            })
            .collect::<Result<_, _>>()?;
        let id = |tok: &str| {
            vocab_map
                .get(tok)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| err(vocab, format!("no id for special token '{tok}'")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let special = |t: &str, i: u64| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(BOS, bos), special(EOS, eos)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos], "cls": [BOS, bos],
                "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map, "merges": merge_list},
        });
        let inner: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(vocab, e))?;
        let source = format!("{} + {}", vocab.display(), merges.display());
        Self::finish(inner, source, max_len, vocab)
    }

    /// `tokenizer.json` in `dir`, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self, MetricsError> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json, max_len);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges, max_len);
        }
        Err(err(
            dir,
            "no tokenizer: neither tokenizer.json nor vocab.json + merges.txt",
        ))
    }

    fn finish(
        mut inner: Tokenizer,
        source: String,
        max_len: usize,
        path: &Path,
    ) -> Result<Self, MetricsError> {
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| err(path, e))?;
        inner.with_padding(None);
        Ok(Self { inner, source })
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
}

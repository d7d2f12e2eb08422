//! The CLIP BPE tokenizer of Stable Diffusion (SPEC §6): 77 tokens, `<|startoftext|>` … `<|endoftext|>`,
//! padded with the tokenizer config's `pad_token`, truncated to `model_max_length`.
//!
//! The tokenizer itself is [`clip_tokenizer`]'s: a `tokenizer/tokenizer.json` is used as is; real
//! SD 1.5 folders ship only `vocab.json` + `merges.txt`, from which it builds the same pipeline
//! transformers' `CLIPTokenizer` builds. This wrapper adds SD's padding and truncation, word
//! positions and Textual Inversion tokens.

use clip_tokenizer::{BOS, EOS};
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Load(#[from] clip_tokenizer::Error),
    #[error("tokenizer: token '{token}' is not in the vocabulary of '{path}'")]
    MissingToken { token: String, path: PathBuf },
    #[error("tokenizing '{prompt}': {reason}")]
    Encode { prompt: String, reason: String },
    #[error("the word '{word}' does not occur in the prompt '{prompt}'")]
    WordNotFound { word: String, prompt: String },
    #[error("textual inversion token '{token}' is already in the vocabulary (id {id})")]
    TokenExists { token: String, id: u32 },
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// A prompt tokenized to the model's fixed length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// `max_length` ids: BOS, the prompt's tokens, EOS, then padding.
    pub ids: Vec<u32>,
    /// Token strings of the unpadded part (BOS … EOS), as the vocabulary spells them.
    pub tokens: Vec<String>,
    /// Byte ranges of each unpadded token in the prompt (`(0, 0)` for BOS/EOS).
    pub offsets: Vec<(usize, usize)>,
}

impl TokenizedPrompt {
    /// Number of tokens before padding, BOS and EOS included.
    pub fn len_unpadded(&self) -> usize {
        self.tokens.len()
    }
}

/// The CLIP tokenizer with SD's padding and truncation.
#[derive(Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    source: PathBuf,
    max_length: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// A `tokenizer_config.json` / `special_tokens_map.json` entry: a string or `{"content": ..}`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// The tokenizer of a model: `{subdir}/tokenizer.json`, else `{subdir}/vocab.json` +
    /// `merges.txt`; padding and length from `tokenizer_config.json` (or `special_tokens_map.json`),
    /// defaulting to SD 1.5's (`<|endoftext|>`, 77).
    pub fn from_source(src: &weights::ModelSource, subdir: &str) -> Result<Self, TokenizerError> {
        let p = |f: &str| {
            if subdir.is_empty() {
                f.to_string()
            } else {
                format!("{subdir}/{f}")
            }
        };
        let tok_json = src.file(&[&p("tokenizer.json")]).ok();
        let (tok, source) = match tok_json {
            Some(path) => (clip_tokenizer::from_tokenizer_json(&path)?, path),
            None => {
                let vocab = src.file(&[&p("vocab.json")])?;
                let merges = src.file(&[&p("merges.txt")])?;
                (clip_tokenizer::from_vocab_merges(&vocab, &merges)?, vocab)
            }
        };
        let mut settings = Vec::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            if let Ok(path) = src.file(&[&p(name)]) {
                let v: serde_json::Value = weights::read_json(&path)?;
                settings.push(v);
            }
        }
        let pad = settings
            .iter()
            .find_map(|v| v.get("pad_token").and_then(token_string))
            .unwrap_or_else(|| EOS.to_string());
        let max_length = settings
            .iter()
            .find_map(|v| v.get("model_max_length").and_then(|m| m.as_u64()))
            .filter(|&m| m > 2 && m < 100_000)
            .unwrap_or(77) as usize;
        Self::new(tok, source, &pad, max_length)
    }

    /// A tokenizer folder holding `tokenizer.json` or `vocab.json` + `merges.txt`.
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_source(&weights::ModelSource::Local(dir.to_path_buf()), "")
    }

    fn new(
        tok: Tokenizer,
        source: PathBuf,
        pad: &str,
        max_length: usize,
    ) -> Result<Self, TokenizerError> {
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| TokenizerError::MissingToken {
                    token: t.to_string(),
                    path: source.clone(),
                })
        };
        let (pad_id, bos_id, eos_id) = (id(pad)?, id(BOS)?, id(EOS)?);
        Ok(Self {
            tok,
            source,
            max_length,
            pad_id,
            bos_id,
            eos_id,
        })
    }

    /// The file the vocabulary came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Tokenizes as `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`:
    /// BOS, tokens, EOS (the last content tokens dropped when too long), then `pad_token`.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt, TokenizerError> {
        let enc = self
            .tok
            .encode(prompt, true)
            .map_err(|e| TokenizerError::Encode {
                prompt: prompt.into(),
                reason: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        let mut tokens = enc.get_tokens().to_vec();
        let mut offsets = enc.get_offsets().to_vec();
        if ids.len() > self.max_length {
            // Truncation keeps BOS and EOS and drops content from the end.
            let keep = self.max_length - 1;
            ids.truncate(keep);
            tokens.truncate(keep);
            offsets.truncate(keep);
            ids.push(self.eos_id);
            tokens.push(EOS.to_string());
            offsets.push((0, 0));
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            tokens,
            offsets,
        })
    }

    /// Token positions (indices into the 77 ids) of the first whole-word, case-insensitive
    /// occurrence of `word` in `prompt`; a word split into several BPE tokens gives all of them
    /// in order (the subject token of SPEC §7 is the last).
    pub fn word_positions(&self, prompt: &str, word: &str) -> Result<Vec<usize>, TokenizerError> {
        let not_found = || TokenizerError::WordNotFound {
            word: word.into(),
            prompt: prompt.into(),
        };
        let (start, end) = find_word(prompt, word).ok_or_else(not_found)?;
        let enc = self.encode(prompt)?;
        let pos: Vec<usize> = enc
            .offsets
            .iter()
            .enumerate()
            .filter(|(i, &(s, e))| *i > 0 && e > s && s >= start && e <= end)
            .map(|(i, _)| i)
            .collect();
        if pos.is_empty() {
            return Err(not_found());
        }
        Ok(pos)
    }

    /// Adds a Textual Inversion token (matched before BPE splitting, like transformers'
    /// `add_tokens`) and returns its id. Fails if the token is already known.
    pub fn add_token(&mut self, token: &str) -> Result<u32, TokenizerError> {
        if let Some(id) = self.tok.token_to_id(token) {
            return Err(TokenizerError::TokenExists {
                token: token.into(),
                id,
            });
        }
        self.tok.add_tokens(&[AddedToken::from(token, false)]);
        self.tok
            .token_to_id(token)
            .ok_or_else(|| TokenizerError::MissingToken {
                token: token.into(),
                path: self.source.clone(),
            })
    }
}

/// Byte range of the first case-insensitive occurrence of `word` bounded by non-alphanumerics.
fn find_word(prompt: &str, word: &str) -> Option<(usize, usize)> {
    if word.is_empty() {
        return None;
    }
    let hay = prompt.to_lowercase();
    let needle = word.to_lowercase();
    if hay.len() != prompt.len() {
        // Lowercasing changed byte lengths: fall back to an exact-case search.
        return find_bounded(prompt, word);
    }
    find_bounded(&hay, &needle)
}

fn find_bounded(hay: &str, needle: &str) -> Option<(usize, usize)> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    let mut from = 0;
    while let Some(i) = hay[from..].find(needle) {
        let s = from + i;
        let e = s + needle.len();
        let before = hay[..s].chars().next_back();
        let after = hay[e..].chars().next();
        let needle_word = needle.chars().next().is_some_and(|c| c.is_alphanumeric());
        if !needle_word || (!is_word(before) && !is_word(after)) {
            return Some((s, e));
        }
        from = s + needle.chars().next().map_or(1, char::len_utf8);
    }
    None
}

//! The CLIP BPE tokenizer, as transformers' `CLIPTokenizer` builds it
//! (`models/clip/tokenization_clip.py`, `CLIPTokenizer.__init__`): NFC → whitespace runs to one
//! space → lowercase; CLIP's split regex, then byte-level; BPE with the `</w>` end-of-word suffix and
//! `<|endoftext|>` as unknown; `<|startoftext|> … <|endoftext|>` around the tokens (RoBERTa-style
//! post-processing). No padding and no truncation: each user applies its own rules (the metrics
//! truncate to the text model's positions, Stable Diffusion pads to 77).
//!
//! A model folder's `tokenizer.json` is used as is ([`from_tokenizer_json`]); `vocab.json` +
//! `merges.txt` go through the same pipeline ([`from_vocab_merges`]). The vocabulary of the original
//! CLIP release (`bpe_simple_vocab_16e6.txt.gz`, openai/CLIP, MIT license in `data/LICENSE`) is
//! built in ([`builtin`], [`write_builtin`]): its merges are `data/merges.txt` (the 48,894 merges
//! CLIP's `SimpleTokenizer` reads, in Hugging Face's `merges.txt` format), and the vocabulary is
//! built from them as CLIP does: the 256 byte characters, the same with `</w>`, one token per merge,
//! then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenization pattern (`tokenization_clip.py`'s `self.pat`).
pub const SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The built-in vocabulary's merges, as a Hugging Face `merges.txt` (`#version: 0.2` header).
pub const BUILTIN_MERGES_TXT: &str = include_str!("../data/merges.txt");
/// Size of the built-in vocabulary: 2 × 256 byte tokens + 48,894 merges + 2 special tokens.
pub const BUILTIN_VOCAB_SIZE: usize = 49_408;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tokenizer '{path}': {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizer: token '{token}' is not in the vocabulary of '{path}'")]
    MissingToken { token: String, path: PathBuf },
}

fn load_err(path: &Path, reason: impl ToString) -> Error {
    Error::Load {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`), in CLIP's vocabulary order: the
/// printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ` as themselves, then the others mapped to U+0100….
pub fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut chars: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let others = (0..256u32).filter(|&b| !printable(b));
    chars.extend(
        others
            .enumerate()
            .filter_map(|(n, _)| char::from_u32(256 + n as u32)),
    );
    chars
}

/// The merge lines of a `merges.txt` (header and blank lines skipped), each split into its pair.
pub fn parse_merges(text: &str) -> Result<Vec<(&str, &str)>, String> {
    text.lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a, b)),
                _ => Err(format!("malformed merge line '{l}'")),
            }
        })
        .collect()
}

fn builtin_merges() -> Vec<(&'static str, &'static str)> {
    parse_merges(BUILTIN_MERGES_TXT).expect("the built-in merges are well formed")
}

/// The built-in vocabulary in id order, as CLIP's `SimpleTokenizer` builds it.
pub fn builtin_vocab() -> Vec<String> {
    let bytes = byte_chars();
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
    vocab.extend(builtin_merges().into_iter().map(|(a, b)| format!("{a}{b}")));
    vocab.extend([BOS.to_string(), EOS.to_string()]);
    vocab
}

fn vocab_map(vocab: Vec<String>) -> serde_json::Map<String, serde_json::Value> {
    vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect()
}

/// The tokenizer of the built-in vocabulary (the one of CLIP ViT-B/32 and of SD 1.x's text encoder).
pub fn builtin() -> Tokenizer {
    build(
        vocab_map(builtin_vocab()),
        &builtin_merges(),
        Path::new("<built-in>"),
    )
    .expect("the built-in vocabulary builds")
}

/// Writes the built-in vocabulary as `dir/vocab.json` + `dir/merges.txt` (a tokenizer folder every
/// loader of this workspace and transformers' `CLIPTokenizer` read).
pub fn write_builtin(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| load_err(dir, e))?;
    let vocab = serde_json::Value::Object(vocab_map(builtin_vocab())).to_string();
    for (name, text) in [
        ("vocab.json", vocab.as_str()),
        ("merges.txt", BUILTIN_MERGES_TXT),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| load_err(&path, e))?;
    }
    Ok(())
}

/// A `tokenizer.json`, with its padding and truncation removed.
pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer, Error> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| load_err(path, e))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| load_err(path, e))?;
    Ok(tok)
}

/// The pipeline over `vocab.json` + `merges.txt`.
pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer, Error> {
    let text = std::fs::read_to_string(vocab_path).map_err(|e| load_err(vocab_path, e))?;
    let vocab: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| load_err(vocab_path, e))?;
    let serde_json::Value::Object(vocab) = vocab else {
        return Err(load_err(vocab_path, "vocab.json is not a JSON object"));
    };
    let text = std::fs::read_to_string(merges_path).map_err(|e| load_err(merges_path, e))?;
    let merges = parse_merges(&text).map_err(|e| load_err(merges_path, e))?;
    build(vocab, &merges, vocab_path)
}

/// `dir/tokenizer.json` when present, else `dir/vocab.json` + `dir/merges.txt`.
pub fn from_folder(dir: &Path) -> Result<Tokenizer, Error> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return from_tokenizer_json(&json);
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if vocab.is_file() && merges.is_file() {
        return from_vocab_merges(&vocab, &merges);
    }
    Err(load_err(
        dir,
        "no tokenizer: neither tokenizer.json nor vocab.json + merges.txt",
    ))
}

/// transformers' `CLIPTokenizer` pipeline over a vocabulary and its merges (`source` names them in
/// errors).
pub fn build(
    vocab: serde_json::Map<String, serde_json::Value>,
    merges: &[(&str, &str)],
    source: &Path,
) -> Result<Tokenizer, Error> {
    let id = |t: &str| {
        vocab
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::MissingToken {
                token: t.into(),
                path: source.into(),
            })
    };
    let (bos_id, eos_id) = (id(BOS)?, id(EOS)?);
    let added = |id: u64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(bos_id, BOS), added(eos_id, EOS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos_id], "cls": [BOS, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| load_err(source, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocabulary_has_clip_ids() {
        let vocab = builtin_vocab();
        assert_eq!(vocab.len(), BUILTIN_VOCAB_SIZE);
        assert_eq!(vocab[0], "!");
        assert_eq!(vocab[256], "!</w>");
        assert_eq!(vocab[49406], BOS);
        assert_eq!(vocab[49407], EOS);
        let tok = builtin();
        assert_eq!(tok.get_vocab_size(true), BUILTIN_VOCAB_SIZE);
        let ids = tok.encode("a sks dog in the jungle", true).unwrap();
        assert_eq!(
            ids.get_ids(),
            [49406, 320, 48136, 1929, 530, 518, 10865, 49407]
        );
    }

    #[test]
    fn byte_chars_are_a_permutation_of_256_distinct_characters() {
        let chars = byte_chars();
        assert_eq!(chars.len(), 256);
        let set: std::collections::BTreeSet<char> = chars.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(chars[93], '~');
        assert_eq!(
            chars[188], 'Ā',
            "byte 0 maps to U+0100, after the 188 printable bytes"
        );
    }

    #[test]
    fn written_builtin_folder_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        write_builtin(dir.path()).unwrap();
        let read = from_folder(dir.path()).unwrap();
        let built = builtin();
        for text in ["a photo of a dog", "Naïve CAFÉ, 3.14 <|endoftext|>", ""] {
            assert_eq!(
                read.encode(text, true).unwrap().get_ids(),
                built.encode(text, true).unwrap().get_ids(),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_files_are_one_error_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        let (vocab, merges) = (dir.path().join("vocab.json"), dir.path().join("merges.txt"));
        std::fs::write(&vocab, "[1, 2]").unwrap();
        std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
        let err = from_vocab_merges(&vocab, &merges).unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
        std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        let err = from_vocab_merges(&vocab, &merges).unwrap_err();
        assert!(
            matches!(&err, Error::MissingToken { token, .. } if token == BOS),
            "{err}"
        );
        std::fs::write(&merges, "a b c\n").unwrap();
        let err = from_vocab_merges(&vocab, &merges).unwrap_err().to_string();
        assert!(err.contains("malformed merge line 'a b c'"), "{err}");
    }
}

//! The built-in vocabulary equals the Hugging Face files derived from the original CLIP release
//! (`vocab.json`, `merges.txt`, `tokenizer.json` in `$PND_CLIP_TOKENIZER`, default
//! `../shared/clip-tokenizer` beside the checkout); reported ignored when that folder is absent.

#[test]
#[cfg_attr(
    no_clip_tokenizer,
    ignore = "needs the real CLIP tokenizer: set PND_CLIP_TOKENIZER"
)]
fn builtin_vocabulary_and_merges_equal_the_shared_files() {
    let dir = testdata::clip_tokenizer();
    let want: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).unwrap()).unwrap();
    let vocab = clip_tokenizer::builtin_vocab();
    assert_eq!(vocab.len(), want.len());
    for (id, token) in vocab.iter().enumerate() {
        assert_eq!(
            want.get(token).and_then(|v| v.as_u64()),
            Some(id as u64),
            "{token}"
        );
    }
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    assert_eq!(merges, clip_tokenizer::BUILTIN_MERGES_TXT);
}

#[test]
#[cfg_attr(
    no_clip_tokenizer,
    ignore = "needs the real CLIP tokenizer: set PND_CLIP_TOKENIZER"
)]
fn builtin_tokenizer_equals_tokenizer_json() {
    let dir = testdata::clip_tokenizer();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let builtin = clip_tokenizer::builtin();
    let from_files =
        clip_tokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))
            .unwrap();
    for text in [
        "a sks dog in the jungle",
        "A  Photo\tof   a DOG's toy, isn't it?!",
        "naïve café — “quotes” … emoji 🐶🎒 日本語のテキスト",
        "<|startoftext|> raw special tokens <|endoftext|>",
        "1234567890 3.14159 1e-4 #hashtag @mention http://example.com/a?b=c",
        "",
    ] {
        let want = reference.encode(text, true).unwrap();
        assert_eq!(
            builtin.encode(text, true).unwrap().get_ids(),
            want.get_ids(),
            "{text}"
        );
        assert_eq!(
            from_files.encode(text, true).unwrap().get_ids(),
            want.get_ids(),
            "{text}"
        );
    }
}

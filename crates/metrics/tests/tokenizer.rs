//! The CLIP tokenizer built from `vocab.json` + `merges.txt` tokenizes exactly as `tokenizer.json`.

use metrics::tokenizer::ClipTokenizer;

#[test]
#[cfg_attr(
    no_clip_tokenizer,
    ignore = "needs the real CLIP tokenizer: set PND_CLIP_TOKENIZER"
)]
fn vocab_merges_tokenizer_equals_tokenizer_json_on_all_clip_t_prompts() {
    let dir = testdata::clip_tokenizer();
    let json = ClipTokenizer::from_tokenizer_json(&dir.join("tokenizer.json"), 77).unwrap();
    let built =
        ClipTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), 77)
            .unwrap();
    let mut texts: Vec<String> = Vec::new();
    for s in dreambench::SUBJECTS.iter() {
        for p in s.prompts() {
            texts.push(dreambench::clip_t_prompt(p, s.class));
        }
    }
    assert_eq!(texts.len(), 750);
    texts.extend(
        [
            "A  Photo\tof   a DOG's toy, isn't it?!",
            "naïve café — 3 dogs & 2 cats (50%)",
            "<|startoftext|> raw special tokens <|endoftext|>",
            "",
            &"very long prompt ".repeat(60),
        ]
        .map(String::from),
    );
    for t in &texts {
        let a = json.encode(t).unwrap();
        let b = built.encode(t).unwrap();
        assert_eq!(a, b, "'{t}'");
        assert!(a.len() <= 77);
        assert_eq!(a[0], 49406);
        assert_eq!(*a.last().unwrap(), 49407);
    }
    // Known ids (transformers' CLIPTokenizer): "a dog in the jungle".
    assert_eq!(
        json.encode("a dog in the jungle").unwrap(),
        vec![49406, 320, 1929, 530, 518, 10865, 49407]
    );
}

#[test]
fn a_folder_without_tokenizer_files_is_one_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path(), 77)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("vocab.json"), "{err}");
}

//! The CLIP tokenizer built from vocab.json + merges.txt against the reference tokenizer.json and
//! against transformers' ids (fixture: tools/fixtures/sd_pipeline.py).

mod pipeline_support;

use diffusion::tokenizer::ClipTokenizer;
use pipeline_support::*;

fn bpe() -> ClipTokenizer {
    // The fixture model's tokenizer folder holds only vocab.json + merges.txt (+ config).
    let dir = model_dir().join("tokenizer");
    assert!(!dir.join("tokenizer.json").exists());
    ClipTokenizer::from_folder(&dir).unwrap()
}

#[test]
fn ids_match_transformers() {
    let tok = bpe();
    let facts = facts();
    let ids = facts["token_ids"].as_object().unwrap();
    assert!(ids.len() >= 8);
    for (prompt, want) in ids {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(prompt).unwrap().ids, want, "prompt {prompt:?}");
    }
}

fn many_prompts() -> Vec<String> {
    let mut prompts: Vec<String> = vec![
        "a sks dog".into(),
        "".into(),
        "A <dog7> in the jungle".into(),
        "a photo of <sks-backpack>, (high quality), 4k; f/1.8 :)".into(),
        "Don't, won't; you'll we've I'm they'd it's".into(),
        "naïve café — “quotes” ‘single’ … emoji 🐶🎒 日本語のテキスト".into(),
        "tabs\tand\nnewlines   and   runs".into(),
        "x".repeat(300),
        "a red cube on top of a blue cube ".repeat(10),
        "1234567890 3.14159 1e-4 #hashtag @mention http://example.com/a?b=c".into(),
        "<|startoftext|> inside <|endoftext|> text".into(),
    ];
    let prompts_file = testdata::dreambench().join("prompts_and_classes.txt");
    if let Ok(text) = std::fs::read_to_string(prompts_file) {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for l in &lines {
            prompts.push(l.to_string());
            let inner = l.split('\'').nth(1).unwrap_or(l);
            for (id, class) in [("sks", "dog"), ("<dog7>", "backpack"), ("sks", "rc_car")] {
                prompts.push(inner.replace("{0}", id).replace("{1}", class));
            }
        }
    }
    prompts
}

#[test]
#[cfg_attr(
    any(no_clip_tokenizer, no_dreambench),
    ignore = "needs the real CLIP tokenizer and DreamBench: set PND_CLIP_TOKENIZER and PND_DREAMBENCH"
)]
fn bpe_from_vocab_and_merges_equals_tokenizer_json() {
    let shared = testdata::clip_tokenizer();
    let reference = tokenizers::Tokenizer::from_file(shared.join("tokenizer.json")).unwrap();
    let from_json = ClipTokenizer::from_folder(&shared).unwrap();
    let tok = bpe();
    let prompts = many_prompts();
    assert!(prompts.len() > 50, "only {} prompts", prompts.len());
    for p in &prompts {
        let ours = tok.encode(p).unwrap();
        let want = reference.encode(p.as_str(), true).unwrap();
        let n = want.get_ids().len().min(76); // truncation replaces the 77th by EOS
        assert_eq!(&ours.ids[..n], &want.get_ids()[..n], "prompt {p:?}");
        assert_eq!(ours.ids, from_json.encode(p).unwrap().ids, "prompt {p:?}");
        assert_eq!(ours.ids.len(), 77);
    }
}

#[test]
fn padding_and_truncation() {
    let tok = bpe();
    let e = tok.encode("a dog").unwrap();
    assert_eq!(e.ids[0], 49406);
    assert_eq!(&e.ids[1..4], &[320, 1929, 49407]);
    assert!(
        e.ids[4..].iter().all(|&i| i == 49407),
        "SD 1.5 pads with <|endoftext|>"
    );
    let long = tok.encode(&"dog ".repeat(100)).unwrap();
    assert_eq!(long.ids.len(), 77);
    assert_eq!(long.ids[76], 49407);
    assert_eq!(long.ids[75], 1929);
}

#[test]
fn word_positions_find_subject_tokens() {
    let tok = bpe();
    let p = "a photo of a sks dog in the jungle";
    assert_eq!(tok.word_positions(p, "dog").unwrap(), vec![6]);
    assert_eq!(tok.word_positions(p, "sks").unwrap(), vec![5]);
    // "a" must match the word, not the "a" inside "photo"/"jungle".
    assert_eq!(tok.word_positions(p, "a").unwrap(), vec![1]);
    // A word split into several BPE tokens gives all of them.
    let multi = tok
        .word_positions("a rc_car on the road", "rc_car")
        .unwrap();
    assert!(multi.len() > 1, "{multi:?}");
    assert_eq!(multi[0], 2);
    assert!(tok
        .word_positions(p, "cat")
        .unwrap_err()
        .to_string()
        .contains("'cat'"));
}

#[test]
fn added_token_is_one_token() {
    let mut tok = bpe();
    let facts = facts();
    let before = tok.encode("a <dog7> dog").unwrap();
    assert!(before.len_unpadded() > 5);
    let id = tok.add_token("<dog7>").unwrap();
    assert_eq!(id as u64, facts["ti_token_id"].as_u64().unwrap());
    let want: Vec<u32> = facts["ti_prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        tok.encode(facts["ti_prompt"].as_str().unwrap())
            .unwrap()
            .ids,
        want
    );
    assert_eq!(
        tok.word_positions("a <dog7> dog", "<dog7>").unwrap(),
        vec![2]
    );
    assert!(tok.add_token("<dog7>").is_err());
}

//! `pnd tiny-model` works offline from an empty folder with no tokenizer argument: the CLIP
//! vocabulary built into the binary is used (issue 11 item 1), and the model then generates.

use std::path::Path;
use std::process::{Command, Output};

fn pnd_in(dir: &Path, hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hf_home)
        .output()
        .unwrap()
}

#[test]
fn tiny_model_from_an_empty_folder_offline_uses_the_builtin_vocabulary() {
    let cwd = tempfile::tempdir().unwrap();
    let hf_home = tempfile::tempdir().unwrap();
    let o = pnd_in(cwd.path(), hf_home.path(), &["tiny-model", "--out", "m"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("built-in vocabulary"), "{stderr}");
    let tok = cwd.path().join("m/tokenizer");
    let merges = std::fs::read_to_string(tok.join("merges.txt")).unwrap();
    assert_eq!(merges, clip_tokenizer::BUILTIN_MERGES_TXT);
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(tok.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(vocab.len(), clip_tokenizer::BUILTIN_VOCAB_SIZE);
    // Nothing but the model was written.
    let names: Vec<_> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["m"]);

    let o = pnd_in(
        cwd.path(),
        hf_home.path(),
        &[
            "generate", "--model", "m", "--prompt", "a dog", "--steps", "2", "--height", "64",
            "--width", "64", "--out", "dog.png", "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(cwd.path().join("dog.png").is_file());
}

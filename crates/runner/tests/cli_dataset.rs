//! `pnd dataset check | list` as a user runs them.

use std::process::Command;

fn pnd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn check_passes_on_the_shared_copy() {
    let (ok, out) = pnd(&[
        "dataset",
        "check",
        "--data",
        testdata::dreambench().to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("158 of 158 images verified"), "{out}");
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn check_fails_and_names_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("db");
    for subject in ["cat", "dog", "vase"] {
        std::fs::create_dir_all(copy.join(subject)).unwrap();
        for e in std::fs::read_dir(testdata::dreambench().join(subject)).unwrap() {
            let e = e.unwrap();
            let dst = copy.join(subject).join(e.file_name());
            std::fs::copy(e.path(), &dst).unwrap();
            // The shared dataset is read-only; its copy must be writable to be damaged on purpose.
            let mut perm = std::fs::metadata(&dst).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&dst, perm).unwrap();
        }
    }
    let f = copy.join("dog/01.jpg");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..100]).unwrap();
    std::fs::remove_file(copy.join("cat/00.jpg")).unwrap();
    std::fs::write(copy.join("vase/extra.jpg"), b"x").unwrap();
    let (ok, out) = pnd(&["dataset", "check", "--data", copy.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("altered: dog/01.jpg"), "{out}");
    assert!(out.contains("missing: cat/00.jpg"), "{out}");
    assert!(out.contains("extra:   vase/extra.jpg"), "{out}");
    // The other 27 subjects are missing too: every one of their images is named.
    assert!(out.contains("missing: wolf_plushie/00.jpg"), "{out}");
}

#[test]
fn check_of_a_missing_folder_is_one_clear_error() {
    let (ok, out) = pnd(&["dataset", "check", "--data", "/no/such/dreambench"]);
    assert!(!ok);
    assert!(
        out.contains("'/no/such/dreambench' does not exist") && out.contains("pnd dataset fetch"),
        "{out}"
    );
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn list_prints_subjects_and_json() {
    let data = testdata::dreambench();
    let (ok, out) = pnd(&["dataset", "list", "--data", data.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("30 subjects, 158 images"), "{out}");
    let (ok, out) = pnd(&[
        "dataset",
        "list",
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["images"], 158);
    assert_eq!(v["subjects"].as_array().unwrap().len(), 30);
    assert_eq!(v["subjects"][10]["name"], "dog");
    assert_eq!(v["subjects"][10]["prompts"][0], "a dog in the jungle");
}

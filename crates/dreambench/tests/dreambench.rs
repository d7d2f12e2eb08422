//! DreamBench facts checked against a copy of the dataset (`PND_DREAMBENCH`, default
//! `../shared/dreambench`; the tests that read it are ignored without it).

use dreambench::{
    check, clip_t_prompt, enumerate_jobs, fetch, subject, Dataset, FetchOptions, Kind, Problem,
    PromptStyle, ReferenceRule, LIVE_PROMPTS, OBJECT_PROMPTS, SUBJECTS,
};
use std::process::Command;

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn thirty_subjects_158_images_9_live() {
    let ds = Dataset::open(testdata::dreambench()).unwrap();
    assert_eq!(SUBJECTS.len(), 30);
    assert_eq!(ds.image_count(), 158);
    let live: Vec<&str> = SUBJECTS
        .iter()
        .filter(|s| s.kind == Kind::Live)
        .map(|s| s.name)
        .collect();
    assert_eq!(
        live,
        ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    );
}

/// The class table and both prompt lists agree with the dataset's own `prompts_and_classes.txt`.
#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn class_table_and_prompts_match_prompts_and_classes_txt() {
    let text =
        std::fs::read_to_string(testdata::dreambench().join("prompts_and_classes.txt")).unwrap();
    let classes: Vec<(String, String)> = text
        .lines()
        .skip_while(|l| *l != "subject_name,class")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once(',').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    assert_eq!(classes.len(), 30);
    for (s, (name, class)) in SUBJECTS.iter().zip(&classes) {
        assert_eq!((s.name, s.class), (name.as_str(), class.as_str()));
    }
    // Prompt lists: python format lines `'a {0} {1} in the jungle'.format(...)`.
    let lists: Vec<Vec<String>> = text
        .split("prompt_list = [")
        .skip(1)
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.trim().strip_prefix('\''))
                .map(|l| {
                    l.split('\'')
                        .next()
                        .unwrap()
                        .replace("{0} {1}", "{subject}")
                })
                .collect()
        })
        .collect();
    assert_eq!(lists.len(), 2);
    assert_eq!(lists[0], OBJECT_PROMPTS.to_vec());
    assert_eq!(lists[1], LIVE_PROMPTS.to_vec());
    assert_eq!(subject("bear_plushie").unwrap().class, "stuffed animal");
    assert_eq!(subject("pink_sunglasses").unwrap().class, "glasses");
}

#[test]
fn prompts_render_per_method() {
    let dog = subject("dog").unwrap();
    let p0 = dog.prompts()[0];
    assert_eq!(
        PromptStyle::dreambooth("sks")
            .render(p0, dog.class)
            .unwrap(),
        "a sks dog in the jungle"
    );
    assert_eq!(
        PromptStyle::class_only().render(p0, dog.class).unwrap(),
        "a dog in the jungle"
    );
    assert_eq!(clip_t_prompt(p0, dog.class), "a dog in the jungle");
    let ti = PromptStyle::textual_inversion("<dog7>", true);
    assert_eq!(
        ti.render(p0, dog.class).unwrap(),
        "a <dog7> dog in the jungle"
    );
    assert_eq!(
        PromptStyle::textual_inversion("<dog7>", false)
            .render(p0, dog.class)
            .unwrap(),
        "a <dog7> in the jungle"
    );
    assert_eq!(ti.added_words(dog.class).unwrap(), ["<dog7>"]);
    // Live vs object lists differ at index 10; identifier in the middle of a prompt.
    assert_eq!(
        PromptStyle::dreambooth("sks")
            .render(dog.prompts()[10], dog.class)
            .unwrap(),
        "a sks dog wearing a red hat"
    );
    let bear = subject("bear_plushie").unwrap();
    assert_eq!(
        PromptStyle::dreambooth("sks")
            .render(bear.prompts()[20], bear.class)
            .unwrap(),
        "a red sks stuffed animal"
    );
    assert_eq!(
        clip_t_prompt(bear.prompts()[10], bear.class),
        "a stuffed animal with a wheat field in the background"
    );
    // A style naming a placeholder without a value is an error, not a prompt with braces.
    let err = PromptStyle {
        subject: "{token} {class}".into(),
        identifier: "sks".into(),
        token: None,
    }
    .render(p0, "dog")
    .unwrap_err();
    assert_eq!(err.placeholder, "token");
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn reference_image_rule() {
    let ds = Dataset::open(testdata::dreambench()).unwrap();
    let first = ds.reference_image("dog7", &ReferenceRule::First).unwrap();
    assert_eq!(first.file_name().unwrap(), "00.jpg");
    let third = ds
        .reference_image("dog7", &ReferenceRule::Index(2))
        .unwrap();
    assert_eq!(third.file_name().unwrap(), "02.jpg");
    assert!(ds
        .reference_image("dog7", &ReferenceRule::Index(99))
        .is_err());
    assert!(ds.reference_image("nope", &ReferenceRule::First).is_err());
}

#[test]
fn job_ids_are_stable_and_human_readable() {
    let subjects = [subject("dog7").unwrap(), subject("backpack_dog").unwrap()];
    let methods = vec!["dreambooth".to_string(), "dreambooth+pnd".to_string()];
    let a = enumerate_jobs(&methods, &subjects, &[0, 3], &[0, 1]);
    let b = enumerate_jobs(&methods, &subjects, &[0, 3], &[0, 1]);
    assert_eq!(a, b);
    assert_eq!(a.len(), 2 * 2 * 2 * 2);
    let ids: Vec<String> = a.iter().map(|j| j.id().0).collect();
    assert_eq!(ids[0], "dreambooth__dog7__p00__s0");
    assert_eq!(ids[3], "dreambooth__dog7__p03__s1");
    assert_eq!(ids[4], "dreambooth__backpack_dog__p00__s0");
    assert_eq!(ids.last().unwrap(), "dreambooth+pnd__backpack_dog__p03__s1");
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn shared_copy_verifies() {
    let report = check(testdata::dreambench()).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.verified, 158);
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn check_names_truncated_missing_and_extra_files() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("dreambench");
    testdata::copy_tree(&testdata::dreambench(), &copy);
    let truncated = copy.join("dog/02.jpg");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(copy.join("cat/01.jpg")).unwrap();
    std::fs::write(copy.join("vase/99.jpg"), b"not an image").unwrap();
    let report = check(&copy).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.problems.len(), 3, "{:?}", report.problems);
    assert!(report.problems.contains(&Problem::Missing {
        path: "cat/01.jpg".into()
    }));
    assert!(report.problems.contains(&Problem::Extra {
        path: "vase/99.jpg".into()
    }));
    assert!(report
        .problems
        .iter()
        .any(|p| matches!(p, Problem::Altered { path, .. } if path == "dog/02.jpg")));
    assert_eq!(report.verified, 156);
}

/// `fetch` from a local git repository laid out like google/dreambooth (no network needed).
#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn fetch_clones_a_repository_and_verifies_its_dataset_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("dreambooth");
    testdata::copy_tree(&testdata::dreambench(), &repo.join("dataset"));
    std::fs::write(repo.join("README.md"), "DreamBooth\n").unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "dataset"]);
    let dest = tmp.path().join("out/dreambench");
    let url = format!("file://{}", repo.display());
    let report = fetch(&FetchOptions {
        dest: dest.clone(),
        from: url.clone(),
    })
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(Dataset::open(&dest).unwrap().image_count(), 158);
    // A second fetch into the same non-empty folder is refused, and nothing there is touched.
    let err = fetch(&FetchOptions {
        dest: dest.clone(),
        from: url,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(check(&dest).unwrap().verified, 158);
    // A repository without dataset/ and an unreachable URL are clear errors; no partial dest.
    let bad = fetch(&FetchOptions {
        dest: tmp.path().join("x"),
        from: tmp.path().join("nope").display().to_string(),
    });
    assert!(bad.unwrap_err().to_string().contains("git clone"));
    assert!(!tmp.path().join("x").exists());
}

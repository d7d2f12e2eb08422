//! What a new user met (issue 26), end to end through `pnd` on the built-in tiny model: sizes,
//! output formats, values listed twice, short schedules, cheap checks first, partial datasets,
//! error lines.

mod common;

use common::{pnd, pnd_in, repo};
use std::path::{Path, PathBuf};

/// `pnd tiny-model --out DIR/m`.
fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("m");
    let o = pnd(&["tiny-model", "--out", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    m
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A small RGB image file of one colour.
fn write_image(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([shade, (x * 6) as u8, (y * 6) as u8])
    })
    .save(path)
    .unwrap();
}

#[test]
fn generate_takes_the_models_size_and_the_format_of_its_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    // diffusers: unet.config.sample_size × 2^(len(vae.block_out_channels) − 1).
    let sample = json(&m.join("unet/config.json"))["sample_size"]
        .as_u64()
        .unwrap();
    let levels = json(&m.join("vae/config.json"))["block_out_channels"]
        .as_array()
        .unwrap()
        .len();
    let side = (sample << (levels - 1)) as u32;
    let gen = |out: &Path| {
        pnd(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "a dog",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
    };
    let png = tmp.path().join("a.png");
    let o = gen(&png);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (side, side));
    assert_ne!(side, 512, "the tiny model is not 512×512");

    let jpg = tmp.path().join("a.JPG");
    let o = gen(&jpg);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&jpg).unwrap();
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "a JPEG file");
    assert_eq!(
        image::guess_format(&bytes).unwrap(),
        image::ImageFormat::Jpeg
    );

    // Another extension is refused before any model is loaded, and nothing is written.
    let gif = tmp.path().join("out/a.gif");
    let o = gen(&gif);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("output '")
            && e.contains("a.gif': the file name must end in .png, .jpg or .jpeg"),
        "{e}"
    );
    assert!(
        !e.contains("device:"),
        "refused after opening the device: {e}"
    );
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn a_value_listed_twice_is_refused_everywhere_with_one_message() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let o = pnd(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--seeds",
        "0,0",
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(stderr(&o).contains("error: --seeds lists seed 0 twice (positions 1 and 2)"));

    // pnd eval: the same rule for every list, before anything is scored or written.
    let images = tmp.path().join("imgs");
    write_image(&images.join("dog/0-s0.png"), 10);
    let out = tmp.path().join("run");
    for (flag, value, msg) in [
        (
            "--seeds",
            "0,0",
            "--seeds lists seed 0 twice (positions 1 and 2)",
        ),
        (
            "--subjects",
            "dog,dog",
            "--subjects lists subject dog twice (positions 1 and 2)",
        ),
        (
            "--prompts",
            "0,20,0",
            "--prompts lists prompt 0 twice (positions 1 and 3)",
        ),
    ] {
        let (ok, log) = pnd_in(
            &[
                "eval",
                images.to_str().unwrap(),
                "--name",
                "mine",
                "--out",
                out.to_str().unwrap(),
                flag,
                value,
            ],
            &repo(),
        );
        assert!(!ok && log.contains(&format!("error: {msg}")), "{log}");
        assert!(!out.exists(), "{flag}: a refused eval writes nothing");
    }

    // An experiment file: located at the second occurrence.
    let exp = tmp.path().join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"dup\"\nsubjects = [\"dog\"]\nprompts = [0]\nseeds = [0, 1, 0]\n\n[models]\nbase = \"{}\"\n\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n",
            m.display()
        ),
    )
    .unwrap();
    let (ok, log) = pnd_in(&["sweep", exp.to_str().unwrap(), "--dry-run"], &repo());
    assert!(!ok, "{log}");
    assert!(
        log.contains("exp.toml:4:16: seeds lists seed 0 twice (positions 1 and 3)"),
        "{log}"
    );
}

#[test]
fn a_short_schedule_skips_the_inversion_and_a_wrong_class_stops_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let reference = tmp.path().join("ref.png");
    write_image(&reference, 120);
    let run = |class: &str, cache: &Path| {
        pnd(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "a dog on the beach",
            "--steps",
            "6",
            "--height",
            "64",
            "--width",
            "64",
            "--pick-and-draw",
            "--reference",
            reference.to_str().unwrap(),
            "--class",
            class,
            "--palette-cache",
            cache.to_str().unwrap(),
            "--out",
            tmp.path().join("g.png").to_str().unwrap(),
            "--quiet",
        ])
    };
    // The paper's appearance window [10, 20) lies past a 6-step schedule: a warning, and no
    // inversion or palette (the cache holds the layout template alone).
    let cache = tmp.path().join("cache");
    let o = run("dog", &cache);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("warning: the appearance window [10, 20) lies outside the 6-step schedule (steps 0..6): no step is guided by it, and the inversion and palette are skipped"),
        "{e}"
    );
    let cached: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!cached.is_empty(), "the template is cached");
    assert!(
        cached.iter().all(|f| f.starts_with("template-")),
        "an inversion or palette was computed: {cached:?}"
    );
    // A class that is not in the prompt is reported before any inversion or template.
    let cache2 = tmp.path().join("cache2");
    let o = run("cat", &cache2);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains(
            "error: subject token: the class 'cat' is not in the prompt 'a dog on the beach'"
        ),
        "{e}"
    );
    assert!(!e.contains("identifier None"), "{e}");
    assert!(!cache2.exists(), "work was done before the check");
}

#[test]
fn oracle_runs_on_the_subjects_a_partial_copy_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_image(&data.join("dog/00.png"), 10);
    write_image(&data.join("dog/01.png"), 200);
    let fixtures = repo().join("crates/metrics/tests/fixtures");
    let args = |subjects: Option<&str>| {
        let mut a = vec![
            "oracle".to_string(),
            "--data".into(),
            data.display().to_string(),
            "--dino".into(),
            fixtures.join("dino_tiny").display().to_string(),
            "--clip".into(),
            fixtures.join("clip_tiny").display().to_string(),
            "--json".into(),
        ];
        if let Some(s) = subjects {
            a.extend(["--subjects".into(), s.into()]);
        }
        a
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        pnd(&refs)
    };
    let o = run(args(Some("dog")));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("of 1 subject\n"),
        "not singular: {}",
        stderr(&o)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["n_images"], 2);
    assert_eq!(report["n_pairs"], 2);
    let subjects: Vec<&String> = report["per_subject"].as_object().unwrap().keys().collect();
    assert_eq!(subjects, ["dog"]);
    // All 30 need all 30 folders: the error names what is missing.
    let o = run(args(None));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("backpack"), "{}", stderr(&o));
    let o = run(args(Some("dog,dog")));
    assert!(stderr(&o).contains("--subjects lists subject dog twice"));
}

#[test]
fn an_error_names_each_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let missing = tmp.path().join("nope.safetensors");
    let o = pnd(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--steps",
        "2",
        "--init-latents",
        missing.to_str().unwrap(),
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("nope.safetensors"), "{e}");
    assert_eq!(e.matches("(os error 2)").count(), 1, "{e}");
    // pnd eval on a path that is not there says so.
    let (ok, log) = pnd_in(
        &[
            "eval",
            tmp.path().join("none").to_str().unwrap(),
            "--name",
            "x",
        ],
        &repo(),
    );
    assert!(!ok && log.contains("none' does not exist"), "{log}");
}

#[test]
fn null_text_inversion_reports_its_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let image = tmp.path().join("ref.png");
    write_image(&image, 90);
    let o = pnd(&[
        "invert",
        "--model",
        m.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--steps",
        "12",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        tmp.path().join("inv.safetensors").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    let lines: Vec<&str> = e
        .lines()
        .filter(|l| l.starts_with("null-text inversion: step "))
        .collect();
    assert_eq!(
        lines,
        [
            "null-text inversion: step 10/12",
            "null-text inversion: step 12/12"
        ],
        "{e}"
    );
}

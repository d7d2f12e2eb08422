//! `pnd eval` (issue 15): the images of a sweep, scored again as another program's images, give
//! exactly the sweep's scores; a manifest and a partial folder work; bad input is one clear error
//! that loses nothing; `pnd report` puts an eval run and a sweep run in one table.
//!
//! The fixture is a small sweep on the demo's tiny models and mini benchmark: unguided Stable
//! Diffusion, 2 subjects × 2 prompts × 1 seed, 4 denoising steps.

mod common;

use common::{pnd, pnd_in};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Fixture {
    root: PathBuf,
    /// The sweep's run folder.
    sweep: PathBuf,
    /// A protocol file naming the tiny metric models and the mini benchmark.
    protocol: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // One folder per test binary, rebuilt at each run (a static is never dropped, so a
        // temporary folder would be left behind).
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-fixture");
        if root.exists() {
            std::fs::remove_dir_all(&root).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        let tokenizer = root.join("clip-tokenizer");
        clip_tokenizer::write_builtin(&tokenizer).unwrap();
        let models = root.join("models");
        tiny::write_tiny_model(&models.join("sd"), 0, &tokenizer, &Default::default()).unwrap();
        tiny::write_tiny_metric_models(&models, &tokenizer, 0).unwrap();
        runner::demo::subjects::write_mini_benchmark(&root.join("data"), 3, 96).unwrap();
        let p = |s: &str| root.join(s).display().to_string();
        let metrics = format!(
            "[metrics]\ndata = \"{}\"\ndino = \"{}\"\nclip = \"{}\"\n",
            p("data"),
            p("models/dino"),
            p("models/clip")
        );
        let exp = root.join("small.toml");
        std::fs::write(
            &exp,
            format!(
                "name = \"small\"\nsubjects = [\"dog\", \"teapot\"]\nprompts = [0, 20]\nseeds = [0]\n\n[models]\nbase = \"{}\"\n\n[generation]\nsteps = 4\nheight = 64\nwidth = 64\n\n{metrics}\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n",
                p("models/sd")
            ),
        )
        .unwrap();
        let protocol = root.join("tiny-protocol.toml");
        std::fs::write(&protocol, format!("[generation]\nsteps = 4\n\n{metrics}")).unwrap();
        let sweep = root.join("sweep");
        let (ok, log) = pnd_in(
            &[
                "sweep",
                exp.to_str().unwrap(),
                "--out",
                sweep.to_str().unwrap(),
            ],
            &root,
        );
        assert!(ok, "{log}");
        Fixture {
            root,
            sweep,
            protocol,
        }
    })
}

/// The rows of a run's `results.csv`, keyed by (subject, prompt index, seed).
fn rows(run: &Path) -> BTreeMap<(String, usize, u64), runner::report::rows::ImageRow> {
    let mut r = csv::Reader::from_path(run.join("results.csv")).unwrap();
    let store = runner::sweep::RunStore::open(run).unwrap();
    r.deserialize::<runner::report::rows::ImageRow>()
        .map(|row| {
            let mut row = row.unwrap();
            // Timings are not in results.csv: they are the run's timings/ files.
            row.timing = store
                .read_timing(&dreambench::JobId(row.id.clone()))
                .expect("a timing per row");
            ((row.subject.clone(), row.prompt_index, row.seed), row)
        })
        .collect()
}

/// The sweep's images laid out as `<subject>/<prompt index>-s<seed>.png` in a new folder.
fn layout(name: &str) -> PathBuf {
    let f = fixture();
    let dir = f.root.join(name);
    for ((subject, p, seed), row) in rows(&f.sweep) {
        let to = dir.join(&subject).join(format!("{p}-s{seed}.png"));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f.sweep.join(&row.image), &to).unwrap();
    }
    dir
}

/// `pnd eval IMAGES --name NAME` under the tiny protocol, over the sweep's subjects, prompts
/// and seeds, plus `extra` arguments: success and the log.
fn eval(images: &Path, name: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let out = eval_command(images, name, out, extra).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The command of [`eval`], to start without waiting.
fn eval_command(images: &Path, name: &str, out: &Path, extra: &[&str]) -> std::process::Command {
    let f = fixture();
    let mut args = vec!["eval", images.to_str().unwrap(), "--name", name];
    if !extra.contains(&"--protocol") {
        args.extend(["--protocol", f.protocol.to_str().unwrap()]);
    }
    args.extend(["--out", out.to_str().unwrap(), "--device", "cpu"]);
    if !extra.contains(&"--subjects") {
        args.extend(["--subjects", "dog,teapot"]);
    }
    if !extra.contains(&"--prompts") {
        args.extend(["--prompts", "0,20"]);
    }
    args.extend_from_slice(extra);
    let mut c = common::pnd_command(&args);
    c.current_dir(&f.root);
    c
}

#[test]
fn eval_of_a_sweeps_images_gives_exactly_the_sweeps_scores_and_reports_beside_it() {
    let f = fixture();
    let images = layout("layout-full");
    let out = f.root.join("eval-full");
    let (ok, log) = eval(&images, "external", &out, &["--compare-to", "sd"]);
    assert!(ok, "{log}");
    assert!(
        log.contains("4 image(s) of 4 expected (100.0% coverage), 0 missing, 0 extra"),
        "{log}"
    );
    let (want, got) = (rows(&f.sweep), rows(&out));
    assert_eq!(got.len(), 4);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        let g = &got[k];
        // The same bytes through the same scorer (with a fresh embedding cache): equal bits.
        assert_eq!(
            (g.dino, g.clip_i, g.clip_t, g.dino_max),
            (w.dino, w.clip_i, w.clip_t, w.dino_max),
            "{k:?}"
        );
        assert!(w.dino_max.is_some());
        assert_eq!(
            (g.method.as_str(), g.baseline.as_str()),
            ("external", "images")
        );
        assert_eq!(g.clip_t_prompt, w.clip_t_prompt);
        assert_eq!(g.device, "external");
        // Phases: the sweep sampled, decoded and scored; the eval only scored.
        assert!(
            w.timing.sampling_s.is_some()
                && w.timing.decode_s.is_some()
                && w.timing.scoring_s.is_some()
        );
        assert!(w.timing.inversion_s.is_none(), "unguided: no inversion");
        assert!(
            g.timing.sampling_s.is_none()
                && g.timing.decode_s.is_none()
                && g.timing.scoring_s.is_some()
        );
        // The run folder holds the image it scored.
        assert_eq!(
            std::fs::read(out.join(&g.image)).unwrap(),
            std::fs::read(f.sweep.join(&w.image)).unwrap()
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("oracle.json")).unwrap(),
        std::fs::read_to_string(f.sweep.join("oracle.json")).unwrap()
    );
    let oracle: runner::report::rows::OracleRow =
        serde_json::from_str(&std::fs::read_to_string(out.join("oracle.json")).unwrap()).unwrap();
    assert_eq!(oracle.dino_max_pair.len(), 2, "{oracle:?}");
    // Its own report: every image, the oracle gate not applied to tiny models.
    let table = std::fs::read_to_string(out.join("report/table.md")).unwrap();
    assert!(table.contains("| external | "), "{table}");
    let front = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        front.contains("- Oracle gate: not applied (the metric models")
            && !front.contains("Warning"),
        "{front}"
    );

    // One table over the sweep and the eval run.
    let both = f.root.join("report-both");
    let out_note = pnd(&[
        "report",
        f.sweep.to_str().unwrap(),
        out.to_str().unwrap(),
        "--out",
        both.to_str().unwrap(),
    ]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out_note.stdout),
        String::from_utf8_lossy(&out_note.stderr)
    );
    assert!(out_note.status.success(), "{log}");
    let table = std::fs::read_to_string(both.join("table.md")).unwrap();
    let sd = table
        .lines()
        .find(|l| l.starts_with("| Stable Diffusion |"))
        .expect(&table);
    let ext = table
        .lines()
        .find(|l| l.starts_with("| external |"))
        .expect(&table);
    // Equal scores, so equal cells apart from the label and the (zero) change against the
    // method it is compared with (`--compare-to sd`).
    assert_eq!(
        sd.trim_start_matches("| Stable Diffusion |"),
        ext.trim_start_matches("| external |")
            .replace(" (+0.000)", ""),
        "{table}"
    );
    assert_eq!(ext.matches("(+0.000)").count(), 3, "{table}");
    // Identical pairs: delta 0, a collapsed interval, p = 1.
    let zero = "+0.000 [+0.000, +0.000], p 1.000";
    assert!(
        table.contains(&format!(
            "| external | Stable Diffusion | 4 | {zero} | {zero} | {zero} |"
        )),
        "{table}"
    );
    assert!(table.contains("| Real Images (Oracle) |"), "{table}");
    let front = std::fs::read_to_string(both.join("report.md")).unwrap();
    assert!(
        front.contains("# Report of experiment 'small'")
            && front.contains("## Also in this table: experiment 'eval-external'"),
        "{front}"
    );
    for f in [
        "pareto_dino.png",
        "subjects_dino.png",
        "table.csv",
        "results.parquet",
        // reference | Stable Diffusion | external (the method it is compared with), one row per
        // prompt.
        "grids/dog__external.png",
        "grids/teapot__external.png",
    ] {
        assert!(both.join(f).is_file(), "{f}");
    }
    let grid = image::open(both.join("grids/dog__external.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (3 * 192 + 16, 24 + 2 * (20 + 192 + 4) + 4)
    );
    // A report of several runs needs --out; the same method twice is refused.
    let e = pnd(&["report", f.sweep.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("needs --out"));
    let e = pnd(&[
        "report",
        out.to_str().unwrap(),
        out.to_str().unwrap(),
        "--out",
        f.root.join("dup").to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("method 'external' is in more than one"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
}

#[test]
fn a_partial_folder_is_scored_with_its_coverage_and_extras_listed() {
    let f = fixture();
    let images = layout("layout-partial");
    std::fs::remove_file(images.join("teapot/20-s0.png")).unwrap();
    // Outside the expected seeds (0): listed, not scored.
    std::fs::copy(images.join("dog/0-s0.png"), images.join("dog/0-s9.png")).unwrap();
    let out = f.root.join("eval-partial");
    let (ok, log) = eval(&images, "partial", &out, &["--seeds", "0"]);
    assert!(ok, "{log}");
    assert!(
        log.contains("3 image(s) of 4 expected (75.0% coverage), 1 missing, 1 extra"),
        "{log}"
    );
    assert!(log.contains("missing: partial__teapot__p20__s0"), "{log}");
    assert!(log.contains("0-s9.png"), "{log}");
    let got = rows(&out);
    let want = rows(&f.sweep);
    assert_eq!(got.len(), 3);
    for (k, g) in &got {
        assert_eq!(
            (g.dino, g.clip_i, g.clip_t),
            (want[k].dino, want[k].clip_i, want[k].clip_t)
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("missing.csv")).unwrap(),
        "subject,prompt_index,seed\nteapot,20,0\n"
    );
    assert!(std::fs::read_to_string(out.join("extra.csv"))
        .unwrap()
        .contains("0-s9.png"));
    let table = std::fs::read_to_string(out.join("report/table.md")).unwrap();
    assert!(table.contains("| 3 of 4 (75%) |"), "{table}");
    let csv = std::fs::read_to_string(out.join("report/table.csv")).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.starts_with("partial,3,") && l.contains(",4,")),
        "{csv}"
    );
    let front = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        front.contains("- Jobs: 3 of 4 finished, 0 failed"),
        "{front}"
    );
}

#[test]
fn a_manifest_names_any_files() {
    let f = fixture();
    let dir = f.root.join("manifest-images");
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from("subject,prompt_index,seed,path,prompt\n");
    for ((subject, p, seed), row) in rows(&f.sweep) {
        let name = format!("img-{subject}-{p}.png");
        std::fs::copy(f.sweep.join(&row.image), dir.join(&name)).unwrap();
        text.push_str(&format!(
            "{subject},{p},{seed},{name},a photo of {subject} number {p}\n"
        ));
    }
    let manifest = dir.join("list.csv");
    std::fs::write(&manifest, text).unwrap();
    let out = f.root.join("eval-manifest");
    let (ok, log) = eval(&manifest, "listed", &out, &[]);
    assert!(ok, "{log}");
    let (want, got) = (rows(&f.sweep), rows(&out));
    assert_eq!(got.len(), 4);
    for (k, g) in &got {
        assert_eq!(
            (g.dino, g.clip_i, g.clip_t),
            (want[k].dino, want[k].clip_i, want[k].clip_t)
        );
        assert_eq!(g.prompt, format!("a photo of {} number {}", k.0, k.1));
    }
}

#[test]
fn bad_input_is_one_clear_error_and_loses_nothing() {
    let f = fixture();
    let images = layout("layout-bad");
    let out = f.root.join("eval-bad");
    let (ok, log) = eval(&images, "bad", &out, &[]);
    assert!(ok, "{log}");
    let results = std::fs::read(out.join("results.csv")).unwrap();
    let check = |make: &dyn Fn(&Path), undo: &dyn Fn(&Path), want: &[&str]| {
        make(&images);
        let (ok, log) = eval(&images, "bad", &out, &["--resume"]);
        undo(&images);
        assert!(!ok, "{log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{log}");
        for w in want {
            assert!(errors[0].contains(w), "want '{w}' in: {log}");
        }
        // The run folder's results are untouched.
        assert_eq!(std::fs::read(out.join("results.csv")).unwrap(), results);
    };
    let png = |p: &Path| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::RgbImage::new(8, 8).save(p).unwrap();
    };
    check(
        &|r| png(&r.join("dogg/0-s0.png")),
        &|r| std::fs::remove_dir_all(r.join("dogg")).unwrap(),
        &["unknown subject 'dogg'"],
    );
    check(
        &|r| png(&r.join("dog/31-s0.png")),
        &|r| std::fs::remove_file(r.join("dog/31-s0.png")).unwrap(),
        &["31-s0.png", "prompt index 31 out of range"],
    );
    let saved = std::fs::read(images.join("dog/0-s0.png")).unwrap();
    check(
        &|r| std::fs::write(r.join("dog/0-s0.png"), b"truncated").unwrap(),
        &|r| std::fs::write(r.join("dog/0-s0.png"), &saved).unwrap(),
        &["dog/0-s0.png", "not a readable image"],
    );
    let manifest = f.root.join("bad-manifest.csv");
    std::fs::write(
        &manifest,
        "subject,prompt_index,seed,path\ndog,0,zero,a.png\n",
    )
    .unwrap();
    let (ok, log) = eval(&manifest, "bad2", &f.root.join("eval-bad2"), &[]);
    assert!(!ok);
    assert!(
        log.contains("bad-manifest.csv' line 2: seed 'zero' is not a number"),
        "{log}"
    );
    assert!(
        !f.root.join("eval-bad2").exists(),
        "a failed eval left a run folder"
    );
    let (ok, log) = eval(&images, "Bad Name", &f.root.join("eval-bad3"), &[]);
    assert!(!ok && log.contains("--name 'Bad Name'"), "{log}");
    let (ok, log) = eval(
        &images,
        "x",
        &f.root.join("eval-bad4"),
        &["--protocol", "nonesuch"],
    );
    assert!(!ok && log.contains("no protocol 'nonesuch'"), "{log}");
    // A rerun without --resume refuses a folder with results.
    let (ok, log) = eval(&images, "bad", &out, &[]);
    assert!(!ok && log.contains("already has results"), "{log}");
}

/// The same inside a sweep: a method of baseline `images` with a path template scores the
/// files it names like the sweep's own images; a missing file stops the sweep before any job,
/// named.
#[test]
fn an_images_method_in_a_sweep_scores_files_from_its_template() {
    let f = fixture();
    let images = layout("layout-sweep");
    let p = |s: &str| f.root.join(s).display().to_string();
    let exp = f.root.join("with-images.toml");
    let protocol = std::fs::read_to_string(&f.protocol).unwrap();
    std::fs::write(
        &exp,
        format!(
            "name = \"with-images\"\nsubjects = [\"dog\", \"teapot\"]\nprompts = [0, 20]\nseeds = [0]\n\n[models]\nbase = \"{}\"\n\n{protocol}\n[[methods]]\nname = \"ext\"\nbaseline = \"images\"\nimages = \"{}/{{subject}}/{{prompt}}-s{{seed}}.png\"\n",
            p("models/sd"),
            images.display()
        ),
    )
    .unwrap();
    let run = f.root.join("sweep-images");
    let (ok, log) = pnd_in(
        &[
            "sweep",
            exp.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ],
        &f.root,
    );
    assert!(ok, "{log}");
    let (want, got) = (rows(&f.sweep), rows(&run));
    assert_eq!(got.len(), 4);
    for (k, g) in &got {
        let w = &want[k];
        assert_eq!(
            (g.dino, g.clip_i, g.clip_t, g.dino_max),
            (w.dino, w.clip_i, w.clip_t, w.dino_max),
            "{k:?}"
        );
        assert_eq!((g.method.as_str(), g.baseline.as_str()), ("ext", "images"));
    }
    std::fs::remove_file(images.join("dog/20-s0.png")).unwrap();
    let (ok, log) = pnd_in(
        &[
            "sweep",
            exp.to_str().unwrap(),
            "--out",
            f.root.join("sweep-images-2").to_str().unwrap(),
        ],
        &f.root,
    );
    assert!(!ok, "{log}");
    assert!(
        log.contains("method 'ext': 1 image(s) missing") && log.contains("ext__dog__p20__s0"),
        "{log}"
    );
    assert!(!f.root.join("sweep-images-2/rows").exists(), "{log}");
}

/// An eval run is a run folder like any other: `pnd merge` copies it whole and the merged folder
/// reports the same table.
#[test]
fn pnd_merge_treats_an_eval_run_like_a_sweeps() {
    let f = fixture();
    let images = layout("layout-merge");
    let out = f.root.join("eval-merge");
    let (ok, log) = eval(&images, "merged", &out, &[]);
    assert!(ok, "{log}");
    let merged = f.root.join("eval-merged");
    let (ok, log) = pnd_in(
        &[
            "merge",
            out.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        &f.root,
    );
    assert!(ok && log.contains("4 of 4 jobs done"), "{log}");
    assert_eq!(
        std::fs::read(merged.join("results.csv")).unwrap(),
        std::fs::read(out.join("results.csv")).unwrap()
    );
    let (ok, log) = pnd_in(&["report", merged.to_str().unwrap()], &f.root);
    assert!(ok, "{log}");
    assert_eq!(
        std::fs::read_to_string(merged.join("report/table.md")).unwrap(),
        std::fs::read_to_string(out.join("report/table.md")).unwrap()
    );
}

/// A JPEG is scored through the protocol's decoder, as `pnd score` scores it: the same three
/// numbers to the bit.
#[test]
fn a_jpeg_scores_as_pnd_score_scores_it() {
    let f = fixture();
    let want = rows(&f.sweep);
    let dog = &want[&("dog".to_string(), 0, 0)];
    let dir = f.root.join("layout-jpeg");
    std::fs::create_dir_all(dir.join("dog")).unwrap();
    let jpeg = dir.join("dog/0-s0.jpg");
    image::open(f.sweep.join(&dog.image))
        .unwrap()
        .to_rgb8()
        .save(&jpeg)
        .unwrap();
    let out = f.root.join("eval-jpeg");
    let (ok, log) = eval(&dir, "jpeg", &out, &["--subjects", "dog", "--prompts", "0"]);
    assert!(ok, "{log}");
    let got = rows(&out);
    let g = &got[&("dog".to_string(), 0, 0)];
    assert!(g.image.ends_with("image.jpg"), "{}", g.image);
    let p = |s: &str| f.root.join(s).display().to_string();
    let score = pnd(&[
        "score",
        "--generated",
        jpeg.to_str().unwrap(),
        "--real",
        &p("data/dog"),
        "--prompt",
        &dog.clip_t_prompt,
        "--dino",
        &p("models/dino"),
        "--clip",
        &p("models/clip"),
        "--no-cache",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(
        score.status.success(),
        "{}",
        String::from_utf8_lossy(&score.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&score.stdout).unwrap();
    assert_eq!(
        (g.dino, g.clip_i, g.clip_t),
        (
            s["dino"].as_f64().unwrap(),
            s["clip_i"].as_f64().unwrap(),
            s["clip_t"].as_f64().unwrap()
        )
    );
    // JPEG loses detail: not the PNG's scores.
    assert_ne!(g.dino, dog.dino);
}

/// The profiles of `configs/protocol/`, their model ids replaced by tiny models, in a folder tree
/// to run `pnd eval` from: DINO ViT-S/16 and CLIP ViT-B/32 are the fixture's tiny DINO and CLIP;
/// ViT-S/8, DINOv2 and (standing in for ViT-L/14) a second tiny CLIP are the metrics crate's
/// parity fixtures.
fn tiny_profiles() -> PathBuf {
    let f = fixture();
    let tree = f.root.join("profiles-tree");
    let dir = tree.join("configs/protocol");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let metrics = manifest
        .join("../metrics/tests/fixtures")
        .canonicalize()
        .unwrap();
    let ids = [
        ("facebook/dino-vits16", f.root.join("models/dino")),
        ("facebook/dino-vits8", metrics.join("dino_s8_tiny")),
        ("openai/clip-vit-base-patch32", f.root.join("models/clip")),
        ("openai/clip-vit-large-patch14", metrics.join("clip_tiny")),
        ("facebook/dinov2-small", metrics.join("dinov2_tiny")),
    ];
    for entry in std::fs::read_dir(manifest.join("../../configs/protocol")).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (id, local) in &ids {
            text = text.replace(&format!("\"{id}\""), &format!("\"{}\"", local.display()));
        }
        assert!(
            !text.contains("= \"facebook/") && !text.contains("= \"openai/"),
            "a model id left in {}",
            path.display()
        );
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    tree
}

/// `--protocol all` scores every profile into its own run folder, each with exactly the scores a
/// run under that profile alone gives, embeds a (model, preprocessing) that several profiles share
/// once (one cache), and shows the profiles side by side in one table with a protocol column.
#[test]
fn protocol_all_gives_each_profile_exactly_its_own_scores_and_shares_embeddings() {
    let f = fixture();
    let tree = tiny_profiles();
    let images = layout("layout-all");
    let data = f.root.join("data");
    let eval_under = |protocol: &str, out: &Path| {
        let args = [
            "eval",
            images.to_str().unwrap(),
            "--name",
            "ext",
            "--protocol",
            protocol,
            "--out",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
            "--subjects",
            "dog,teapot",
            "--prompts",
            "0,20",
        ];
        let (ok, log) = pnd_in(&args, &tree);
        assert!(ok, "{log}");
        log
    };
    let all = f.root.join("eval-all");
    let log = eval_under("all", &all);
    // `dreambooth` first, then in name order.
    let profiles = [
        "dreambooth",
        "custom-diffusion",
        "dreambench-plus",
        "torchmetrics",
    ];
    let at: Vec<usize> = profiles
        .iter()
        .map(|p| log.find(&format!("== protocol '{p}'")).expect(&log))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{log}");
    let side = std::fs::read_to_string(all.join("report/protocols.md")).unwrap();
    let mut dino_of = Vec::new();
    for p in profiles {
        let single = f.root.join(format!("eval-single-{p}"));
        let file = tree.join(format!("configs/protocol/{p}.toml"));
        eval_under(file.to_str().unwrap(), &single);
        let (want, got) = (rows(&single), rows(&all.join(p)));
        assert_eq!(got.len(), 4, "{p}");
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (k, w) in &want {
            let g = &got[k];
            assert_eq!(
                (g.dino, g.clip_i, g.clip_t, g.dino_max),
                (w.dino, w.clip_i, w.clip_t, w.dino_max),
                "{p} {k:?}"
            );
        }
        dino_of.push(want.values().next().unwrap().dino);
        assert_eq!(
            std::fs::read_to_string(all.join(p).join("oracle.json")).unwrap(),
            std::fs::read_to_string(single.join("oracle.json")).unwrap(),
            "{p}"
        );
        // The side-by-side table has the single run's lines (oracle and method), under `p`.
        let table = std::fs::read_to_string(single.join("report/table.md")).unwrap();
        let lines: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ext |") || l.starts_with("| Real Images (Oracle) |"))
            .collect();
        assert_eq!(lines.len(), 2, "{table}");
        // DreamBench++'s DINOv2 is one more column after CLIP-T, empty ("–") for the others.
        let extra = usize::from(p == "dreambench-plus");
        for line in lines {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let dinov2 = if extra == 1 { cells[5] } else { "–" };
            let want = format!(
                "| {p} | {} | {dinov2} | {} |",
                cells[1..5].join(" | "),
                cells[5 + extra]
            );
            assert!(side.contains(&want), "no '{want}' in\n{side}");
        }
        // Each profile's run is complete on its own: its own report, no cache of its own.
        assert!(all.join(p).join("report/index.html").is_file());
        assert!(!all.join(p).join("cache").exists());
    }
    // The profiles do score differently (DreamBench++: 100 · cos with one image, ViT-S/8).
    assert!((dino_of[2] - dino_of[0]).abs() > 1.0, "{dino_of:?}");
    // One embedding folder per distinct (model, preprocessing): DINO S/16 (shared by three
    // profiles), DINO S/8, the CLIP at torchvision's crop (two profiles), the same CLIP at
    // transformers' crop, the second CLIP, DINOv2.
    let keys: Vec<String> = std::fs::read_dir(all.join("cache/embeddings"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    // The gate applies under `dreambooth` only (here: tiny models, so not at all).
    assert!(
        side.contains("- `dreambooth`: oracle gate: not applied (the metric models"),
        "{side}"
    );
    assert!(
        side.contains(
            "- `custom-diffusion`: oracle gate: not applied (the run scores under the 'custom-diffusion' protocol"
        ),
        "{side}"
    );
    assert!(
        side.contains(
            "\n| Protocol | Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | dinov2 ↑ | images |\n"
        ),
        "{side}"
    );
    let csv = std::fs::read_to_string(all.join("report/protocols.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * profiles.len(), "{csv}");
    assert!(
        csv.starts_with("protocol,method,images,dino,clip_i,clip_t,dinov2\n"),
        "{csv}"
    );
    let page = std::fs::read_to_string(all.join("report/index.html")).unwrap();
    for p in profiles {
        let link = format!("href=\"../{p}/report/index.html\"");
        assert!(page.contains(&link), "{page}");
    }
    assert!(
        page.contains("<td>dreambench-plus</td><td>ext</td>"),
        "{page}"
    );
    // Two profiles' runs do not share one table: same models, different scales.
    let (ok, log) = pnd_in(
        &[
            "report",
            all.join("dreambooth").to_str().unwrap(),
            all.join("custom-diffusion").to_str().unwrap(),
            "--out",
            f.root.join("report-mixed").to_str().unwrap(),
        ],
        &tree,
    );
    assert!(
        !ok && log
            .contains("scored under different protocols ('dreambooth' vs 'custom-diffusion')"),
        "{log}"
    );
}

/// `pnd score --json` under `protocol` (run from the profiles' tree), with `reference` when given.
fn score_json(
    tree: &Path,
    protocol: &str,
    generated: &Path,
    real: &Path,
    reference: Option<&Path>,
    prompt: &str,
) -> serde_json::Value {
    let mut args = vec![
        "score",
        "--generated",
        generated.to_str().unwrap(),
        "--real",
        real.to_str().unwrap(),
        "--prompt",
        prompt,
        "--protocol",
        protocol,
        "--no-cache",
        "--device",
        "cpu",
        "--json",
    ];
    if let Some(r) = reference {
        args.extend(["--reference", r.to_str().unwrap()]);
    }
    let out = common::pnd_command(&args)
        .current_dir(tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A profile with an extra score (DreamBench++'s DINOv2): `pnd eval` writes it into every row
/// (`row.json` and a `results.csv` column), equal to what `pnd score` gives for the same image,
/// and into the oracle, equal to the mean of `pnd score`'s values over every ordered pair of
/// distinct real images; the report's tables have a `dinov2` column with the mean of the rows.
#[test]
fn an_extra_score_is_in_every_row_the_oracle_and_the_tables() {
    let f = fixture();
    let tree = tiny_profiles();
    let images = layout("layout-extra");
    let data = f.root.join("data");
    let out = f.root.join("eval-extra");
    let (ok, log) = pnd_in(
        &[
            "eval",
            images.to_str().unwrap(),
            "--name",
            "ext",
            "--protocol",
            "dreambench-plus",
            "--out",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
            "--subjects",
            "dog,teapot",
            "--prompts",
            "0,20",
        ],
        &tree,
    );
    assert!(ok, "{log}");
    let rows: Vec<runner::report::rows::ImageRow> =
        runner::sweep::RunStore::open(&out).unwrap().rows().unwrap();
    assert_eq!(rows.len(), 4);
    // results.csv: the column after clip_t, the rows' values.
    let mut csv = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let at = header
        .iter()
        .position(|h| h == "dinov2")
        .expect("a dinov2 column");
    assert_eq!(&header[at - 1], "clip_t");
    let cells: Vec<f64> = csv
        .records()
        .map(|r| r.unwrap()[at].parse().unwrap())
        .collect();
    for (row, cell) in rows.iter().zip(&cells) {
        let v = row.extra["dinov2"];
        assert_eq!(row.extra.len(), 1, "{:?}", row.extra);
        assert_eq!(v, *cell, "{}", row.id);
        // `pnd score` of the same image against the subject's images: the same numbers.
        let s = score_json(
            &tree,
            "dreambench-plus",
            &out.join(&row.image),
            &data.join(&row.subject),
            None,
            &row.clip_t_prompt,
        );
        assert_eq!(
            (row.dino, v),
            (
                s["dino"].as_f64().unwrap(),
                s["extra"]["dinov2"].as_f64().unwrap()
            ),
            "{}",
            row.id
        );
    }
    // DreamBench++ scores 100 · cos; the images differ, so do their scores.
    assert!(cells.iter().all(|v| v.abs() <= 100.0 + 1e-9), "{cells:?}");
    assert!(cells.iter().any(|v| *v != cells[0]), "{cells:?}");

    // The oracle: each real image scored one-to-one against each other one of its subject.
    let oracle: runner::report::rows::OracleRow =
        serde_json::from_str(&std::fs::read_to_string(out.join("oracle.json")).unwrap()).unwrap();
    let mut pairs = Vec::new();
    for subject in ["dog", "teapot"] {
        let real = metrics::list_images(&data.join(subject)).unwrap();
        for r in &real {
            let s = score_json(
                &tree,
                "dreambench-plus",
                &data.join(subject),
                &data.join(subject),
                Some(r),
                "a photo",
            );
            for (g, img) in real.iter().zip(s["per_image"].as_array().unwrap()) {
                if g != r {
                    pairs.push(img["extra"]["dinov2"].as_f64().unwrap());
                }
            }
        }
    }
    assert_eq!(pairs.len(), 2 * 3 * 2);
    let want = pairs.iter().sum::<f64>() / pairs.len() as f64;
    let got = oracle.extra["dinov2"];
    assert!(
        (got - want).abs() < 1e-9 * want.abs().max(1.0),
        "{got} vs {want}"
    );

    // The tables: a dinov2 column after CLIP-T, the oracle's and the mean of the rows.
    let mean = cells.iter().sum::<f64>() / cells.len() as f64;
    let md = std::fs::read_to_string(out.join("report/table.md")).unwrap();
    assert!(
        md.starts_with("| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | dinov2 ↑ | images |"),
        "{md}"
    );
    let cell_of = |label: &str| -> String {
        let line = md.lines().find(|l| l.starts_with(label)).expect(&md);
        line.split('|').map(str::trim).nth(5).unwrap().to_string()
    };
    assert_eq!(cell_of("| ext |"), format!("{mean:.3}"), "{md}");
    assert_eq!(
        cell_of("| Real Images (Oracle) |"),
        format!("{got:.3}"),
        "{md}"
    );
    let table = std::fs::read_to_string(out.join("report/table.csv")).unwrap();
    let mut t = csv::Reader::from_reader(table.as_bytes());
    let h = t.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).expect(&table);
    assert_eq!(col("dinov2"), col("clip_t") + 1, "{table}");
    assert!(col("delta_dinov2") > col("delta_clip_t"), "{table}");
    assert!(col("paired_p_dinov2") > col("paired_p_clip_t"), "{table}");
    let lines: Vec<csv::StringRecord> = t.records().map(Result::unwrap).collect();
    let value = |label: &str| -> f64 {
        let r = lines.iter().find(|r| &r[0] == label).expect(&table);
        r[col("dinov2")].parse().unwrap()
    };
    assert!((value("ext") - mean).abs() < 1e-6, "{table}");
    assert!(
        (value("Real Images (Oracle)") - got).abs() < 1e-6,
        "{table}"
    );
    let tex = std::fs::read_to_string(out.join("report/table.tex")).unwrap();
    assert!(
        tex.contains("\\begin{tabular}{lcccc}")
            && tex.contains("CLIP-T $\\uparrow$ & dinov2 $\\uparrow$"),
        "{tex}"
    );
    let stats = std::fs::read_to_string(out.join("report/stats.csv")).unwrap();
    assert!(
        stats.contains(&format!("ext,4,dinov2,{mean:.6},")),
        "{stats}"
    );
    let per_subject = std::fs::read_to_string(out.join("report/per_subject.csv")).unwrap();
    assert!(
        per_subject.starts_with("method,subject,dino,clip_i,clip_t,dinov2\n"),
        "{per_subject}"
    );
    let page = std::fs::read_to_string(out.join("report/index.html")).unwrap();
    assert!(page.contains("<th class=\"r\">dinov2 ↑</th>"), "{page}");
}

/// The dataset checksum a run recorded.
fn recorded_dataset(run: &Path) -> String {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    plan["provenance"]["dataset"]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Provenance is what was scored (issue 26): a failed first attempt's plan is replaced when the
/// same command runs again on repaired data, and a resume over rows made from other data is
/// refused, saying what changed.
#[test]
fn provenance_is_the_data_that_was_scored() {
    let f = fixture();
    let images = layout("layout-provenance");
    let data = f.root.join("data-provenance");
    testdata::copy_tree(&f.root.join("data"), &data);
    let real = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("dog"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v[0].clone()
    };
    let good = std::fs::read(&real).unwrap();
    let out = f.root.join("eval-provenance");
    let with_data = ["--data", data.to_str().unwrap()];
    // A broken real image: the eval fails and leaves its plan behind.
    std::fs::write(&real, b"broken").unwrap();
    let (ok, log) = eval(&images, "prov", &out, &with_data);
    assert!(!ok, "{log}");
    let broken = recorded_dataset(&out);
    // Repaired: the same command succeeds, and the plan records the repaired copy.
    std::fs::write(&real, &good).unwrap();
    let (ok, log) = eval(&images, "prov", &out, &with_data);
    assert!(ok, "{log}");
    let repaired = recorded_dataset(&out);
    assert_ne!(broken, repaired);
    let fresh = f.root.join("eval-provenance-fresh");
    let (ok, log) = eval(&images, "prov", &fresh, &with_data);
    assert!(ok, "{log}");
    assert_eq!(repaired, recorded_dataset(&fresh));
    // The data changes under finished rows: a resume is refused, naming the change.
    let mut altered = image::open(&real).unwrap().to_rgb8();
    altered.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    altered.save(&real).unwrap();
    let results = std::fs::read(out.join("results.csv")).unwrap();
    let (ok, log) = eval(
        &images,
        "prov",
        &out,
        &[&with_data[..], &["--resume"]].concat(),
    );
    assert!(!ok, "{log}");
    assert!(log.contains("the dataset changed"), "{log}");
    assert!(log.contains(&repaired), "{log}");
    assert_eq!(std::fs::read(out.join("results.csv")).unwrap(), results);
    // Another plan (other prompts) over finished rows: the message says what differs.
    std::fs::write(&real, &good).unwrap();
    let (ok, log) = eval(
        &images,
        "prov",
        &out,
        &[&with_data[..], &["--resume", "--prompts", "0"]].concat(),
    );
    assert!(!ok, "{log}");
    assert!(
        log.contains("started for another plan") && log.contains("differs in"),
        "{log}"
    );
    assert!(log.contains("jobs (4 vs 2)"), "{log}");
}

/// `pnd eval --dino/--clip` replace a profile's models, and the shipped profiles are built into
/// the binary: `--protocol torchmetrics` works from a folder outside the checkout.
#[test]
fn eval_takes_its_models_from_flags_and_its_profiles_from_the_binary() {
    let f = fixture();
    let images = layout("layout-builtin");
    let outside = tempfile::tempdir().unwrap();
    let out = outside.path().join("run");
    let p = |s: &str| f.root.join(s).display().to_string();
    let (ok, log) = pnd_in(
        &[
            "eval",
            images.to_str().unwrap(),
            "--name",
            "ext",
            "--protocol",
            "torchmetrics",
            "--dino",
            &p("models/dino"),
            "--clip",
            &p("models/clip"),
            "--data",
            &p("data"),
            "--subjects",
            "dog,teapot",
            "--prompts",
            "0,20",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        outside.path(),
    );
    assert!(ok, "{log}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    let m = &plan["config"]["metrics"];
    assert_eq!(m["dino"].as_str().unwrap(), p("models/dino"));
    assert_eq!(m["clip"].as_str().unwrap(), p("models/clip"));
    assert_eq!(m["scoring"]["profile"], "torchmetrics");
    assert_eq!(rows(&out).len(), 4);
    // A run of one method alone still gets its image grids: reference | its images.
    for subject in ["dog", "teapot"] {
        let grid = out.join(format!("report/grids/{subject}__ext.png"));
        let img = image::open(&grid).unwrap_or_else(|e| panic!("{}: {e}", grid.display()));
        assert_eq!(img.width(), 2 * 192 + 3 * 4, "two columns");
    }
}

/// A PNG whose header is whole but whose body is cut: one error naming it before anything is
/// written (not a stop partway); with --keep-going the others are scored and its job is recorded
/// in failures.csv. Images under the metric models' 224x224 input are warned about.
#[test]
fn a_corrupt_image_body_stops_nothing_partway_and_keep_going_scores_the_rest() {
    let f = fixture();
    let images = layout("layout-cut");
    let cut = images.join("dog/0-s0.png");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = f.root.join("eval-cut");
    let (ok, log) = eval(&images, "cut", &out, &[]);
    assert!(!ok, "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("dog/0-s0.png")
            && errors[0].contains("not a readable image")
            && errors[0].contains("nothing written"),
        "{log}"
    );
    assert!(!out.exists(), "a refused eval wrote '{}'", out.display());
    let (ok, log) = eval(&images, "cut", &out, &["--keep-going"]);
    assert!(!ok, "a failed job makes the exit status a failure: {log}");
    assert!(log.contains("failed jobs are listed in"), "{log}");
    assert!(
        log.contains("smaller than the metric models' 224x224 input"),
        "{log}"
    );
    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    assert!(failures.contains("cut__dog__p00__s0"), "{failures}");
    assert_eq!(failures.lines().count(), 2, "{failures}");
    assert_eq!(rows(&out).len(), 3);
}

/// Two `pnd eval --resume` started together on one folder: both succeed, each image is scored
/// once, and the rows are a single eval's.
#[test]
fn two_evals_at_once_on_one_folder_score_each_image_once() {
    let f = fixture();
    let images = layout("layout-two");
    let single = f.root.join("eval-two-single");
    let (ok, log) = eval(&images, "two", &single, &[]);
    assert!(ok, "{log}");
    let out = f.root.join("eval-two");
    let mut evals: Vec<_> = (0..2)
        .map(|_| {
            eval_command(&images, "two", &out, &["--resume"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut done = 0;
    for e in evals.drain(..) {
        let o = e.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{log}");
        done += log
            .lines()
            .filter(|l| l.starts_with("job ") && l.contains(" done in "))
            .count();
    }
    assert_eq!(done, 4, "each image scored once");
    assert_eq!(
        std::fs::read(out.join("results.csv")).unwrap(),
        std::fs::read(single.join("results.csv")).unwrap()
    );
}

/// `pnd eval --protocol all --keep-going`: a profile that fails (its model is missing) does not
/// stop the others; it is named, and the exit status says something failed.
#[test]
fn protocol_all_keep_going_scores_the_profiles_that_work() {
    let f = fixture();
    let tree = f.root.join("profiles-broken");
    let dir = tree.join("configs/protocol");
    std::fs::create_dir_all(&dir).unwrap();
    let good = tiny_profiles().join("configs/protocol/dreambooth.toml");
    std::fs::copy(&good, dir.join("dreambooth.toml")).unwrap();
    let text = std::fs::read_to_string(&good).unwrap();
    let dino = f.root.join("models/dino").display().to_string();
    let broken = text.replace(&format!("\"{dino}\""), "\"/nonexistent/dino\"");
    assert_ne!(broken, text);
    std::fs::write(dir.join("broken.toml"), broken).unwrap();
    let images = layout("layout-keep-going-all");
    let args = |out: &Path, extra: &[&'static str]| {
        let mut a = vec![
            "eval".to_string(),
            images.display().to_string(),
            "--name".into(),
            "ext".into(),
            "--protocol".into(),
            "all".into(),
            "--out".into(),
            out.display().to_string(),
            "--data".into(),
            f.root.join("data").display().to_string(),
            "--device".into(),
            "cpu".into(),
            "--subjects".into(),
            "dog,teapot".into(),
            "--prompts".into(),
            "0,20".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        pnd_in(&refs, &tree)
    };
    // Without --keep-going the broken profile stops the run.
    let (ok, log) = run(args(&f.root.join("eval-all-stop"), &[]));
    assert!(!ok && log.contains("under protocol 'broken'"), "{log}");
    let out = f.root.join("eval-all-keep-going");
    let (ok, log) = run(args(&out, &["--keep-going"]));
    assert!(!ok, "{log}");
    assert!(
        log.contains("failed under protocol 'broken'") && log.contains("/nonexistent/dino"),
        "{log}"
    );
    assert_eq!(rows(&out.join("dreambooth")).len(), 4, "{log}");
    assert!(out.join("report/protocols.md").is_file());
}

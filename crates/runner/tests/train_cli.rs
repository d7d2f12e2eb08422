//! `pnd train` end to end on the tiny diffusers fixture pipeline (issue 14): each bad input is one
//! clear error that writes nothing; a run stopped after a step resumes to the uninterrupted run's
//! bytes; the outputs load in `pnd generate` and change its images; and `pnd generate` on the
//! committed trained fixtures matches diffusers on them (tools/fixtures/train_outputs.py, whose
//! docstring holds the `pnd train` commands that made them; they are re-run here and compared).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{pnd, repo, sd_fixtures};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn model() -> PathBuf {
    sd_fixtures().join("model")
}

fn images() -> PathBuf {
    repo().join("crates/training/tests/fixtures/step/images")
}

fn trained() -> PathBuf {
    repo().join("crates/training/tests/fixtures/trained")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `pnd train textual-inversion` on the fixture (token `<sks-toy>` from `toy`, 64², 2 steps) with
/// `args` added; later flags of `args` replace these (clap refuses repeats, so they are merged).
fn ti(out: &Path, args: &[&str]) -> Output {
    train(
        "textual-inversion",
        &[
            ("--model", s(&model())),
            ("--images", s(&images())),
            ("--token", "<sks-toy>"),
            ("--init-token", "toy"),
            ("--resolution", "64"),
            ("--steps", "2"),
            ("--lr", "5e-2"),
            ("--out", s(out)),
        ],
        args,
    )
}

/// `pnd train dreambooth` on the fixture ("a photo of sks toy", 64², 2 steps at lr 1e-3) with
/// `args` merged in as for [`ti`].
fn db(out: &Path, args: &[&str]) -> Output {
    train(
        "dreambooth",
        &[
            ("--model", s(&model())),
            ("--images", s(&images())),
            ("--instance-prompt", "a photo of sks toy"),
            ("--resolution", "64"),
            ("--steps", "2"),
            ("--lr", "1e-3"),
            ("--out", s(out)),
        ],
        args,
    )
}

/// `pnd train KIND` with `defaults` (flag, value) unless `args` gives the flag, then `args`.
fn train(kind: &str, defaults: &[(&str, &str)], args: &[&str]) -> Output {
    let mut all = vec!["train", kind];
    for (flag, value) in defaults {
        if !args.contains(flag) {
            all.extend([*flag, *value]);
        }
    }
    all.extend(args);
    pnd(&all)
}

/// A failed run with exactly one `error:` line, naming each of `needles`.
fn assert_one_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded:\n{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "'{n}' missing from:\n{err}");
    }
    eprintln!("{}", err.lines().find(|l| l.starts_with("error")).unwrap());
    err
}

/// Files and folders under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// Each bad input: one error, and nothing under the output's folder (which does not exist yet:
/// not even it may be created).
#[test]
fn bad_inputs_are_one_clear_error_each_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let no_sched = tmp.path().join("model-without-scheduler");
    copy_dir(&model(), &no_sched);
    std::fs::remove_file(no_sched.join("scheduler/scheduler_config.json")).unwrap();
    let outs = tmp.path().join("outs");
    let ti_out = outs.join("ti/learned_embeds.safetensors");
    let db_out = outs.join("db/subject");

    // No images.
    assert_one_error(
        &ti(&ti_out, &["--images", s(&empty)]),
        &[s(&empty), "no images", "--images"],
    );
    assert_one_error(
        &db(&db_out, &["--images", s(&empty)]),
        &[s(&empty), "no images", "--images"],
    );
    // A token the tokenizer knows.
    assert_one_error(
        &ti(&ti_out, &["--token", "dog"]),
        &[
            "'dog'",
            "already in the tokenizer's vocabulary",
            "pick a new placeholder",
        ],
    );
    // An init token of several tokens.
    assert_one_error(
        &ti(&ti_out, &["--init-token", "sports car"]),
        &["'sports car'", "2 tokens", "single token"],
    );
    // A resolution that is not a multiple of 8.
    for o in [
        ti(&ti_out, &["--resolution", "60"]),
        db(&db_out, &["--resolution", "60"]),
    ] {
        assert_one_error(&o, &["--resolution 60", "multiple of 8", "56 or 64"]);
    }
    // A model without a scheduler config.
    for o in [
        ti(&ti_out, &["--model", s(&no_sched)]),
        db(&db_out, &["--model", s(&no_sched)]),
    ] {
        assert_one_error(
            &o,
            &[
                s(&no_sched),
                "scheduler/scheduler_config.json",
                "copy scheduler/",
            ],
        );
    }
    // Prior preservation without a class prompt (before any class image is made).
    assert_one_error(
        &db(&db_out, &["--prior-preservation"]),
        &["--prior-preservation", "--class-prompt"],
    );
    assert_eq!(tree(&outs), Vec::<String>::new(), "a refused run wrote");
    assert!(!tmp.path().join("checkpoints").exists());
}

#[test]
fn an_existing_output_needs_overwrite_which_then_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("learned_embeds.safetensors");
    std::fs::write(&out, b"old").unwrap();
    assert_one_error(&ti(&out, &[]), &[s(&out), "exists", "--overwrite"]);
    // A bad input with --overwrite keeps the old output too.
    assert_one_error(
        &ti(&out, &["--overwrite", "--resolution", "60"]),
        &["--resolution 60"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(tree(tmp.path()), ["learned_embeds.safetensors"]);
    let o = ti(&out, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["<sks-toy>"].dims(), [1, 16]);

    let dir = tmp.path().join("subject");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("old.txt"), b"old").unwrap();
    assert_one_error(&db(&dir, &[]), &[s(&dir), "exists", "--overwrite"]);
    assert_eq!(tree(&dir), ["old.txt"]);
    let o = db(&dir, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        tree(&dir),
        [
            "model_index.json",
            "unet",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"
        ]
    );
    assert!(!tmp.path().join("subject.checkpoints").exists());
}

/// Every file under `dir` by relative path.
fn files(dir: &Path) -> HashMap<String, Vec<u8>> {
    tree(dir)
        .into_iter()
        .filter(|r| dir.join(r).is_file())
        .map(|r| (r.clone(), std::fs::read(dir.join(&r)).unwrap()))
        .collect()
}

/// Stopped after step 3 of 5 (checkpoints every 2), then re-run: resumes from step 2 and writes
/// the uninterrupted run's bytes; no checkpoint is left.
fn kill_and_resume(run: impl Fn(&Path, &[&str]) -> Output, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--steps", "5", "--checkpoint-every", "2"];
    let whole = tmp.path().join(format!("whole-{name}"));
    let o = run(&whole, &flags);
    assert!(o.status.success(), "{}", stderr(&o));

    let cut = tmp.path().join(format!("cut-{name}"));
    let ckpt = tmp.path().join(format!("cut-{name}.checkpoints"));
    let o = run(&cut, &[&flags[..], &["--stop-after", "3"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stopped after step 3"),
        "{}",
        stderr(&o)
    );
    assert!(!cut.exists(), "a stopped run wrote its output");
    assert!(
        tree(&ckpt).iter().any(|p| p == "checkpoint-2"),
        "{:?}",
        tree(&ckpt)
    );

    let o = run(&cut, &flags);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("resumed from the checkpoint of step 2"),
        "{}",
        stderr(&o)
    );
    let (a, b) = if whole.is_dir() {
        (files(&whole), files(&cut))
    } else {
        (
            HashMap::from([(String::new(), std::fs::read(&whole).unwrap())]),
            HashMap::from([(String::new(), std::fs::read(&cut).unwrap())]),
        )
    };
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    assert_eq!(a.len(), b.len(), "{names:?}");
    for n in names {
        assert!(a[n] == b[n], "{name}: '{n}' differs after resume");
    }
    eprintln!("{name}: resumed run byte-identical ({} files)", a.len());
    assert!(!ckpt.exists(), "checkpoints left: {:?}", tree(&ckpt));
    assert!(!tmp
        .path()
        .join(format!("whole-{name}.checkpoints"))
        .exists());
}

#[test]
fn textual_inversion_stopped_and_resumed_writes_the_same_bytes() {
    kill_and_resume(ti, "ti.safetensors");
}

#[test]
fn dreambooth_stopped_and_resumed_writes_the_same_bytes() {
    kill_and_resume(db, "db");
    kill_and_resume(
        |out: &Path, args: &[&str]| db(out, &[args, &["--train-text-encoder"]].concat()),
        "db-text",
    );
}

/// `pnd generate` at 64², 3 steps, seed 0, with `extra`; its final latents.
fn generate(dir: &Path, name: &str, model: &Path, prompt: &str, extra: &[&str]) -> Tensor {
    let latents = dir.join(format!("{name}.safetensors"));
    let png = dir.join(format!("{name}.png"));
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompt",
        prompt,
        "--steps",
        "3",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "0",
        "--save-latents",
        s(&latents),
        "--out",
        s(&png),
        "--quiet",
    ];
    args.extend(extra);
    let o = pnd(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png.is_file());
    diffusion::pipeline::read_latents(&latents).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

/// The fixture text encoder's row of `word</w>`, as `{token: [1, dim]}` in f32 at `path`.
fn write_init_row(word: &str, token: &str, path: &Path) {
    let vocab: HashMap<String, usize> = serde_json::from_str(
        &std::fs::read_to_string(model().join("tokenizer/vocab.json")).unwrap(),
    )
    .unwrap();
    let id = vocab[&format!("{word}</w>")];
    let weights = candle_core::safetensors::load(
        model().join("text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (_, table) = weights
        .iter()
        .find(|(k, _)| k.ends_with("token_embedding.weight"))
        .unwrap();
    let row = table
        .narrow(0, id, 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    candle_core::safetensors::save(&HashMap::from([(token.to_string(), row)]), path).unwrap();
}

#[test]
fn trained_embedding_loads_in_generate_and_changes_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("learned_embeds.safetensors");
    let o = ti(&file, &["--steps", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let init_file = tmp.path().join("init_row.safetensors");
    write_init_row("toy", "<sks-toy>", &init_file);
    let m = model();
    let word = generate(tmp.path(), "word", &m, "a photo of toy", &[]);
    let untrained = generate(
        tmp.path(),
        "untrained",
        &m,
        "a photo of <sks-toy>",
        &["--embeddings", s(&init_file)],
    );
    let learned = generate(
        tmp.path(),
        "learned",
        &m,
        "a photo of <sks-toy>",
        &["--embeddings", s(&file)],
    );
    let same = max_diff(&word, &untrained);
    let changed = max_diff(&word, &learned);
    eprintln!("TI in pnd generate: init row vs the word {same:e}, trained vs the word {changed}");
    assert!(same <= 1e-6, "{same}");
    assert!(changed > 1e-2, "{changed}");
}

#[test]
fn trained_dreambooth_loads_in_generate_with_base_and_changes_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let base = generate(tmp.path(), "base", &m, "a photo of sks toy", &[]);
    for (name, extra) in [("db", &[][..]), ("db-text", &["--train-text-encoder"][..])] {
        let out = tmp.path().join(name);
        let o = db(&out, &[&["--steps", "3"][..], extra].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let tuned = generate(
            tmp.path(),
            &format!("{name}-gen"),
            &out,
            "a photo of sks toy",
            &["--base", s(&m)],
        );
        let changed = max_diff(&base, &tuned);
        eprintln!("{name} in pnd generate: vs the base {changed}");
        assert!(changed > 1e-2, "{changed}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(trained().join("expected.json")).unwrap())
        .unwrap()
}

/// `pnd generate` on each committed trained output (and the base), from diffusers' initial
/// latents: the final latents and PNG match diffusers' within the pipeline parity bounds
/// (`pipeline_parity.rs`: 1e-3 on latents, 2/255 on the PNG).
#[test]
fn generate_on_trained_outputs_matches_diffusers() {
    let f = expected();
    let tmp = tempfile::tempdir().unwrap();
    let exp = trained().join("expected");
    let size = f["size"].as_u64().unwrap().to_string();
    let steps = f["steps"].as_u64().unwrap().to_string();
    let cfg = f["cfg"].as_f64().unwrap().to_string();
    let cases = f["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 5);
    for (name, c) in cases {
        let latents = tmp.path().join(format!("{name}.safetensors"));
        let png = tmp.path().join(format!("{name}.png"));
        let m = model();
        let model_dir = match c["model"].as_str().unwrap() {
            "base" => m.clone(),
            rel => repo().join(rel),
        };
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            s(&model_dir).into(),
            "--prompt".into(),
            c["prompt"].as_str().unwrap().into(),
            "--negative-prompt".into(),
            f["negative_prompt"].as_str().unwrap().into(),
            "--steps".into(),
            steps.clone(),
            "--cfg-scale".into(),
            cfg.clone(),
            "--height".into(),
            size.clone(),
            "--width".into(),
            size.clone(),
            "--init-latents".into(),
            s(&exp.join("init_latents.safetensors")).into(),
            "--save-latents".into(),
            s(&latents).into(),
            "--out".into(),
            s(&png).into(),
            "--quiet".into(),
        ];
        if model_dir != m {
            args.extend(["--base".into(), s(&m).into()]);
        }
        if let Some(file) = c.get("embeddings") {
            args.extend([
                "--embeddings".into(),
                s(&repo().join(file.as_str().unwrap())).into(),
                "--embedding-token".into(),
                c["token"].as_str().unwrap().into(),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let o = pnd(&refs);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let ours = diffusion::pipeline::read_latents(&latents).unwrap();
        let want =
            diffusion::pipeline::read_latents(&exp.join(format!("{name}.safetensors"))).unwrap();
        let err = max_diff(&ours, &want);
        let img = image::open(&png).unwrap().to_rgb8();
        let want_img = image::open(exp.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        let worst = common::max_pixel_diff(&img, &want_img);
        eprintln!("{name}: final latents max abs diff {err:e}, PNG max abs diff {worst}/255");
        assert!(err <= 1e-3, "{name}: {err}");
        assert!(worst <= 2, "{name}: {worst}/255");
    }
}

/// The `pnd train` commands of train_outputs.py's docstring, split into arguments (double
/// quotes group).
fn fixture_commands() -> Vec<Vec<String>> {
    let script = std::fs::read_to_string(repo().join("tools/fixtures/train_outputs.py")).unwrap();
    let cmds: Vec<Vec<String>> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pnd train "))
        .map(|l| {
            let mut args = Vec::new();
            let mut cur = String::new();
            let mut quoted = false;
            for ch in l.chars() {
                match ch {
                    '"' => quoted = !quoted,
                    c if c.is_whitespace() && !quoted => {
                        if !cur.is_empty() {
                            args.push(std::mem::take(&mut cur));
                        }
                    }
                    c => cur.push(c),
                }
            }
            args.push(cur);
            args
        })
        .collect();
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    cmds
}

/// The tensors of a safetensors file within 1e-5 of another's (same names and shapes), except
/// for at most one entry in a thousand (and at least one per tensor) and every entry of a key
/// bias, held to 1e-2: AdamW's early
/// updates are lr·g/(|g| + 1e-8), so an entry whose gradient is within a few ε of zero (the key
/// biases, which softmax's shift invariance leaves with an exactly zero gradient; padding-only
/// taps) moves by up to lr per step on the rounding of g, which another CPU's kernels change.
fn assert_tensors_close(ours: &Path, want: &Path) -> f32 {
    let a = candle_core::safetensors::load(ours, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(want, &Device::Cpu).unwrap();
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{}", ours.display());
    let mut worst = 0f32;
    for k in ka {
        assert_eq!(a[k].dims(), b[k].dims(), "{k}");
        assert_eq!(a[k].dtype(), b[k].dtype(), "{k}");
        let x = a[k]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = b[k]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diffs: Vec<f32> = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).collect();
        let loose = diffs.iter().filter(|d| **d > 1e-5).count();
        let d = diffs.iter().cloned().fold(0f32, f32::max);
        // A key bias shifts every score of a row alike, so softmax leaves it an exactly zero
        // gradient: every one of its entries is rounding moved by AdamW, bounded by 1e-2 alone.
        let zero_gradient = k.ends_with("k_proj.bias");
        assert!(
            (zero_gradient || loose <= (x.len() / 1000).max(1)) && d <= 1e-2,
            "{}: '{k}' differs by up to {d} ({loose} of {} entries above 1e-5)",
            ours.display(),
            x.len()
        );
        worst = worst.max(
            diffs
                .iter()
                .cloned()
                .filter(|d| *d <= 1e-5)
                .fold(0f32, f32::max),
        );
    }
    worst
}

/// Re-running the docstring's commands (into a temporary folder) reproduces the committed trained
/// files: tensors within 1e-5 (another CPU may round differently), other files byte for byte.
#[test]
fn trained_fixtures_are_reproduced_by_their_commands() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in fixture_commands() {
        let at = cmd.iter().position(|a| a == "--out").unwrap();
        let committed = repo().join(&cmd[at + 1]);
        assert!(committed.starts_with(trained()), "{}", committed.display());
        let out = tmp.path().join(committed.file_name().unwrap());
        let mut args = cmd[1..].to_vec();
        args[at] = s(&out).into();
        let o = common::pnd_command(&args.iter().map(|a| a.as_str()).collect::<Vec<_>>())
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        let pairs: Vec<(PathBuf, PathBuf)> = if committed.is_dir() {
            let (ours, want) = (tree(&out), tree(&committed));
            assert_eq!(ours, want, "{}", committed.display());
            want.iter()
                .filter(|r| committed.join(r).is_file())
                .map(|r| (out.join(r), committed.join(r)))
                .collect()
        } else {
            vec![(out.clone(), committed.clone())]
        };
        let mut worst = 0f32;
        for (ours, want) in &pairs {
            if want.extension().is_some_and(|e| e == "safetensors") {
                worst = worst.max(assert_tensors_close(ours, want));
            } else {
                assert_eq!(
                    std::fs::read(ours).unwrap(),
                    std::fs::read(want).unwrap(),
                    "{}",
                    want.display()
                );
            }
        }
        eprintln!(
            "{}: {} files reproduced, tensors max abs diff {worst:e}",
            committed.strip_prefix(repo()).unwrap().display(),
            pairs.len()
        );
    }
}

/// A second `pnd train` on an output that another process is training into refuses, with one
/// error naming the output and its lock, and writes nothing (no second trace, no checkpoints);
/// once the other process has ended (its lock dies with it), the same command trains.
#[test]
fn a_second_training_on_one_output_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("emb.safetensors");
    let trace = tmp.path().join("trace.jsonl");
    // The other process's claim (a lock on `<out>.lock`, as `pnd train` takes it).
    let lock = tmp.path().join("emb.safetensors.lock");
    let held = runner::sweep::claim::try_claim(&lock).unwrap().unwrap();
    let o = ti(&out, &["--trace", s(&trace)]);
    assert_one_error(
        &o,
        &["another process is training into", "emb.safetensors.lock"],
    );
    assert!(!out.exists() && !trace.exists());
    assert!(!tmp.path().join("emb.safetensors.checkpoints").exists());
    drop(held);
    let o = ti(&out, &["--trace", s(&trace)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let steps = std::fs::read_to_string(&trace).unwrap().lines().count();
    assert_eq!(steps, 2, "each step traced once");
}

//! Whole runs of both trainers on the tiny pipeline model: 30 steps lower the training loss, and a
//! run stopped after a step past its last checkpoint, then started again, ends with exactly the
//! weights of an uninterrupted run.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, model};
use std::path::Path;
use training::dreambooth::{DbSettings, DreamBooth};
use training::textual_inversion::{TextualInversion, TiSettings};
use training::train_loop::{self, LoopSettings, MicroBatch, Objective, Outcome};

fn settings(steps: usize, dataset_len: usize, dir: &Path, every: Option<usize>) -> LoopSettings {
    LoopSettings {
        steps,
        grad_accum: 1,
        batch: 1,
        dataset_len,
        seed: 3,
        max_grad_norm: None,
        checkpoint_every: every,
        checkpoint_dir: dir.join("ckpt"),
        trace: Some(dir.join("trace.jsonl")),
        fingerprint: "test".into(),
        stop_after: None,
        loss_scaling: false,
    }
}

/// The mean loss over 16 fixed micro-batches (the draws of micro-steps 1000..1016).
fn expected_loss(obj: &mut dyn Objective, n: usize) -> f64 {
    (0..16u64)
        .map(|k| {
            let mb = MicroBatch {
                micro: 1000 + k,
                indices: vec![k as usize % n],
                positions: vec![1000 + k],
            };
            obj.loss(&mb).unwrap().to_scalar::<f32>().unwrap() as f64
        })
        .sum::<f64>()
        / 16.0
}

fn ti(lr: f64, steps: usize) -> TextualInversion {
    let mut s = TiSettings::new("<cat-toy>", "toy");
    s.lr = lr;
    s.grad_accum = 1;
    s.steps = steps;
    s.resolution = 64;
    s.repeats = 2;
    s.seed = 3;
    TextualInversion::new(&model(), &fixtures().join("images"), s, &Device::Cpu).unwrap()
}

fn db(lr: f64, steps: usize, prior: bool) -> DreamBooth {
    let mut s = DbSettings::new("a photo of sks toy");
    s.lr = lr;
    s.steps = steps;
    s.resolution = 64;
    s.seed = 3;
    s.prior_preservation = prior;
    s.class_prompt = Some("a photo of toy".into());
    let class = fixtures().join("class");
    DreamBooth::new(
        &model(),
        &fixtures().join("images"),
        prior.then_some(class.as_path()),
        s,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn thirty_steps_lower_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = ti(5e-2, 30);
    let before = expected_loss(&mut t, 2);
    let mut opt = t.optimizer().unwrap();
    let s = settings(30, t.dataset_len(), dir.path(), None);
    train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
    let after = expected_loss(&mut t, 2);
    eprintln!("textual inversion: expected loss {before:.5} -> {after:.5}");
    assert!(after < before, "{before} -> {after}");
    let lines = std::fs::read_to_string(dir.path().join("trace.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 30);

    let dir = tempfile::tempdir().unwrap();
    let mut d = db(1e-3, 30, true);
    let before = expected_loss(&mut d, 2);
    let mut opt = d.optimizer().unwrap();
    let mut s = settings(30, d.dataset_len(), dir.path(), None);
    s.max_grad_norm = Some(1.0);
    train_loop::run(&mut opt, &mut d, &s, &mut |_| {}).unwrap();
    let after = expected_loss(&mut d, 2);
    eprintln!("dreambooth (prior preservation): expected loss {before:.5} -> {after:.5}");
    assert!(after < before, "{before} -> {after}");
}

fn snapshot(params: &[(String, candle_core::Var)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(b) {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{n} differs by {d}");
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    // Textual Inversion: 6 steps, checkpoints every 2, killed after step 3.
    let full = tempfile::tempdir().unwrap();
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    let s = settings(6, t.dataset_len(), full.path(), Some(2));
    train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
    let want = snapshot(opt.params());

    let cut = tempfile::tempdir().unwrap();
    let mut s = settings(6, 4, cut.path(), Some(2));
    s.stop_after = Some(3);
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    let o = train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
    assert_eq!(
        o,
        Outcome {
            resumed_from: None,
            steps_done: 3,
            finished: false,
            unreadable_checkpoints: vec![],
        }
    );
    s.stop_after = None;
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    let o = train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
    assert_eq!(o.resumed_from, Some(2));
    assert!(o.finished);
    assert_same(&snapshot(opt.params()), &want);
    let full_trace = std::fs::read_to_string(full.path().join("trace.jsonl")).unwrap();
    let cut_trace = std::fs::read_to_string(cut.path().join("trace.jsonl")).unwrap();
    let steps = |t: &str| -> Vec<u64> {
        t.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(steps(&cut_trace), steps(&full_trace));

    // Other settings refuse the checkpoints.
    let mut other = settings(6, 4, cut.path(), Some(2));
    other.fingerprint = "other".into();
    other.stop_after = Some(3);
    let cut2 = tempfile::tempdir().unwrap();
    let mut s2 = settings(6, 4, cut2.path(), Some(2));
    s2.stop_after = Some(3);
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    train_loop::run(&mut opt, &mut t, &s2, &mut |_| {}).unwrap();
    other.checkpoint_dir = s2.checkpoint_dir.clone();
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    let e = train_loop::run(&mut opt, &mut t, &other, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other settings"), "{e}");

    // DreamBooth: 4 steps, checkpoints every 2, killed after step 3.
    let full = tempfile::tempdir().unwrap();
    let mut d = db(1e-3, 4, false);
    let mut opt = d.optimizer().unwrap();
    let mut s = settings(4, d.dataset_len(), full.path(), Some(2));
    s.max_grad_norm = Some(1.0);
    train_loop::run(&mut opt, &mut d, &s, &mut |_| {}).unwrap();
    let want = snapshot(opt.params());
    let cut = tempfile::tempdir().unwrap();
    let mut s = settings(4, 2, cut.path(), Some(2));
    s.max_grad_norm = Some(1.0);
    s.stop_after = Some(3);
    let mut d = db(1e-3, 4, false);
    let mut opt = d.optimizer().unwrap();
    assert!(
        !train_loop::run(&mut opt, &mut d, &s, &mut |_| {})
            .unwrap()
            .finished
    );
    s.stop_after = None;
    let mut d = db(1e-3, 4, false);
    let mut opt = d.optimizer().unwrap();
    let o = train_loop::run(&mut opt, &mut d, &s, &mut |_| {}).unwrap();
    assert_eq!(o.resumed_from, Some(2));
    assert_same(&snapshot(opt.params()), &want);
}

/// The parameters as the bytes of a safetensors file (deterministic: no metadata, sorted names).
fn param_bytes(params: &[(String, candle_core::Var)], dir: &Path) -> Vec<u8> {
    let map: std::collections::HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let path = dir.join("params.safetensors");
    weights::save_safetensors(&map, &path).unwrap();
    std::fs::read(&path).unwrap()
}

/// Issue 25 item 5: when the newest checkpoint is truncated (or has one flipped byte), the run
/// resumes from the older one still on disk, names the unreadable one, and ends with exactly the
/// bytes of an uninterrupted run. Checkpoint files get a new file's permissions.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_older_one() {
    let full = tempfile::tempdir().unwrap();
    let mut t = ti(5e-2, 6);
    let mut opt = t.optimizer().unwrap();
    let s = settings(6, t.dataset_len(), full.path(), Some(2));
    train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
    let want = param_bytes(opt.params(), full.path());

    for damage in ["truncated", "flipped byte"] {
        let cut = tempfile::tempdir().unwrap();
        let mut s = settings(6, 4, cut.path(), Some(2));
        s.stop_after = Some(5);
        let mut t = ti(5e-2, 6);
        let mut opt = t.optimizer().unwrap();
        assert!(
            !train_loop::run(&mut opt, &mut t, &s, &mut |_| {})
                .unwrap()
                .finished
        );
        let newest = s.checkpoint_dir.join("checkpoint-4/state.safetensors");
        assert!(s.checkpoint_dir.join("checkpoint-2/state.json").is_file());
        let fresh = cut.path().join("fresh");
        let mode = std::fs::File::create(&fresh)
            .unwrap()
            .metadata()
            .unwrap()
            .permissions();
        for f in ["state.safetensors", "state.json"] {
            let p = s.checkpoint_dir.join("checkpoint-4").join(f);
            assert_eq!(std::fs::metadata(&p).unwrap().permissions(), mode, "{f}");
        }
        let mut bytes = std::fs::read(&newest).unwrap();
        match damage {
            "truncated" => bytes.truncate(bytes.len() / 2),
            _ => *bytes.last_mut().unwrap() ^= 0x01,
        }
        std::fs::write(&newest, bytes).unwrap();

        s.stop_after = None;
        let mut t = ti(5e-2, 6);
        let mut opt = t.optimizer().unwrap();
        let o = train_loop::run(&mut opt, &mut t, &s, &mut |_| {}).unwrap();
        assert_eq!(o.resumed_from, Some(2), "{damage}");
        assert!(o.finished);
        assert_eq!(o.unreadable_checkpoints.len(), 1, "{damage}");
        let u = &o.unreadable_checkpoints[0];
        assert_eq!(u.path, s.checkpoint_dir.join("checkpoint-4"));
        let says = if damage == "truncated" {
            "not a safetensors file"
        } else {
            "checksum mismatch"
        };
        assert!(
            u.reason.contains(&newest.display().to_string()) && u.reason.contains(says),
            "{damage}: {u}"
        );
        assert!(
            param_bytes(opt.params(), cut.path()) == want,
            "{damage}: the resumed run's weights differ from the uninterrupted run's"
        );
    }
}

//! The CI regression of metric scores (SPEC §8): the demo experiment on the tiny models runs end to
//! end and its table must match the golden results in `results/golden/demo/` (tolerance in the
//! README there). The same test kills `pnd sweep` on the demo experiment at several moments and
//! checks that resuming gives the same table byte for byte, and that two merged shards do too.
//!
//! After a deliberate change of results, rewrite the golden files with
//! `PND_BLESS=1 cargo test -p runner --test demo_regression` and say why in the commit.

use runner::demo::run_demo;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Absolute tolerance on every score: tiny models amplify float reassociation across CPUs
/// (SIMD widths, thread counts), which moves scores in the 5th-6th decimal; a real change of a
/// metric default (resize size, normalization, pooling) moves them by 1e-2 or more.
const TOLERANCE: f64 = 1e-4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden() -> PathBuf {
    repo().join("results/golden/demo")
}

fn pnd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pnd"));
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Compares two CSV files cell by cell: text cells exactly, numbers within TOLERANCE.
fn compare_csv(name: &str, got: &str, want: &str) -> Vec<String> {
    let mut diffs = Vec::new();
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    if g.len() != w.len() {
        diffs.push(format!("{name}: {} lines, golden has {}", g.len(), w.len()));
    }
    for (i, (gl, wl)) in g.iter().zip(&w).enumerate() {
        for (j, (gc, wc)) in gl.split(',').zip(wl.split(',')).enumerate() {
            let same = match (gc.parse::<f64>(), wc.parse::<f64>()) {
                (Ok(a), Ok(b)) => (a - b).abs() <= TOLERANCE,
                _ => gc == wc,
            };
            if !same {
                let header = w[0].split(',').nth(j).unwrap_or("?");
                diffs.push(format!(
                    "{name} line {} ({}), column {header}: got {gc}, golden {wc}",
                    i + 1,
                    wl.split(',').next().unwrap_or("")
                ));
            }
        }
    }
    diffs
}

fn kill_and_resume(demo: &Path, run: &Path) {
    let exp = demo.join("demo.toml");
    let cache = demo.join("cache");
    let args = [
        "sweep",
        exp.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--resume",
    ];
    let mut kills = 0;
    for delay_ms in [700u64, 1500, 2300, 3100, 4200] {
        let mut child = pnd(&args).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let out = pnd(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kills >= 1, "the sweep finished before any kill");
}

#[test]
#[cfg_attr(
    no_clip_tokenizer,
    ignore = "needs the real CLIP tokenizer: set PND_CLIP_TOKENIZER"
)]
fn demo_matches_golden_and_survives_kills_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let tokenizer = testdata::clip_tokenizer();
    let out = run_demo(&demo, Some(&tokenizer), false).unwrap();
    let report = &out.report_dir;
    // 1. Golden scores.
    let mut diffs = Vec::new();
    for f in ["table.csv", "per_subject.csv"] {
        let got = std::fs::read_to_string(report.join(f)).unwrap();
        if std::env::var_os("PND_BLESS").is_some() {
            std::fs::create_dir_all(golden()).unwrap();
            std::fs::write(golden().join(f), &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(golden().join(f))
            .unwrap_or_else(|e| panic!("golden {f}: {e} (bless with PND_BLESS=1)"));
        diffs.extend(compare_csv(f, &got, &want));
    }
    assert!(
        diffs.is_empty(),
        "scores moved beyond {TOLERANCE} from results/golden/demo:\n  {}",
        diffs.join("\n  ")
    );
    let table = std::fs::read(report.join("table.md")).unwrap();

    // 2. Killed and resumed: the same table, byte for byte.
    let run2 = tmp.path().join("killed");
    kill_and_resume(&demo, &run2);
    let st = pnd(&["report", run2.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    assert_eq!(
        String::from_utf8(std::fs::read(run2.join("report/table.md")).unwrap()).unwrap(),
        String::from_utf8(table.clone()).unwrap()
    );

    // 3. Two shards merged: the same table.
    let exp = demo.join("demo.toml");
    let cache = demo.join("cache");
    let mut shard_dirs = Vec::new();
    for i in 0..2 {
        let dir = tmp.path().join(format!("shard{i}"));
        let st = pnd(&[
            "sweep",
            exp.to_str().unwrap(),
            "--shard",
            &format!("{i}/2"),
            "--out",
            dir.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ])
        .status()
        .unwrap();
        assert!(st.success());
        shard_dirs.push(dir);
    }
    let merged = tmp.path().join("merged");
    let st = pnd(&[
        "merge",
        shard_dirs[0].to_str().unwrap(),
        shard_dirs[1].to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ])
    .status()
    .unwrap();
    assert!(st.success());
    let st = pnd(&["report", merged.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(merged.join("report/table.md")).unwrap(),
        table
    );
}

//! `pnd sweep` as users run it: dry runs of the paper's experiments, and one clear error before
//! any work for a bad experiment.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pnd(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pnd"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn table1_dry_run_lists_3000_jobs_per_method() {
    let (ok, out) = pnd(&["sweep", "experiments/table1.toml", "--dry-run"], &repo());
    assert!(ok, "{out}");
    assert!(
        out.contains("experiment 'table1': 24000 generation jobs (24000 in shard 0/1)"),
        "{out}"
    );
    for m in [
        "sd ", "sd+pnd", "ti ", "ti+pnd", "db ", "db+pnd", "blip ", "blip+pnd",
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(m))
            .unwrap_or_else(|| panic!("{m}: {out}"));
        assert!(line.contains(" 3000 jobs"), "{line}");
    }
    assert!(
        out.contains("null-text inversion + reference palette: 120"),
        "{out}"
    );
    assert!(out.contains("layout templates: 3000"), "{out}");
    let (ok, out) = pnd(
        &[
            "sweep",
            "experiments/table1.toml",
            "--dry-run",
            "--shard",
            "3/16",
        ],
        &repo(),
    );
    assert!(ok && out.contains("(1500 in shard 3/16)"), "{out}");
}

#[test]
fn table1_plus_dry_run_counts_6000_more_jobs_for_ip_adapter() {
    let (ok, out) = pnd(
        &["sweep", "experiments/table1-plus.toml", "--dry-run"],
        &repo(),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("experiment 'table1-plus': 30000 generation jobs (30000 in shard 0/1)"),
        "{out}"
    );
    for m in [
        "sd ", "sd+pnd", "ti ", "ti+pnd", "db ", "db+pnd", "blip ", "blip+pnd", "ipa ", "ipa+pnd",
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(m))
            .unwrap_or_else(|| panic!("{m}: {out}"));
        assert!(line.contains(" 3000 jobs"), "{line}");
    }
    let ipa = out
        .lines()
        .find(|l| l.trim_start().starts_with("ipa+pnd"))
        .unwrap();
    assert!(ipa.contains("IpAdapter + Pick-and-Draw"), "{ipa}");
    assert!(
        out.contains("null-text inversion + reference palette: 150"),
        "{out}"
    );
    assert!(out.contains("layout templates: 3000"), "{out}");
}

#[test]
fn every_experiment_file_parses() {
    for e in [
        "table1",
        "table1-plus",
        "table2-resolution",
        "ablation-emd",
        "ablation-losses",
        "ablation-timesteps",
        "ablation-subject-token",
    ] {
        let (ok, out) = pnd(
            &["sweep", &format!("experiments/{e}.toml"), "--dry-run"],
            &repo(),
        );
        assert!(ok, "{e}: {out}");
    }
}

fn experiment(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("e.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn bad_experiments_fail_before_any_work_with_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = testdata::dreambench();
    let base = format!(
        "name = \"e\"\nsubjects = [\"dog\"]\n[metrics]\ndata = \"{}\"\ndino = \"/nonexistent/dino\"\nclip = \"/nonexistent/clip\"\n",
        data.display()
    );
    let run = |body: &str| {
        let p = experiment(tmp.path(), body);
        let out = tmp.path().join("run");
        let r = pnd(
            &["sweep", p.to_str().unwrap(), "--out", out.to_str().unwrap()],
            tmp.path(),
        );
        assert!(!out.exists(), "work started for a bad experiment: {}", r.1);
        r
    };
    let (ok, out) = run(&format!(
        "{base}sedes = [0]\n[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n"
    ));
    assert!(
        !ok && out.contains("e.toml:7:1:") && out.contains("sedes"),
        "{out}"
    );
    let unknown = base.replace("[\"dog\"]", "[\"dog\", \"unicorn\"]");
    let (ok, out) = run(&format!(
        "{unknown}[[methods]]\nname = \"sd\"\nbaseline = \"stable-diffusion\"\n"
    ));
    assert!(
        !ok && out.contains("e.toml:2:20:") && out.contains("unknown subject 'unicorn'"),
        "{out}"
    );
    let (ok, out) = run(&format!(
        "{base}[models]\nbase = \"/nonexistent/sd\"\ndreambooth = \"/nonexistent/db/{{subject}}\"\n[[methods]]\nname = \"db\"\nbaseline = \"dreambooth\"\n"
    ));
    assert!(
        !ok && out.contains("model path '/nonexistent/db/dog' does not exist"),
        "{out}"
    );
    assert!(
        out.contains("DINO model path '/nonexistent/dino' does not exist"),
        "{out}"
    );
}

/// Sharded, a subject's jobs stay together: each of 16 shards holds 1,500 consecutive jobs of the
/// subject-grouped list (800 per subject), so it touches at most 3 subjects, and every subject's
/// inversions happen in at most two shards (dealing by index modulo 16 put every subject in every
/// shard: 16 × 120 inversions).
#[test]
fn table1_dry_run_prints_each_shards_shared_work() {
    let (ok, out) = pnd(
        &[
            "sweep",
            "experiments/table1.toml",
            "--dry-run",
            "--shard",
            "3/16",
        ],
        &repo(),
    );
    assert!(ok, "{out}");
    let shards: Vec<&str> = out
        .lines()
        .map(str::trim_start)
        .filter(|l| l.contains(" jobs, ") && l.contains(" inversions, "))
        .collect();
    assert_eq!(shards.len(), 16, "{out}");
    let number = |line: &str, after: &str| -> usize {
        line.split(after)
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    for (i, line) in shards.iter().enumerate() {
        assert!(line.starts_with(&format!("{i}/16: 1500 jobs, ")), "{line}");
        assert!(number(line, " subjects") <= 3, "{line}");
        assert!(number(line, " inversions") <= 3 * 4, "{line}");
        assert!(number(line, " layout templates") <= 3 * 100, "{line}");
    }
    assert!(shards[3].ends_with("<- this shard"), "{out}");
    let inversions: usize = shards.iter().map(|l| number(l, " inversions")).sum();
    assert!(
        inversions < 2 * 120,
        "{inversions} inversions over all shards"
    );
}

/// `--devices` is checked before any work: `all` in a build without CUDA is one error that says
/// so, an unknown device is named, and `--device` with `--devices` is refused.
#[test]
fn devices_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = |devices: &[&str]| {
        let mut args = vec![
            "sweep",
            "experiments/table1.toml",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(devices);
        let r = pnd(&args, &repo());
        assert!(!out.exists(), "work started: {}", r.1);
        r
    };
    if !cfg!(feature = "cuda") {
        let (ok, log) = run(&["--devices", "all"]);
        assert!(!ok && log.contains("built without CUDA"), "{log}");
        assert_eq!(
            log.lines().filter(|l| l.starts_with("error")).count(),
            1,
            "{log}"
        );
    }
    let (ok, log) = run(&["--devices", "cpu,tpu:0"]);
    assert!(!ok && log.contains("unknown device 'tpu:0'"), "{log}");
    let (ok, log) = run(&["--devices", "cpu,cpu", "--device", "cpu"]);
    assert!(!ok && log.contains("cannot be used with"), "{log}");
}

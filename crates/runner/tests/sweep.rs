//! The sweep engine: resume after kills, shards merged equal the unsharded run, config errors
//! with line and column.

use dreambench::Job;
use runner::experiment::Experiment;
use runner::sweep::{merge, run_jobs, JobOutput, JobRunner, Plan, RunStore, Shard};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const EXPERIMENT: &str = r#"
name = "engine-test"
subjects = ["dog", "backpack", "cat2"]
prompts = [0, 5, 24]
seeds = [0, 1]

[[methods]]
name = "sd"
baseline = "stable-diffusion"

[[methods]]
name = "sd+pnd"
baseline = "stable-diffusion"
pick_and_draw = true
"#;

/// A row like the real ones: ids, prompt, a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: String,
    method: String,
    subject: String,
    prompt: String,
    seed: u64,
    score: f64,
}

/// A deterministic job that writes its "image" in two steps with a pause between them, so a kill
/// can land in the middle of a job and leave a half-written folder behind.
struct TwoStepRunner {
    pause: Duration,
}

impl JobRunner for TwoStepRunner {
    type Row = Row;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Row> {
        let subject = dreambench::subject(&job.subject).unwrap();
        let prompt = dreambench::clip_t_prompt(subject.prompts()[job.prompt_index], subject.class);
        let h = job.id().0.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ b as u64).wrapping_mul(1099511628211)
        });
        // Not atomic on purpose: a partial file the engine must discard on rerun.
        std::fs::write(
            out.path("partial.txt"),
            &prompt.as_bytes()[..prompt.len() / 2],
        )?;
        std::thread::sleep(self.pause);
        out.write("image.txt", prompt.as_bytes())?;
        std::fs::remove_file(out.path("partial.txt"))?;
        Ok(Row {
            id: job.id().0,
            method: job.method.clone(),
            subject: job.subject.clone(),
            prompt,
            seed: job.seed,
            score: (h % 10_000) as f64 / 10_000.0,
        })
    }
}

fn plan() -> Plan {
    let exp = Experiment::parse(EXPERIMENT, "engine-test.toml").unwrap();
    Plan {
        experiment: exp.name.clone(),
        config: serde_json::to_value(&exp).unwrap(),
        jobs: exp.jobs(),
    }
}

fn run_all(dir: &Path, shard: Shard, pause: Duration) {
    let plan = plan();
    let store = RunStore::create(dir, &plan).unwrap();
    run_jobs(
        &store,
        &plan.jobs,
        shard,
        &mut TwoStepRunner { pause },
        false,
    )
    .unwrap();
}

fn results(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("results.csv")).unwrap()
}

#[test]
fn experiment_expands_into_jobs() {
    let plan = plan();
    assert_eq!(plan.jobs.len(), 2 * 3 * 3 * 2);
    assert_eq!(plan.jobs[0].id().0, "sd__dog__p00__s0");
    assert_eq!(plan.jobs.last().unwrap().id().0, "sd+pnd__cat2__p24__s1");
}

#[test]
fn uninterrupted_run_writes_every_row_once_and_a_rerun_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    run_all(tmp.path(), Shard::ALL, Duration::ZERO);
    let csv = String::from_utf8(results(tmp.path())).unwrap();
    assert_eq!(csv.lines().count(), 1 + 36);
    assert!(csv.starts_with(
        "id,method,subject,prompt,seed,score\nsd__dog__p00__s0,sd,dog,a dog in the jungle,0,"
    ));
    let plan = plan();
    let store = RunStore::open(tmp.path()).unwrap();
    let summary = run_jobs(
        &store,
        &plan.jobs,
        Shard::ALL,
        &mut TwoStepRunner {
            pause: Duration::ZERO,
        },
        false,
    )
    .unwrap();
    assert_eq!((summary.skipped, summary.completed), (36, 0));
}

#[test]
fn a_half_written_job_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    run_all(tmp.path(), Shard::ALL, Duration::ZERO);
    // Simulate a crash inside one job: its row never got written, a partial file remains.
    let store = RunStore::open(tmp.path()).unwrap();
    let id = plan().jobs[7].id();
    std::fs::remove_file(store.row_path(&id)).unwrap();
    std::fs::write(store.files_dir(&id).join("partial.txt"), "half").unwrap();
    let summary = run_jobs(
        &store,
        &plan().jobs,
        Shard::ALL,
        &mut TwoStepRunner {
            pause: Duration::ZERO,
        },
        false,
    )
    .unwrap();
    assert_eq!(summary.completed, 1);
    assert!(!store.files_dir(&id).join("partial.txt").exists());
    assert_eq!(results(tmp.path()), results(reference.path()));
}

#[test]
fn shards_merged_equal_the_unsharded_run() {
    let full = tempfile::tempdir().unwrap();
    run_all(full.path(), Shard::ALL, Duration::ZERO);
    let shards: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in shards.iter().enumerate() {
        run_all(dir.path(), Shard { index: i, count: 3 }, Duration::ZERO);
    }
    let merged = tempfile::tempdir().unwrap();
    let paths: Vec<_> = shards.iter().map(|d| d.path().to_path_buf()).collect();
    merge::<Row>(&paths, merged.path()).unwrap();
    assert_eq!(results(merged.path()), results(full.path()));
    for job in plan().jobs {
        let a = std::fs::read(
            RunStore::open(merged.path())
                .unwrap()
                .files_dir(&job.id())
                .join("image.txt"),
        )
        .unwrap();
        let b = std::fs::read(
            RunStore::open(full.path())
                .unwrap()
                .files_dir(&job.id())
                .join("image.txt"),
        )
        .unwrap();
        assert_eq!(a, b);
    }
    // Merging two of three shards is not the full run, and a plan mismatch is refused.
    let partial = tempfile::tempdir().unwrap();
    merge::<Row>(&paths[..2], partial.path()).unwrap();
    assert_ne!(results(partial.path()), results(full.path()));
}

const CHILD_ENV: &str = "PND_SWEEP_TEST_CHILD_DIR";

/// Not a test on its own: the child process of `resume_after_kills_matches_uninterrupted_run`.
#[test]
#[ignore = "child process of resume_after_kills_matches_uninterrupted_run"]
fn sweep_child_process() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_all(Path::new(&dir), Shard::ALL, Duration::from_millis(15));
    }
}

/// Real kills: a child process runs the sweep and is SIGKILLed at several moments (mid-job
/// included: each job pauses between its partial and its final write); reruns finish the work.
#[test]
fn resume_after_kills_matches_uninterrupted_run() {
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&exe)
            .args([
                "--exact",
                "sweep_child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Kill at varied moments until at least three kills landed (a child that finishes first ends it).
    let delays = [40u64, 95, 130, 77, 160, 55, 110];
    let mut kills = 0;
    for attempt in 0..30 {
        let mut child = spawn();
        std::thread::sleep(Duration::from_millis(delays[attempt % delays.len()]));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if kills == 4 {
            break;
        }
    }
    assert!(
        kills >= 3,
        "the child finished too early to test kills ({kills} kills)"
    );
    let store = RunStore::open(dir.path()).unwrap();
    let status = spawn().wait().unwrap();
    assert!(status.success());
    assert_eq!(results(dir.path()), results(reference.path()));
    let rows: Vec<Row> = store.rows().unwrap();
    assert_eq!(rows.len(), 36);
    for job in plan().jobs {
        let files: Vec<_> = std::fs::read_dir(store.files_dir(&job.id()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["image.txt"], "{}", job.id());
    }
}

#[test]
fn malformed_toml_is_reported_with_line_and_column() {
    let err = Experiment::parse("name = \"x\"\nseeds = [0, 1\n[[methods]]\n", "bad.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("bad.toml:3:1:") || err.starts_with("bad.toml:2:"),
        "{err}"
    );
    let err = Experiment::parse(
        &EXPERIMENT.replace("seeds = [0, 1]", "seeds = [0, 1]\nsedes = 3"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:6:1:") && err.contains("sedes"),
        "{err}"
    );
    let err = Experiment::parse(&EXPERIMENT.replace("\"cat2\"", "\"cat3\""), "e.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("e.toml:3:32:") && err.contains("unknown subject 'cat3'"),
        "{err}"
    );
    let err = Experiment::parse(
        &EXPERIMENT.replace("\"stable-diffusion\"\npick", "\"stable-diffusio\"\npick"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:13:12:") && err.contains("stable-diffusio"),
        "{err}"
    );
    let err = Experiment::parse(
        &EXPERIMENT.replace("prompts = [0, 5, 24]", "prompts = [0, 5, 25]"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:4:18:") && err.contains("out of range"),
        "{err}"
    );
}

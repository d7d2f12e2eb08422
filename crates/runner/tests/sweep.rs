//! The sweep engine: resume after kills, shards merged equal the unsharded run, config errors
//! with line and column.

use dreambench::Job;
use runner::commands::sweep::plan_of;
use runner::demo::DEMO_METHODS;
use runner::experiment::Experiment;
use runner::progress::ProgressMode;
use runner::sweep::{
    merge, run_jobs, run_jobs_with, JobOutput, JobRunner, Plan, RunOptions, RunStore, Shard,
    SweepRow,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The engine test's experiment: the demo's two methods over three subjects.
fn experiment() -> String {
    format!(
        r#"
name = "engine-test"
subjects = ["dog", "backpack", "cat2"]
prompts = [0, 5, 24]
seeds = [0, 1]

{DEMO_METHODS}"#
    )
}

/// A row like the real ones: ids, prompt, a score, and a wall time that is not part of the row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: String,
    method: String,
    subject: String,
    prompt: String,
    seed: u64,
    score: f64,
    #[serde(skip)]
    seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Seconds {
    seconds: f64,
}

impl SweepRow for Row {
    type Timing = Seconds;
    fn timing(&self) -> Option<Seconds> {
        Some(Seconds {
            seconds: self.seconds,
        })
    }
}

/// Appends a line to the run's `runs.log` (O_APPEND: lines of several processes stay whole).
fn log_line(root: &Path, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("runs.log"))
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// A deterministic job that writes its "image" in two steps with a pause between them, so a kill
/// can land in the middle of a job and leave a half-written folder behind.
struct TwoStepRunner {
    pause: Duration,
}

impl JobRunner for TwoStepRunner {
    type Row = Row;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Row> {
        let started = std::time::Instant::now();
        // The run folder: `files/<id>` two levels up.
        let root = out.dir().parent().unwrap().parent().unwrap().to_path_buf();
        log_line(&root, &format!("start {} {}", job.id(), std::process::id()));
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
        log_line(&root, &format!("end {} {}", job.id(), std::process::id()));
        Ok(Row {
            id: job.id().0,
            method: job.method.clone(),
            subject: job.subject.clone(),
            prompt,
            seed: job.seed,
            score: (h % 10_000) as f64 / 10_000.0,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn plan() -> Plan {
    let exp = Experiment::parse(&experiment(), "engine-test.toml").unwrap();
    plan_of(&exp).unwrap()
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
    merge::<Row>(&paths, merged.path(), false).unwrap();
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
    // The timings came along, in their own file: the merged timings.csv is the shards' lines.
    let timings = std::fs::read_to_string(merged.path().join("timings.csv")).unwrap();
    assert_eq!(timings.lines().count(), 1 + 36);
    assert!(
        timings.starts_with("id,seconds\nsd__dog__p00__s0,"),
        "{timings}"
    );
    let shard_lines: usize = paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p.join("timings.csv"))
                .unwrap()
                .lines()
                .count()
                - 1
        })
        .sum();
    assert_eq!(shard_lines, 36);
    for line in timings.lines().skip(1) {
        assert!(
            paths
                .iter()
                .any(|p| std::fs::read_to_string(p.join("timings.csv"))
                    .unwrap()
                    .lines()
                    .any(|l| l == line)),
            "{line}"
        );
    }
    // Two of three shards are not the run: refused, with nothing written, unless --partial.
    let out = merged.path().join("two-of-three");
    let err = merge::<Row>(&paths[..2], &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("12 of 36 jobs have no row") && err.contains("--partial"),
        "{err}"
    );
    assert!(!out.exists(), "a refused merge wrote '{}'", out.display());
    merge::<Row>(&paths[..2], &out, true).unwrap();
    assert_ne!(results(&out), results(full.path()));
}

/// The same work twice, with other wall times: the rows, results.csv included, are the same
/// bytes and the shards merge; rows that differ in a value are refused, with nothing written.
#[test]
fn merge_compares_values_not_timings_and_a_refused_merge_writes_nothing() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    run_all(a.path(), Shard::ALL, Duration::ZERO);
    run_all(b.path(), Shard::ALL, Duration::from_millis(2));
    assert_eq!(results(a.path()), results(b.path()));
    let ta = std::fs::read_to_string(a.path().join("timings.csv")).unwrap();
    let tb = std::fs::read_to_string(b.path().join("timings.csv")).unwrap();
    assert_ne!(ta, tb, "the wall times differ");
    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    let both = [a.path().to_path_buf(), b.path().to_path_buf()];
    merge::<Row>(&both, &merged, false).unwrap();
    assert_eq!(results(&merged), results(a.path()));
    // A value differs in one row of b: refused, and no merged folder appears.
    let store = RunStore::open(b.path()).unwrap();
    let id = plan().jobs[5].id();
    let mut row: Row = store.read_row(&id).unwrap().unwrap();
    row.score += 0.5;
    store.write_row(&id, &row).unwrap();
    let refused = out.path().join("refused");
    let err = merge::<Row>(&both, &refused, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("job {id} has different rows")),
        "{err}"
    );
    assert!(!refused.exists());
    // Into an existing run folder: refused before anything is written there either.
    let before = results(&merged);
    let err = merge::<Row>(&both, &merged, false).unwrap_err().to_string();
    assert!(err.contains("different rows"), "{err}");
    assert_eq!(results(&merged), before);
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
        &experiment().replace("seeds = [0, 1]", "seeds = [0, 1]\nsedes = 3"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:6:1:") && err.contains("sedes"),
        "{err}"
    );
    let err = Experiment::parse(&experiment().replace("\"cat2\"", "\"cat3\""), "e.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("e.toml:3:32:") && err.contains("unknown subject 'cat3'"),
        "{err}"
    );
    let err = Experiment::parse(
        &experiment().replace("\"stable-diffusion\"\npick", "\"stable-diffusio\"\npick"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:13:12:") && err.contains("stable-diffusio"),
        "{err}"
    );
    let err = Experiment::parse(
        &experiment().replace("prompts = [0, 5, 24]", "prompts = [0, 5, 25]"),
        "e.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("e.toml:4:18:") && err.contains("out of range"),
        "{err}"
    );
}

const PROGRESS_CHILD_ENV: &str = "PND_SWEEP_PROGRESS_CHILD_DIR";

/// Not a test on its own: the child process of `progress_lines_when_stderr_is_not_a_terminal`.
#[test]
#[ignore = "child process of progress_lines_when_stderr_is_not_a_terminal"]
fn sweep_progress_child_process() {
    if let Ok(dir) = std::env::var(PROGRESS_CHILD_ENV) {
        let plan = plan();
        let store = RunStore::create(Path::new(&dir), &plan).unwrap();
        let mut runner = TwoStepRunner {
            pause: Duration::ZERO,
        };
        run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, true).unwrap();
    }
}

/// Under a batch scheduler stderr is a file: a sweep then prints one plain line per finished job
/// (id, seconds, done/total, ETA) instead of a progress bar that would never show.
#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sweep_progress_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROGRESS_CHILD_ENV, dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("job ")).collect();
    assert_eq!(lines.len(), 36, "{log}");
    let first = lines[0];
    assert!(
        first.starts_with("job sd__dog__p00__s0 done in ")
            && first.contains("s [1/36], ETA ")
            && first.split("ETA ").nth(1).unwrap().split(':').count() == 3,
        "{first}"
    );
    // In the order the shard runs them: grouped by subject.
    let plan = plan();
    for (i, (line, job)) in lines.iter().zip(Shard::ALL.select(&plan.jobs)).enumerate() {
        let want = format!("job {} done in ", job.id());
        assert!(line.starts_with(&want), "{line}");
        assert!(line.contains(&format!("[{}/36]", i + 1)), "{line}");
    }
    assert!(
        lines[35].ends_with("ETA 0:00:00"),
        "the last job leaves nothing to wait for: {}",
        lines[35]
    );
}

/// A runner whose chosen jobs fail (an unreadable reference, a NaN that aborts, ...).
struct FailingRunner {
    inner: TwoStepRunner,
    fail: Vec<String>,
}

impl JobRunner for FailingRunner {
    type Row = Row;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Row> {
        if self.fail.contains(&job.id().0) {
            anyhow::bail!("injected failure of {}", job.id());
        }
        self.inner.run(job, out)
    }
}

#[test]
fn keep_going_records_failures_and_a_rerun_retries_them() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan();
    let store = RunStore::create(tmp.path(), &plan).unwrap();
    let bad = [plan.jobs[3].id().0, plan.jobs[20].id().0];
    let failing = |fail: &[String]| FailingRunner {
        inner: TwoStepRunner {
            pause: Duration::ZERO,
        },
        fail: fail.to_vec(),
    };
    // Without --keep-going the first failure stops the sweep, as before.
    let err = run_jobs(&store, &plan.jobs, Shard::ALL, &mut failing(&bad), false).unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("job {} failed", bad[0])),
        "{err:#}"
    );
    assert_eq!(store.rows::<Row>().unwrap().len(), 3);
    assert!(store.failures().unwrap().is_empty());

    // With it, both failures are recorded and every other job finishes.
    let keep_going = RunOptions {
        progress: ProgressMode::Hidden,
        keep_going: true,
    };
    let summary = run_jobs_with(
        &store,
        &plan.jobs,
        Shard::ALL,
        &mut failing(&bad),
        keep_going,
    )
    .unwrap();
    let ids: Vec<&str> = summary.failed.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, [bad[0].as_str(), bad[1].as_str()]);
    assert_eq!((summary.skipped, summary.completed), (3, 31));
    let failures = store.failures().unwrap();
    assert_eq!(failures, summary.failed);
    assert!(
        failures[1].error.contains("injected failure"),
        "{failures:?}"
    );
    let csv = std::fs::read_to_string(tmp.path().join("failures.csv")).unwrap();
    assert!(csv.starts_with("id,error\n"), "{csv}");
    assert_eq!(store.rows::<Row>().unwrap().len(), 34);

    // The report states them.
    let head = runner::report::header::header(&plan, 34, &failures);
    assert!(
        head.contains("- Jobs: 34 of 36 finished, 2 failed"),
        "{head}"
    );
    assert!(
        head.contains(&format!("| {} | injected failure", bad[1])),
        "{head}"
    );

    // A rerun retries exactly the failed jobs; one fails again and stays recorded.
    let summary = run_jobs_with(
        &store,
        &plan.jobs,
        Shard::ALL,
        &mut failing(&bad[1..]),
        keep_going,
    )
    .unwrap();
    assert_eq!(
        (summary.skipped, summary.completed, summary.failed.len()),
        (34, 1, 1)
    );
    assert_eq!(store.failures().unwrap(), summary.failed);
    // Fixed: the last one finishes, failures.csv goes, and the results equal an unbroken run.
    let summary = run_jobs_with(
        &store,
        &plan.jobs,
        Shard::ALL,
        &mut failing(&[]),
        keep_going,
    )
    .unwrap();
    assert_eq!((summary.completed, summary.failed.len()), (1, 0));
    assert!(!tmp.path().join("failures.csv").exists());
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    assert_eq!(results(tmp.path()), results(reference.path()));
}

/// Batches jobs that differ only by seed, records the batches it ran, and fails a whole batch
/// (its "generation") when it holds a job of `fail`.
struct BatchingRunner {
    inner: TwoStepRunner,
    size: usize,
    fail: Vec<String>,
    batches: Vec<Vec<String>>,
}

impl JobRunner for BatchingRunner {
    type Row = Row;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Row> {
        self.batches.push(vec![job.id().0]);
        self.inner.run(job, out)
    }
    fn batch_size(&self) -> usize {
        self.size
    }
    fn batchable(&self, a: &Job, b: &Job) -> bool {
        (&a.method, &a.subject, a.prompt_index) == (&b.method, &b.subject, b.prompt_index)
    }
    fn run_batch(&mut self, jobs: &[&Job], outs: &[JobOutput]) -> Vec<anyhow::Result<Row>> {
        let ids: Vec<String> = jobs.iter().map(|j| j.id().0).collect();
        self.batches.push(ids.clone());
        if ids.iter().any(|id| self.fail.contains(id)) {
            return ids
                .iter()
                .map(|_| Err(anyhow::anyhow!("injected batch failure")))
                .collect();
        }
        jobs.iter()
            .zip(outs)
            .map(|(j, o)| self.inner.run(j, o))
            .collect()
    }
}

#[test]
fn batches_hold_one_prompts_seeds_and_keep_resume_and_failures_right() {
    let plan = {
        let text = experiment().replace("seeds = [0, 1]", "seeds = [0, 1, 2]");
        plan_of(&Experiment::parse(&text, "engine-test.toml").unwrap()).unwrap()
    };
    let batching = |size: usize, fail: &[String]| BatchingRunner {
        inner: TwoStepRunner {
            pause: Duration::ZERO,
        },
        size,
        fail: fail.to_vec(),
        batches: vec![],
    };
    let keep_going = RunOptions {
        progress: ProgressMode::Hidden,
        keep_going: true,
    };
    let unbatched = tempfile::tempdir().unwrap();
    let store = RunStore::create(unbatched.path(), &plan).unwrap();
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut batching(1, &[]), false).unwrap();

    // Batches of up to 2 (the 3 seeds of a prompt: 2 + 1), never across prompts; the same rows.
    let tmp = tempfile::tempdir().unwrap();
    let store = RunStore::create(tmp.path(), &plan).unwrap();
    let mut runner = batching(2, &[]);
    run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap();
    assert_eq!(runner.batches.len(), 2 * 3 * 3 * 2);
    for b in &runner.batches {
        let prompt = |id: &str| id.rsplit_once("__s").unwrap().0.to_string();
        assert!(
            b.len() <= 2 && b.iter().all(|id| prompt(id) == prompt(&b[0])),
            "{b:?}"
        );
    }
    assert_eq!(runner.batches[0], ["sd__dog__p00__s0", "sd__dog__p00__s1"]);
    assert_eq!(runner.batches[1], ["sd__dog__p00__s2"]);
    assert_eq!(results(tmp.path()), results(unbatched.path()));

    // A failing batch fails each of its jobs; a rerun batches only the unfinished jobs.
    let tmp = tempfile::tempdir().unwrap();
    let store = RunStore::create(tmp.path(), &plan).unwrap();
    // One finished job of the first prompt (as a killed run leaves it).
    run_jobs(
        &store,
        &plan.jobs[1..2],
        Shard::ALL,
        &mut batching(1, &[]),
        false,
    )
    .unwrap();
    let bad = plan.jobs[4].id().0; // sd__dog__p05__s1
    let mut runner = batching(4, std::slice::from_ref(&bad));
    let summary = run_jobs_with(&store, &plan.jobs, Shard::ALL, &mut runner, keep_going).unwrap();
    assert_eq!(runner.batches[0], ["sd__dog__p00__s0", "sd__dog__p00__s2"]);
    let failed: Vec<&str> = summary.failed.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(
        failed,
        ["sd__dog__p05__s0", "sd__dog__p05__s1", "sd__dog__p05__s2"]
    );
    assert_eq!(store.failures().unwrap(), summary.failed);
    assert!(summary.failed[2].error.contains("injected batch failure"));
    // Without --keep-going, the failing batch stops the sweep with its first job's error.
    let err = run_jobs(
        &store,
        &plan.jobs,
        Shard::ALL,
        &mut batching(4, &[bad]),
        false,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("job sd__dog__p05__s0 failed"),
        "{err:#}"
    );
    let mut runner = batching(4, &[]);
    let summary = run_jobs_with(&store, &plan.jobs, Shard::ALL, &mut runner, keep_going).unwrap();
    assert_eq!(
        runner.batches,
        [["sd__dog__p05__s0", "sd__dog__p05__s1", "sd__dog__p05__s2"]]
    );
    assert_eq!((summary.completed, summary.failed.len()), (3, 0));
    assert!(!tmp.path().join("failures.csv").exists());
    assert_eq!(results(tmp.path()), results(unbatched.path()));
}

/// A runner that scores chosen jobs NaN (a metric model that overflowed).
struct NanRunner {
    inner: TwoStepRunner,
    nan: Vec<String>,
}

impl JobRunner for NanRunner {
    type Row = Row;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Row> {
        let mut row = self.inner.run(job, out)?;
        if self.nan.contains(&row.id) {
            row.score = f64::NAN;
        }
        Ok(row)
    }
}

/// A NaN score is that job's one clear error (in failures.csv under --keep-going), never a row
/// that cannot be read back: the run, its rows and a resume stay readable.
#[test]
fn a_non_finite_score_fails_its_job_and_never_writes_an_unreadable_row() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan();
    let store = RunStore::create(tmp.path(), &plan).unwrap();
    let bad = plan.jobs[2].id();
    let mut runner = NanRunner {
        inner: TwoStepRunner {
            pause: Duration::ZERO,
        },
        nan: vec![bad.0.clone()],
    };
    let err = run_jobs(&store, &plan.jobs, Shard::ALL, &mut runner, false).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!("job {bad} failed")) && err.contains("would not read back"),
        "{err}"
    );
    assert!(!store.is_done(&bad));
    let keep_going = RunOptions {
        progress: ProgressMode::Hidden,
        keep_going: true,
    };
    let summary = run_jobs_with(&store, &plan.jobs, Shard::ALL, &mut runner, keep_going).unwrap();
    assert_eq!(summary.failed.len(), 1);
    assert_eq!(summary.failed[0].id, bad.0);
    assert_eq!(store.failures().unwrap(), summary.failed);
    assert_eq!(store.rows::<Row>().unwrap().len(), 35);
    // Fixed, a resume redoes only that job, and the run equals an unbroken one.
    runner.nan.clear();
    let summary = run_jobs_with(&store, &plan.jobs, Shard::ALL, &mut runner, keep_going).unwrap();
    assert_eq!((summary.skipped, summary.completed), (35, 1));
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    assert_eq!(results(tmp.path()), results(reference.path()));
}

/// A row file that does not read back (a disk fault) is redone by a resume.
#[test]
fn an_unreadable_row_file_is_redone() {
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    let tmp = tempfile::tempdir().unwrap();
    run_all(tmp.path(), Shard::ALL, Duration::ZERO);
    let store = RunStore::open(tmp.path()).unwrap();
    let id = plan().jobs[9].id();
    std::fs::write(store.row_path(&id), "{\"id\": \"trunc").unwrap();
    let e = store.rows::<Row>().unwrap_err().to_string();
    assert!(
        e.contains(&store.row_path(&id).display().to_string()),
        "{e}"
    );
    let mut runner = TwoStepRunner {
        pause: Duration::ZERO,
    };
    let summary = run_jobs(&store, &plan().jobs, Shard::ALL, &mut runner, false).unwrap();
    assert_eq!((summary.skipped, summary.completed), (35, 1));
    assert_eq!(results(tmp.path()), results(reference.path()));
}

const CLAIM_CHILD_ENV: &str = "PND_SWEEP_TEST_CLAIM_DIR";

/// Not a test on its own: a worker of `three_processes_on_one_folder_run_each_job_once`.
#[test]
#[ignore = "child process of three_processes_on_one_folder_run_each_job_once"]
fn sweep_claim_child_process() {
    if let Ok(dir) = std::env::var(CLAIM_CHILD_ENV) {
        run_all(Path::new(&dir), Shard::ALL, Duration::from_millis(20));
    }
}

/// Three processes started together on one run folder, one of them killed (SIGKILL) midway, then
/// a resume: every row has its files, every job ran to its end exactly once (the runs' log), the
/// only job begun twice is the one the kill interrupted, and results.csv is an unbroken run's.
#[test]
fn three_processes_on_one_folder_run_each_job_once() {
    let reference = tempfile::tempdir().unwrap();
    run_all(reference.path(), Shard::ALL, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&exe)
            .args([
                "--exact",
                "sweep_claim_child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CLAIM_CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut workers: Vec<_> = (0..3).map(|_| spawn()).collect();
    let log = || std::fs::read_to_string(dir.path().join("runs.log")).unwrap_or_default();
    let victim = workers[1].id();
    // Kill the second worker while it is inside a job (started, not ended), after some progress.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = log();
        let mine = |w: &str| {
            text.lines()
                .filter(|l| l.starts_with(w) && l.ends_with(&format!(" {victim}")))
                .count()
        };
        if mine("end ") >= 2 && mine("start ") > mine("end ") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && workers[1].try_wait().unwrap().is_none(),
            "the worker to kill ended first:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    workers[1].kill().unwrap();
    workers[1].wait().unwrap();
    for (k, w) in workers.iter_mut().enumerate() {
        if k != 1 {
            assert!(w.wait().unwrap().success());
        }
    }
    // The two survivors took over the killed worker's job: the folder is complete already.
    let store = RunStore::open(dir.path()).unwrap();
    assert_eq!(store.rows::<Row>().unwrap().len(), 36);
    assert!(spawn().wait().unwrap().success(), "the resume");
    assert_eq!(results(dir.path()), results(reference.path()));
    let text = log();
    let count = |what: &str, id: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{what} {id} ")))
            .count()
    };
    let mut begun_twice = Vec::new();
    for job in plan().jobs {
        let id = job.id().0;
        assert_eq!(count("end", &id), 1, "{id}:\n{text}");
        if count("start", &id) != 1 {
            begun_twice.push(id.clone());
        }
        let files: Vec<_> = std::fs::read_dir(store.files_dir(&job.id()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["image.txt"], "{id}");
    }
    assert_eq!(begun_twice.len(), 1, "{begun_twice:?}\n{text}");
    let killed_in = format!("start {} {victim}", begun_twice[0]);
    assert!(text.lines().any(|l| l == killed_in), "{text}");
    // Three workers shared the work (each ran some of it).
    let pids: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("end "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{text}");
}

/// A run folder written before timings had their own files: its row files hold the wall time.
/// They load, their timing is read from them, and a resume writes the same results.csv as a new
/// run (no timing column).
#[test]
fn rows_of_older_runs_with_timing_fields_load_and_keep_their_timings() {
    let tmp = tempfile::tempdir().unwrap();
    run_all(tmp.path(), Shard::ALL, Duration::ZERO);
    let want = results(tmp.path());
    let store = RunStore::open(tmp.path()).unwrap();
    let id = plan().jobs[0].id();
    let path = store.row_path(&id);
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    old["seconds"] = 2.5.into();
    std::fs::write(&path, old.to_string()).unwrap();
    std::fs::remove_file(store.timing_path(&id)).unwrap();
    let row: Row = store.read_row(&id).unwrap().unwrap();
    assert_eq!(row.id, id.0);
    assert_eq!(
        store.read_timing::<Seconds>(&id),
        Some(Seconds { seconds: 2.5 })
    );
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
    assert_eq!(summary.skipped, 36);
    assert_eq!(results(tmp.path()), want);
    let timings = std::fs::read_to_string(tmp.path().join("timings.csv")).unwrap();
    assert!(timings.contains(&format!("\n{id},2.5\n")), "{timings}");
}

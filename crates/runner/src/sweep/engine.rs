//! Running a job list against a store: shard selection, skipping finished jobs, redoing
//! half-written ones, batching jobs that differ only by seed, progress with ETA.

use super::claim::{claim, try_claim, Claim};
use super::store::{write_file_atomic, Failure, RunStore, StoreError, SweepRow};
use crate::progress::{JobProgress, ProgressMode};
use dreambench::{Job, JobId};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// `--shard i/n`: shard `i` (0-based) of `n`. The jobs are grouped by subject (subjects in order
/// of first appearance, each group in canonical order) and cut into `n` contiguous, equal parts
/// (sizes differ by at most one): a subject's jobs stay together, in one shard or two neighbours,
/// so its per-subject work (real-image embeddings, inversions, layout templates) is done once or
/// twice, not in every shard. Deterministic, and the same on every machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid shard '{0}': expected i/n with 0 <= i < n, e.g. 0/4")]
pub struct ShardError(pub String);

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ShardError(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(err)?;
        let index: usize = i.trim().parse().map_err(|_| err())?;
        let count: usize = n.trim().parse().map_err(|_| err())?;
        if count == 0 || index >= count {
            return Err(err());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// This shard's jobs, grouped by subject (canonical order within a subject).
    pub fn select<'a>(&self, jobs: &'a [Job]) -> Vec<&'a Job> {
        let mut first_seen: Vec<&str> = Vec::new();
        for j in jobs {
            if !first_seen.contains(&j.subject.as_str()) {
                first_seen.push(&j.subject);
            }
        }
        let mut grouped: Vec<&Job> = jobs.iter().collect();
        // Stable: canonical order within each subject.
        grouped.sort_by_key(|j| first_seen.iter().position(|s| *s == j.subject));
        let n = grouped.len();
        grouped[self.index * n / self.count..(self.index + 1) * n / self.count].to_vec()
    }
}

/// Where a job writes its output files. Files are written atomically into the job's folder; the
/// folder is emptied before a job (re)starts, so leftovers of a killed attempt never survive. Only
/// the process that holds the job's claim writes there.
pub struct JobOutput {
    dir: PathBuf,
}

impl JobOutput {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `name` (a path relative to the job folder) atomically and returns its full path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.dir.join(name);
        write_file_atomic(&path, bytes)?;
        Ok(path)
    }

    /// A path in the job folder for writers that produce files themselves (e.g. PNG encoders);
    /// write to [`JobOutput::temp_path`] and `std::fs::rename` onto it to stay atomic.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A temporary name for `name`, unique to this process (it keeps `name`'s extension, which
    /// encoders read the format from).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".tmp-{}-{name}", std::process::id()))
    }
}

/// A job's folder, emptied: a half-written attempt (files but no row) is redone from scratch.
/// Called only under the job's claim, after checking that it has no row, so the files removed are
/// those of a dead process.
fn fresh_output(dir: PathBuf) -> Result<JobOutput, StoreError> {
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io {
            action: "clearing",
            path: dir.clone(),
            cause: source,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
        action: "creating",
        path: dir.clone(),
        cause: source,
    })?;
    Ok(JobOutput { dir })
}

/// What a sweep runs for each job.
pub trait JobRunner {
    /// One result row per job: a flat serde struct (it becomes a CSV line).
    type Row: SweepRow;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Self::Row>;

    /// How many jobs may run as one batch (at least 1).
    fn batch_size(&self) -> usize {
        1
    }

    /// Whether `job` may join a batch that starts with `first`.
    fn batchable(&self, _first: &Job, _job: &Job) -> bool {
        false
    }

    /// Runs a batch of jobs (each with its own folder in `outs`); one result per job, in order, so
    /// a job of the batch can fail alone (its scoring) or with the others (their generation).
    fn run_batch(&mut self, jobs: &[&Job], outs: &[JobOutput]) -> Vec<anyhow::Result<Self::Row>> {
        jobs.iter().zip(outs).map(|(j, o)| self.run(j, o)).collect()
    }
}

/// What a call of [`run_jobs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Jobs of this shard.
    pub selected: usize,
    /// Jobs that were already finished when the run started, and skipped.
    pub skipped: usize,
    /// Jobs run to completion now.
    pub completed: usize,
    /// Jobs that another process on the same run folder finished (or failed) while this one ran.
    pub elsewhere: usize,
    /// Jobs that failed now (only with [`RunOptions::keep_going`]; also in `failures.csv`).
    pub failed: Vec<Failure>,
}

/// How [`run_jobs_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    pub progress: ProgressMode,
    /// Record a failing job in `failures.csv` and go on, instead of stopping the sweep.
    pub keep_going: bool,
}

/// Runs this shard's unfinished jobs (grouped by subject, see [`Shard`]), writing each row as soon as its job
/// finishes; then rewrites `results.csv`. The first failing job stops the sweep with its error
/// (finished rows are kept, so a rerun resumes after fixing the cause). `show_progress` shows a
/// bar on a terminal and one line per finished job otherwise.
pub fn run_jobs<R: JobRunner>(
    store: &RunStore,
    jobs: &[Job],
    shard: Shard,
    runner: &mut R,
    show_progress: bool,
) -> anyhow::Result<RunSummary> {
    let options = RunOptions {
        progress: ProgressMode::detect(show_progress),
        keep_going: false,
    };
    run_jobs_with(store, jobs, shard, runner, options)
}

/// Whether a job has a row that reads back.
enum RowState {
    Done,
    Missing,
    /// A row file that does not read back (a disk fault, a hand edit): the job is redone.
    Unreadable(StoreError),
}

fn row_state<R: SweepRow>(store: &RunStore, id: &JobId) -> RowState {
    if !store.is_done(id) {
        return RowState::Missing;
    }
    match store.read_row::<R>(id) {
        Ok(Some(_)) => RowState::Done,
        Ok(None) => RowState::Missing,
        Err(e) => RowState::Unreadable(e),
    }
}

/// Says once per job that its row file does not read back and is redone.
fn warn_unreadable(warned: &mut BTreeSet<JobId>, id: &JobId, e: &StoreError) {
    if warned.insert(id.clone()) {
        eprintln!("warning: {e}; redoing job {id}");
    }
}

/// [`run_jobs`] with options. With `keep_going`, a failing job is recorded in `failures.csv`
/// (job id, error) and the sweep goes on; a later run retries it, since it has no row. A job that
/// finishes loses its earlier failure record.
///
/// Any number of processes may run this on one run folder: each job is claimed (a lock file, see
/// [`super::claim`]) before it runs and checked again under the claim, so it runs in one process
/// only and no process clears a folder another one is writing or has finished. A process that
/// finds the rest of its jobs claimed by others waits for them; a claim whose process died is
/// free, and its job is redone. So every process ends with the shard complete (but for failures).
///
/// The unfinished jobs run in batches of consecutive jobs, at most [`JobRunner::batch_size`]
/// long and [`JobRunner::batchable`] with their first; a batch
/// writes the rows of its finished jobs before the first failure of the batch stops the sweep,
/// and a batch whose generation fails fails each of its jobs. A job's time (its progress line)
/// is its share of its batch's time.
pub fn run_jobs_with<R: JobRunner>(
    store: &RunStore,
    jobs: &[Job],
    shard: Shard,
    runner: &mut R,
    options: RunOptions,
) -> anyhow::Result<RunSummary> {
    let selected = shard.select(jobs);
    let mut warned: BTreeSet<JobId> = BTreeSet::new();
    let mut todo: BTreeSet<JobId> = BTreeSet::new();
    for j in &selected {
        match row_state::<R::Row>(store, &j.id()) {
            RowState::Done => {}
            RowState::Missing => {
                todo.insert(j.id());
            }
            RowState::Unreadable(e) => {
                warn_unreadable(&mut warned, &j.id(), &e);
                todo.insert(j.id());
            }
        }
    }
    let mut summary = RunSummary {
        selected: selected.len(),
        skipped: selected.len() - todo.len(),
        ..Default::default()
    };
    // Failures recorded before this run: those are retried; one recorded by another process
    // during this run is not tried again here.
    let failed_before: BTreeSet<String> = store.failures()?.into_iter().map(|f| f.id).collect();
    let mut progress = JobProgress::new(todo.len(), options.progress);
    let size = runner.batch_size().max(1);
    // Jobs this process ran, or found finished or failed by another process.
    let mut settled: BTreeSet<JobId> = BTreeSet::new();
    let mut announced_wait = false;
    loop {
        let mut ran = false;
        let mut held_elsewhere: Option<JobId> = None;
        let mut batch: Vec<(&Job, Claim)> = Vec::new();
        for &job in &selected {
            let id = job.id();
            if settled.contains(&id) {
                continue;
            }
            if store.is_done(&id) && !warned.contains(&id) {
                if todo.contains(&id) {
                    // Finished by another process since this one started.
                    progress.elsewhere();
                    settled.insert(id);
                }
                continue;
            }
            let Some(claim) = try_claim(&store.claim_path(&id))? else {
                held_elsewhere.get_or_insert(id);
                continue;
            };
            // Checked again under the claim: another process may have finished it meanwhile.
            match row_state::<R::Row>(store, &id) {
                RowState::Done => {
                    progress.elsewhere();
                    settled.insert(id);
                    continue;
                }
                RowState::Unreadable(e) => warn_unreadable(&mut warned, &id, &e),
                RowState::Missing => {}
            }
            let failed_elsewhere =
                !failed_before.contains(&id.0) && store.failures()?.iter().any(|f| f.id == id.0);
            if failed_elsewhere {
                progress.elsewhere();
                settled.insert(id);
                continue;
            }
            let joins = batch
                .first()
                .is_none_or(|(first, _)| batch.len() < size && runner.batchable(first, job));
            if !joins {
                run_batch(
                    store,
                    runner,
                    &mut batch,
                    options,
                    &mut progress,
                    &mut summary,
                )?;
                ran = true;
            }
            settled.insert(id);
            batch.push((job, claim));
        }
        if !batch.is_empty() {
            run_batch(
                store,
                runner,
                &mut batch,
                options,
                &mut progress,
                &mut summary,
            )?;
            ran = true;
        }
        if ran {
            continue;
        }
        // Everything left is claimed by other processes: wait for one to let go (it finished,
        // failed or died), then look again.
        let Some(id) = held_elsewhere else { break };
        if !announced_wait {
            eprintln!(
                "waiting for jobs another process on '{}' is running (job {id} first)",
                store.root.display()
            );
            announced_wait = true;
        }
        drop(claim(&store.claim_path(&id))?);
    }
    progress.finish();
    summary.elsewhere = todo
        .len()
        .saturating_sub(summary.completed + summary.failed.len());
    store.write_results_csv::<R::Row>()?;
    Ok(summary)
}

/// Runs one batch of claimed jobs and records each result; the claims are released at the end.
fn run_batch<R: JobRunner>(
    store: &RunStore,
    runner: &mut R,
    batch: &mut Vec<(&Job, Claim)>,
    options: RunOptions,
    progress: &mut JobProgress,
    summary: &mut RunSummary,
) -> anyhow::Result<()> {
    let held = std::mem::take(batch);
    let jobs: Vec<&Job> = held.iter().map(|(j, _)| *j).collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id()).collect();
    let names: Vec<&str> = ids.iter().map(|id| id.0.as_str()).collect();
    progress.start(&names.join(", "));
    let started = Instant::now();
    let outs = ids
        .iter()
        .map(|id| fresh_output(store.files_dir(id)))
        .collect::<Result<Vec<_>, _>>()?;
    // A job that runs again loses its earlier failure record (kept again if it fails again).
    update_failures(store, |f| f.retain(|f| !ids.iter().any(|id| id.0 == f.id)))?;
    let results = if jobs.len() == 1 {
        vec![runner.run(jobs[0], &outs[0])]
    } else {
        runner.run_batch(&jobs, &outs)
    };
    anyhow::ensure!(
        results.len() == jobs.len(),
        "a batch of {} jobs gave {} results",
        jobs.len(),
        results.len()
    );
    let seconds = started.elapsed().as_secs_f64() / jobs.len() as f64;
    let mut first_error = None;
    for (id, result) in ids.iter().zip(results) {
        // A row is written only if it reads back (a NaN score would be written as null).
        let result = result.and_then(|row| {
            let text = serde_json::to_string(&row)?;
            serde_json::from_str::<R::Row>(&text).map_err(|e| {
                anyhow::anyhow!("its row would not read back ({e}), a non-finite value?: {text}")
            })?;
            Ok(row)
        });
        match result {
            Ok(row) => {
                if let Some(t) = row.timing() {
                    store.write_timing(id, &t)?;
                }
                store.write_row(id, &row)?;
                summary.completed += 1;
                progress.finished(&id.0, seconds, None);
            }
            Err(e) if options.keep_going => {
                let failure = Failure {
                    id: id.0.clone(),
                    error: crate::error_chain(&e),
                };
                progress.finished(&id.0, seconds, Some(&failure.error));
                update_failures(store, |f| f.push(failure.clone()))?;
                summary.failed.push(failure);
            }
            Err(e) => {
                first_error.get_or_insert(e.context(format!("job {id} failed")));
            }
        }
    }
    drop(held);
    if let Some(e) = first_error {
        progress.abandon();
        return Err(e);
    }
    Ok(())
}

/// Rewrites `failures.csv` under the folder lock (other processes change it too).
fn update_failures(
    store: &RunStore,
    change: impl FnOnce(&mut Vec<Failure>),
) -> Result<(), StoreError> {
    let _lock = store.lock_folder()?;
    let mut failures = store.failures()?;
    let before = failures.clone();
    change(&mut failures);
    if failures != before {
        store.write_failures(&failures)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parsing_and_selection_partition_the_jobs() {
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let jobs: Vec<Job> = (0..10)
            .map(|i| Job {
                method: "m".into(),
                subject: "dog".into(),
                prompt_index: i,
                seed: 0,
            })
            .collect();
        let mut all: Vec<usize> = (0..3)
            .flat_map(|i| {
                Shard { index: i, count: 3 }
                    .select(&jobs)
                    .into_iter()
                    .map(|j| j.prompt_index)
            })
            .collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn shards_keep_a_subjects_jobs_together_and_are_balanced() {
        // Table 1's shape in small: 3 methods × 5 subjects × 4 prompts, canonical order.
        let mut jobs = Vec::new();
        for m in ["a", "b", "c"] {
            for s in ["s0", "s1", "s2", "s3", "s4"] {
                for p in 0..4 {
                    jobs.push(Job {
                        method: m.into(),
                        subject: s.into(),
                        prompt_index: p,
                        seed: 0,
                    });
                }
            }
        }
        let shards: Vec<Vec<&Job>> = (0..4)
            .map(|i| Shard { index: i, count: 4 }.select(&jobs))
            .collect();
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert_eq!(sizes, [15, 15, 15, 15]);
        for s in ["s0", "s1", "s2", "s3", "s4"] {
            let holding = shards
                .iter()
                .filter(|sh| sh.iter().any(|j| j.subject == s))
                .count();
            assert!(holding <= 2, "subject {s} is in {holding} shards");
        }
        // Within a shard, a subject's jobs keep the canonical order (methods, prompts).
        let first: Vec<(&str, usize)> = shards[0]
            .iter()
            .map(|j| (j.method.as_str(), j.prompt_index))
            .collect();
        assert_eq!(
            &first[..5],
            [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0)]
        );
        let subjects: Vec<&str> = shards[0].iter().map(|j| j.subject.as_str()).collect();
        assert_eq!(subjects, [["s0"; 12].as_slice(), &["s1"; 3]].concat());
        // Uneven counts differ by at most one job.
        let sizes: Vec<usize> = (0..7)
            .map(|i| Shard { index: i, count: 7 }.select(&jobs).len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 60);
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }
}

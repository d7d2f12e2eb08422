//! Running a job list against a store: shard selection, skipping finished jobs, redoing
//! half-written ones, batching jobs that differ only by seed, progress with ETA.

use super::store::{write_file_atomic, Failure, RunStore, StoreError};
use crate::progress::{JobProgress, ProgressMode};
use dreambench::Job;
use serde::de::DeserializeOwned;
use serde::Serialize;
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
/// folder is emptied before a job (re)starts, so leftovers of a killed attempt never survive.
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

    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".tmp-{name}"))
    }
}

/// A job's folder, emptied: a half-written attempt (files but no row) is redone from scratch.
fn fresh_output(dir: PathBuf) -> Result<JobOutput, StoreError> {
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io {
            action: "clearing",
            path: dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
        action: "creating",
        path: dir.clone(),
        source,
    })?;
    Ok(JobOutput { dir })
}

/// What a sweep runs for each job.
pub trait JobRunner {
    /// One result row per job: a flat serde struct (it becomes a CSV line).
    type Row: Serialize + DeserializeOwned;
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

/// Cuts `jobs` (in order) into batches of consecutive jobs, each at most `size` long and
/// batchable with its first job.
pub fn batches<'a>(
    jobs: &[&'a Job],
    size: usize,
    batchable: impl Fn(&Job, &Job) -> bool,
) -> Vec<Vec<&'a Job>> {
    let mut out: Vec<Vec<&Job>> = Vec::new();
    for &job in jobs {
        match out.last_mut() {
            Some(b) if b.len() < size.max(1) && batchable(b[0], job) => b.push(job),
            _ => out.push(vec![job]),
        }
    }
    out
}

/// What a call of [`run_jobs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Jobs of this shard.
    pub selected: usize,
    /// Jobs that were already finished and skipped.
    pub skipped: usize,
    /// Jobs run to completion now.
    pub completed: usize,
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

/// [`run_jobs`] with options. With `keep_going`, a failing job is recorded in `failures.csv`
/// (job id, error) and the sweep goes on; a later run retries it, since it has no row. A job that
/// finishes loses its earlier failure record.
///
/// The unfinished jobs run in batches of [`JobRunner::batch_size`] (see [`batches`]); a batch
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
    let todo: Vec<&Job> = selected
        .iter()
        .copied()
        .filter(|j| !store.is_done(&j.id()))
        .collect();
    let mut summary = RunSummary {
        selected: selected.len(),
        skipped: selected.len() - todo.len(),
        ..Default::default()
    };
    let mut failures = store.failures()?;
    let mut progress = JobProgress::new(todo.len(), options.progress);
    let size = runner.batch_size().max(1);
    for batch in batches(&todo, size, |a, b| runner.batchable(a, b)) {
        let ids: Vec<_> = batch.iter().map(|j| j.id()).collect();
        let names: Vec<&str> = ids.iter().map(|id| id.0.as_str()).collect();
        progress.start(&names.join(", "));
        let started = Instant::now();
        let outs = ids
            .iter()
            .map(|id| fresh_output(store.files_dir(id)))
            .collect::<Result<Vec<_>, _>>()?;
        // A job that runs again loses its earlier failure record (kept again if it fails again).
        let before = failures.len();
        failures.retain(|f| !ids.iter().any(|id| id.0 == f.id));
        let mut failures_changed = failures.len() != before;
        let results = if batch.len() == 1 {
            vec![runner.run(batch[0], &outs[0])]
        } else {
            runner.run_batch(&batch, &outs)
        };
        anyhow::ensure!(
            results.len() == batch.len(),
            "a batch of {} jobs gave {} results",
            batch.len(),
            results.len()
        );
        let seconds = started.elapsed().as_secs_f64() / batch.len() as f64;
        let mut first_error = None;
        for (id, result) in ids.iter().zip(results) {
            match result {
                Ok(row) => {
                    store.write_row(id, &row)?;
                    summary.completed += 1;
                    progress.finished(&id.0, seconds, None);
                }
                Err(e) if options.keep_going => {
                    let failure = Failure {
                        id: id.0.clone(),
                        error: format!("{e:#}"),
                    };
                    progress.finished(&id.0, seconds, Some(&failure.error));
                    failures.push(failure.clone());
                    summary.failed.push(failure);
                    failures_changed = true;
                }
                Err(e) => {
                    first_error.get_or_insert(e.context(format!("job {id} failed")));
                }
            }
        }
        if failures_changed {
            store.write_failures(&failures)?;
        }
        if let Some(e) = first_error {
            progress.abandon();
            return Err(e);
        }
    }
    progress.finish();
    store.write_results_csv::<R::Row>()?;
    Ok(summary)
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

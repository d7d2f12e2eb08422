//! Running a job list against a store: shard selection, skipping finished jobs, redoing
//! half-written ones, progress with ETA.

use super::store::{write_file_atomic, RunStore, StoreError};
use dreambench::Job;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// `--shard i/n`: shard `i` (0-based) of `n` takes every job whose position in the canonical
/// job list is `i` modulo `n`. Deterministic, balanced, and the same on every machine.
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

    /// This shard's jobs, in canonical order.
    pub fn select<'a>(&self, jobs: &'a [Job]) -> Vec<&'a Job> {
        jobs.iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, j)| j)
            .collect()
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

/// What a sweep runs for each job.
pub trait JobRunner {
    /// One result row per job: a flat serde struct (it becomes a CSV line).
    type Row: Serialize + DeserializeOwned;
    fn run(&mut self, job: &Job, out: &JobOutput) -> anyhow::Result<Self::Row>;
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
}

/// Runs this shard's unfinished jobs in canonical order, writing each row as soon as its job
/// finishes; then rewrites `results.csv`. The first failing job stops the sweep with its error
/// (finished rows are kept, so a rerun resumes after fixing the cause).
pub fn run_jobs<R: JobRunner>(
    store: &RunStore,
    jobs: &[Job],
    shard: Shard,
    runner: &mut R,
    show_progress: bool,
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
    let bar = if show_progress {
        ProgressBar::new(todo.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs, ETA {eta} {msg}",
        )
        .expect("valid progress template"),
    );
    for job in todo {
        let id = job.id();
        bar.set_message(id.to_string());
        let dir = store.files_dir(&id);
        // A half-written attempt (files but no row) is redone from scratch.
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
        let out = JobOutput { dir };
        match runner.run(job, &out) {
            Ok(row) => {
                store.write_row(&id, &row)?;
                summary.completed += 1;
                bar.inc(1);
            }
            Err(e) => {
                bar.abandon();
                return Err(e.context(format!("job {id} failed")));
            }
        }
    }
    bar.finish_and_clear();
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
}

//! The sweep engine (SPEC §8): an experiment expands into jobs; `--shard i/n` picks a
//! deterministic subset; every finished job writes its files and then its result row atomically
//! (temporary file + rename), so a killed run loses at most the job in flight; a rerun skips
//! finished jobs and redoes half-written ones; shards merge into one run.
//!
//! A run folder holds:
//! - `plan.json`: the experiment's resolved job list (the canonical order of rows),
//! - `rows/<job id>.json`: one finished row each, written last, the job's completion marker,
//! - `files/<job id>/...`: the job's output files (images, traces),
//! - `timings/<job id>.json`: its wall times (measured, not computed: kept out of the row),
//! - `results.csv`: every finished row in plan order, rewritten at the end of each run and merge,
//!   and `timings.csv` (job id, seconds by phase) beside it,
//! - `claims/<job id>.lock`: the lock a process holds while it runs the job (see [`claim`]),
//! - `failures.csv`: jobs that failed under `--keep-going` (job id, error), retried by a rerun.

pub mod claim;
mod config;
mod engine;
mod store;

pub use config::{line_column as config_line_column, load_toml, parse_toml, ConfigError, Problem};
pub use engine::{
    run_jobs, run_jobs_with, JobOutput, JobRunner, RunOptions, RunSummary, Shard, ShardError,
};
pub use store::{
    merge, write_csv_atomic, write_file_atomic, Failure, Plan, RunStore, StoreError, SweepRow,
};

//! The on-disk result store of one run: plan, rows, job files, and the merged CSV.

use crate::provenance::Provenance;
use dreambench::{Job, JobId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The causes are fields named `cause`, not `source`: thiserror would make a `source` field
    // the error's source too, and `{:#}` (anyhow's chain) would then print it twice.
    #[error("{action} '{}': {cause}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("row file '{}' is not a valid row: {cause}", path.display())]
    BadRow {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("'{}' is not a valid plan: {cause}", path.display())]
    BadPlan {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("'{}' is not a run folder (no plan.json); was it written by `pnd sweep`?", .0.display())]
    NoPlan(PathBuf),
    #[error("run '{}' has a different plan than '{}' (experiment '{}' vs '{}', {} vs {} jobs): shards of different experiments cannot be merged", a.display(), b.display(), name_a, name_b, jobs_a, jobs_b)]
    PlanMismatch {
        a: PathBuf,
        b: PathBuf,
        name_a: String,
        name_b: String,
        jobs_a: usize,
        jobs_b: usize,
    },
    #[error("run '{}' was started for another plan (experiment '{}'; differs in {}); use a new --out folder", dir.display(), name, fields.join(", "))]
    ExistingPlanDiffers {
        dir: PathBuf,
        name: String,
        /// What differs: dotted keys of the plan (`config.generation.steps`, `jobs`).
        fields: Vec<String>,
    },
    /// Rows were scored with other inputs than a resume would use (SPEC §9: provenance is what
    /// was actually used).
    #[error("run '{}' has finished rows made with other inputs; a resume would mix them: {}. Use a new --out folder (or restore the inputs)", dir.display(), changes.join("; "))]
    InputsChanged { dir: PathBuf, changes: Vec<String> },
    #[error("job {id} has different rows in '{}' and '{}'", a.display(), b.display())]
    ConflictingRows { id: JobId, a: PathBuf, b: PathBuf },
    #[error("{missing} of {total} jobs have no row and no failure in any of the shards given (first: {first}): a shard is missing or unfinished; finish it, or pass --partial to merge what there is")]
    MissingJobs {
        missing: usize,
        total: usize,
        first: String,
    },
    #[error("writing CSV '{}': {cause}", path.display())]
    Csv { path: PathBuf, cause: csv::Error },
    #[error("reading CSV '{}': {cause}", path.display())]
    ReadCsv { path: PathBuf, cause: csv::Error },
    #[error("encoding plan: {0}")]
    Json(#[from] serde_json::Error),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        cause: source,
    }
}

/// Writes a file atomically: the bytes go to a temporary file in the same folder, are flushed to
/// disk, and the file is renamed into place. A reader sees the old file or the whole new one.
/// A full disk fails here, before the rename, and leaves the previous file untouched.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("creating folder", dir))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
    // Errors name the file being written, not its temporary name.
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })()
    .map_err(io("writing", path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serializes rows to CSV (header from the row type) and writes it atomically.
pub fn write_csv_atomic<R: Serialize>(path: &Path, rows: &[R]) -> Result<(), StoreError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for row in rows {
        w.serialize(row).map_err(|source| StoreError::Csv {
            path: path.into(),
            cause: source,
        })?;
    }
    let bytes = w.into_inner().map_err(|e| StoreError::Io {
        action: "encoding CSV for",
        path: path.into(),
        cause: e.into_error(),
    })?;
    write_file_atomic(path, &bytes)
}

/// The field names of a JSON object in their written order (serde_json's `Value` sorts them).
struct FieldOrder(Vec<String>);

impl<'de> Deserialize<'de> for FieldOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = FieldOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row (an object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<FieldOrder, A::Error> {
                let mut names = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    names.push(k);
                }
                Ok(FieldOrder(names))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// One row as (column, cell): its fields in order, a field that is a map (a row's extra scores)
/// spread into one column per key in its place.
fn flat_cells<R: Serialize>(row: &R) -> Result<Vec<(String, serde_json::Value)>, String> {
    let order: FieldOrder = serde_json::to_string(row)
        .and_then(|t| serde_json::from_str(&t))
        .map_err(|e| e.to_string())?;
    // Values from `to_value`: no text round trip of the floats.
    let serde_json::Value::Object(mut fields) =
        serde_json::to_value(row).map_err(|e| e.to_string())?
    else {
        return Err("a row is not a struct".into());
    };
    let mut cells: Vec<(String, serde_json::Value)> = Vec::new();
    for name in order.0 {
        match fields.remove(&name).unwrap_or_default() {
            serde_json::Value::Object(inner) => cells.extend(inner),
            v => cells.push((name, v)),
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (c, _) in &cells {
        if !seen.insert(c.as_str()) {
            return Err(format!(
                "column '{c}' twice in a row (a map key repeats a field's name)"
            ));
        }
    }
    Ok(cells)
}

/// Serializes rows to CSV as [`write_csv_atomic`] does, a map field (a row's extra scores) spread
/// into one column per key where the field is. The header has every column of any row (a new one
/// after the column before it in its row); a row without a column leaves its cell empty. Rows
/// without map fields give exactly [`write_csv_atomic`]'s file.
pub fn write_flat_csv_atomic<R: Serialize>(path: &Path, rows: &[R]) -> Result<(), StoreError> {
    let bad = |message: String| StoreError::Csv {
        path: path.into(),
        cause: std::io::Error::new(std::io::ErrorKind::InvalidData, message).into(),
    };
    let mut header: Vec<String> = Vec::new();
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let cells = flat_cells(row).map_err(bad)?;
        for (k, (c, _)) in cells.iter().enumerate() {
            if header.contains(c) {
                continue;
            }
            let at = match k {
                0 => 0,
                _ => header
                    .iter()
                    .position(|h| *h == cells[k - 1].0)
                    .map_or(header.len(), |i| i + 1),
            };
            header.insert(at, c.clone());
        }
        records.push(cells.into_iter().collect::<BTreeMap<_, _>>());
    }
    let csv_err = |source| StoreError::Csv {
        path: path.into(),
        cause: source,
    };
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    if !rows.is_empty() {
        w.write_record(&header).map_err(csv_err)?;
    }
    for r in &records {
        let cells: Vec<&serde_json::Value> = header
            .iter()
            .map(|h| r.get(h).unwrap_or(&serde_json::Value::Null))
            .collect();
        w.serialize(cells).map_err(csv_err)?;
    }
    let bytes = w.into_inner().map_err(|e| StoreError::Io {
        action: "encoding CSV for",
        path: path.into(),
        cause: e.into_error(),
    })?;
    write_file_atomic(path, &bytes)
}

/// A run's plan: the experiment's name, its resolved config (free-form, for traceability),
/// every job in canonical order, and what made the run (build, models, data). Shards of one
/// experiment share one plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub experiment: String,
    pub config: serde_json::Value,
    pub jobs: Vec<Job>,
    /// Recorded when the run folder is created; absent in plans written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

impl Plan {
    /// The same experiment and jobs: what a resumed run or a merged shard must share. The
    /// provenance may differ (a resumed run built anew); the first one recorded is kept.
    pub fn same_work(&self, other: &Plan) -> bool {
        self.experiment == other.experiment
            && self.config == other.config
            && self.jobs == other.jobs
    }
}

/// The dotted keys in which two plans' work differs (experiment name, config settings, the job
/// list), at most 10.
pub fn plan_differences(a: &Plan, b: &Plan) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let (u, v) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                    walk(&format!("{prefix}.{k}"), u, v, out);
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = vec![];
    if a.experiment != b.experiment {
        out.push(format!(
            "experiment ('{}' vs '{}')",
            a.experiment, b.experiment
        ));
    }
    walk("config", &a.config, &b.config, &mut out);
    if a.jobs != b.jobs {
        out.push(format!("jobs ({} vs {})", a.jobs.len(), b.jobs.len()));
    }
    out.truncate(10);
    out
}

/// A result row: what a job computed, one line of `results.csv`. What was measured rather than
/// computed (wall times) is its [`SweepRow::Timing`], kept out of the row file and `results.csv`
/// (written to `timings/<id>.json` and `timings.csv`), so that those depend only on the work: a
/// resumed run, a merged one and an uninterrupted one give the same bytes.
pub trait SweepRow: Serialize + DeserializeOwned {
    type Timing: Serialize + DeserializeOwned;
    /// This row's timing, if it has one.
    fn timing(&self) -> Option<Self::Timing>;
}

/// One line of `timings.csv`: a job id and its timing's fields.
#[derive(Serialize)]
struct TimingLine<T> {
    id: String,
    #[serde(flatten)]
    timing: T,
}

/// A job that failed under `--keep-going`: one line of `failures.csv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub id: String,
    pub error: String,
}

/// One run folder.
#[derive(Debug, Clone)]
pub struct RunStore {
    pub root: PathBuf,
}

impl RunStore {
    /// Opens or creates a run folder for a plan. An existing folder must hold the same plan,
    /// so a resumed run can never mix rows of two experiments.
    pub fn create(root: &Path, plan: &Plan) -> Result<Self, StoreError> {
        fs::create_dir_all(root.join("rows")).map_err(io("creating", root))?;
        fs::create_dir_all(root.join("files")).map_err(io("creating", root))?;
        let plan_path = root.join("plan.json");
        let store = Self { root: root.into() };
        // A folder without a finished row holds nothing to keep: it restarts under the new plan
        // (a failed first attempt's plan.json, with its provenance, is replaced).
        if plan_path.exists() && store.has_rows()? {
            let existing = Self::read_plan(root)?;
            if !existing.same_work(plan) {
                return Err(StoreError::ExistingPlanDiffers {
                    dir: root.into(),
                    name: existing.experiment.clone(),
                    fields: plan_differences(&existing, plan),
                });
            }
            if let (Some(was), Some(now)) = (&existing.provenance, &plan.provenance) {
                let changes = was.input_changes(now);
                if !changes.is_empty() {
                    return Err(StoreError::InputsChanged {
                        dir: root.into(),
                        changes,
                    });
                }
            }
        } else {
            write_file_atomic(&plan_path, serde_json::to_string_pretty(plan)?.as_bytes())?;
        }
        Ok(store)
    }

    /// Whether any job of the folder has finished (a row file exists).
    pub fn has_rows(&self) -> Result<bool, StoreError> {
        let dir = self.root.join("rows");
        if !dir.is_dir() {
            return Ok(false);
        }
        let mut entries = fs::read_dir(&dir).map_err(io("reading", &dir))?;
        Ok(entries.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))))
    }

    /// Opens an existing run folder.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        if !root.join("plan.json").is_file() {
            return Err(StoreError::NoPlan(root.into()));
        }
        Ok(Self { root: root.into() })
    }

    pub fn read_plan(root: &Path) -> Result<Plan, StoreError> {
        let path = root.join("plan.json");
        if !path.is_file() {
            return Err(StoreError::NoPlan(root.into()));
        }
        let text = fs::read_to_string(&path).map_err(io("reading", &path))?;
        serde_json::from_str(&text).map_err(|source| StoreError::BadPlan {
            path,
            cause: source,
        })
    }

    pub fn plan(&self) -> Result<Plan, StoreError> {
        Self::read_plan(&self.root)
    }

    pub fn row_path(&self, id: &JobId) -> PathBuf {
        self.root.join("rows").join(format!("{id}.json"))
    }

    /// The folder of a job's output files.
    pub fn files_dir(&self, id: &JobId) -> PathBuf {
        self.root.join("files").join(&id.0)
    }

    pub fn is_done(&self, id: &JobId) -> bool {
        self.row_path(id).is_file()
    }

    /// The lock file that claims a job (see [`super::claim`]).
    pub fn claim_path(&self, id: &JobId) -> PathBuf {
        self.root.join("claims").join(format!("{id}.lock"))
    }

    /// Holds the folder-wide lock for a short read-modify-write of a shared file.
    pub fn lock_folder(&self) -> Result<super::claim::Claim, StoreError> {
        super::claim::claim(&self.root.join("claims").join("folder.lock"))
    }

    /// Where a job's timing is (see [`SweepRow`]).
    pub fn timing_path(&self, id: &JobId) -> PathBuf {
        self.root.join("timings").join(format!("{id}.json"))
    }

    /// A finished job's timing: `timings/<id>.json`, or in a run written before timings had
    /// their own files, the timing fields of its row file; `None` when neither has one.
    pub fn read_timing<T: DeserializeOwned>(&self, id: &JobId) -> Option<T> {
        [self.timing_path(id), self.row_path(id)]
            .iter()
            .find_map(|p| serde_json::from_str(&fs::read_to_string(p).ok()?).ok())
    }

    /// Writes a job's timing (before its row, which marks the job finished).
    pub fn write_timing<T: Serialize>(&self, id: &JobId, timing: &T) -> Result<(), StoreError> {
        write_file_atomic(
            &self.timing_path(id),
            serde_json::to_string_pretty(timing)?.as_bytes(),
        )
    }

    /// Reads a finished job's row, or `None` if the job has not finished.
    pub fn read_row<R: DeserializeOwned>(&self, id: &JobId) -> Result<Option<R>, StoreError> {
        let path = self.row_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|source| StoreError::BadRow {
                        path,
                        cause: source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io {
                action: "reading",
                path,
                cause: e,
            }),
        }
    }

    /// Records a finished job: its row is written atomically, after its files.
    pub fn write_row<R: Serialize>(&self, id: &JobId, row: &R) -> Result<(), StoreError> {
        write_file_atomic(
            &self.row_path(id),
            serde_json::to_string_pretty(row)?.as_bytes(),
        )
    }

    /// Every finished row in plan order.
    pub fn rows<R: DeserializeOwned>(&self) -> Result<Vec<R>, StoreError> {
        let plan = self.plan()?;
        let mut rows = Vec::new();
        for job in &plan.jobs {
            if let Some(row) = self.read_row(&job.id())? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    fn failures_path(&self) -> PathBuf {
        self.root.join("failures.csv")
    }

    /// The failures recorded by `--keep-going` runs (none when there is no `failures.csv`).
    pub fn failures(&self) -> Result<Vec<Failure>, StoreError> {
        let path = self.failures_path();
        if !path.is_file() {
            return Ok(Vec::new());
        }
        let csv_err = |source| StoreError::ReadCsv {
            path: path.clone(),
            cause: source,
        };
        csv::Reader::from_path(&path)
            .map_err(csv_err)?
            .deserialize::<Failure>()
            .collect::<Result<_, _>>()
            .map_err(csv_err)
    }

    /// Rewrites `failures.csv`; removes it when there are none.
    pub fn write_failures(&self, failures: &[Failure]) -> Result<(), StoreError> {
        let path = self.failures_path();
        if failures.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                    action: "removing",
                    path,
                    cause: e,
                }),
                _ => Ok(()),
            };
        }
        write_csv_atomic(&path, failures)
    }

    /// Rewrites `results.csv` from the finished rows, in plan order (a row's extra scores one
    /// column each, see [`write_flat_csv_atomic`]), and `timings.csv` from their timings (job id
    /// first; none when no row has one). Holds the folder lock, so the last of several processes
    /// to finish writes a file with every row.
    pub fn write_results_csv<R: SweepRow>(&self) -> Result<PathBuf, StoreError> {
        let _lock = self.lock_folder()?;
        let rows: Vec<R> = self.rows()?;
        let path = self.root.join("results.csv");
        write_flat_csv_atomic(&path, &rows)?;
        let mut timings = Vec::new();
        for job in &self.plan()?.jobs {
            let id = job.id();
            if self.is_done(&id) {
                if let Some(timing) = self.read_timing::<R::Timing>(&id) {
                    timings.push(TimingLine { id: id.0, timing });
                }
            }
        }
        let timings_path = self.root.join("timings.csv");
        if timings.is_empty() {
            let _ = fs::remove_file(&timings_path);
        } else {
            write_flat_csv_atomic(&timings_path, &timings)?;
        }
        Ok(path)
    }
}

/// Joins shard runs of one experiment into `out`: rows, timings and files are copied, the plans
/// must be identical, a job finished in two shards must have the same row (its values: timings
/// are not part of a row). Everything is checked before anything is written, so a refused merge
/// writes nothing; a new `out` is built beside itself and renamed into place, so a merge that
/// fails while writing (a full disk) leaves no half-merged folder either. A job that no shard
/// finished nor recorded as failed means a shard is missing or unfinished: an error unless
/// `partial`. Returns the merged store; its `results.csv` is written in plan order, so merging
/// shards equals an unsharded run.
pub fn merge<R: SweepRow + PartialEq>(
    shards: &[PathBuf],
    out: &Path,
    partial: bool,
) -> Result<RunStore, StoreError> {
    let Some(first) = shards.first() else {
        return Err(StoreError::NoPlan(out.into()));
    };
    let plan = RunStore::read_plan(first)?;
    for other in &shards[1..] {
        let p = RunStore::read_plan(other)?;
        if p != plan {
            return Err(StoreError::PlanMismatch {
                a: first.clone(),
                b: other.clone(),
                name_a: plan.experiment.clone(),
                name_b: p.experiment.clone(),
                jobs_a: plan.jobs.len(),
                jobs_b: p.jobs.len(),
            });
        }
    }
    if out.join("plan.json").is_file() {
        let existing = RunStore::read_plan(out)?;
        if !existing.same_work(&plan) {
            return Err(StoreError::ExistingPlanDiffers {
                dir: out.into(),
                fields: plan_differences(&existing, &plan),
                name: existing.experiment,
            });
        }
    }
    let same_folder = |a: &Path| match (a.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    // 1. Check: every row readable, no two shards disagreeing, no job unaccounted for.
    let mut chosen: Vec<(JobId, R, usize)> = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let opened: Vec<RunStore> = shards
        .iter()
        .map(|s| RunStore::open(s))
        .collect::<Result<_, _>>()?;
    for job in &plan.jobs {
        let id = job.id();
        let mut found: Option<(R, usize)> = None;
        for (k, shard) in opened.iter().enumerate() {
            let Some(row) = shard.read_row::<R>(&id)? else {
                continue;
            };
            match &found {
                Some((prev, at)) if *prev != row => {
                    return Err(StoreError::ConflictingRows {
                        id,
                        a: shards[*at].clone(),
                        b: shards[k].clone(),
                    })
                }
                Some(_) => {}
                None => found = Some((row, k)),
            }
        }
        if let Some((row, k)) = found {
            chosen.push((id, row, k));
        }
    }
    for shard in &opened {
        for f in shard.failures()? {
            if !chosen.iter().any(|(id, _, _)| id.0 == f.id) && !failures.contains(&f) {
                failures.push(f);
            }
        }
    }
    let missing: Vec<String> = plan
        .jobs
        .iter()
        .map(|j| j.id().0)
        .filter(|id| {
            !chosen.iter().any(|(c, _, _)| c.0 == *id) && !failures.iter().any(|f| f.id == *id)
        })
        .collect();
    if !missing.is_empty() && !partial {
        return Err(StoreError::MissingJobs {
            missing: missing.len(),
            total: plan.jobs.len(),
            first: missing
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // 2. Write: into a new folder renamed into place, or into the existing `out`.
    let fresh = !out.exists()
        || fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
    let target = if fresh {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        parent.join(format!(".tmp-{}-{name}", std::process::id()))
    } else {
        out.to_path_buf()
    };
    let written = (|| {
        let merged = RunStore::create(&target, &plan)?;
        for (id, row, k) in &chosen {
            let shard = &opened[*k];
            if same_folder(&shard.root) {
                continue;
            }
            copy_dir(&shard.files_dir(id), &merged.files_dir(id))?;
            if let Some(t) = shard.read_timing::<R::Timing>(id) {
                merged.write_timing(id, &t)?;
            }
            merged.write_row(id, row)?;
        }
        merged.write_failures(&failures)?;
        merged.write_results_csv::<R>()?;
        Ok(merged)
    })();
    if !fresh {
        return written;
    }
    match written {
        Ok(_) => {
            if out.exists() {
                fs::remove_dir(out).map_err(io("replacing", out))?;
            }
            fs::rename(&target, out).map_err(io("renaming into", out))?;
            Ok(RunStore { root: out.into() })
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&target);
            Err(e)
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), StoreError> {
    if !from.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(to).map_err(io("creating", to))?;
    for entry in fs::read_dir(from).map_err(io("reading", from))? {
        let entry = entry.map_err(io("reading", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let bytes = fs::read(&src).map_err(io("reading", &src))?;
            write_file_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        name: String,
        score: f64,
        extra: BTreeMap<String, f64>,
        note: Option<f64>,
    }

    fn row(name: &str, score: f64, extra: &[(&str, f64)]) -> Row {
        Row {
            name: name.into(),
            score,
            extra: extra.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            note: None,
        }
    }

    #[derive(Serialize)]
    struct Plain {
        name: String,
        score: f64,
        seed: u64,
        flag: bool,
        note: Option<f64>,
    }

    #[test]
    fn a_map_field_becomes_one_column_per_key_and_plain_rows_are_written_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        let plain = [
            Plain {
                name: "x, y".into(),
                score: 0.1 + 0.2,
                seed: u64::MAX,
                flag: true,
                note: None,
            },
            Plain {
                name: "z".into(),
                score: 1.0,
                seed: 0,
                flag: false,
                note: Some(-2.5e-300),
            },
        ];
        write_csv_atomic(&a, &plain).unwrap();
        write_flat_csv_atomic(&b, &plain).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        write_flat_csv_atomic(&b, &[] as &[Plain]).unwrap();
        assert!(fs::read(&b).unwrap().is_empty());
        // An older row without the map first: the new columns go where the map is.
        let rows = [
            row("old", 0.5, &[]),
            row("new", 0.25, &[("dinov2", 81.5), ("aa", 1.0)]),
        ];
        write_flat_csv_atomic(&b, &rows).unwrap();
        assert_eq!(
            fs::read_to_string(&b).unwrap(),
            "name,score,aa,dinov2,note\nold,0.5,,,\nnew,0.25,1.0,81.5,\n"
        );
        // A key that repeats a field's name is one clear error.
        let e = write_flat_csv_atomic(&b, &[row("x", 0.0, &[("score", 1.0)])]).unwrap_err();
        assert!(e.to_string().contains("column 'score' twice"), "{e}");
    }
}

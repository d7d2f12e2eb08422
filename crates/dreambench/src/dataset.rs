//! The DreamBench dataset on disk: listing, the reference-image rule, verification against the
//! project's own SHA-256 list of the 158 images, and fetching from the public repository.

use crate::subjects::{Subject, SUBJECTS};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The project's own checksums of all 158 DreamBench images (`sha256sum` format, paths `./subject/NN.jpg`).
pub const SHA256SUMS: &str = include_str!("../data/SHA256SUMS");

/// Where `pnd dataset fetch` clones from by default.
pub const DEFAULT_URL: &str = "https://github.com/google/dreambooth";

/// The expected images: relative path (`subject/NN.jpg`) → lowercase hex SHA-256.
pub fn expected_checksums() -> BTreeMap<String, String> {
    SHA256SUMS
        .lines()
        .filter_map(|line| {
            let (hash, path) = line.split_once("  ")?;
            Some((path.trim_start_matches("./").to_string(), hash.to_string()))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("DreamBench folder '{0}' does not exist (get it with `pnd dataset fetch --dest {0}`)")]
    NotFound(PathBuf),
    #[error("DreamBench folder '{dir}' has no folder for subject '{subject}'")]
    MissingSubject { dir: PathBuf, subject: String },
    #[error("subject '{subject}' in '{dir}' has no images")]
    NoImages { dir: PathBuf, subject: String },
    #[error("unknown subject '{0}' (DreamBench has: backpack, backpack_dog, ..., wolf_plushie; see `pnd dataset list`)")]
    UnknownSubject(String),
    #[error("reference image {rule} of subject '{subject}' does not exist ({count} images)")]
    NoSuchReference {
        subject: String,
        rule: ReferenceRule,
        count: usize,
    },
    #[error("reading '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`git clone {url}` failed ({status}): {stderr}")]
    Clone {
        url: String,
        status: String,
        stderr: String,
    },
    #[error("'{0}' has no dataset/ folder: is it the google/dreambooth repository?")]
    NoDatasetFolder(String),
    #[error("destination '{0}' already exists and is not empty; check it with `pnd dataset check --data {0}` or choose another --dest")]
    DestinationExists(PathBuf),
}

/// The paths in a folder, sorted. An entry that cannot be read is an error naming the folder,
/// never silently left out (a missing image must not shrink a subject unnoticed).
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut paths = fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    paths.sort();
    Ok(paths)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which real image of a subject single-image methods (inversion, BLIP-Diffusion) use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReferenceRule {
    /// The first image in file-name order (the default).
    #[default]
    First,
    /// The n-th image (0-based) in file-name order.
    Index(usize),
    /// A file name inside the subject folder, e.g. `02.jpg`.
    File(String),
}

impl fmt::Display for ReferenceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReferenceRule::First => write!(f, "'first'"),
            ReferenceRule::Index(i) => write!(f, "index {i}"),
            ReferenceRule::File(name) => write!(f, "'{name}'"),
        }
    }
}

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("jpg" | "jpeg" | "png" | "webp")
    )
}

/// A DreamBench folder: every subject with its images in file-name order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    images: BTreeMap<&'static str, Vec<PathBuf>>,
}

impl Dataset {
    /// Opens a dataset folder; every subject folder must exist and hold at least one image.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DatasetError> {
        let all: Vec<&str> = SUBJECTS.iter().map(|s| s.name).collect();
        Self::open_subjects(root, &all)
    }

    /// Opens a dataset folder that needs only some subjects (an experiment on a subset, the demo's
    /// mini benchmark); each named subject's folder must exist and hold at least one image.
    pub fn open_subjects(root: impl AsRef<Path>, names: &[&str]) -> Result<Self, DatasetError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(DatasetError::NotFound(root));
        }
        let mut images = BTreeMap::new();
        for name in names {
            let subject = crate::subjects::subject(name)
                .ok_or_else(|| DatasetError::UnknownSubject(name.to_string()))?;
            let dir = root.join(subject.name);
            if !dir.is_dir() {
                return Err(DatasetError::MissingSubject {
                    dir: root.clone(),
                    subject: subject.name.into(),
                });
            }
            let mut files = sorted_entries(&dir)?;
            files.retain(|p| p.is_file() && is_image(p));
            if files.is_empty() {
                return Err(DatasetError::NoImages {
                    dir: root.clone(),
                    subject: subject.name.into(),
                });
            }
            images.insert(subject.name, files);
        }
        Ok(Self { root, images })
    }

    /// The subject's images in file-name order.
    pub fn images(&self, subject: &str) -> Result<&[PathBuf], DatasetError> {
        self.images
            .get(subject)
            .map(Vec::as_slice)
            .ok_or_else(|| DatasetError::UnknownSubject(subject.into()))
    }

    /// Total number of images over all subjects.
    pub fn image_count(&self) -> usize {
        self.images.values().map(Vec::len).sum()
    }

    /// The reference image of a subject under a rule.
    pub fn reference_image(
        &self,
        subject: &str,
        rule: &ReferenceRule,
    ) -> Result<&Path, DatasetError> {
        let images = self.images(subject)?;
        let found = match rule {
            ReferenceRule::First => images.first(),
            ReferenceRule::Index(i) => images.get(*i),
            ReferenceRule::File(name) => images
                .iter()
                .find(|p| p.file_name().is_some_and(|f| f == name.as_str())),
        };
        found
            .map(PathBuf::as_path)
            .ok_or_else(|| DatasetError::NoSuchReference {
                subject: subject.into(),
                rule: rule.clone(),
                count: images.len(),
            })
    }

    /// The subjects this dataset was opened with.
    pub fn subjects(&self) -> impl Iterator<Item = &'static Subject> + '_ {
        SUBJECTS.iter().filter(|s| self.images.contains_key(s.name))
    }
}

/// One thing wrong with a dataset copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "lowercase")]
pub enum Problem {
    /// An image of the list is not there.
    Missing { path: String },
    /// A file inside a subject folder (or a folder at the top) that the list does not have.
    Extra { path: String },
    /// An image whose content differs from the list (truncated, re-encoded, replaced).
    Altered {
        path: String,
        expected: String,
        actual: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { path } => write!(f, "missing: {path}"),
            Problem::Extra { path } => write!(f, "extra:   {path}"),
            Problem::Altered {
                path,
                expected,
                actual,
            } => {
                write!(f, "altered: {path} (sha256 {actual}, expected {expected})")
            }
        }
    }
}

/// The outcome of a check: how many images were verified and every problem found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub root: PathBuf,
    pub verified: usize,
    pub expected: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn sha256_file(path: &Path) -> Result<String, DatasetError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Verifies a dataset copy against the project's SHA-256 list: every image present and unaltered,
/// and no extra file inside a subject folder (top-level metadata files such as
/// `prompts_and_classes.txt` are not checked).
pub fn check(root: impl AsRef<Path>) -> Result<CheckReport, DatasetError> {
    let root = root.as_ref();
    if !root.is_dir() {
        return Err(DatasetError::NotFound(root.to_path_buf()));
    }
    let expected = expected_checksums();
    let hashed: Vec<(String, Result<String, DatasetError>)> = expected
        .par_iter()
        .filter_map(|(rel, _)| {
            let path = root.join(rel);
            path.is_file().then(|| (rel.clone(), sha256_file(&path)))
        })
        .collect();
    let mut problems = Vec::new();
    let mut verified = 0;
    let present: BTreeMap<String, String> = hashed
        .into_iter()
        .map(|(rel, h)| h.map(|h| (rel, h)))
        .collect::<Result<_, _>>()?;
    for (rel, want) in &expected {
        match present.get(rel) {
            None => problems.push(Problem::Missing { path: rel.clone() }),
            Some(got) if got != want => problems.push(Problem::Altered {
                path: rel.clone(),
                expected: want.clone(),
                actual: got.clone(),
            }),
            Some(_) => verified += 1,
        }
    }
    // Extra files: anything in a subject folder that is not listed, and unknown top-level folders.
    for entry in sorted_entries(root)? {
        let name = entry
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if !entry.is_dir() || name.starts_with('.') {
            continue;
        }
        if !SUBJECTS.iter().any(|s| s.name == name) {
            problems.push(Problem::Extra {
                path: format!("{name}/"),
            });
            continue;
        }
        for file in sorted_entries(&entry)? {
            let rel = format!(
                "{name}/{}",
                file.file_name().unwrap_or_default().to_string_lossy()
            );
            if !expected.contains_key(&rel) {
                problems.push(Problem::Extra { path: rel });
            }
        }
    }
    Ok(CheckReport {
        root: root.to_path_buf(),
        verified,
        expected: expected.len(),
        problems,
    })
}

/// Options of `pnd dataset fetch`.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where the dataset folder ends up (it must not exist or be empty).
    pub dest: PathBuf,
    /// A git URL or local path of the google/dreambooth repository.
    pub from: String,
}

/// Clones the repository (shallow) next to `dest`, moves its `dataset/` folder to `dest` and
/// verifies it. The clone goes to a temporary folder, so an interrupted fetch leaves no partial
/// `dest` behind.
pub fn fetch(opts: &FetchOptions) -> Result<CheckReport, DatasetError> {
    let dest = &opts.dest;
    if dest.exists() && fs::read_dir(dest).map_err(io(dest))?.next().is_some() {
        return Err(DatasetError::DestinationExists(dest.clone()));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(
        ".pnd-fetch-{}-{}",
        std::process::id(),
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let out = Command::new("git")
        .args(["clone", "--depth", "1", "--quiet", &opts.from])
        .arg(&tmp)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(io(Path::new("git")))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(DatasetError::Clone {
            url: opts.from.clone(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let dataset = tmp.join("dataset");
    if !dataset.is_dir() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(DatasetError::NoDatasetFolder(opts.from.clone()));
    }
    if dest.exists() {
        fs::remove_dir(dest).map_err(io(dest))?;
    }
    fs::rename(&dataset, dest).map_err(io(dest))?;
    fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    check(dest)
}

//! Claims: a job runs only in the process that holds its lock file, so any number of processes
//! (a requeued Slurm task beside a live one, a user's second start, `--devices` workers) share
//! one run folder and each job runs once.
//!
//! A claim is an advisory exclusive lock (`flock`, through the `fs4` crate) on
//! `claims/<job id>.lock`. The kernel drops it when the process ends, however it ends (kill -9
//! included), so the claim of a dead process is free again at once: no pid files, no timeouts.
//! Lock files stay on disk: unlinking one while another process waits on it would let two
//! processes hold "the" lock. Short read-modify-write sections of the folder (`failures.csv`,
//! `results.csv`, `timings.csv`) hold `claims/folder.lock` the same way.
//!
//! On NFS, Linux (since 2.6.12) emulates `flock` with whole-file `fcntl` byte-range locks, which
//! NFSv4 (and NFSv3 through lockd) makes visible to every client; that is what this relies on.
//! A mount with `nolock` (or `local_lock=flock`) keeps locks local to one node: processes on one
//! node still exclude each other, processes on two nodes do not. A node that dies holds its
//! locks until the server's lease expires (NFSv4: about 90 s).

use super::store::StoreError;
use fs4::fs_std::FileExt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// A held lock; released when dropped or when the process ends.
#[derive(Debug)]
pub struct Claim {
    _file: File,
    pub path: PathBuf,
}

fn open(path: &Path) -> Result<File, StoreError> {
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io {
            action,
            path: p,
            cause: source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating folder", dir))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("opening lock file", path))
}

/// The lock at `path` if no other holder has it, else `None` at once.
pub fn try_claim(path: &Path) -> Result<Option<Claim>, StoreError> {
    let file = open(path)?;
    match file.try_lock_exclusive() {
        Ok(true) => Ok(Some(Claim {
            _file: file,
            path: path.into(),
        })),
        Ok(false) => Ok(None),
        Err(source) => Err(StoreError::Io {
            action: "locking",
            path: path.into(),
            cause: source,
        }),
    }
}

/// The lock at `path`, waiting for its holder to release it (or to end).
pub fn claim(path: &Path) -> Result<Claim, StoreError> {
    let file = open(path)?;
    file.lock_exclusive().map_err(|source| StoreError::Io {
        action: "locking",
        path: path.into(),
        cause: source,
    })?;
    Ok(Claim {
        _file: file,
        path: path.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_excludes_a_second_one_until_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claims/a.lock");
        let first = try_claim(&path).unwrap().expect("a free lock");
        // flock locks belong to the open file, so even this process's second open is refused.
        assert!(try_claim(&path).unwrap().is_none());
        drop(first);
        let again = try_claim(&path).unwrap();
        assert!(again.is_some());
        drop(again);
        assert!(claim(&path).is_ok());
    }
}

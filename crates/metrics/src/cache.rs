//! On-disk embedding cache: one small file per (model, preprocessing, image content), so the real
//! images of a subject are embedded once per model, not once per generated image.
//!
//! An entry is `MAGIC`, the SHA-256 of its values, then the values (little-endian f32). It is
//! written atomically (a temporary file unique to the process in the same folder, then a rename:
//! a killed run never leaves a half-written entry) with a new file's permissions, so a cache
//! shared between accounts stays readable. An entry that cannot be read, has another size, fails
//! its checksum, holds a NaN or infinite value or has the older checksum-less format is a miss:
//! warned on stderr with its path (the older format once per process), recomputed and replaced
//! (SPEC §9).

use crate::MetricsError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    root: PathBuf,
}

const MAGIC: &[u8; 8] = b"PNDEMB2\0";
/// The format before entries carried a checksum.
const MAGIC_V1: &[u8; 8] = b"PNDEMB1\0";
const OLDER_FORMAT: &str = "no checksum (written by an older version of pnd)";
static OLDER_FORMAT_SAID: AtomicBool = AtomicBool::new(false);

/// What a cache lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Hit(Vec<f32>),
    /// No entry.
    Absent,
    /// An entry that cannot be used, and why.
    Unusable {
        path: PathBuf,
        reason: String,
    },
}

impl EmbeddingCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$PND_CACHE`, else `$XDG_CACHE_HOME/pnd`, else `~/.cache/pnd`; embeddings under `embeddings/`.
    pub fn default_dir() -> PathBuf {
        let base = std::env::var_os("PND_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("pnd")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pnd")))
            .unwrap_or_else(|| PathBuf::from(".pnd-cache"));
        base.join("embeddings")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of an entry.
    pub fn path(&self, model_key: &str, content: &str) -> PathBuf {
        self.root.join(model_key).join(format!("{content}.emb"))
    }

    /// The cached embedding of `dim` values; anything else is a miss, and an entry that is there
    /// but unusable is said on stderr with its path (the caller recomputes and [`put`]s it).
    ///
    /// This is the one place the metrics print: the lookup runs deep inside parallel scoring,
    /// where nothing is returned to a caller that could warn before the result is needed.
    ///
    /// [`put`]: EmbeddingCache::put
    pub fn get(&self, model_key: &str, content: &str, dim: usize) -> Option<Vec<f32>> {
        match self.lookup(model_key, content, dim) {
            Lookup::Hit(v) => Some(v),
            Lookup::Absent => None,
            Lookup::Unusable { path, reason } => {
                if reason != OLDER_FORMAT {
                    eprintln!(
                        "warning: embedding cache entry '{}' is unusable ({reason}); recomputing it",
                        path.display()
                    );
                } else if !OLDER_FORMAT_SAID.swap(true, Ordering::Relaxed) {
                    // Every entry of a cache from before the checksums is of the older format:
                    // one line says so, not one per image.
                    eprintln!(
                        "warning: embedding cache entry '{}' has {reason}; it and every other \
                         entry of that format are recomputed and replaced",
                        path.display()
                    );
                }
                None
            }
        }
    }

    /// What the cache holds for an entry of `dim` values.
    pub fn lookup(&self, model_key: &str, content: &str, dim: usize) -> Lookup {
        let path = self.path(model_key, content);
        let unusable = |reason: String| Lookup::Unusable {
            path: path.clone(),
            reason,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Absent,
            Err(e) => return unusable(e.to_string()),
        };
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return unusable(if bytes.starts_with(MAGIC_V1) {
                OLDER_FORMAT.into()
            } else {
                "not an embedding cache file".into()
            });
        };
        if rest.len() != 32 + dim * 4 {
            return unusable(format!(
                "{} bytes, not the {} of {dim} values and their checksum",
                bytes.len(),
                MAGIC.len() + 32 + dim * 4
            ));
        }
        let (sum, body) = rest.split_at(32);
        if Sha256::digest(body).as_slice() != sum {
            return unusable("checksum mismatch".into());
        }
        let values: Vec<f32> = body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return unusable(format!("value {i} is {}", values[i]));
        }
        Lookup::Hit(values)
    }

    /// Stores an embedding atomically, replacing any entry. A non-finite embedding is not stored:
    /// it would only be refused when read back.
    pub fn put(&self, model_key: &str, content: &str, emb: &[f32]) -> Result<(), MetricsError> {
        if emb.iter().any(|v| !v.is_finite()) {
            return Ok(());
        }
        let path = self.path(model_key, content);
        let body: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut buf = Vec::with_capacity(MAGIC.len() + 32 + body.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&Sha256::digest(&body));
        buf.extend_from_slice(&body);
        weights::files::write_atomic(&path, &buf).map_err(|e| MetricsError::Cache {
            path: path.clone(),
            reason: e.reason().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_miss_and_corrupt_entry() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddingCache::new(dir.path());
        assert!(c.get("m", "abc", 3).is_none());
        assert_eq!(c.lookup("m", "abc", 3), Lookup::Absent);
        c.put("m", "abc", &[1.0, -2.5, 3.25]).unwrap();
        assert_eq!(c.get("m", "abc", 3).unwrap(), vec![1.0, -2.5, 3.25]);
        assert!(c.get("m", "abc", 4).is_none());
        assert!(c.get("other", "abc", 3).is_none());
        std::fs::write(dir.path().join("m/abc.emb"), b"junk").unwrap();
        assert!(c.get("m", "abc", 3).is_none());
        // No temporary files are left behind.
        let n = std::fs::read_dir(dir.path().join("m")).unwrap().count();
        assert_eq!(n, 1);
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }

    /// Every damaged entry is unusable with its path and why, and a `put` replaces it.
    #[test]
    fn damaged_entries_are_unusable_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddingCache::new(dir.path());
        let emb = [0.5f32, -1.25, 2.0, 7.0];
        c.put("m", "x", &emb).unwrap();
        let path = c.path("m", "x");
        let good = std::fs::read(&path).unwrap();
        let n = good.len();
        let mut zeroed = good.clone();
        zeroed[MAGIC.len() + 32..].iter_mut().for_each(|b| *b = 0);
        let mut flipped = good.clone();
        flipped[n - 3] ^= 0x10;
        // NaN under a correct checksum: only the finiteness check catches it.
        let mut nan_body: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
        nan_body[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        let nan = [MAGIC.as_slice(), &Sha256::digest(&nan_body), &nan_body].concat();
        let v1: Vec<u8> = [MAGIC_V1.as_slice(), &good[MAGIC.len() + 32..]].concat();
        for (what, bytes, says) in [
            ("truncated", good[..n - 5].to_vec(), "bytes, not the"),
            (
                "garbage",
                b"garbage garbage garbage".to_vec(),
                "not an embedding",
            ),
            ("zeroed", zeroed, "checksum mismatch"),
            ("flipped byte", flipped, "checksum mismatch"),
            ("NaN", nan, "value 1 is NaN"),
            ("older format", v1, "no checksum"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            match c.lookup("m", "x", emb.len()) {
                Lookup::Unusable { path: p, reason } => {
                    assert_eq!(p, path, "{what}");
                    assert!(reason.contains(says), "{what}: {reason}");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert!(c.get("m", "x", emb.len()).is_none(), "{what}");
            c.put("m", "x", &emb).unwrap();
            assert_eq!(
                c.lookup("m", "x", emb.len()),
                Lookup::Hit(emb.to_vec()),
                "{what}"
            );
        }
        // A non-finite embedding is not stored.
        c.put("m", "y", &[f32::INFINITY]).unwrap();
        assert_eq!(c.lookup("m", "y", 1), Lookup::Absent);
    }

    #[test]
    fn an_entry_gets_a_new_files_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddingCache::new(dir.path());
        c.put("m", "x", &[1.0]).unwrap();
        let fresh = dir.path().join("fresh");
        let want = std::fs::File::create(&fresh)
            .unwrap()
            .metadata()
            .unwrap()
            .permissions();
        let got = std::fs::metadata(c.path("m", "x")).unwrap().permissions();
        assert_eq!(got, want);
    }

    #[test]
    fn a_failed_write_names_the_entry_and_says_writing() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddingCache::new(dir.path());
        // The model's folder is a file: nothing can be created under it.
        std::fs::write(dir.path().join("m"), b"").unwrap();
        let e = c.put("m", "x", &[1.0]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "writing embedding cache entry '{}'",
                c.path("m", "x").display()
            )),
            "{e}"
        );
    }
}

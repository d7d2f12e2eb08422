//! On-disk embedding cache: one small file per (model, preprocessing, image content), so the real
//! images of a subject are embedded once per model, not once per generated image. Files are
//! written atomically (temporary file in the same folder, then rename), so a killed run never
//! leaves a half-written entry behind.

use crate::MetricsError;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    root: PathBuf,
}

const MAGIC: &[u8; 8] = b"PNDEMB1\0";

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

    fn path(&self, model_key: &str, content: &str) -> PathBuf {
        self.root.join(model_key).join(format!("{content}.emb"))
    }

    /// The cached embedding, if present and well-formed with `dim` values (anything else is a miss).
    pub fn get(&self, model_key: &str, content: &str, dim: usize) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(model_key, content)).ok()?;
        let body = bytes.strip_prefix(MAGIC.as_slice())?;
        if body.len() != dim * 4 {
            return None;
        }
        Some(
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// Stores an embedding atomically.
    pub fn put(&self, model_key: &str, content: &str, emb: &[f32]) -> Result<(), MetricsError> {
        let path = self.path(model_key, content);
        let dir = path.parent().expect("cache entry has a parent");
        let io = |source| MetricsError::Cache {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let mut buf = Vec::with_capacity(MAGIC.len() + emb.len() * 4);
        buf.extend_from_slice(MAGIC);
        for v in emb {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        tmp.write_all(&buf).map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(())
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
}

//! The guidance trace (SPEC §7): one JSON line per guided latent update, the loss curve users
//! look at first when guidance misbehaves.

use crate::appearance::MaskSize;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One guided update. Losses are unweighted (before α and β) and `null` outside their window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRow {
    /// Sampling step index (0-based).
    pub step: usize,
    /// Update index within the step (0-based).
    pub iteration: usize,
    pub loss_app: Option<f64>,
    pub loss_lay: Option<f64>,
    /// ‖∇_z ℓ‖₂ of the weighted loss; `null` when it is not finite.
    pub grad_norm: Option<f64>,
    /// Appearance mask sizes per layer (empty outside the appearance window).
    pub masks: Vec<MaskSize>,
    /// Appearance layers skipped for an empty mask.
    pub skipped_layers: usize,
    /// The gradient held NaN or infinite values; the update was not applied.
    pub non_finite: bool,
}

/// Appends trace rows to a JSON-lines file, flushing each row so a crash loses nothing.
pub struct TraceWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl TraceWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let io = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = std::fs::File::create(path).map_err(io)?;
        Ok(TraceWriter {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, row: &TraceRow) -> Result<()> {
        let line = serde_json::to_string(row).expect("trace rows serialize");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads a trace file back.
pub fn read_trace(path: &Path) -> Result<Vec<TraceRow>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::TraceLine {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_as_json_lines() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/trace.jsonl");
        let rows = vec![
            TraceRow {
                step: 0,
                iteration: 2,
                loss_app: None,
                loss_lay: Some(0.25),
                grad_norm: Some(1.5),
                masks: vec![],
                skipped_layers: 0,
                non_finite: false,
            },
            TraceRow {
                step: 12,
                iteration: 0,
                loss_app: Some(0.5),
                loss_lay: None,
                grad_norm: None,
                masks: vec![MaskSize {
                    layer: "up_blocks.2.attentions.0.transformer_blocks.0".into(),
                    generated: 12,
                    reference: 0,
                    skipped: true,
                }],
                skipped_layers: 1,
                non_finite: true,
            },
        ];
        let mut w = TraceWriter::create(&path)?;
        for r in &rows {
            w.write(r)?;
        }
        drop(w);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().next().unwrap().contains("\"loss_app\":null"));
        assert_eq!(read_trace(&path)?, rows);
        std::fs::write(&path, "{\"step\": 1}\n").unwrap();
        let err = read_trace(&path).unwrap_err().to_string();
        assert!(err.contains("trace.jsonl:1"), "{err}");
        Ok(())
    }
}

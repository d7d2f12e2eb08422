//! Files written the way SPEC §9 promises, and safetensors files that carry a checksum.
//!
//! - [`write_atomic`]: a temporary file unique to the process and the call, in the target's
//!   folder, then a rename: a kill never leaves a half-written file under the final name, and two
//!   processes writing the same file never write into one temporary. The file is created like any
//!   new file, so it gets the permissions the umask gives (safetensors 0.8, under candle, writes
//!   through a private temporary file of mode 0600, which made caches shared between accounts
//!   unreadable).
//! - [`save_checked`] / [`load_checked`]: safetensors with the SHA-256 of their content in the
//!   header's metadata (key [`CHECKSUM_KEY`]); a read that fails, does not match or holds NaN or
//!   infinite values is an [`FileError::Unreadable`] naming the file, which a cache treats as a
//!   miss.

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The metadata key of the content checksum.
pub const CHECKSUM_KEY: &str = "pnd.sha256";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("writing '{path}': {reason}")]
    Write { path: PathBuf, reason: String },
    /// The file is missing, not safetensors, fails its checksum or holds non-finite values.
    #[error("reading '{path}': {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

impl FileError {
    /// What was wrong, without the path (for a warning that names the file itself).
    pub fn reason(&self) -> &str {
        match self {
            FileError::Write { reason, .. } | FileError::Unreadable { reason, .. } => reason,
        }
    }
}

/// What [`load_checked`] does with a file that has no checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingChecksum {
    /// It is unreadable (a cache entry of an older version: recomputing is the safe answer).
    Reject,
    /// It is read unverified (a checkpoint an older version wrote: it cannot be recomputed).
    Accept,
}

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

static WRITES: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a temporary file in the same folder (unique per process and
/// call), flushed to disk before it is renamed over `path`; the folder is created when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(|e| e.to_string()))
}

/// As [`write_atomic`], with the content written by `write` into the temporary file.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), String>,
) -> Result<(), FileError> {
    let err = |reason: String| FileError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            write(&mut w)?;
            let f = w.into_inner().map_err(|e| e.error().to_string())?;
            f.sync_all().map_err(|e| e.to_string())
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// SHA-256 (hex) of tensors in name order (name, dtype, shape, bytes) and of the other metadata
/// entries in key order; each field is length-prefixed so no two contents hash alike by
/// concatenation.
fn checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
    metadata: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in sorted {
        field(name.as_bytes());
        field(format!("{dtype:?}").as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|d| (*d as u64).to_le_bytes())
            .collect();
        field(&dims);
        field(data);
    }
    for (k, v) in metadata.iter().filter(|(k, _)| *k != CHECKSUM_KEY) {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    hex(&h.finalize())
}

/// Writes `tensors` and `metadata` as a safetensors file at `path` ([`write_atomic`]), with the
/// checksum of both in the metadata.
pub fn save_checked<K: AsRef<str>>(
    tensors: &HashMap<K, Tensor>,
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(), FileError> {
    let err = |reason: String| FileError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let sorted = layout(tensors);
    // The checksum precedes the data in the header: a first pass over the tensors, one at a time
    // (a second copy of a checkpoint's whole state would be gigabytes).
    let mut bytes = Vec::with_capacity(sorted.len());
    for (name, t) in &sorted {
        bytes.push((*name, host_bytes(t).map_err(&err)?));
    }
    let sum = checksum(
        sorted
            .iter()
            .zip(&bytes)
            .map(|((name, t), (_, b))| (*name, View::dtype(t), t.dims(), b.as_slice())),
        metadata,
    );
    drop(bytes);
    let mut meta = metadata.clone();
    meta.insert(CHECKSUM_KEY.to_string(), sum);
    write_safetensors(&sorted, Some(&meta), path)
}

/// Writes `tensors` as a safetensors file at `path` ([`write_atomic`], with a new file's
/// permissions), without a checksum: the layout other tools read (models, embeddings, latents).
pub fn save_plain<K: AsRef<str>>(
    tensors: &HashMap<K, Tensor>,
    path: &Path,
) -> Result<(), FileError> {
    write_safetensors(&layout(tensors), None, path)
}

/// The tensors in the order safetensors' own writer puts them: by descending dtype size (so every
/// tensor's data is aligned to its element), then by name.
fn layout<K: AsRef<str>>(tensors: &HashMap<K, Tensor>) -> Vec<(&str, &Tensor)> {
    let mut v: Vec<(&str, &Tensor)> = tensors
        .iter()
        .map(|(k, t)| (AsRef::<str>::as_ref(k), t))
        .collect();
    v.sort_by(|a, b| {
        (std::cmp::Reverse(Tensor::dtype(a.1).size_in_bytes()), a.0)
            .cmp(&(std::cmp::Reverse(Tensor::dtype(b.1).size_in_bytes()), b.0))
    });
    v
}

/// A tensor's little-endian bytes, read off its device.
fn host_bytes(t: &Tensor) -> Result<Vec<u8>, String> {
    // candle's `View::data` panics on a failed device read; a host copy first reports it.
    let cpu = t.to_device(&Device::Cpu).map_err(|e| e.to_string())?;
    Ok(View::data(&&cpu).into_owned())
}

/// Streams a safetensors file: the header (padded with spaces to 8 bytes, as safetensors does),
/// then each tensor's bytes, one tensor in memory at a time.
fn write_safetensors(
    sorted: &[(&str, &Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
    path: &Path,
) -> Result<(), FileError> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let mut offset = 0usize;
    for (name, t) in sorted {
        let n = t.elem_count() * Tensor::dtype(t).size_in_bytes();
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": format!("{:?}", View::dtype(t)),
                "shape": t.dims(),
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&header).expect("a JSON map serializes");
    head.resize(head.len().next_multiple_of(8), b' ');
    write_atomic_with(path, |f| {
        let io = |e: std::io::Error| e.to_string();
        f.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        f.write_all(&head).map_err(io)?;
        for (_, t) in sorted {
            f.write_all(&host_bytes(t)?).map_err(io)?;
        }
        Ok(())
    })
}

/// Tensors and metadata read by [`load_checked`] (the metadata without the checksum).
#[derive(Debug)]
pub struct Checked {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads a safetensors file, verifies its checksum (see [`MissingChecksum`] for a file without
/// one) and that every float tensor is finite, and loads its tensors onto `device`.
pub fn load_checked(
    path: &Path,
    device: &Device,
    missing: MissingChecksum,
) -> Result<Checked, FileError> {
    let bad = |reason: String| FileError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let mut metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let views = st.tensors();
    match metadata.remove(CHECKSUM_KEY) {
        Some(stored) => {
            let actual = checksum(
                views
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
                &metadata,
            );
            if stored != actual {
                return Err(bad(format!(
                    "checksum mismatch (stored {stored}, content {actual})"
                )));
            }
        }
        None if missing == MissingChecksum::Reject => {
            return Err(bad(
                "no checksum (written by an older version of pnd)".to_string()
            ));
        }
        None => {}
    }
    let mut tensors = HashMap::new();
    for (name, view) in &views {
        if let Some(i) = first_non_finite(view.dtype(), view.data()) {
            return Err(bad(format!(
                "tensor '{name}' holds a NaN or infinite value (element {i})"
            )));
        }
        let t = candle_core::safetensors::Load::load(view, device)
            .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        tensors.insert(name.clone(), t);
    }
    Ok(Checked { tensors, metadata })
}

/// The index of the first NaN or infinite element of little-endian float data (an exponent of all
/// ones), or `None` (also for integer dtypes).
fn first_non_finite(dtype: Dtype, data: &[u8]) -> Option<usize> {
    match dtype {
        Dtype::F16 => data
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        Dtype::BF16 => data
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        Dtype::F32 => data
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        Dtype::F64 => data
            .chunks_exact(8)
            .position(|c| !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HashMap<String, Tensor> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let m = Tensor::new(&[3u32, 1, 4], &Device::Cpu).unwrap();
        HashMap::from([("w".to_string(), t), ("mask".to_string(), m)])
    }

    fn new_file_mode(dir: &Path) -> std::fs::Permissions {
        let fresh = dir.join("fresh");
        let p = std::fs::File::create(&fresh)
            .unwrap()
            .metadata()
            .unwrap()
            .permissions();
        std::fs::remove_file(fresh).unwrap();
        p
    }

    #[test]
    fn a_checked_file_reads_back_exactly_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.safetensors");
        let meta = BTreeMap::from([("report".to_string(), "abc".to_string())]);
        save_checked(&sample(), &meta, &path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions(),
            new_file_mode(dir.path())
        );
        let back = load_checked(&path, &Device::Cpu, MissingChecksum::Reject).unwrap();
        assert_eq!(back.metadata, meta);
        assert_eq!(
            back.tensors["w"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        assert_eq!(
            back.tensors["mask"].to_vec1::<u32>().unwrap(),
            vec![3, 1, 4]
        );
        // Only the file itself is left in its folder.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    /// Files of both writers read back through candle's own loader, every dtype and shape intact
    /// (f16 and u8 beside f32 and u32, a scalar, an empty tensor).
    #[test]
    fn written_files_are_safetensors_that_candle_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut map = sample();
        let d = Device::Cpu;
        let h = Tensor::new(&[1.5f32, -2.0, 0.25], &d).unwrap();
        map.insert("half".into(), h.to_dtype(candle_core::DType::F16).unwrap());
        map.insert("bytes".into(), Tensor::new(&[7u8, 9], &d).unwrap());
        map.insert("scalar".into(), Tensor::new(3.5f64, &d).unwrap());
        map.insert(
            "empty".into(),
            Tensor::zeros(0, candle_core::DType::U32, &d).unwrap(),
        );
        for (i, path) in ["plain", "checked"].iter().enumerate() {
            let path = dir.path().join(path);
            if i == 0 {
                save_plain(&map, &path).unwrap();
            } else {
                save_checked(&map, &BTreeMap::new(), &path).unwrap();
            }
            let back = candle_core::safetensors::load(&path, &d).unwrap();
            assert_eq!(back.len(), map.len());
            for (name, t) in &map {
                let b = &back[name];
                assert_eq!((b.dtype(), b.dims()), (t.dtype(), t.dims()), "{name}");
                let f = |x: &Tensor| {
                    let x = x.to_dtype(candle_core::DType::F64).unwrap();
                    x.flatten_all().unwrap().to_vec1::<f64>().unwrap()
                };
                assert_eq!(f(b), f(t), "{name}");
            }
        }
    }

    #[test]
    fn every_kind_of_damage_is_unreadable_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        save_checked(&sample(), &BTreeMap::new(), &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let n = good.len();
        let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut flipped = good.clone();
        flipped[n - 1] ^= 0x01;
        let mut zeroed = good.clone();
        zeroed[header..].iter_mut().for_each(|b| *b = 0);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "truncated",
                good[..n / 2].to_vec(),
                "not a safetensors file",
            ),
            (
                "garbage",
                b"not a tensor file at all".to_vec(),
                "not a safetensors file",
            ),
            ("all zero", vec![0; n], "not a safetensors file"),
            ("values zeroed", zeroed, "checksum mismatch"),
            ("flipped byte", flipped, "checksum mismatch"),
        ];
        for (what, bytes, says) in cases {
            std::fs::write(&path, bytes).unwrap();
            let e = load_checked(&path, &Device::Cpu, MissingChecksum::Reject).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&path.display().to_string()) && text.contains(says),
                "{what}: {text}"
            );
        }
        // A file without a checksum: refused by a cache, read by a checkpoint's resume.
        save_plain(&sample(), &path).unwrap();
        let e = load_checked(&path, &Device::Cpu, MissingChecksum::Reject).unwrap_err();
        assert!(e.to_string().contains("no checksum"), "{e}");
        load_checked(&path, &Device::Cpu, MissingChecksum::Accept).unwrap();
        // NaN and infinite values are refused even under a valid checksum.
        for (dtype, bad) in [
            (candle_core::DType::F32, f64::NAN),
            (candle_core::DType::F16, f64::INFINITY),
            (candle_core::DType::BF16, f64::NAN),
            (candle_core::DType::F64, f64::NEG_INFINITY),
        ] {
            let t = Tensor::new(&[1.0f64, bad, 2.0], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            save_checked(&HashMap::from([("v", t)]), &BTreeMap::new(), &path).unwrap();
            let e = load_checked(&path, &Device::Cpu, MissingChecksum::Accept).unwrap_err();
            assert!(
                e.to_string()
                    .contains("tensor 'v' holds a NaN or infinite value (element 1)"),
                "{dtype:?}: {e}"
            );
        }
    }

    #[test]
    fn a_failed_write_names_the_file_and_says_writing() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should go: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let e = save_checked(&sample(), &BTreeMap::new(), &path).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("writing '{}'", path.display())),
            "{text}"
        );
        // The temporary file is removed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

//! Where a model's files come from and how its weights are read (SPEC §3).
//!
//! A model argument is a local folder, or else a Hugging Face repo id (`owner/name`) resolved
//! through `hf-hub` and its standard cache (`HF_HOME`; with `HF_HUB_OFFLINE=1` only the cache is
//! read). Weights are `*.safetensors` (memory-mapped), or PyTorch `*.bin` where only that exists.
//! Every failure names what was looked for and where.

pub mod files;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("model '{model}' has none of [{wanted}] (looked in '{location}')")]
    MissingFile {
        model: String,
        wanted: String,
        location: String,
    },
    #[error("model folder '{model}' does not exist")]
    NoSuchFolder { model: String },
    #[error("model '{model}' is neither a local folder nor a Hugging Face repo id (owner/name)")]
    NotAModel { model: String },
    #[error("model '{model}' (no such local folder, so taken as a Hugging Face repo id): [{wanted}] not in the Hugging Face cache ('{cache}') and HF_HUB_OFFLINE is set")]
    OfflineMiss {
        model: String,
        wanted: String,
        cache: String,
    },
    #[error("model '{model}' (no such local folder, so taken as a Hugging Face repo id): could not download [{wanted}] from the Hugging Face hub: {reason}")]
    Download {
        model: String,
        wanted: String,
        reason: String,
    },
    #[error("reading weights '{path}': {source}")]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("reading '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing '{path}': {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("sharded weight index '{path}': {reason}")]
    ShardIndex { path: PathBuf, reason: String },
}

/// A resolved model location: a local folder, or a hub repo whose files come from the cache or a download.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String },
}

impl ModelSource {
    /// A path that exists locally is a folder; `owner/name` that is not a local path is a repo id.
    /// Any other path is a folder that does not exist.
    pub fn parse(model: &str) -> Result<Self, WeightsError> {
        let path = Path::new(model);
        if path.exists() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        let looks_like_path =
            model.starts_with('.') || model.starts_with('/') || model.starts_with('~');
        let parts: Vec<&str> = model.split('/').collect();
        if !looks_like_path && parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) {
            return Ok(ModelSource::Hub {
                repo: model.to_string(),
            });
        }
        if looks_like_path || parts.len() > 1 || model.contains(std::path::MAIN_SEPARATOR) {
            return Err(WeightsError::NoSuchFolder {
                model: model.into(),
            });
        }
        Err(WeightsError::NotAModel {
            model: model.into(),
        })
    }

    fn name(&self) -> String {
        match self {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub { repo } => repo.clone(),
        }
    }

    /// The first of `candidates` (paths relative to the model root, e.g. `unet/config.json`) that
    /// exists: locally, in the hub cache, or (online) downloaded.
    pub fn file(&self, candidates: &[&str]) -> Result<PathBuf, WeightsError> {
        let wanted = candidates.join(", ");
        match self {
            ModelSource::Local(root) => candidates
                .iter()
                .map(|c| root.join(c))
                .find(|p| p.is_file())
                .ok_or_else(|| WeightsError::MissingFile {
                    model: self.name(),
                    wanted,
                    location: root.display().to_string(),
                }),
            ModelSource::Hub { repo } => {
                let cache = hf_hub::Cache::from_env();
                let cached = cache.model(repo.clone());
                if let Some(p) = candidates.iter().find_map(|c| cached.get(c)) {
                    return Ok(p);
                }
                if offline() {
                    return Err(WeightsError::OfflineMiss {
                        model: repo.clone(),
                        wanted,
                        cache: cache.path().display().to_string(),
                    });
                }
                let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
                    .with_progress(true)
                    .build()
                    .map_err(|e| WeightsError::Download {
                        model: repo.clone(),
                        wanted: wanted.clone(),
                        reason: e.to_string(),
                    })?;
                let remote = api.model(repo.clone());
                let mut last = String::new();
                for c in candidates {
                    match remote.get(c) {
                        Ok(p) => return Ok(p),
                        Err(e) => last = format!("{c}: {e}"),
                    }
                }
                Err(WeightsError::Download {
                    model: repo.clone(),
                    wanted,
                    reason: last,
                })
            }
        }
    }

    /// The weight files of a component: `{dir}/{stem}.safetensors` (or its sharded
    /// `.safetensors.index.json`), else `{dir}/{stem}.bin`. `dir` may be empty for the root.
    pub fn weight_files(&self, dir: &str, stems: &[&str]) -> Result<Vec<PathBuf>, WeightsError> {
        let join = |f: String| {
            if dir.is_empty() {
                f
            } else {
                format!("{dir}/{f}")
            }
        };
        let mut candidates = Vec::new();
        for stem in stems {
            candidates.push(join(format!("{stem}.safetensors")));
            candidates.push(join(format!("{stem}.safetensors.index.json")));
        }
        for stem in stems {
            candidates.push(join(format!("{stem}.bin")));
            candidates.push(join(format!("{stem}.bin.index.json")));
        }
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let first = self.file(&refs)?;
        let name = first
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if !name.ends_with(".index.json") {
            return Ok(vec![first]);
        }
        // A sharded checkpoint: the index maps tensor names to shard files beside it.
        let text = std::fs::read_to_string(&first).map_err(|source| WeightsError::Io {
            path: first.clone(),
            source,
        })?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| WeightsError::Json {
                path: first.clone(),
                source,
            })?;
        let bad_index = |reason: &str| WeightsError::ShardIndex {
            path: first.clone(),
            reason: reason.to_string(),
        };
        let map = index
            .get("weight_map")
            .ok_or_else(|| bad_index("no \"weight_map\" (tensor name -> shard file)"))?
            .as_object()
            .ok_or_else(|| bad_index("\"weight_map\" is not an object"))?;
        if map.is_empty() {
            return Err(bad_index("\"weight_map\" lists no tensors"));
        }
        let mut shards = map
            .iter()
            .map(|(name, file)| {
                file.as_str().map(str::to_string).ok_or_else(|| {
                    bad_index(&format!("the shard of '{name}' is {file}, not a file name"))
                })
            })
            .collect::<Result<Vec<String>, WeightsError>>()?;
        shards.sort();
        shards.dedup();
        shards
            .iter()
            .map(|s| self.file(&[&join(s.clone())]))
            .collect()
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

/// Reads all tensors of the given files (safetensors or PyTorch `.bin`) into memory.
pub fn load_tensors(
    files: &[PathBuf],
    device: &Device,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let mut out = HashMap::new();
    for path in files {
        let read = |source| WeightsError::Read {
            path: path.clone(),
            source,
        };
        if is_safetensors(path) {
            out.extend(candle_core::safetensors::load(path, device).map_err(read)?);
        } else {
            for (name, t) in candle_core::pickle::read_all(path).map_err(read)? {
                out.insert(name, t.to_device(device).map_err(read)?);
            }
        }
    }
    Ok(out)
}

/// The tensors of a file whose state dict is split into named sections, as IP-Adapter's files are
/// (`{"image_proj": {...}, "ip_adapter": {...}}`): from a PyTorch `.bin`, each section's nested
/// dict; from safetensors, whose keys are flat, the tensors named `{section}.…`. Keys come back as
/// `{section}.{name}` either way; a section the file lacks is simply absent.
pub fn load_sectioned_tensors(
    path: &Path,
    sections: &[&str],
    device: &Device,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let read = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    };
    if is_safetensors(path) {
        let all = candle_core::safetensors::load(path, device).map_err(read)?;
        return Ok(all
            .into_iter()
            .filter(|(k, _)| sections.iter().any(|s| k.starts_with(&format!("{s}."))))
            .collect());
    }
    let mut out = HashMap::new();
    let mut first_error = None;
    for section in sections {
        // candle's reader fails on a missing key; a missing section is the caller's to report,
        // a file that has none of them (or is no pickle at all) is this function's.
        match candle_core::pickle::read_all_with_key(path, Some(*section)) {
            Ok(tensors) => {
                for (name, t) in tensors {
                    out.insert(
                        format!("{section}.{name}"),
                        t.to_device(device).map_err(read)?,
                    );
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if out.is_empty() => Err(read(e)),
        _ => Ok(out),
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// A `VarBuilder` over weight files: memory-mapped safetensors, or PyTorch `.bin` loaded in memory.
/// Tensors are converted to `dtype` as they are read.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    if files.iter().all(|p| is_safetensors(p)) {
        // SAFETY: memory-mapping requires the files not to change while mapped; model files are
        // read-only inputs for the life of the process.
        unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|source| {
            WeightsError::Read {
                path: files.first().cloned().unwrap_or_default(),
                source,
            }
        })
    } else {
        let tensors = load_tensors(files, device)?;
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }
}

/// Reads and parses a JSON config file, naming the file on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|source| WeightsError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| WeightsError::Json {
        path: path.into(),
        source,
    })
}

/// Writes `tensors` as a safetensors file at `path`, atomically and with the permissions of any
/// new file in that folder ([`files::save_plain`]): safetensors 0.8's own writer goes through a
/// private temporary file (mode 0600), which left models, embeddings and latents unreadable to
/// anyone else whatever the user's umask.
pub fn save_safetensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &HashMap<K, Tensor>,
    path: impl AsRef<Path>,
) -> candle_core::Result<()> {
    files::save_plain(tensors, path.as_ref()).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folder_finds_first_existing_candidate_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/diffusion_pytorch_model.bin"), b"x").unwrap();
        let src = ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
        let files = src
            .weight_files("unet", &["diffusion_pytorch_model"])
            .unwrap();
        assert!(files[0].ends_with("unet/diffusion_pytorch_model.bin"));
        let err = src
            .weight_files("vae", &["diffusion_pytorch_model"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vae/diffusion_pytorch_model.safetensors"),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn hub_id_offline_without_cache_fails_clearly() {
        let cache = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let src = ModelSource::parse("openai/clip-vit-base-patch32").unwrap();
        let err = src.file(&["config.json"]).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("openai/clip-vit-base-patch32"),
            "{err}"
        );
    }

    #[test]
    fn not_a_path_nor_repo_id_is_an_error() {
        assert!(ModelSource::parse("./no/such/folder").is_err());
        assert!(ModelSource::parse("just-a-name").is_err());
    }

    #[test]
    fn a_missing_folder_is_named_as_one() {
        for model in ["/nonexistent", "./no/such/folder", "no/such/folder"] {
            let err = ModelSource::parse(model).unwrap_err().to_string();
            assert_eq!(err, format!("model folder '{model}' does not exist"));
        }
        let err = ModelSource::parse("just-a-name").unwrap_err().to_string();
        assert!(
            err.contains("'just-a-name'") && err.contains("neither a local folder"),
            "{err}"
        );
    }

    #[test]
    fn a_two_part_name_that_is_no_folder_is_said_to_be_taken_as_a_hub_id() {
        let cache = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let src = ModelSource::parse("no-such-owner/no-such-model").unwrap();
        let err = src.file(&["model_index.json"]).unwrap_err().to_string();
        assert!(
            err.contains("'no-such-owner/no-such-model'")
                && err.contains("no such local folder, so taken as a Hugging Face repo id"),
            "{err}"
        );
    }

    #[test]
    fn saved_safetensors_get_a_new_files_permissions_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let map = HashMap::from([("w".to_string(), t.clone())]);
        save_safetensors(&map, &path).unwrap();
        let fresh = dir.path().join("fresh");
        let want = std::fs::File::create(&fresh)
            .unwrap()
            .metadata()
            .unwrap()
            .permissions();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions(), want);
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let diff = (&back["w"] - &t).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // No probe or temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_shard_index_that_names_no_shards_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        let src = ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
        for (json, says) in [
            (r#"{"metadata": {"total_size": 0}}"#, "no \"weight_map\""),
            (r#"{"weight_map": []}"#, "not an object"),
            (r#"{"weight_map": {}}"#, "lists no tensors"),
            (r#"{"weight_map": {"a.weight": 3}}"#, "'a.weight' is 3"),
        ] {
            std::fs::write(&index, json).unwrap();
            let err = src.weight_files("", &["model"]).unwrap_err().to_string();
            assert!(
                err.contains(&index.display().to_string()) && err.contains(says),
                "{json}: {err}"
            );
        }
        std::fs::write(
            &index,
            r#"{"weight_map": {"a.weight": "model-1.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("model-1.safetensors"), b"x").unwrap();
        let files = src.weight_files("", &["model"]).unwrap();
        assert_eq!(files, vec![dir.path().join("model-1.safetensors")]);
    }
}

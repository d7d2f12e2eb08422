//! Provenance of a run, for results cited in a paper: the build (version, git commit, compiled
//! backend features), each model's resolved revision (the hub commit of a cached hub model, or the
//! SHA-256 of a local model's weight files), the dataset's checksum and the protocol settings.
//! `plan.json` records it when a run starts; the report's header shows it.

use crate::experiment::{Baseline, Experiment};
use crate::jobs::{model_for, open_dataset};
use anyhow::Context;
use diffusion::textual_inversion::learned_embedding_key;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (`unknown` when built outside a git checkout).
pub const COMMIT: &str = env!("PND_GIT_COMMIT");

/// The compute backends compiled into candle (`cuda`, `metal`, `mkl`, `accelerate`); `cpu` when
/// none is.
pub fn features() -> Vec<String> {
    use candle_core::utils;
    let mut f: Vec<String> = [
        ("cuda", utils::cuda_is_available()),
        ("metal", utils::metal_is_available()),
        ("mkl", utils::has_mkl()),
        ("accelerate", utils::has_accelerate()),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| name.to_string())
    .collect();
    if f.is_empty() {
        f.push("cpu".into());
    }
    f
}

/// What `pnd --version` prints after the name: version, git commit and compiled features.
pub fn version_line() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        format!(
            "{VERSION} (commit {COMMIT}; features: {})",
            features().join(", ")
        )
    })
}

/// One model a run uses and its resolved revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRevision {
    /// What the run uses it for, e.g. `base`, `dreambooth (dog)`, `dino`.
    pub role: String,
    /// The location as configured: a folder, a file or a hub id.
    pub model: String,
    /// `hub:<commit>`, `sha256:<hex>` of the weight files, or why neither is known.
    pub revision: String,
    /// For a Textual Inversion file: the token its vector is bound to and the file's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<TokenBinding>,
}

/// How a Textual Inversion vector enters the prompts: bound to the token the method's prompts use
/// (diffusers' `load_textual_inversion(path, token=…)`), whatever key the file names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBinding {
    /// The token the prompts use and the vector is bound to.
    pub token: String,
    /// The token the file itself names.
    pub file_key: String,
}

impl std::fmt::Display for TokenBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vector of file key '{}' bound to token '{}'",
            self.file_key, self.token
        )
    }
}

/// The dataset images a run scores against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetChecksum {
    pub path: String,
    pub images: usize,
    /// SHA-256 over the lines `subject/file <sha256 of the file>` of every image used, in order.
    pub sha256: String,
}

/// Everything that made a run, recorded in `plan.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub version: String,
    pub commit: String,
    pub features: Vec<String>,
    pub models: Vec<ModelRevision>,
    pub dataset: DatasetChecksum,
    /// The protocol settings: generation, metric protocol, guidance, seeds and prompts.
    pub protocol: serde_json::Value,
    /// The device and generation precision the run started on (absent in older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::runtime::RuntimeRecord>,
}

impl Provenance {
    /// Resolves every model and checksums the dataset of `exp`. `cache_dir` keeps the hashes of
    /// local weight files (keyed by path, size and modification time), so shards and resumed runs
    /// do not hash gigabytes again.
    pub fn collect(
        exp: &Experiment,
        cache_dir: &Path,
        runtime: &crate::runtime::RuntimeRecord,
    ) -> anyhow::Result<Self> {
        let mut hashes = HashCache::open(&cache_dir.join("weight-hashes.json"));
        let mut models: Vec<ModelRevision> = Vec::new();
        let mut add = |role: String,
                       model: &str,
                       binding: Option<TokenBinding>,
                       hashes: &mut HashCache|
         -> anyhow::Result<()> {
            if models
                .iter()
                .any(|m| m.model == model && m.binding == binding)
            {
                return Ok(());
            }
            let revision = revision(model, hashes)?;
            models.push(ModelRevision {
                role,
                model: model.to_string(),
                revision,
                binding,
            });
            Ok(())
        };
        // Every method but unguided BLIP-Diffusion uses the base model (as the model, the source of
        // a DreamBooth folder's other parts, the Textual Inversion base or the layout template).
        let uses_base = exp.methods.iter().any(|m| {
            m.pick_and_draw || !matches!(m.baseline, Baseline::BlipDiffusion | Baseline::Images)
        });
        if uses_base {
            add("base".into(), &exp.models.base, None, &mut hashes)?;
        }
        let mut external = Vec::new();
        for method in &exp.methods {
            if method.baseline == Baseline::Images {
                // Made by another program: what the run knows is where they were read from.
                external.push(ModelRevision {
                    role: format!("images ({})", method.name),
                    model: method.images.clone().unwrap_or_default(),
                    revision: "external images, copied into the run folder".into(),
                    binding: None,
                });
                continue;
            }
            for subject in exp.subjects() {
                let choice = model_for(exp, method, subject)?;
                let baseline = serde_json::to_value(method.baseline)?;
                let role = format!("{} ({})", baseline.as_str().unwrap_or("?"), subject.name);
                add(role.clone(), &choice.model, None, &mut hashes)?;
                if let Some(ip) = &choice.ip_adapter {
                    // A local adapter folder: its adapter file and its image encoder's folder.
                    let source = ip.source();
                    let local = Path::new(&ip.repo)
                        .is_dir()
                        .then(|| {
                            Some((
                                source.weight_file().ok()?,
                                source.image_encoder_files().ok()?,
                            ))
                        })
                        .flatten();
                    match local {
                        Some((file, (config, _))) => {
                            let encoder = config.parent().unwrap_or(Path::new(""));
                            add(role.clone(), &file.display().to_string(), None, &mut hashes)?;
                            add(
                                role.clone(),
                                &encoder.display().to_string(),
                                None,
                                &mut hashes,
                            )?;
                        }
                        None => add(role.clone(), &ip.repo, None, &mut hashes)?,
                    }
                }
                if let Some(e) = &choice.embeddings {
                    let file_key = learned_embedding_key(e)?;
                    let binding = TokenBinding {
                        token: choice.embedding_token.clone().unwrap_or(file_key.clone()),
                        file_key,
                    };
                    add(role, &e.display().to_string(), Some(binding), &mut hashes)?;
                }
            }
        }
        add("dino".into(), &exp.metrics.dino, None, &mut hashes)?;
        add("clip".into(), &exp.metrics.clip, None, &mut hashes)?;
        models.extend(external);
        hashes.save();
        let protocol = serde_json::json!({
            "generation": exp.generation,
            "metrics": exp.metrics,
            "guidance": exp.guidance,
            "seeds": exp.seeds,
            "prompts": exp.prompt_indices(),
        });
        Ok(Provenance {
            version: VERSION.into(),
            commit: COMMIT.into(),
            features: features(),
            models,
            dataset: dataset_checksum(exp)?,
            protocol,
            runtime: Some(runtime.clone()),
        })
    }

    /// What a resume on `now`'s inputs would change in this recorded run: the dataset (checksum
    /// or image count) and each model's revision, one line each (the build may change: a resumed
    /// run may be a rebuilt binary).
    pub fn input_changes(&self, now: &Provenance) -> Vec<String> {
        let mut out = vec![];
        let (a, b) = (&self.dataset, &now.dataset);
        if a.sha256 != b.sha256 || a.images != b.images {
            out.push(format!(
                "the dataset changed ('{}': {} images, sha256 {} then; '{}': {} images, sha256 {} now)",
                a.path, a.images, a.sha256, b.path, b.images, b.sha256
            ));
        }
        for m in &self.models {
            match now.models.iter().find(|n| n.role == m.role) {
                Some(n) if n.model != m.model || n.revision != m.revision => out.push(format!(
                    "model '{}' changed ('{}' {} then, '{}' {} now)",
                    m.role, m.model, m.revision, n.model, n.revision
                )),
                None => out.push(format!(
                    "model '{}' ('{}') is no longer used",
                    m.role, m.model
                )),
                Some(_) => {}
            }
        }
        for n in &now.models {
            if !self.models.iter().any(|m| m.role == n.role) {
                out.push(format!("model '{}' ('{}') is new", n.role, n.model));
            }
        }
        out
    }

    /// The build part (version, commit, features) as one line.
    pub fn build_line(&self) -> String {
        format!(
            "pnd {} (commit {}; features: {})",
            self.version,
            self.commit,
            self.features.join(", ")
        )
    }
}

/// SHA-256 of a reader, as lowercase hex.
fn sha256_hex(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_weight_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "bin" | "pt" | "ckpt")
    )
}

/// Every weight file under `dir`, sorted by path.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading '{}'", d.display()))? {
            let path = entry
                .with_context(|| format!("reading '{}'", d.display()))?
                .path();
            if path.is_dir() {
                stack.push(path);
            } else if is_weight_file(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The revision of a model location: the commit of a hub snapshot in the local cache, or the
/// SHA-256 over the weight files of a local folder (each file's hash with its relative path).
fn revision(model: &str, hashes: &mut HashCache) -> anyhow::Result<String> {
    let path = Path::new(model);
    if path.is_file() {
        return Ok(format!("sha256:{}", hashes.file(path)?));
    }
    if path.is_dir() {
        let mut lines = String::new();
        for f in weight_files(path)? {
            let rel = f.strip_prefix(path).unwrap_or(&f).display().to_string();
            lines.push_str(&format!("{rel} {}\n", hashes.file(&f)?));
        }
        if lines.is_empty() {
            return Ok("no weight files".into());
        }
        return Ok(format!("sha256:{}", sha256_hex(lines.as_bytes())?));
    }
    let cache = hf_hub::Cache::from_env();
    let refs = cache
        .path()
        .join(format!("models--{}", model.replace('/', "--")))
        .join("refs/main");
    Ok(match std::fs::read_to_string(&refs) {
        Ok(commit) => format!("hub:{}", commit.trim()),
        Err(_) => "hub: not in the local cache yet (downloaded at first use)".into(),
    })
}

/// The checksum of the experiment's dataset images.
fn dataset_checksum(exp: &Experiment) -> anyhow::Result<DatasetChecksum> {
    let data = open_dataset(exp)?;
    let mut lines = String::new();
    let mut images = 0;
    for subject in exp.subjects() {
        for img in data.images(subject.name)? {
            let f =
                std::fs::File::open(img).with_context(|| format!("reading '{}'", img.display()))?;
            let name = img.file_name().unwrap_or_default().to_string_lossy();
            lines.push_str(&format!("{}/{name} {}\n", subject.name, sha256_hex(f)?));
            images += 1;
        }
    }
    Ok(DatasetChecksum {
        path: exp.metrics.data.clone(),
        images,
        sha256: sha256_hex(lines.as_bytes())?,
    })
}

/// File hashes kept between runs, valid while a file's size and modification time stay the same.
struct HashCache {
    path: PathBuf,
    entries: BTreeMap<String, (u64, String, String)>,
    changed: bool,
}

impl HashCache {
    fn open(path: &Path) -> Self {
        let entries = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            path: path.into(),
            entries,
            changed: false,
        }
    }

    fn file(&mut self, path: &Path) -> anyhow::Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading '{}'", path.display()))?;
        // The modification time as the platform gives it; only compared for equality.
        let mtime = format!("{:?}", meta.modified().ok());
        let key = path
            .canonicalize()
            .unwrap_or_else(|_| path.into())
            .display()
            .to_string();
        if let Some((len, t, hash)) = self.entries.get(&key) {
            if *len == meta.len() && *t == mtime {
                return Ok(hash.clone());
            }
        }
        let f =
            std::fs::File::open(path).with_context(|| format!("reading '{}'", path.display()))?;
        let hash = sha256_hex(f).with_context(|| format!("hashing '{}'", path.display()))?;
        self.entries.insert(key, (meta.len(), mtime, hash.clone()));
        self.changed = true;
        Ok(hash)
    }

    /// Writes the cache back; a cache that cannot be written only costs time later (a warning).
    fn save(&self) {
        if !self.changed {
            return;
        }
        let written = serde_json::to_string(&self.entries)
            .map_err(anyhow::Error::from)
            .and_then(|text| {
                Ok(crate::sweep::write_file_atomic(
                    &self.path,
                    text.as_bytes(),
                )?)
            });
        if let Err(e) = written {
            eprintln!(
                "warning: could not write the weight-hash cache '{}': {e:#}",
                self.path.display()
            );
        }
    }
}

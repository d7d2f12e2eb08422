//! Training experiments (`pnd train baselines FILE`): which subjects get a Textual Inversion
//! embedding and a DreamBooth model, with which settings, written where the sweep's `[models]`
//! templates read them.
//!
//! ```toml
//! name = "train-baselines"
//! include = ["models/sd15", "train/textual-inversion", "train/dreambooth"]
//! data = "dreambench"          # the DreamBench folder (default)
//! subjects = ["dog", "cat"]    # default: all 30
//! ```
//! `configs/train/textual-inversion.toml` holds a `[textual_inversion]` table and
//! `configs/train/dreambooth.toml` a `[dreambooth]` table; a method trains when its table is
//! present. Includes work as in sweep experiments (later keys win).

use crate::experiment::{find_include, merge, Models};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn default_data() -> PathBuf {
    PathBuf::from("dreambench")
}

/// A training experiment file, includes merged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainExperiment {
    pub name: String,
    #[serde(default)]
    pub models: Models,
    #[serde(default = "default_data")]
    pub data: PathBuf,
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    #[serde(default)]
    pub textual_inversion: Option<TiConfig>,
    #[serde(default)]
    pub dreambooth: Option<DbConfig>,
}

/// Textual Inversion settings; `{subject}` and `{class}` are filled per subject.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TiConfig {
    /// The placeholder; must be the token the sweep's prompt style uses (`<{subject}>`).
    pub token: String,
    /// The initializer word: `{class}`, or its last word when the class noun is several tokens.
    pub init_token: String,
    pub steps: usize,
    pub lr: f64,
    pub scale_lr: bool,
    pub batch: usize,
    pub grad_accum: usize,
    pub resolution: u32,
    pub repeats: usize,
    pub seed: u64,
    pub checkpoint_every: usize,
}

/// DreamBooth settings; `{identifier}`, `{class}` and `{subject}` are filled per subject.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    pub identifier: String,
    pub instance_prompt: String,
    pub class_prompt: String,
    pub prior_preservation: bool,
    pub class_images: usize,
    pub prior_loss_weight: f64,
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub grad_accum: usize,
    pub train_text_encoder: bool,
    pub resolution: u32,
    pub seed: u64,
    pub checkpoint_every: usize,
}

/// The settings both trainers' configs have, as `pnd train` takes them.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub grad_accum: usize,
    pub resolution: u32,
    pub seed: u64,
    pub checkpoint_every: usize,
}

macro_rules! knobs {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn knobs(&self) -> Knobs {
                Knobs {
                    steps: self.steps,
                    lr: self.lr,
                    batch: self.batch,
                    grad_accum: self.grad_accum,
                    resolution: self.resolution,
                    seed: self.seed,
                    checkpoint_every: self.checkpoint_every,
                }
            }
        }
    )*};
}

knobs!(TiConfig, DbConfig);

impl TrainExperiment {
    /// Loads a file with its includes (`configs/NAME.toml`, found as for sweep experiments).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut merged = toml::Table::new();
        load_into(path, &mut merged, &mut Vec::new())?;
        let exp: TrainExperiment =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    anyhow::anyhow!(
                        "training experiment '{}': {}",
                        path.display(),
                        e.message().trim()
                    )
                })?;
        if exp.textual_inversion.is_none() && exp.dreambooth.is_none() {
            anyhow::bail!(
                "training experiment '{}': no [textual_inversion] or [dreambooth] table (include train/textual-inversion or train/dreambooth)",
                path.display()
            );
        }
        for (present, template, what) in [
            (
                exp.textual_inversion.is_some(),
                &exp.models.textual_inversion,
                "textual_inversion",
            ),
            (
                exp.dreambooth.is_some(),
                &exp.models.dreambooth,
                "dreambooth",
            ),
        ] {
            if present && template.as_deref().is_none_or(|t| !t.contains("{subject}")) {
                anyhow::bail!(
                    "training experiment '{}': [models] {what} must be an output path with {{subject}} (include models/sd15)",
                    path.display()
                );
            }
        }
        for s in exp.subjects.iter().flatten() {
            if dreambench::subject(s).is_none() {
                anyhow::bail!(
                    "training experiment '{}': unknown subject '{s}'",
                    path.display()
                );
            }
        }
        Ok(exp)
    }

    pub fn subjects(&self) -> Vec<&'static dreambench::Subject> {
        match &self.subjects {
            None => dreambench::SUBJECTS.iter().collect(),
            Some(list) => list.iter().filter_map(|s| dreambench::subject(s)).collect(),
        }
    }

    /// Every training, subject by subject (Textual Inversion, then DreamBooth).
    pub fn units(&self) -> Vec<Unit> {
        let mut out = Vec::new();
        for s in self.subjects() {
            if self.textual_inversion.is_some() {
                out.push(Unit {
                    method: Method::TextualInversion,
                    subject: s,
                    out: PathBuf::from(
                        self.models
                            .for_subject(crate::experiment::Baseline::TextualInversion, s.name)
                            .expect("checked at load"),
                    ),
                });
            }
            if self.dreambooth.is_some() {
                out.push(Unit {
                    method: Method::Dreambooth,
                    subject: s,
                    out: PathBuf::from(
                        self.models
                            .for_subject(crate::experiment::Baseline::Dreambooth, s.name)
                            .expect("checked at load"),
                    ),
                });
            }
        }
        out
    }
}

fn load_into(
    path: &Path,
    merged: &mut toml::Table,
    stack: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading training experiment '{}'", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing '{}'", path.display()))?;
    let includes: Vec<String> = match table.remove("include") {
        None => Vec::new(),
        Some(v) => v
            .try_into()
            .with_context(|| format!("'{}': include must be a list of names", path.display()))?,
    };
    stack.push(path.to_path_buf());
    for inc in &includes {
        let found = find_include(path, inc).ok_or_else(|| {
            anyhow::anyhow!(
                "'{}': include '{inc}' not found (configs/{inc}.toml)",
                path.display()
            )
        })?;
        if stack.contains(&found) {
            anyhow::bail!("'{}': include cycle through '{inc}'", path.display());
        }
        load_into(&found, merged, stack)?;
    }
    stack.pop();
    merge(merged, table);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    TextualInversion,
    Dreambooth,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Method::TextualInversion => "textual-inversion",
            Method::Dreambooth => "dreambooth",
        })
    }
}

/// One training: a method on a subject, and where its result goes.
#[derive(Debug, Clone)]
pub struct Unit {
    pub method: Method,
    pub subject: &'static dreambench::Subject,
    pub out: PathBuf,
}

/// Fills `{subject}`, `{class}` and `{identifier}`.
pub fn fill(template: &str, subject: &dreambench::Subject, identifier: &str) -> String {
    template
        .replace("{subject}", subject.name)
        .replace("{class}", subject.class)
        .replace("{identifier}", identifier)
}

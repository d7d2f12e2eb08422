//! Experiment files (SPEC §8): which methods, subjects, prompts and seeds a sweep runs.
//!
//! ```toml
//! name = "table1"
//! subjects = ["dog", "cat"]   # default: all 30
//! prompts = [0, 1, 2]         # prompt indices, default: all 25
//! seeds = [0, 1, 2, 3]        # default
//!
//! [[methods]]
//! name = "dreambooth+pnd"     # part of every job id
//! baseline = "dreambooth"
//! pick_and_draw = true
//! ```
//! Unknown keys, bad values and unknown subjects are errors with file, line and column.

use crate::sweep::{parse_toml, ConfigError};
use dreambench::{enumerate_jobs, jobs::valid_name, Job, PromptStyle, Subject};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::Spanned;

/// The four baselines of the paper's Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    StableDiffusion,
    TextualInversion,
    Dreambooth,
    BlipDiffusion,
}

/// One row of a results table: a baseline, with or without Pick-and-Draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// Short name used in job ids and tables: lowercase letters, digits, `-`, `+`, `_`.
    pub name: Spanned<String>,
    pub baseline: Baseline,
    #[serde(default)]
    pub pick_and_draw: bool,
    /// How the subject is named in prompts; the baseline's usual style when absent.
    #[serde(default)]
    pub prompt_style: Option<PromptStyle>,
}

impl MethodSpec {
    /// The prompt style for a subject: the configured one, else the baseline's default. A
    /// `{subject}` inside the Textual Inversion token is the subject's name (`<{subject}>` → `<dog7>`).
    pub fn style(&self, subject: &Subject) -> PromptStyle {
        let mut style = self
            .prompt_style
            .clone()
            .unwrap_or_else(|| match self.baseline {
                Baseline::StableDiffusion | Baseline::BlipDiffusion => PromptStyle::class_only(),
                Baseline::Dreambooth => PromptStyle::dreambooth("sks"),
                Baseline::TextualInversion => PromptStyle::textual_inversion("<{subject}>", true),
            });
        if let Some(token) = &mut style.token {
            *token = token.replace("{subject}", subject.name);
        }
        style
    }
}

fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2, 3]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Subject folder names; all 30 when absent.
    #[serde(default)]
    pub subjects: Option<Vec<Spanned<String>>>,
    /// Prompt indices 0..25; all when absent.
    #[serde(default)]
    pub prompts: Option<Vec<Spanned<usize>>>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub methods: Vec<MethodSpec>,
}

impl Experiment {
    /// Parses and validates an experiment; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let exp: Experiment = parse_toml(text, file)?;
        let at = |span: std::ops::Range<usize>, message: String| {
            let (line, column) = crate::sweep::config_line_column(text, span.start);
            ConfigError::Invalid {
                file: file.to_string(),
                line,
                column,
                message,
            }
        };
        for s in exp.subjects.iter().flatten() {
            if dreambench::subject(s.get_ref()).is_none() {
                return Err(at(
                    s.span(),
                    format!("unknown subject '{}' (see `pnd dataset list`)", s.get_ref()),
                ));
            }
        }
        for p in exp.prompts.iter().flatten() {
            if *p.get_ref() >= 25 {
                return Err(at(
                    p.span(),
                    format!("prompt index {} out of range 0..25", p.get_ref()),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for m in &exp.methods {
            if !valid_name(m.name.get_ref()) {
                return Err(at(
                    m.name.span(),
                    format!("method name '{}' must be lowercase letters, digits, '-', '+', '_' (no '__')", m.name.get_ref()),
                ));
            }
            if !names.insert(m.name.get_ref().clone()) {
                return Err(at(
                    m.name.span(),
                    format!("method name '{}' appears twice", m.name.get_ref()),
                ));
            }
        }
        if exp.methods.is_empty() {
            return Err(ConfigError::NoLocation {
                file: file.into(),
                message: "no [[methods]]".into(),
            });
        }
        Ok(exp)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn subjects(&self) -> Vec<&'static Subject> {
        match &self.subjects {
            None => dreambench::SUBJECTS.iter().collect(),
            Some(list) => list
                .iter()
                .filter_map(|s| dreambench::subject(s.get_ref()))
                .collect(),
        }
    }

    pub fn prompt_indices(&self) -> Vec<usize> {
        match &self.prompts {
            None => (0..25).collect(),
            Some(list) => list.iter().map(|p| *p.get_ref()).collect(),
        }
    }

    pub fn method_names(&self) -> Vec<String> {
        self.methods
            .iter()
            .map(|m| m.name.get_ref().clone())
            .collect()
    }

    /// Every generation job in canonical order (methods, subjects, prompts, seeds).
    pub fn jobs(&self) -> Vec<Job> {
        enumerate_jobs(
            &self.method_names(),
            &self.subjects(),
            &self.prompt_indices(),
            &self.seeds,
        )
    }
}

//! Experiment files (SPEC §8): which methods, subjects, prompts and seeds a sweep runs, with which
//! models, generation settings, metric protocol and guidance overrides.
//!
//! ```toml
//! name = "table1"
//! include = ["models/sd15", "protocol/dreambooth", "guidance/paper"]   # configs/<name>.toml
//! subjects = ["dog", "cat"]   # default: all 30
//! prompts = [0, 1, 2]         # prompt indices, default: all 25
//! seeds = [0, 1, 2, 3]        # default
//!
//! [[methods]]
//! name = "dreambooth+pnd"     # part of every job id
//! baseline = "dreambooth"
//! pick_and_draw = true
//! ```
//! Included blocks are merged in order, then the file itself (later keys win; tables merge key by
//! key). Every file is checked on its own first, so unknown keys, bad values, unknown subjects and
//! bad guidance settings (the experiment's `[guidance]` and each method's) are reported with that
//! file's name, line and column.

use crate::sweep::{config_line_column, ConfigError, Problem};
use dreambench::{enumerate_jobs, jobs::valid_name, Job, PromptStyle, ReferenceRule, Subject};
use guidance::GuidanceConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The four baselines of the paper's Table 1, IP-Adapter (SD 1.5 with an image prompt from the
/// subject's reference image, issue 28), and `images`: images another program made, read from
/// files (see [`MethodSpec::images`]) and scored like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    StableDiffusion,
    TextualInversion,
    Dreambooth,
    BlipDiffusion,
    IpAdapter,
    Images,
}

/// One row of a results table: a baseline, with or without Pick-and-Draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// Short name used in job ids and tables: lowercase letters, digits, `-`, `+`, `_`.
    pub name: String,
    pub baseline: Baseline,
    /// How tables and plots name the method; `Baseline + Pick-and-Draw` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub pick_and_draw: bool,
    /// How the subject is named in prompts; the baseline's usual style when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_style: Option<PromptStyle>,
    /// Guidance settings of this method over the experiment's `[guidance]` (e.g. the appearance
    /// resolution of a Table 2 row).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub guidance: toml::Table,
    /// Baseline `images` only: where each job's image is. Either a path template with
    /// `{subject}`, `{prompt}` (the prompt index; `{prompt:02}` zero-padded) and `{seed}`, e.g.
    /// `out/mymethod/{subject}/{prompt}-s{seed}.png`, or a manifest `.csv` with the columns
    /// `subject,prompt_index,seed,path[,prompt]` (paths relative to the manifest's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// The method this one is compared with in reports (delta, paired statistics, arrow, grid),
    /// when it is not the usual one (a guided method's first unguided method of the same
    /// baseline); it may live in another run of the same report (e.g. `pnd eval
    /// --compare-to dreambooth` for another program's guided images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_to: Option<String>,
}

impl MethodSpec {
    /// The prompt style for a subject: the configured one, else the baseline's default. A
    /// `{subject}` inside the Textual Inversion token is the subject's name (`<{subject}>` → `<dog7>`).
    pub fn style(&self, subject: &Subject) -> PromptStyle {
        let mut style = self
            .prompt_style
            .clone()
            .unwrap_or_else(|| match self.baseline {
                Baseline::StableDiffusion
                | Baseline::BlipDiffusion
                | Baseline::IpAdapter
                | Baseline::Images => PromptStyle::class_only(),
                Baseline::Dreambooth => PromptStyle::dreambooth("sks"),
                Baseline::TextualInversion => PromptStyle::textual_inversion("<{subject}>", true),
            });
        if let Some(token) = &mut style.token {
            *token = token.replace("{subject}", subject.name);
        }
        style
    }
}

/// Where each baseline's weights are. `{subject}` in a path is the subject's folder name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// Vanilla Stable Diffusion (baseline, Textual Inversion base, layout template).
    #[serde(default = "default_base")]
    pub base: String,
    /// A diffusers folder per subject, e.g. `checkpoints/dreambooth/{subject}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dreambooth: Option<String>,
    /// A learned-embedding file per subject, e.g. `checkpoints/ti/{subject}/learned_embeds.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub textual_inversion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blip_diffusion: Option<String>,
    /// IP-Adapter (on `base`): a folder or hub id laid out as `h94/IP-Adapter`; default
    /// `h94/IP-Adapter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter: Option<String>,
    /// IP-Adapter's kind: `plain` (`ip-adapter_sd15`, the default) or `plus`
    /// (`ip-adapter-plus_sd15`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter_kind: Option<String>,
    /// IP-Adapter's image-prompt scale (default 1.0, diffusers' default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_scale: Option<f64>,
}

/// Vanilla Stable Diffusion 1.5 on the Hugging Face hub: the paper's base model.
pub const SD15: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

fn default_base() -> String {
    SD15.into()
}

impl Default for Models {
    fn default() -> Self {
        Self {
            base: default_base(),
            dreambooth: None,
            textual_inversion: None,
            blip_diffusion: None,
            ip_adapter: None,
            ip_adapter_kind: None,
            ip_scale: None,
        }
    }
}

impl Models {
    /// The model location of a baseline for a subject (`{subject}` filled in).
    pub fn for_subject(&self, baseline: Baseline, subject: &str) -> Option<String> {
        let template = match baseline {
            Baseline::StableDiffusion | Baseline::IpAdapter => Some(&self.base),
            Baseline::Dreambooth => self.dreambooth.as_ref(),
            Baseline::TextualInversion => self.textual_inversion.as_ref(),
            Baseline::BlipDiffusion => self.blip_diffusion.as_ref(),
            Baseline::Images => None,
        }?;
        Some(template.replace("{subject}", subject))
    }
}

/// Sampling settings shared by every method (SPEC §6 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Generation {
    pub steps: usize,
    pub cfg_scale: f64,
    pub height: usize,
    pub width: usize,
    pub negative_prompt: String,
}

impl Default for Generation {
    fn default() -> Self {
        Self {
            steps: 50,
            cfg_scale: 7.5,
            height: 512,
            width: 512,
            negative_prompt: String::new(),
        }
    }
}

/// The metric protocol (SPEC §5 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricProtocol {
    /// The DreamBench folder.
    pub data: String,
    pub dino: String,
    pub clip: String,
    /// Reference image of single-image methods (inversion, BLIP-Diffusion), and the real image of
    /// the one-to-one pairing.
    pub reference: ReferenceRule,
    /// How the profile turns embeddings into scores (`[metrics.scoring]`, complete when given; the
    /// DreamBooth protocol's when absent).
    pub scoring: metrics::Scoring,
}

impl Default for MetricProtocol {
    fn default() -> Self {
        Self {
            data: "dreambench".into(),
            dino: "facebook/dino-vits16".into(),
            clip: "openai/clip-vit-base-patch32".into(),
            reference: ReferenceRule::First,
            scoring: metrics::Scoring::dreambooth(),
        }
    }
}

fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2, 3]
}

/// A resolved experiment: includes merged, every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Subject folder names; all 30 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<String>>,
    /// Prompt indices 0..25; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<usize>>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub methods: Vec<MethodSpec>,
    #[serde(default)]
    pub models: Models,
    #[serde(default)]
    pub generation: Generation,
    #[serde(default)]
    pub metrics: MetricProtocol,
    /// Device, precision and batch size (`--device`/`--dtype` override them).
    #[serde(default)]
    pub runtime: crate::runtime::RuntimeConfig,
    /// Guidance settings for every guided method (validated by the guidance crate's config).
    #[serde(default)]
    pub guidance: toml::Table,
}

/// One file as written, every key optional, spans kept: checked on its own for located errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields exist to be validated; the merged table is what gets used
struct FileParts {
    include: Option<Vec<Spanned<String>>>,
    name: Option<String>,
    description: Option<String>,
    subjects: Option<Vec<Spanned<String>>>,
    prompts: Option<Vec<Spanned<usize>>>,
    seeds: Option<Vec<Spanned<u64>>>,
    methods: Option<Vec<MethodParts>>,
    models: Option<Models>,
    generation: Option<Generation>,
    metrics: Option<MetricProtocol>,
    runtime: Option<crate::runtime::RuntimeConfig>,
    /// Parsed as guidance settings here, so unknown keys and bad values point into this file.
    guidance: Option<Spanned<GuidanceConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct MethodParts {
    name: Spanned<String>,
    baseline: Baseline,
    label: Option<String>,
    pick_and_draw: Option<bool>,
    prompt_style: Option<PromptStyle>,
    guidance: Option<Spanned<GuidanceConfig>>,
    images: Option<Spanned<String>>,
    compare_to: Option<String>,
}

/// A problem at a span of a config file's text, with the span's line and column.
pub(crate) fn located(
    text: &str,
    file: &str,
    span: std::ops::Range<usize>,
    problem: Problem,
) -> ConfigError {
    let (line, column) = config_line_column(text, span.start);
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        problem,
    }
}

/// Checks one file's text against the schema; returns its table and its includes.
fn check_file(text: &str, file: &str) -> Result<(toml::Table, Vec<Spanned<String>>), ConfigError> {
    let parts: FileParts = crate::sweep::parse_toml(text, file)?;
    for s in parts.subjects.iter().flatten() {
        if dreambench::subject(s.get_ref()).is_none() {
            return Err(located(
                text,
                file,
                s.span(),
                Problem::UnknownSubject(s.get_ref().clone()),
            ));
        }
    }
    for p in parts.prompts.iter().flatten() {
        if *p.get_ref() >= 25 {
            return Err(located(
                text,
                file,
                p.span(),
                Problem::PromptOutOfRange(*p.get_ref()),
            ));
        }
    }
    // A value listed twice would run and count the same images twice.
    fn unique<T: PartialEq + std::fmt::Display + Clone>(
        text: &str,
        file: &str,
        list: &str,
        noun: &str,
        items: &[Spanned<T>],
    ) -> Result<(), ConfigError> {
        let values: Vec<T> = items.iter().map(|x| x.get_ref().clone()).collect();
        match crate::lists::check_unique(list, noun, &values) {
            Ok(()) => Ok(()),
            Err(msg) => {
                let (_, second) = crate::lists::first_duplicate(&values).expect("a duplicate");
                Err(located(
                    text,
                    file,
                    items[second].span(),
                    Problem::Duplicate(msg),
                ))
            }
        }
    }
    if let Some(v) = &parts.subjects {
        unique(text, file, "subjects", "subject", v)?;
    }
    if let Some(v) = &parts.prompts {
        unique(text, file, "prompts", "prompt", v)?;
    }
    if let Some(v) = &parts.seeds {
        unique(text, file, "seeds", "seed", v)?;
    }
    let mut names = std::collections::BTreeSet::new();
    for m in parts.methods.iter().flatten() {
        if !valid_name(m.name.get_ref()) {
            return Err(located(
                text,
                file,
                m.name.span(),
                Problem::BadMethodName(m.name.get_ref().clone()),
            ));
        }
        if !names.insert(m.name.get_ref().clone()) {
            return Err(located(
                text,
                file,
                m.name.span(),
                Problem::DuplicateMethod(m.name.get_ref().clone()),
            ));
        }
    }
    for m in parts.methods.iter().flatten() {
        let problem = match (&m.baseline, &m.images) {
            (Baseline::Images, None) => Some(Problem::Images(format!(
                "method '{}' has baseline \"images\" but no `images` = \"path/{{subject}}/{{prompt}}-s{{seed}}.png\" (or a manifest .csv)",
                m.name.get_ref()
            ))),
            (Baseline::Images, Some(t)) => crate::jobs::images::check_template(t.get_ref())
                .err()
                .map(Problem::Images),
            (_, Some(_)) => Some(Problem::Images(format!(
                "method '{}': `images` belongs to baseline \"images\" only",
                m.name.get_ref()
            ))),
            (_, None) => None,
        };
        let guided_images = m.baseline == Baseline::Images && m.pick_and_draw == Some(true);
        let problem = problem.or_else(|| {
            guided_images.then(|| {
                Problem::Images(format!(
                    "method '{}': images read from files cannot be generated with Pick-and-Draw",
                    m.name.get_ref()
                ))
            })
        });
        if let Some(problem) = problem {
            let span = m.images.as_ref().map_or(m.name.span(), |t| t.span());
            return Err(located(text, file, span, problem));
        }
    }
    let guidance_tables = parts.guidance.iter().chain(
        parts
            .methods
            .iter()
            .flatten()
            .filter_map(|m| m.guidance.as_ref()),
    );
    for g in guidance_tables {
        if let Err(e) = g.get_ref().validate() {
            return Err(located(
                text,
                file,
                g.span(),
                Problem::Guidance(e.to_string()),
            ));
        }
    }
    let mut table: toml::Table = crate::sweep::parse_toml(text, file)?;
    table.remove("include");
    Ok((table, parts.include.unwrap_or_default()))
}

/// Later values win; tables merge key by key; arrays (methods, subjects) are replaced whole.
pub(crate) fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Experiment {
    /// Parses an experiment text without includes (an `include` key is an error here).
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let (table, includes) = check_file(text, file)?;
        if let Some(first) = includes.first() {
            return Err(located(
                text,
                file,
                first.span(),
                Problem::IncludeWithoutFile,
            ));
        }
        Self::from_table(table, file)
    }

    /// Loads an experiment file with its includes. An include `NAME` is `configs/NAME.toml`, looked
    /// up next to the file, then in its parent folders (so `experiments/x.toml` finds `configs/`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut merged = toml::Table::new();
        Self::load_into(path, &mut merged, &mut Vec::new())?;
        Self::from_table(merged, &path.display().to_string())
    }

    fn load_into(
        path: &Path,
        merged: &mut toml::Table,
        stack: &mut Vec<PathBuf>,
    ) -> Result<(), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            cause: source,
        })?;
        let (table, includes) = check_file(&text, &file)?;
        stack.push(path.to_path_buf());
        for inc in &includes {
            let found = find_include(path, inc.get_ref()).ok_or_else(|| {
                located(
                    &text,
                    &file,
                    inc.span(),
                    Problem::MissingInclude(inc.get_ref().clone()),
                )
            })?;
            if stack.iter().any(|p| p == &found) {
                return Err(located(
                    &text,
                    &file,
                    inc.span(),
                    Problem::IncludeCycle(inc.get_ref().clone()),
                ));
            }
            Self::load_into(&found, merged, stack)?;
        }
        stack.pop();
        merge(merged, table);
        Ok(())
    }

    fn from_table(table: toml::Table, file: &str) -> Result<Self, ConfigError> {
        let exp: Experiment =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::NoLocation {
                    file: file.into(),
                    problem: Problem::Schema(e.message().trim().to_string()),
                })?;
        if exp.methods.is_empty() {
            return Err(ConfigError::NoLocation {
                file: file.into(),
                problem: Problem::NoMethods,
            });
        }
        Ok(exp)
    }

    pub fn subjects(&self) -> Vec<&'static Subject> {
        match &self.subjects {
            None => dreambench::SUBJECTS.iter().collect(),
            Some(list) => list.iter().filter_map(|s| dreambench::subject(s)).collect(),
        }
    }

    pub fn prompt_indices(&self) -> Vec<usize> {
        self.prompts.clone().unwrap_or_else(|| (0..25).collect())
    }

    pub fn method_names(&self) -> Vec<String> {
        self.methods.iter().map(|m| m.name.clone()).collect()
    }

    pub fn method(&self, name: &str) -> Option<&MethodSpec> {
        self.methods.iter().find(|m| m.name == name)
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

pub(crate) fn find_include(from: &Path, name: &str) -> Option<PathBuf> {
    let rel = format!("{name}.toml");
    let mut dir = from.parent();
    while let Some(d) = dir {
        for candidate in [d.join("configs").join(&rel), d.join(&rel)] {
            if candidate.is_file() {
                return Some(candidate);
            }
        }
        dir = d.parent();
    }
    None
}

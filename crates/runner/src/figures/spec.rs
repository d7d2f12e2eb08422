//! Figure files: the paper's qualitative figures as data (SPEC §8). A figure names its rows
//! (subject, prompt index, seed), its columns (`reference` or a method of the runs given, each
//! with a title), its caption and its print size.
//!
//! ```toml
//! [[figures]]
//! name = "fig6"                      # the file names: fig6.png, fig6.svg, fig6.tex
//! caption = "Ablation of the losses."  # LaTeX, written as is into \caption{}
//! label = "fig:ablation-losses"      # \label{}; default fig:<name>
//! run = "ablation-losses"            # the run the columns' methods come from, unless one says
//! wide = false                       # figure* over both columns (width 7 in) or one (3.33 in)
//! columns = [
//!     { method = "reference", title = "Reference" },
//!     { method = "db", title = "DreamBooth" },
//!     { method = "db+app", title = "+ ℓ_app" },
//! ]
//! rows = [
//!     { subject = "dog6", prompt = 10, seed = 0 },
//! ]
//! ```
//! Unknown keys, bad values, unknown subjects and prompt indices out of range are errors with the
//! file's line and column, as in experiment files.

use crate::experiment::located;
use crate::sweep::{config_line_column, parse_toml, ConfigError, Problem};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::Spanned;

/// The column name that stands for the subject's reference image.
pub const REFERENCE: &str = "reference";

/// A figure file: one or more figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FigureFile {
    pub figures: Vec<FigureSpec>,
}

/// One figure: a grid of images with a title over each column and the prompt under each row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FigureSpec {
    /// File stem of the outputs: lowercase letters, digits, `-`, `_`.
    pub name: Spanned<String>,
    /// The LaTeX caption, written into `\caption{}` as it is (math and macros allowed).
    pub caption: String,
    /// The LaTeX label; `fig:<name>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The run a column's method is looked up in when the column names none: an experiment name
    /// (`plan.json`'s) or a run folder's name. Without it, the one run that has the method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Spanned<String>>,
    /// What the prompt under each row writes for the subject's identifier ("a V* dog in the
    /// jungle"); empty: the class noun alone ("a dog in the jungle", for vanilla Stable Diffusion).
    #[serde(default = "default_identifier")]
    pub identifier: String,
    /// A `figure*` over both columns of the page (default width 7 in) instead of one column
    /// (3.33 in): ACM's two-column `acmart` text and column widths.
    #[serde(default)]
    pub wide: bool,
    /// Printed width in inches; the PNG is `width × dpi` pixels wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<f64>,
    /// Print resolution of the PNG.
    #[serde(default = "default_dpi")]
    pub dpi: u32,
    /// Size of the titles and prompts, in points at the printed width.
    #[serde(default = "default_font_size")]
    pub font_size: f64,
    pub columns: Vec<ColumnSpec>,
    pub rows: Vec<RowSpec>,
}

/// One column: the reference image or a method's images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// `reference`, or a method name of one of the runs (`db+pnd`).
    pub method: Spanned<String>,
    /// The title over the column; default "Reference" or the method's label in its run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The run of this column's method, over the figure's `run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Spanned<String>>,
}

/// One row: one DreamBench cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowSpec {
    pub subject: Spanned<String>,
    /// Index into the subject's 25 prompts.
    pub prompt: Spanned<usize>,
    #[serde(default)]
    pub seed: u64,
    /// The text under the row instead of the rendered prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

fn default_identifier() -> String {
    "V*".into()
}
fn default_dpi() -> u32 {
    300
}
fn default_font_size() -> f64 {
    8.0
}

/// acmart's `\textwidth` and `\columnwidth` (sigconf), in inches.
pub const TEXT_WIDTH_IN: f64 = 7.0;
pub const COLUMN_WIDTH_IN: f64 = 3.33;

impl FigureSpec {
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// The printed width in inches.
    pub fn width_in(&self) -> f64 {
        self.width.unwrap_or(if self.wide {
            TEXT_WIDTH_IN
        } else {
            COLUMN_WIDTH_IN
        })
    }

    pub fn latex_label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| format!("fig:{}", self.name()))
    }

    /// The text under a row: its `label`, else its prompt with the figure's identifier.
    pub fn row_text(&self, row: &RowSpec) -> String {
        if let Some(l) = &row.label {
            return l.clone();
        }
        let subject = dreambench::subject(row.subject.get_ref()).expect("checked when parsed");
        let template = subject.prompts()[*row.prompt.get_ref()];
        let style = dreambench::PromptStyle {
            subject: if self.identifier.is_empty() {
                "{class}".into()
            } else {
                "{identifier} {class}".into()
            },
            identifier: self.identifier.clone(),
            token: None,
        };
        style
            .render(template, subject.class)
            .expect("the style names only {identifier} and {class}")
    }
}

/// Where a figure file's value is, for errors found after parsing (an unknown method).
#[derive(Debug, Clone)]
pub struct SpecSource {
    pub file: String,
    pub text: String,
}

impl SpecSource {
    /// `file:line:column` of a span.
    pub fn at(&self, span: std::ops::Range<usize>) -> String {
        let (line, column) = config_line_column(&self.text, span.start);
        format!("{}:{line}:{column}", self.file)
    }
}

impl FigureFile {
    /// Parses and checks a figure file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let spec: FigureFile = parse_toml(text, file)?;
        let bad = |span, msg: String| Err(located(text, file, span, Problem::Figure(msg)));
        if spec.figures.is_empty() {
            return Err(ConfigError::NoLocation {
                file: file.into(),
                problem: Problem::Figure("no [[figures]]".into()),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for f in &spec.figures {
            let name = f.name.get_ref();
            let ok = !name.is_empty()
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !ok {
                return bad(
                    f.name.span(),
                    format!("figure name '{name}' must be lowercase letters, digits, '-', '_' (it names the files)"),
                );
            }
            if !names.insert(name.clone()) {
                return bad(f.name.span(), format!("figure name '{name}' appears twice"));
            }
            if f.columns.is_empty() || f.rows.is_empty() {
                return bad(
                    f.name.span(),
                    format!("figure '{name}' needs at least one column and one row"),
                );
            }
            if f.columns.iter().all(|c| c.method.get_ref() == REFERENCE) {
                return bad(
                    f.name.span(),
                    format!("figure '{name}' needs a column of a method (the reference image is found through a method's rows)"),
                );
            }
            let width = f.width_in();
            if !(width.is_finite() && width > 0.0 && width <= 40.0) {
                return bad(
                    f.name.span(),
                    format!("figure '{name}': width {width} in is not in (0, 40]"),
                );
            }
            if !(72..=1200).contains(&f.dpi) {
                return bad(
                    f.name.span(),
                    format!("figure '{name}': dpi {} is not in 72..=1200", f.dpi),
                );
            }
            if !(f.font_size.is_finite() && (3.0..=40.0).contains(&f.font_size)) {
                return bad(
                    f.name.span(),
                    format!(
                        "figure '{name}': font_size {} pt is not in 3..=40",
                        f.font_size
                    ),
                );
            }
            let cells = (width * f.dpi as f64) as usize / f.columns.len();
            if cells < 16 {
                return bad(
                    f.name.span(),
                    format!(
                        "figure '{name}': {} columns in {width} in at {} dpi leave {cells} px per image",
                        f.columns.len(),
                        f.dpi
                    ),
                );
            }
            for r in &f.rows {
                let Some(subject) = dreambench::subject(r.subject.get_ref()) else {
                    return Err(located(
                        text,
                        file,
                        r.subject.span(),
                        Problem::UnknownSubject(r.subject.get_ref().clone()),
                    ));
                };
                if *r.prompt.get_ref() >= subject.prompts().len() {
                    return Err(located(
                        text,
                        file,
                        r.prompt.span(),
                        Problem::PromptOutOfRange(*r.prompt.get_ref()),
                    ));
                }
            }
        }
        Ok(spec)
    }

    /// Reads and checks a figure file.
    pub fn load(path: &Path) -> Result<(Self, SpecSource), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io {
            path: path.into(),
            cause,
        })?;
        let file = path.display().to_string();
        let spec = Self::parse(&text, &file)?;
        Ok((spec, SpecSource { file, text }))
    }

    /// The file as TOML text (what [`FigureFile::parse`] reads back).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a figure file serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"[[figures]]
name = "fig6"
caption = "Losses."
columns = [{ method = "reference" }, { method = "db", title = "DreamBooth" }]
rows = [{ subject = "dog6", prompt = 10 }, { subject = "can", prompt = 3, seed = 2 }]
"#;

    #[test]
    fn a_figure_parses_with_its_defaults_and_renders_its_prompts_with_v_star() {
        let f = FigureFile::parse(ONE, "f.toml").unwrap();
        let fig = &f.figures[0];
        assert_eq!(
            (fig.dpi, fig.width_in(), fig.font_size),
            (300, COLUMN_WIDTH_IN, 8.0)
        );
        assert_eq!(fig.latex_label(), "fig:fig6");
        assert_eq!(fig.row_text(&fig.rows[0]), "a V* dog wearing a red hat");
        assert_eq!(
            fig.row_text(&fig.rows[1]),
            "a V* can on a cobblestone street"
        );
        assert_eq!(fig.rows[1].seed, 2);
        let mut plain = fig.clone();
        plain.identifier.clear();
        assert_eq!(plain.row_text(&fig.rows[0]), "a dog wearing a red hat");
        // What it serializes to reads back the same.
        let again = FigureFile::parse(&f.to_toml(), "again.toml").unwrap();
        assert_eq!(again.figures[0].rows[1].seed, 2);
        assert_eq!(
            again.figures[0].columns[1].title.as_deref(),
            Some("DreamBooth")
        );
    }

    #[test]
    fn unknown_keys_subjects_and_prompts_are_errors_with_line_and_column() {
        let cases = [
            (
                ONE.replace("title = \"DreamBooth\"", "titel = \"DreamBooth\""),
                "f.toml:4:",
                "unknown field `titel`",
            ),
            (
                ONE.replace("\"dog6\"", "\"unicorn\""),
                "f.toml:5:21",
                "unknown subject 'unicorn'",
            ),
            (
                ONE.replace("prompt = 3", "prompt = 25"),
                "f.toml:5:",
                "prompt index 25 out of range",
            ),
            (
                ONE.replace("name = \"fig6\"", "name = \"Fig 6\""),
                "f.toml:2:8",
                "figure name 'Fig 6'",
            ),
            (
                ONE.replace("[[figures]]", "[[figures]]\ndpi = 10"),
                "f.toml:",
                "dpi 10",
            ),
            (
                ONE.replace(
                    "{ method = \"db\", title = \"DreamBooth\" }",
                    "{ method = \"reference\" }",
                ),
                "f.toml:2:8",
                "needs a column of a method",
            ),
        ];
        for (text, at, what) in cases {
            let err = FigureFile::parse(&text, "f.toml").unwrap_err().to_string();
            assert!(err.starts_with(at) && err.contains(what), "{err}");
        }
    }
}

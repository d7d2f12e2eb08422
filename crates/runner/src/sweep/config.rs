//! Reading TOML configs with serde, with errors that point at file, line and column.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A config that could not be read or does not fit its schema: unknown keys, bad values and
/// malformed TOML all carry the file and the 1-based line and column of the offending text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}:{line}:{column}: {problem}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        problem: Problem,
    },
    #[error("{file}: {problem}")]
    NoLocation { file: String, problem: Problem },
    // `cause`, not `source`: see `StoreError`.
    #[error("reading '{}': {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl ConfigError {
    /// What is wrong, without where.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } | ConfigError::NoLocation { problem, .. } => {
                Some(problem)
            }
            ConfigError::Io { .. } => None,
        }
    }
}

/// What is wrong with a config, one variant per case a caller may need to tell apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Malformed TOML, an unknown key or a value of the wrong type (the TOML parser's message).
    #[error("{0}")]
    Schema(String),
    #[error("unknown subject '{0}' (see `pnd dataset list`)")]
    UnknownSubject(String),
    #[error("prompt index {0} out of range 0..25")]
    PromptOutOfRange(usize),
    #[error("method name '{0}' must be lowercase letters, digits, '-', '+', '_' (no '__')")]
    BadMethodName(String),
    #[error("method name '{0}' appears twice")]
    DuplicateMethod(String),
    /// A subject, prompt index or seed listed twice (the message of `crate::lists::check_unique`).
    #[error("{0}")]
    Duplicate(String),
    #[error("no config block '{0}' (looked for configs/{0}.toml)")]
    MissingInclude(String),
    #[error("'{0}' includes itself")]
    IncludeCycle(String),
    #[error("includes need a file location: use Experiment::load")]
    IncludeWithoutFile,
    #[error("no [[methods]]")]
    NoMethods,
    /// A method of baseline `images` without a usable `images` template, or `images` elsewhere.
    #[error("{0}")]
    Images(String),
    /// Guidance settings that parse but make no sense (e.g. `tau = 2`).
    #[error("guidance settings: {0}")]
    Guidance(String),
    /// A figure file's value that parses but cannot be drawn (see `crate::figures::spec`).
    #[error("{0}")]
    Figure(String),
}

/// 1-based line and column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Parses TOML text into `T`; `file` names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    file: impl fmt::Display,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let problem = Problem::Schema(e.message().trim().to_string());
        match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                ConfigError::Invalid {
                    file: file.to_string(),
                    line,
                    column,
                    problem,
                }
            }
            None => ConfigError::NoLocation {
                file: file.to_string(),
                problem,
            },
        }
    })
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Io {
        path: path.into(),
        cause,
    })?;
    parse_toml(&text, path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 9), (2, 4));
    }
}

//! Typed errors of the guidance crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Pipeline(Box<diffusion::pipeline::PipelineError>),

    #[error(transparent)]
    Tokenizer(Box<diffusion::tokenizer::TokenizerError>),

    #[error("reference image '{path}': {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("guidance gradient at step {step}, iteration {iteration} is not finite (nonfinite = \"abort\")")]
    NonFinite { step: usize, iteration: usize },

    #[error("reading '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A malformed or unknown-key guidance config; `message` carries toml's line and column.
    #[error("guidance config '{path}': {message}")]
    Config { path: String, message: String },

    #[error("invalid guidance setting {name} = {value}: {reason}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("shape mismatch in {what}: expected {expected}, got {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<usize>,
    },

    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    #[error(
        "cannot match the prompt tokens {personal:?} (identifier {identifier:?} removed) \
         with the template tokens {template:?} by position"
    )]
    TokenMismatch {
        personal: Vec<u32>,
        identifier: Vec<u32>,
        template: Vec<u32>,
    },
}

// Boxed: the diffusion crate's errors are large and would bloat every `Result` here.
impl From<diffusion::pipeline::PipelineError> for Error {
    fn from(e: diffusion::pipeline::PipelineError) -> Self {
        Error::Pipeline(Box::new(e))
    }
}

impl From<diffusion::tokenizer::TokenizerError> for Error {
    fn from(e: diffusion::tokenizer::TokenizerError) -> Self {
        Error::Tokenizer(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Typed errors of the guidance crate: one variant per case a caller may want to tell apart.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Pipeline(Box<diffusion::pipeline::PipelineError>),

    #[error(transparent)]
    Tokenizer(Box<diffusion::tokenizer::TokenizerError>),

    #[error("BLIP-Diffusion: {0}")]
    Blip(Box<diffusion::blip::BlipError>),

    #[error("reference image '{path}': {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("guidance gradient of image {image} of the batch at step {step}, iteration {iteration} is not finite (nonfinite = \"abort\")")]
    NonFinite {
        image: usize,
        step: usize,
        iteration: usize,
    },

    /// The null-text optimization met a NaN or infinite loss (diverged, or non-finite inputs).
    #[error(
        "null-text optimization diverged: the loss at sampling step {step}, Adam iteration \
         {iteration} is {loss} (not finite)"
    )]
    NullTextNonFinite {
        step: usize,
        iteration: usize,
        loss: f64,
    },

    /// A cache entry, written or read ([`weights::files`]): the message names the file.
    #[error(transparent)]
    File(#[from] weights::files::FileError),

    #[error("reading '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("writing '{path}': {source}")]
    Write {
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

    /// Feature sets the appearance distance cannot compare (empty, or of different widths).
    #[error(
        "cosine distances need non-empty sets of equal width, got {reference:?} and {generated:?}"
    )]
    FeatureSets {
        reference: [usize; 2],
        generated: [usize; 2],
    },

    #[error("exact EMD: {0}")]
    Transport(#[from] crate::ot::TransportError),

    #[error("token index {index} is outside the {tokens} attention tokens")]
    TokenIndex { index: usize, tokens: usize },

    #[error("layout loss: no cross-attention layers")]
    NoLayoutLayers,

    /// A site the guidance needs is not in the UNet.
    #[error("the UNet has no site '{site}' (sites: {available:?})")]
    UnknownSite {
        site: String,
        available: Vec<String>,
    },

    /// Configured appearance layers that are not transformer blocks of the UNet.
    #[error(
        "appearance layers {layers:?} are not transformer blocks of this UNet ({available:?})"
    )]
    UnknownLayers {
        layers: Vec<String>,
        available: Vec<String>,
    },

    /// Neither the subject word nor the identifier occurs in the prompt.
    #[error("subject token: {} in the prompt '{prompt}' (check --class / the experiment's class)", subject_words(class, identifier.as_deref()))]
    SubjectNotInPrompt {
        class: String,
        identifier: Option<String>,
        prompt: String,
    },

    #[error("guided BLIP-Diffusion needs the reference's subject category")]
    MissingSubjectCategory,

    #[error("guided sampling: the appearance loss is on but there is no reference palette")]
    MissingPalette,

    #[error("guided sampling: the layout loss is on but there are no template maps")]
    MissingTemplate,

    /// A palette or template without the entry of a guided step.
    #[error("{what}: nothing for step {step}")]
    MissingStep { what: &'static str, step: usize },

    /// A sampling step index past the schedule (`pnd maps --step`).
    #[error("step {step} is outside the {steps}-step schedule (steps 0 to {last})", last = steps.saturating_sub(1))]
    StepOutOfRange { step: usize, steps: usize },

    /// A stored tensor file without a tensor it must hold.
    #[error("'{path}' has no tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },

    #[error("trace line {path}:{line}: {message}")]
    TraceLine {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A stored JSON file that does not parse.
    #[error("'{path}': {reason}")]
    CorruptFile { path: PathBuf, reason: String },

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

impl From<diffusion::blip::BlipError> for Error {
    fn from(e: diffusion::blip::BlipError) -> Self {
        Error::Blip(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `the class 'dog' is not` or `neither the class 'dog' nor the identifier 'sks' is`.
fn subject_words(class: &str, identifier: Option<&str>) -> String {
    match identifier {
        Some(id) => format!("neither the class '{class}' nor the identifier '{id}' is"),
        None => format!("the class '{class}' is not"),
    }
}

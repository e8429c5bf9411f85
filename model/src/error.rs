//! The crate's error type.

/// Everything `plip-model` can refuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    UnknownPreset(String),
    #[error("invalid preset {0}")]
    InvalidPreset(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("device: {0}")]
    Device(String),
    #[error("unreadable weights: {0}")]
    Weights(String),
    #[error("weights are for preset {found}, this model is {expected}")]
    PresetMismatch { expected: String, found: String },
    #[error("weights were trained with tokenizer {found}, this model uses {expected}")]
    TokenizerMismatch { expected: String, found: String },
    #[error(
        "weights use format version {found}; this build reads up to {supported}: upgrade plipd"
    )]
    NewerFormat { found: u32, supported: u32 },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The error type of `ssl-text`.

use std::path::PathBuf;

/// Everything that can go wrong in `ssl-text`.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// Model, training or checkpoint error from ssl-core.
    #[error(transparent)]
    Core(#[from] ssl_core::CoreError),
    /// Reading Parquet failed.
    #[error(transparent)]
    Data(#[from] ssl_data::DataError),
    /// A probe (linear or k-NN) failed.
    #[error(transparent)]
    Probe(#[from] ssl_core::probe::ProbeError),
    /// A pipeline step failed: malformed entity spans, a data-parallel exchange between ranks,
    /// an empty held-out set (the message says which, as is).
    #[error("{0}")]
    Pipeline(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The `tokenizers` library reported an error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Inputs have the wrong shape or content.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config.json, tokenizer.json) is malformed.
    #[error("{path}: {message}", path = path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tokenizer holds a token id outside `0..vocabulary size`: the model's embedding
    /// table has one row per id, so such an id would index past it (or, taken as the size,
    /// allocate a table of that many rows).
    #[error("{path}: token {token:?} has id {id}, but the tokenizer has {vocab} tokens; every id must be below the vocabulary size (renumber the vocabulary 0..{vocab})", path = path.display())]
    TokenIdOutOfRange {
        /// The tokenizer file (or where it came from).
        path: PathBuf,
        /// The token.
        token: String,
        /// Its id.
        id: u32,
        /// The vocabulary size (added tokens included).
        vocab: usize,
    },
    /// A tokenizer's vocabulary does not match the stored model's embedding table
    /// (`vocab_size`): its ids would index past the table, or mean other tokens than those
    /// the model was trained on.
    #[error("{path}: the tokenizer has {tokenizer} tokens but the model's vocab_size is {model}; use the tokenizer the model was trained with (the run's tokenizer.json, tokenizer.file in its config.toml)", path = path.display())]
    VocabMismatch {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's vocabulary size (added tokens included).
        tokenizer: usize,
        /// The model's `vocab_size`.
        model: usize,
    },
}

impl TextError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TextError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn tok(e: impl std::fmt::Display) -> Self {
        TextError::Tokenizer(e.to_string())
    }
}

impl From<TextError> for ssl_core::CoreError {
    fn from(e: TextError) -> Self {
        match e {
            TextError::Core(c) => c,
            TextError::Candle(c) => ssl_core::CoreError::Candle(c),
            other => ssl_core::CoreError::InvalidInput(other.to_string()),
        }
    }
}

/// `Result` with [`TextError`].
pub type Result<T> = std::result::Result<T, TextError>;

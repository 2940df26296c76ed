//! The error type of ssl-multimodal.

/// Everything that can go wrong building, training or evaluating an image-text model.
#[derive(Debug, thiserror::Error)]
pub enum MultimodalError {
    /// Training machinery, parameters or checkpoints.
    #[error(transparent)]
    Core(#[from] ssl_core::CoreError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The image tower.
    #[error(transparent)]
    Vision(#[from] ssl_vision::VisionError),
    /// The text tower or the tokenizer.
    #[error(transparent)]
    Text(#[from] ssl_text::TextError),
    /// Reading Parquet.
    #[error(transparent)]
    Data(#[from] ssl_data::DataError),
    /// A setting that cannot work, named by its key.
    #[error("{0}")]
    Config(String),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Input that does not fit the model (shapes, lengths, empty sets).
    #[error("{0}")]
    InvalidInput(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, MultimodalError>;

impl From<MultimodalError> for ssl_core::CoreError {
    fn from(e: MultimodalError) -> Self {
        match e {
            MultimodalError::Core(c) => c,
            MultimodalError::Candle(c) => ssl_core::CoreError::from(c),
            other => ssl_core::CoreError::InvalidInput(other.to_string()),
        }
    }
}

//! The error type of the `ssl` binary.

use std::path::PathBuf;

/// Everything that can stop an `ssl` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Training, model or checkpoint error.
    #[error(transparent)]
    Core(#[from] ssl_core::CoreError),
    /// Reading or writing Parquet.
    #[error(transparent)]
    Data(#[from] ssl_data::DataError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A time-series model, task or data error.
    #[error(transparent)]
    Series(#[from] ssl_timeseries::TsError),
    /// A text model, tokenizer, data or pipeline error.
    #[error(transparent)]
    Text(#[from] ssl_text::TextError),
    /// A vision model, data or pipeline error.
    #[error(transparent)]
    Vision(#[from] ssl_vision::VisionError),
    /// An image-text model, data or pipeline error.
    #[error(transparent)]
    Multimodal(#[from] ssl_multimodal::MultimodalError),
    /// A probe failed.
    #[error(transparent)]
    Probe(#[from] ssl_core::probe::ProbeError),
    /// A configuration problem.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

//! The error type of `ssl-core`.

use std::path::PathBuf;

/// Everything that can go wrong in `ssl-core`.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        /// What was being done ("writing", "reading", "renaming", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON document (trainer state) could not be read or written.
    #[error("JSON in {path}: {source}", path = path.display())]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A GPU named by a device setting could not be opened (no GPU, a stub driver, or a
    /// driver that does not run this CUDA version; without any `libcuda.so.1` a `cuda` build
    /// does not start at all).
    #[error("device `{spec}`: no CUDA GPU could be opened here (is there a GPU and its driver? `nvidia-smi` lists them): {source}")]
    Device {
        /// The device as written (`cuda`, `cuda:1`).
        spec: String,
        /// candle's error from opening it (boxed: it would double the size of every
        /// `Result` of the workspace).
        source: Box<candle_core::Error>,
    },
    /// A collective operation of data-parallel training failed.
    #[error("collective communication: {0}")]
    Collective(String),
    /// Inputs have the wrong shape, type or content.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A checkpoint is missing, incomplete or does not match the model.
    #[error("checkpoint {path}: {message}", path = path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Training produced non-finite values too often in a row.
    #[error("training stopped at step {step}: {count} steps in a row had a non-finite loss or gradient (last loss {loss}, gradient norm {grad_norm}); lower the learning rate, enable gradient clipping or check the data")]
    NonFinite {
        /// The step at which training stopped.
        step: u64,
        /// How many consecutive steps were skipped.
        count: u32,
        /// The last loss seen.
        loss: f64,
        /// The last gradient norm seen.
        grad_norm: f64,
    },
    /// Every step of the run was skipped for a non-finite loss or gradient, so the model is
    /// the untrained one; no final checkpoint is written.
    #[error("no update was applied: all {steps} steps had a non-finite loss or gradient and were skipped, so the model is untrained; check the data for empty or all-missing examples, or lower the learning rate")]
    NoUpdate {
        /// Steps run (all skipped).
        steps: u64,
    },
    /// Training kept diverging after the configured number of rollbacks.
    #[error("training diverged at step {step} (loss {loss:.4e}, moving average {average:.4e}) after {rollbacks} rollbacks; lower train.lr")]
    Diverged {
        /// The step at which training stopped.
        step: u64,
        /// The loss of that step.
        loss: f64,
        /// The moving average it was compared with.
        average: f64,
        /// Rollbacks already done.
        rollbacks: u32,
    },
    /// The parameters hold NaN or infinity, so no checkpoint is written.
    #[error(
        "refusing to write a checkpoint at step {step}: parameter `{name}` holds non-finite values"
    )]
    NonFiniteParameters {
        /// The step.
        step: u64,
        /// The first parameter found with a non-finite value.
        name: String,
    },
    /// The run directory cannot be used as asked (held by another process, nothing to
    /// resume, checkpoints a fresh run would mix with).
    #[error("run directory {path}: {message}", path = path.display())]
    RunDir {
        /// The run directory.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A configuration would need more memory than the machine has (or
    /// `train.max_memory_gb` allows); the message names the keys that drive the estimate.
    #[error("not enough memory: {message}")]
    Memory {
        /// What needs the memory, how much, the limit, and the keys to change.
        message: String,
    },
    /// A probe (linear / k-NN) failed.
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    /// Embedding-health figures could not be computed.
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    /// The training-curve plot could not be written.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
}

/// `Result` with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    /// An [`CoreError::Io`] for `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A [`CoreError::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CoreError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing Parquet data.
///
/// Every variant names the file (and, where it applies, the column and row) together with what
/// was expected and what was found, so a user can fix the data without reading the code.
/// A file read from object storage is named by its URL (`s3://bucket/key.parquet`) in the
/// `path` fields.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A path given by the user does not exist.
    #[error("file not found: {path}")]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// A glob pattern or directory matched no file this crate reads.
    #[error("no data files found for '{pattern}' (expected a file, a glob, or a directory holding *.parquet, *.jsonl, *.csv, *.tsv or *.txt files, or image files)")]
    NoFiles {
        /// The pattern or directory as given.
        pattern: String,
    },
    /// A glob pattern could not be parsed.
    #[error("invalid glob pattern '{pattern}': {reason}")]
    Glob {
        /// The pattern as given.
        pattern: String,
        /// What the glob parser said.
        reason: String,
    },
    /// An operating-system I/O error on a file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The Parquet library failed on a file (not Parquet, truncated, unsupported encoding...).
    #[error("cannot read Parquet file {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A JSON Lines, CSV or text file cannot be read as a whole (its header, its layout, or it
    /// changed while being read). Single bad records are bad rows instead.
    #[error("cannot read {path}, line {line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line (1-based) where the problem is.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A file whose extension names no format this crate reads and which is not Parquet.
    #[error("cannot read {path}: it is not a Parquet file and its extension names no other format read here (.parquet, .jsonl / .ndjson / .json, .csv, .tsv, .txt, or image files: .png, .jpg)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// Arrow failed on a column of a file (for instance while converting its type).
    #[error("cannot convert column '{column}' of {path}: {source}")]
    Arrow {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// The underlying error.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A requested column does not exist in a file.
    #[error("column '{column}' not found in {path}; the file has columns: {}", available.join(", "))]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The requested column.
        column: String,
        /// The columns the file does have.
        available: Vec<String>,
    },
    /// A column exists but its type does not fit the requested kind.
    #[error("column '{column}' of {path} has type {found}, expected {expected}")]
    WrongColumnType {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// What the column kind accepts.
        expected: String,
        /// The column's Arrow type.
        found: String,
    },
    /// The data set holds no rows (or every row was bad and skipped).
    #[error("empty data set: {what}")]
    EmptyDataset {
        /// Which files, and why they count as empty.
        what: String,
    },
    /// A single row could not be decoded (and `skip_bad_rows` is off).
    #[error("bad row {row} of {path}, column '{column}': {reason} (set skip_bad_rows to skip such rows and get a report)")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// The row index within the file (0-based).
        row: usize,
        /// The column.
        column: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// An image's header declares more pixels than the column's `max_pixels` limit; found
    /// before anything is decoded. Not a bad row: `skip_bad_rows` does not skip it.
    #[error("image in row {row} of {path}, column '{column}', is {width}x{height} = {} pixels, over the limit of {limit} pixels (read from its header; nothing was decoded); raise the limit (data.max_image_pixels in the ssl pipelines, ColumnSpec::with_max_pixels in the library) or remove the row", *width as u64 * *height as u64)]
    ImageTooLarge {
        /// The file.
        path: PathBuf,
        /// The row index within the file (0-based).
        row: usize,
        /// The column.
        column: String,
        /// The width the header declares.
        width: u32,
        /// The height the header declares.
        height: u32,
        /// The limit in pixels.
        limit: u64,
    },
    /// An image column's `resize` target has more pixels than its `max_pixels` limit.
    #[error("column '{column}': resize to [{height}, {width}] is {} pixels per image, over the limit of {limit} pixels; choose a smaller resize or raise the limit (data.max_image_pixels in the ssl pipelines, ColumnSpec::with_max_pixels in the library)", *height as u128 * *width as u128)]
    ResizeTooLarge {
        /// The column.
        column: String,
        /// The target height.
        height: usize,
        /// The target width.
        width: usize,
        /// The limit in pixels.
        limit: u64,
    },
    /// The loader or writer configuration is invalid.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A resume position does not fit this source and configuration.
    #[error("invalid resume position {position}: {reason}")]
    InvalidPosition {
        /// The position as JSON.
        position: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A batch column was asked for under a name or kind it does not have.
    #[error("batch has no {kind} column '{name}'; it has: {}", available.join(", "))]
    NoSuchBatchColumn {
        /// The requested name.
        name: String,
        /// The requested kind (text, image, series, label).
        kind: &'static str,
        /// The batch's columns as `name (kind)`.
        available: Vec<String>,
    },
    /// Embeddings handed to the writer do not match its dimension or id count.
    #[error("embedding writer for {path}: {reason}")]
    Write {
        /// The final output file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// Object storage (an `s3://`, `gs://`, `az://` or `http(s)://` URL) failed: the store could
    /// not be set up, a prefix not listed, or a footer or row group not read.
    #[error("object storage: {what} {url}: {source} ({hint})")]
    ObjectStore {
        /// The object, prefix or pattern URL.
        url: String,
        /// What was being done: "cannot list", "cannot read row group 3 (bytes 4..1200) of"...
        what: String,
        /// What to check: the URL, or the environment variables of the store's credentials,
        /// region and endpoint.
        hint: String,
        /// The store client's error (boxed: it is large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// A background worker thread panicked (a bug: please report it).
    #[error("a data loader worker thread panicked: {0}")]
    WorkerPanicked(String),
}

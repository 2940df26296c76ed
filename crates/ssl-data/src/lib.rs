//! Parquet in and Parquet out for the SSL toolkit.
//!
//! * [`ParquetSource`]: one file, a list, a directory or a glob of Parquet files; only the
//!   requested columns are read, row groups are the unit of work. Local JSON Lines, CSV / TSV
//!   and text files and image folders are read too, cut into units of records or images that
//!   stand in for row groups (see the README's "Other inputs").
//! * [`DataLoader`]: sharded by rank, seeded shuffling (row-group order each epoch plus a
//!   shuffle window), epochs or an endless stream, a resumable [`Position`], decoding in
//!   background threads with a bounded prefetch queue. Yields [`Batch`]es of flat buffers:
//!   text, images `(B, C, H, W)`, series with masks `(B, C, L)`, labels as class ids, ids.
//! * [`read_all`]: a whole small source in one [`Table`] (for evaluation), or one rank's
//!   share of its row groups (data-parallel training), with each row's global row index.
//! * [`EmbeddingWriter`] / [`read_embeddings`]: `(id, embedding: FixedSizeList<f32>[D])` files
//!   with key-value metadata, written atomically.
//!
//! Bad input is reported precisely: every [`DataError`] names the file, and where it applies
//! the column, the row, what was expected and what was found. Rows that cannot be decoded are
//! an error, or with `skip_bad_rows` are skipped and listed in a [`BadRowReport`].
//!
//! ```no_run
//! use ssl_data::{ColorMode, ColumnSpec, DataLoader, LoaderConfig, ParquetSource};
//!
//! # fn main() -> Result<(), ssl_data::DataError> {
//! let source = ParquetSource::open(&["data/images/*.parquet"])?;
//! let config = LoaderConfig {
//!     batch_size: 64,
//!     seed: 7,
//!     ..LoaderConfig::new(vec![
//!         ColumnSpec::image("image", ColorMode::Grey, Some([28, 28])),
//!         ColumnSpec::label("label"),
//!     ])
//! };
//! let mut loader = DataLoader::new(&source, config)?;
//! while let Some(batch) = loader.next_batch()? {
//!     let images = batch.image("image")?; // data: Vec<f32>, shape: [B, 1, 28, 28]
//!     let labels = batch.labels("label")?;
//!     # let _ = (images, labels);
//! }
//! let resume_at = loader.position(); // serde: store it in the checkpoint
//! # let _ = resume_at;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod bad_rows;
mod batch;
mod column;
mod decode;
mod error;
mod heldout;
mod image_decode;
mod images;
mod lines;
mod loader;
mod numeric;
pub mod output;
mod plan;
mod position;
mod read_all;
mod remote;
mod series;
mod source;
mod stream;
mod writer;

pub use bad_rows::{BadRow, BadRowReport, MAX_BAD_ROW_EXAMPLES};
pub use batch::{Batch, BatchColumn, ImageBatch, LabelBatch, SeriesBatch};
pub use column::{ColorMode, ColumnKind, ColumnSpec, SeriesLength, DEFAULT_MAX_IMAGE_PIXELS};
pub use error::DataError;
pub use heldout::{heldout_label_column, is_heldout};
pub use loader::{DataLoader, LoaderConfig};
pub use numeric::read_numeric_column;
pub use position::Position;
pub use read_all::{read_all, ReadOptions, Share, Table};
pub use source::{FileChunks, FileRead, ParquetSource};
pub use stream::{ExampleStream, StreamPosition};
pub use writer::{
    read_embeddings, write_embeddings, EmbedSummary, EmbeddingWriter, EmbeddingWriterOptions,
    Embeddings, EMBEDDING_COLUMN, ID_COLUMN,
};

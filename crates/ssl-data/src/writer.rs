//! Writing embeddings to Parquet: `(id: Utf8, embedding: FixedSizeList<Float32>[D])` plus
//! key-value metadata, streamed in row groups, renamed into place when complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::DataError;

/// Name of the id column of embedding files.
pub const ID_COLUMN: &str = "id";
/// Name of the embedding column of embedding files.
pub const EMBEDDING_COLUMN: &str = "embedding";

/// Options of an [`EmbeddingWriter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingWriterOptions {
    /// Rows buffered before a row group is written (default 8,192).
    pub rows_per_group: usize,
    /// zstd compression level, 1..=22 (default 1).
    pub zstd_level: i32,
}

impl Default for EmbeddingWriterOptions {
    fn default() -> Self {
        Self {
            rows_per_group: 8192,
            zstd_level: 1,
        }
    }
}

/// Streams embeddings into a Parquet file readable as is by pyarrow and pandas.
///
/// Rows go to a new temporary file beside `path`; [`EmbeddingWriter::finish`] writes the footer and renames it to
/// `path`. Dropping the writer without `finish` removes the temporary file, so `path` only
/// ever holds a complete file.
pub struct EmbeddingWriter {
    path: PathBuf,
    tmp: PathBuf,
    dim: usize,
    schema: Arc<Schema>,
    writer: Option<ArrowWriter<File>>,
    ids: Vec<String>,
    values: Vec<f32>,
    rows_per_group: usize,
    rows_written: usize,
}

impl EmbeddingWriter {
    /// Creates a temporary file beside `path` (refused when `path` exists and is not a regular
    /// file) for embeddings of dimension `dim`, with key-value metadata (e.g.
    /// `model`, `checkpoint`, `pooling`); `dimension` is always added.
    pub fn create<K, V>(
        path: impl AsRef<Path>,
        dim: usize,
        metadata: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, DataError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        Self::create_with_options(path, dim, metadata, EmbeddingWriterOptions::default())
    }

    /// [`EmbeddingWriter::create`] with explicit options.
    pub fn create_with_options<K, V>(
        path: impl AsRef<Path>,
        dim: usize,
        metadata: impl IntoIterator<Item = (K, V)>,
        options: EmbeddingWriterOptions,
    ) -> Result<Self, DataError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let path = path.as_ref().to_path_buf();
        let err = |reason: String| DataError::Write {
            path: path.clone(),
            reason,
        };
        if dim == 0 {
            return Err(err("embedding dimension must be at least 1".into()));
        }
        if options.rows_per_group == 0 {
            return Err(err("rows_per_group must be at least 1".into()));
        }
        let mut meta: BTreeMap<String, String> = metadata
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if let Some(d) = meta.get("dimension") {
            if d != &dim.to_string() {
                return Err(err(format!(
                    "metadata says dimension {d} but the writer's dimension is {dim}"
                )));
            }
        }
        meta.insert("dimension".into(), dim.to_string());
        let level = ZstdLevel::try_new(options.zstd_level).map_err(|e| err(e.to_string()))?;
        let fields = vec![
            Field::new(ID_COLUMN, DataType::Utf8, false),
            Field::new(
                EMBEDDING_COLUMN,
                DataType::FixedSizeList(
                    Arc::new(Field::new_list_field(DataType::Float32, true)),
                    dim as i32,
                ),
                false,
            ),
        ];
        let schema = Arc::new(Schema::new(fields).with_metadata(meta.clone()));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(options.rows_per_group))
            .set_key_value_metadata(Some(
                meta.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect(),
            ))
            .build();
        // Never through a link, device or directory at `path`: a new file beside it.
        let (file, tmp) = crate::output::create_temp_beside(&path)?;
        let writer = match ArrowWriter::try_new(file, schema.clone(), Some(props)) {
            Ok(w) => w,
            Err(source) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(DataError::Parquet { path: tmp, source });
            }
        };
        Ok(Self {
            path,
            tmp,
            dim,
            schema,
            writer: Some(writer),
            ids: Vec::new(),
            values: Vec::new(),
            rows_per_group: options.rows_per_group,
            rows_written: 0,
        })
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows written so far (buffered rows included).
    pub fn len(&self) -> usize {
        self.rows_written + self.ids.len()
    }

    /// True before any row was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends rows: `embeddings` holds `ids.len() * dim` values, row-major `(N, D)`.
    pub fn write<S: AsRef<str>>(&mut self, ids: &[S], embeddings: &[f32]) -> Result<(), DataError> {
        if embeddings.len() != ids.len() * self.dim {
            return Err(DataError::Write {
                path: self.path.clone(),
                reason: format!(
                    "expected {} x {} = {} embedding values for {} ids, found {}",
                    ids.len(),
                    self.dim,
                    ids.len() * self.dim,
                    ids.len(),
                    embeddings.len()
                ),
            });
        }
        self.ids.extend(ids.iter().map(|s| s.as_ref().to_string()));
        self.values.extend_from_slice(embeddings);
        if self.ids.len() >= self.rows_per_group {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let n = self.ids.len();
        let ids: ArrayRef = Arc::new(StringArray::from_iter_values(self.ids.drain(..)));
        let values = Float32Array::from(std::mem::take(&mut self.values));
        let item = Arc::new(Field::new_list_field(DataType::Float32, true));
        let tmp = self.tmp.clone();
        let arrow_err = |e: arrow::error::ArrowError| DataError::Arrow {
            path: tmp.clone(),
            column: EMBEDDING_COLUMN.into(),
            source: e,
        };
        let emb = FixedSizeListArray::try_new(item, self.dim as i32, Arc::new(values), None)
            .map_err(arrow_err)?;
        let batch = RecordBatch::try_new(self.schema.clone(), vec![ids, Arc::new(emb)])
            .map_err(arrow_err)?;
        if let Some(w) = self.writer.as_mut() {
            w.write(&batch).map_err(|source| DataError::Parquet {
                path: tmp.clone(),
                source,
            })?;
        }
        self.rows_written += n;
        Ok(())
    }

    /// Writes the remaining rows and the footer, and renames the temporary file to `path`
    /// (still absent or a regular file). Returns the number of rows written. On failure the
    /// temporary file is removed.
    pub fn finish(mut self) -> Result<usize, DataError> {
        self.flush()?;
        let tmp = self.tmp.clone();
        if let Some(w) = self.writer.take() {
            let synced = w
                .into_inner()
                .map_err(|source| DataError::Parquet {
                    path: tmp.clone(),
                    source,
                })
                .and_then(|file| {
                    file.sync_all().map_err(|source| DataError::Io {
                        path: tmp.clone(),
                        source,
                    })
                });
            if let Err(e) = synced {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        crate::output::move_into_place(&tmp, &self.path)?;
        Ok(self.rows_written)
    }
}

impl Drop for EmbeddingWriter {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl std::fmt::Debug for EmbeddingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingWriter")
            .field("path", &self.path)
            .field("dim", &self.dim)
            .field("rows", &self.len())
            .finish()
    }
}

/// Embeddings read back from a file written by [`EmbeddingWriter`] (or any file with an `id`
/// string column and an `embedding` fixed-size list of floats).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Row ids.
    pub ids: Vec<String>,
    /// `ids.len() * dim` values, row-major `(N, D)`.
    pub values: Vec<f32>,
    /// `D`.
    pub dim: usize,
    /// The file's key-value metadata (without Arrow's own schema entry).
    pub metadata: BTreeMap<String, String>,
}

/// Reads an embeddings file whole.
pub fn read_embeddings(path: impl AsRef<Path>) -> Result<Embeddings, DataError> {
    let path = path.as_ref().to_path_buf();
    if !path.is_file() {
        return Err(DataError::FileNotFound { path });
    }
    let pq = |source| DataError::Parquet {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
    let metadata: BTreeMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .filter(|kv| kv.key != "ARROW:schema")
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let schema = builder.schema().clone();
    let available = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect::<Vec<_>>()
    };
    for name in [ID_COLUMN, EMBEDDING_COLUMN] {
        if schema.field_with_name(name).is_err() {
            return Err(DataError::MissingColumn {
                path: path.clone(),
                column: name.into(),
                available: available(),
            });
        }
    }
    let emb_type = schema
        .field_with_name(EMBEDDING_COLUMN)
        .map(|f| f.data_type().clone())
        .unwrap_or(DataType::Null);
    let dim = match &emb_type {
        DataType::FixedSizeList(f, d)
            if matches!(f.data_type(), DataType::Float32 | DataType::Float64) =>
        {
            *d as usize
        }
        other => {
            return Err(DataError::WrongColumnType {
                path: path.clone(),
                column: EMBEDDING_COLUMN.into(),
                expected: "FixedSizeList<Float32>[D]".into(),
                found: other.to_string(),
            })
        }
    };
    let reader = builder.build().map_err(pq)?;
    let mut out = Embeddings {
        ids: Vec::new(),
        values: Vec::new(),
        dim,
        metadata,
    };
    let target = DataType::FixedSizeList(
        Arc::new(Field::new_list_field(DataType::Float32, true)),
        dim as i32,
    );
    for batch in reader {
        let batch = batch.map_err(|e| DataError::Parquet {
            path: path.clone(),
            source: parquet::errors::ParquetError::ArrowError(e.to_string()),
        })?;
        let arrow_err = |column: &str, source| DataError::Arrow {
            path: path.clone(),
            column: column.into(),
            source,
        };
        let ids_col = batch
            .column_by_name(ID_COLUMN)
            .cloned()
            .unwrap_or_else(|| arrow::array::new_null_array(&DataType::Utf8, 0));
        let ids =
            arrow::compute::cast(&ids_col, &DataType::Utf8).map_err(|e| arrow_err(ID_COLUMN, e))?;
        let emb_col = batch
            .column_by_name(EMBEDDING_COLUMN)
            .cloned()
            .unwrap_or_else(|| arrow::array::new_null_array(&target, 0));
        let emb =
            arrow::compute::cast(&emb_col, &target).map_err(|e| arrow_err(EMBEDDING_COLUMN, e))?;
        let ids = ids.as_string::<i32>();
        let emb = emb.as_fixed_size_list();
        let first = out.ids.len();
        for i in 0..batch.num_rows() {
            if ids.is_null(i) || emb.is_null(i) {
                return Err(DataError::BadRow {
                    path: path.clone(),
                    row: first + i,
                    column: if ids.is_null(i) {
                        ID_COLUMN
                    } else {
                        EMBEDDING_COLUMN
                    }
                    .into(),
                    reason: "null value".into(),
                });
            }
            out.ids.push(ids.value(i).to_string());
        }
        let values = emb.values().as_primitive::<arrow::datatypes::Float32Type>();
        let start = emb.offset() * dim;
        out.values
            .extend_from_slice(&values.values()[start..start + batch.num_rows() * dim]);
    }
    Ok(out)
}

/// What [`write_embeddings`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EmbedSummary {
    /// The Parquet file (`id`, `embedding`).
    pub out: PathBuf,
    /// Rows written.
    pub rows: usize,
    /// Embedding width.
    pub dim: usize,
}

impl std::fmt::Display for EmbedSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} embeddings of dimension {} to {}",
            self.rows,
            self.dim,
            self.out.display()
        )
    }
}

/// Writes `(id, embedding)` rows (`emb` row-major, `dim` wide) to the Parquet file `out`
/// with `meta` as key-value metadata, atomically (see [`EmbeddingWriter`]).
pub fn write_embeddings(
    out: &Path,
    ids: &[String],
    emb: &[f32],
    dim: usize,
    meta: BTreeMap<String, String>,
) -> Result<EmbedSummary, DataError> {
    let mut writer = EmbeddingWriter::create(out, dim, meta)?;
    writer.write(ids, emb)?;
    let rows = writer.finish()?;
    Ok(EmbedSummary {
        out: out.to_path_buf(),
        rows,
        dim,
    })
}

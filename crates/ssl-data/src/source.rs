//! A set of Parquet files read as one data set: path and URL resolution, schema checks, row
//! groups.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::{ChunkReader, Length};

use crate::column::{ColumnKind, ColumnSpec};
use crate::error::DataError;
use crate::remote::{self, RemoteObject};

/// Where a file's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    /// A local file (at `SourceFile::path`).
    Local,
    /// An object in object storage.
    Remote(Arc<RemoteObject>),
}

/// One Parquet file of a source, with its footer already parsed.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    /// The file's name in messages: its local path, or its URL for a remote object.
    pub(crate) path: PathBuf,
    /// The same as text, as [`ParquetSource::files`] gives it.
    pub(crate) name: String,
    pub(crate) location: Location,
    /// File name without extension, used for default row ids (`stem:row`).
    pub(crate) stem: String,
    pub(crate) meta: ArrowReaderMetadata,
    /// Rows of each row group.
    pub(crate) rg_rows: Vec<usize>,
    /// Index (within the file) of the first row of each row group.
    pub(crate) rg_first_row: Vec<usize>,
}

/// A row group of a source: the unit of work of the loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowGroupRef {
    /// Index of the file in the source.
    pub(crate) file: usize,
    /// Index of the row group in its file.
    pub(crate) row_group: usize,
    /// Number of rows.
    pub(crate) rows: usize,
}

/// A data set made of one or more Parquet files.
///
/// Opening reads only the footers (schema and row-group sizes); data is read later, one row
/// group at a time, and only for the requested columns. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ParquetSource {
    files: Arc<Vec<SourceFile>>,
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn is_parquet(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("parq"))
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        entries.push(entry.map_err(io)?.path());
    }
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_dir(&path, out)?;
        } else if is_parquet(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// A file or object named by the user's paths and URLs.
#[derive(Debug)]
pub(crate) enum Resolved {
    Local(PathBuf),
    Remote(Arc<RemoteObject>),
}

/// Expands files, directories (recursively, `*.parquet`, sorted), glob patterns (sorted) and
/// object-store URLs (see [`remote::resolve_url`]; `file://` URLs are local paths).
pub(crate) fn resolve_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Resolved>, DataError> {
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let text = p.to_string_lossy();
        if let Some(local) = remote::file_url_path(&text) {
            out.extend(resolve_paths(&[local])?);
            continue;
        }
        if remote::is_url(&text) && !p.exists() {
            out.extend(
                remote::resolve_url(&text)?
                    .into_iter()
                    .map(|o| Resolved::Remote(Arc::new(o))),
            );
            continue;
        }
        let mut local = Vec::new();
        resolve_local(p, &text, &mut local)?;
        out.extend(local.into_iter().map(Resolved::Local));
    }
    if out.is_empty() {
        return Err(DataError::NoFiles {
            pattern: "(no paths given)".into(),
        });
    }
    Ok(out)
}

/// Expands one local file, directory or glob pattern into `out`.
fn resolve_local(p: &Path, text: &str, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    if p.is_file() {
        out.push(p.to_path_buf());
    } else if p.is_dir() {
        let before = out.len();
        collect_dir(p, out)?;
        if out.len() == before {
            return Err(DataError::NoFiles {
                pattern: text.to_string(),
            });
        }
    } else if has_glob_chars(text) {
        let entries = glob::glob(text).map_err(|e| DataError::Glob {
            pattern: text.to_string(),
            reason: e.to_string(),
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(DataError::NoFiles {
                pattern: text.to_string(),
            });
        }
        out.extend(found);
    } else {
        return Err(DataError::FileNotFound {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// Opens every resolved file: local footers read in turn, remote ones fetched concurrently.
fn open_files(resolved: Vec<Resolved>) -> Result<Vec<SourceFile>, DataError> {
    let mut remote = Vec::new();
    let mut files = Vec::with_capacity(resolved.len());
    for (i, r) in resolved.into_iter().enumerate() {
        match r {
            Resolved::Local(path) => files.push(Some(open_local(path)?)),
            Resolved::Remote(object) => {
                remote.push((i, object));
                files.push(None);
            }
        }
    }
    if !remote.is_empty() {
        let objects: Vec<Arc<RemoteObject>> = remote.iter().map(|(_, o)| o.clone()).collect();
        let metas = remote::load_metadata(&objects)?;
        for ((i, object), meta) in remote.into_iter().zip(metas) {
            let path = PathBuf::from(&object.url);
            let stem = object.stem();
            files[i] = Some(source_file(path, stem, Location::Remote(object), meta));
        }
    }
    Ok(files.into_iter().flatten().collect())
}

fn open_local(path: PathBuf) -> Result<SourceFile, DataError> {
    let file = File::open(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|source| {
        DataError::Parquet {
            path: path.clone(),
            source,
        }
    })?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(source_file(path, stem, Location::Local, meta))
}

fn source_file(
    path: PathBuf,
    stem: String,
    location: Location,
    meta: ArrowReaderMetadata,
) -> SourceFile {
    let mut rg_rows = Vec::new();
    let mut rg_first_row = Vec::new();
    let mut first = 0usize;
    for rg in meta.metadata().row_groups() {
        let rows = usize::try_from(rg.num_rows()).unwrap_or(0);
        rg_first_row.push(first);
        rg_rows.push(rows);
        first += rows;
    }
    let name = match &location {
        Location::Remote(object) => object.url.clone(),
        Location::Local => path.display().to_string(),
    };
    SourceFile {
        path,
        name,
        location,
        stem,
        meta,
        rg_rows,
        rg_first_row,
    }
}

/// The bytes of one file of a [`ParquetSource`] for the `parquet` crate's readers (see
/// [`ParquetSource::reader_builder`]): a local file, or the column chunks fetched from an object
/// in object storage (any other range is fetched when read).
pub struct FileChunks(Chunks);

enum Chunks {
    Local(File),
    Remote(remote::RemoteReader),
}

/// A sequential read of a [`FileChunks`], as the `parquet` crate's readers ask for one.
pub struct FileRead(ReadInner);

enum ReadInner {
    Local(<File as ChunkReader>::T),
    Remote(remote::RemoteRead),
}

impl std::io::Read for FileRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            ReadInner::Local(r) => r.read(buf),
            ReadInner::Remote(r) => r.read(buf),
        }
    }
}

impl Length for FileChunks {
    fn len(&self) -> u64 {
        match &self.0 {
            Chunks::Local(f) => f.len(),
            Chunks::Remote(r) => r.len(),
        }
    }
}

impl ChunkReader for FileChunks {
    type T = FileRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<FileRead> {
        Ok(FileRead(match &self.0 {
            Chunks::Local(f) => ReadInner::Local(f.get_read(start)?),
            Chunks::Remote(r) => ReadInner::Remote(r.get_read(start)?),
        }))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        match &self.0 {
            Chunks::Local(f) => f.get_bytes(start, length),
            Chunks::Remote(r) => r.get_bytes(start, length),
        }
    }
}

impl std::fmt::Debug for FileChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Chunks::Local(file) => f.debug_tuple("FileChunks::Local").field(file).finish(),
            Chunks::Remote(_) => f.write_str("FileChunks::Remote"),
        }
    }
}

fn is_int(t: &DataType) -> bool {
    t.is_integer()
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn list_child(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            Some(f.data_type())
        }
        _ => None,
    }
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float32 | DataType::Float64)
}

/// Depth of a series type: 1 for `list<float>`, 2 for `list<list<float>>`.
pub(crate) fn series_depth(t: &DataType) -> Option<usize> {
    let child = list_child(t)?;
    if is_float(child) {
        return Some(1);
    }
    let grandchild = list_child(child)?;
    is_float(grandchild).then_some(2)
}

/// Whether an Arrow type can be decoded as `kind`.
pub(crate) fn type_fits(kind: &ColumnKind, t: &DataType) -> bool {
    match kind {
        ColumnKind::Text => is_string(t),
        ColumnKind::Image { .. } => {
            is_binary(t)
                || matches!(t, DataType::Struct(fields)
                    if fields.iter().any(|f| f.name() == "bytes" && is_binary(f.data_type())))
        }
        ColumnKind::RawPixels { .. } => list_child(t) == Some(&DataType::UInt8),
        ColumnKind::Series { .. } => series_depth(t).is_some(),
        ColumnKind::Label { .. } | ColumnKind::Id => is_int(t) || is_string(t),
    }
}

fn list_of(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(t, true)))
}

/// Converts a column to the one canonical Arrow type the decoders handle for its kind.
pub(crate) fn canonicalize(
    kind: &ColumnKind,
    array: ArrayRef,
) -> Result<ArrayRef, arrow::error::ArrowError> {
    use arrow::compute::cast;
    let target = match kind {
        ColumnKind::Text => DataType::Utf8,
        ColumnKind::Image { .. } => {
            if let DataType::Struct(_) = array.data_type() {
                let s = array.as_struct();
                let bytes = s.column_by_name("bytes").cloned().ok_or_else(|| {
                    arrow::error::ArrowError::SchemaError("struct has no 'bytes' field".into())
                })?;
                // A null struct row means a null image: carry the struct's validity over.
                let bytes = match s.nulls() {
                    Some(nulls) if nulls.null_count() > 0 => {
                        let merged = arrow::buffer::NullBuffer::union(Some(nulls), bytes.nulls());
                        let data = bytes.to_data().into_builder().nulls(merged).build()?;
                        arrow::array::make_array(data)
                    }
                    _ => bytes,
                };
                return canonicalize(kind, bytes);
            }
            DataType::Binary
        }
        ColumnKind::RawPixels { .. } => list_of(DataType::UInt8),
        ColumnKind::Series { .. } => match series_depth(array.data_type()) {
            Some(2) => list_of(list_of(DataType::Float32)),
            _ => list_of(DataType::Float32),
        },
        ColumnKind::Label { .. } | ColumnKind::Id => {
            if is_int(array.data_type()) && matches!(kind, ColumnKind::Label { .. }) {
                DataType::Int64
            } else {
                DataType::Utf8
            }
        }
    };
    if array.data_type() == &target {
        Ok(array)
    } else {
        cast(&array, &target)
    }
}

impl ParquetSource {
    /// Opens a source from files, directories (all `*.parquet` below, sorted), glob patterns
    /// (e.g. `data/ucr/*_TRAIN.parquet`) and object-store URLs, in the order given.
    ///
    /// A URL (`s3://bucket/prefix/`, `gs://`, `az://`, `http(s)://`) names objects in object
    /// storage: a key ending in `/` (or none) every `*.parquet` object under it, sorted by key; a
    /// key with `*`, `?` or `[` the objects it matches; any other key the object with that key,
    /// or when there is none every `*.parquet` object under it. Credentials, region and endpoint
    /// come from the store's usual environment variables: for S3 and S3-compatible servers
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) and `AWS_ALLOW_HTTP`; for
    /// Google Cloud Storage `GOOGLE_*`, for Azure `AZURE_*`. Opening reads each object's footer
    /// by one ranged GET (many objects at once); data is read later, row group by row group,
    /// by ranged GETs of the requested columns' chunks. `file://` URLs are local paths.
    ///
    /// Errors when a path does not exist, a pattern or prefix matches nothing, a file is not
    /// Parquet, the files hold no rows at all, or object storage fails (naming the URL and the
    /// environment variables to check).
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DataError> {
        let files = open_files(resolve_paths(paths)?)?;
        let source = Self {
            files: Arc::new(files),
        };
        if source.num_rows() == 0 {
            return Err(DataError::EmptyDataset {
                what: format!("{} holds no rows", source.describe_files()),
            });
        }
        Ok(source)
    }

    /// "a.parquet, b.parquet" (shortened when there are many files), for messages.
    pub(crate) fn describe_files(&self) -> String {
        let names: Vec<String> = self.files.iter().take(5).map(|f| f.name.clone()).collect();
        let more = self.files.len().saturating_sub(5);
        if more > 0 {
            format!("{} and {more} more files", names.join(", "))
        } else {
            names.join(", ")
        }
    }

    /// The files of the source, in reading order: local paths, and URLs for objects in object
    /// storage (`s3://bucket/data/part-0.parquet`).
    pub fn files(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }

    /// Number of files (local files and remote objects).
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// Total number of rows over all files.
    pub fn num_rows(&self) -> usize {
        self.files
            .iter()
            .map(|f| f.rg_rows.iter().sum::<usize>())
            .sum()
    }

    /// Total number of row groups over all files.
    pub fn num_row_groups(&self) -> usize {
        self.files.iter().map(|f| f.rg_rows.len()).sum()
    }

    /// Column names and Arrow types of the first file.
    pub fn schema(&self) -> Vec<(String, DataType)> {
        self.files[0]
            .meta
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    }

    /// Whether the first file has a column named `name`.
    pub fn has_column(&self, name: &str) -> bool {
        self.files[0]
            .meta
            .schema()
            .fields()
            .iter()
            .any(|f| f.name() == name)
    }

    pub(crate) fn file(&self, index: usize) -> &SourceFile {
        &self.files[index]
    }

    /// Every row group, files in order, row groups in file order.
    pub(crate) fn row_groups(&self) -> Vec<RowGroupRef> {
        let mut out = Vec::with_capacity(self.num_row_groups());
        for (file, f) in self.files.iter().enumerate() {
            for (row_group, &rows) in f.rg_rows.iter().enumerate() {
                out.push(RowGroupRef {
                    file,
                    row_group,
                    rows,
                });
            }
        }
        out
    }

    /// Checks that every file has every column with a type that fits its kind.
    pub fn check_columns(&self, columns: &[ColumnSpec]) -> Result<(), DataError> {
        for f in self.files.iter() {
            let schema = f.meta.schema();
            for spec in columns {
                let field =
                    schema
                        .field_with_name(&spec.name)
                        .map_err(|_| DataError::MissingColumn {
                            path: f.path.clone(),
                            column: spec.name.clone(),
                            available: schema.fields().iter().map(|f| f.name().clone()).collect(),
                        })?;
                if !type_fits(&spec.kind, field.data_type()) {
                    return Err(DataError::WrongColumnType {
                        path: f.path.clone(),
                        column: spec.name.clone(),
                        expected: format!(
                            "{} for a {} column",
                            spec.kind.expected_types(),
                            spec.kind.name()
                        ),
                        found: field.data_type().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads the given columns of one row group, each converted to its kind's canonical type,
    /// in the order of `columns`.
    pub(crate) fn read_row_group(
        &self,
        file: usize,
        row_group: usize,
        columns: &[ColumnSpec],
    ) -> Result<Vec<ArrayRef>, DataError> {
        let f = &self.files[file];
        let schema = f.meta.schema();
        let mut roots = Vec::with_capacity(columns.len());
        for spec in columns {
            let idx = schema
                .index_of(&spec.name)
                .map_err(|_| DataError::MissingColumn {
                    path: f.path.clone(),
                    column: spec.name.clone(),
                    available: schema.fields().iter().map(|f| f.name().clone()).collect(),
                })?;
            roots.push(idx);
        }
        let batches = self.read_batches(file, row_group, &roots)?;
        let mut out = Vec::with_capacity(columns.len());
        for spec in columns {
            let arrow_err = |source| DataError::Arrow {
                path: f.path.clone(),
                column: spec.name.clone(),
                source,
            };
            let parts: Vec<ArrayRef> = batches
                .iter()
                .filter_map(|b| b.column_by_name(&spec.name).cloned())
                .collect();
            let array = match parts.len() {
                0 => arrow::array::new_empty_array(
                    schema
                        .field_with_name(&spec.name)
                        .map_err(arrow_err)?
                        .data_type(),
                ),
                1 => parts[0].clone(),
                _ => {
                    let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
                    arrow::compute::concat(&refs).map_err(arrow_err)?
                }
            };
            out.push(canonicalize(&spec.kind, array).map_err(arrow_err)?);
        }
        Ok(out)
    }

    /// Reads the root columns `roots` (indices in the file's Arrow schema) of one row group as
    /// record batches.
    pub(crate) fn read_batches(
        &self,
        file: usize,
        row_group: usize,
        roots: &[usize],
    ) -> Result<Vec<RecordBatch>, DataError> {
        let f = &self.files[file];
        let batches = self
            .reader_builder(file, &[row_group], roots)?
            .with_batch_size(f.rg_rows[row_group].max(1))
            .build()
            .map_err(|source| DataError::Parquet {
                path: f.path.clone(),
                source,
            })?;
        batches
            .map(|batch| {
                batch.map_err(|e| DataError::Parquet {
                    path: f.path.clone(),
                    source: parquet::errors::ParquetError::ArrowError(format!(
                        "row group {row_group}: {e}"
                    )),
                })
            })
            .collect()
    }

    /// The `parquet` crate's Arrow reader over some row groups of one file of the source,
    /// reading the root columns `roots` (indices in the file's Arrow schema, as in
    /// [`ParquetSource::file_schema`]), for readers this crate does not provide (row
    /// selections, other batch sizes). The caller may set more options and `build()` it.
    ///
    /// A local file is read through its handle; for an object in object storage the column
    /// chunks of those columns in `row_groups` are fetched now, by ranged GETs, and held in
    /// memory by the reader: pass a few row groups at a time.
    pub fn reader_builder(
        &self,
        file: usize,
        row_groups: &[usize],
        roots: &[usize],
    ) -> Result<ParquetRecordBatchReaderBuilder<FileChunks>, DataError> {
        let f = self
            .files
            .get(file)
            .ok_or_else(|| DataError::InvalidConfig {
                reason: format!(
                    "file index {file} is out of range: the source has {} files",
                    self.files.len()
                ),
            })?;
        let groups = f.rg_rows.len();
        if let Some(&bad) = row_groups.iter().find(|&&g| g >= groups) {
            return Err(DataError::InvalidConfig {
                reason: format!(
                    "row group {bad} is out of range: {} has {groups} row groups",
                    f.name
                ),
            });
        }
        let width = f.meta.schema().fields().len();
        if let Some(&bad) = roots.iter().find(|&&c| c >= width) {
            return Err(DataError::InvalidConfig {
                reason: format!(
                    "column index {bad} is out of range: {} has {width} columns",
                    f.name
                ),
            });
        }
        let mask = ProjectionMask::roots(f.meta.parquet_schema(), roots.iter().copied());
        let chunks = match &f.location {
            Location::Local => {
                FileChunks(Chunks::Local(File::open(&f.path).map_err(|source| {
                    DataError::Io {
                        path: f.path.clone(),
                        source,
                    }
                })?))
            }
            Location::Remote(object) => FileChunks(Chunks::Remote(remote::row_groups_reader(
                object,
                f.meta.metadata(),
                row_groups,
                &mask,
            )?)),
        };
        Ok(
            ParquetRecordBatchReaderBuilder::new_with_metadata(chunks, f.meta.clone())
                .with_projection(mask)
                .with_row_groups(row_groups.to_vec()),
        )
    }

    /// The Arrow schema of file `file` (whose column indices [`ParquetSource::reader_builder`]
    /// takes), or `None` past the last file.
    pub fn file_schema(&self, file: usize) -> Option<&arrow::datatypes::SchemaRef> {
        self.files.get(file).map(|f| f.meta.schema())
    }

    /// Rows of each row group of file `file`, from its footer (empty past the last file).
    pub fn row_group_rows(&self, file: usize) -> &[usize] {
        self.files.get(file).map_or(&[], |f| f.rg_rows.as_slice())
    }

    /// Sorted distinct non-null values of a string column over the whole source (all files,
    /// all row groups, whatever the rank), or `None` when the column holds integers.
    ///
    /// This is the class list a string label column is mapped with.
    pub fn class_names(&self, column: &str) -> Result<Option<Vec<String>>, DataError> {
        let spec = ColumnSpec::new(column, ColumnKind::Label { classes: None });
        self.check_columns(std::slice::from_ref(&spec))?;
        let mut names = BTreeSet::new();
        for (file, f) in self.files.iter().enumerate() {
            let field_type = f
                .meta
                .schema()
                .field_with_name(column)
                .map(|f| f.data_type().clone());
            if field_type.as_ref().is_ok_and(is_int) {
                return Ok(None);
            }
            for rg in 0..f.rg_rows.len() {
                let arrays = self.read_row_group(file, rg, std::slice::from_ref(&spec))?;
                let strings = arrays[0].as_string::<i32>();
                for v in strings.iter().flatten() {
                    if !names.contains(v) {
                        names.insert(v.to_string());
                    }
                }
            }
        }
        Ok(Some(names.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_depths() {
        let l1 = list_of(DataType::Float64);
        let l2 = list_of(list_of(DataType::Float32));
        assert_eq!(series_depth(&l1), Some(1));
        assert_eq!(series_depth(&l2), Some(2));
        assert_eq!(series_depth(&list_of(DataType::Int32)), None);
        assert_eq!(series_depth(&DataType::Float32), None);
    }

    #[test]
    fn kinds_accept_their_types() {
        let text = ColumnKind::Text;
        assert!(type_fits(&text, &DataType::LargeUtf8));
        assert!(!type_fits(&text, &DataType::Int64));
        let label = ColumnKind::Label { classes: None };
        assert!(type_fits(&label, &DataType::UInt8));
        assert!(type_fits(&label, &DataType::Utf8));
        assert!(!type_fits(&label, &DataType::Float32));
        let raw = ColumnKind::RawPixels { shape: [1, 2, 2] };
        assert!(type_fits(&raw, &list_of(DataType::UInt8)));
        assert!(!type_fits(&raw, &list_of(DataType::Int8)));
    }

    #[test]
    fn missing_paths_are_named() {
        let err = resolve_paths(&["/definitely/not/here.parquet"]).unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here.parquet"));
        let err = resolve_paths(&["/definitely/not/*.parquet"]).unwrap_err();
        assert!(matches!(err, DataError::NoFiles { .. }));
        let err = resolve_paths(&["file:///definitely/not/here.parquet"]).unwrap_err();
        assert!(matches!(err, DataError::FileNotFound { .. }), "{err:?}");
        let err = resolve_paths(&["ftp://host/x.parquet"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://host/x.parquet") && err.contains("unsupported scheme"));
    }

    #[test]
    fn file_urls_are_local_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.parquet");
        std::fs::write(&path, b"x").unwrap();
        let url = format!("file://{}", path.display());
        let resolved = resolve_paths(&[url]).unwrap();
        assert!(
            matches!(&resolved[..], [Resolved::Local(p)] if *p == path),
            "{resolved:?}"
        );
    }
}

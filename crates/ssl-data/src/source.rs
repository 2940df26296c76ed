//! A set of files read as one data set: path and URL resolution, schema checks, row groups.
//!
//! Parquet files are read through their footers and row groups; JSON Lines, CSV, TSV and text
//! files ([`crate::lines`]) and image folders ([`crate::images`]) are cut into units that
//! stand in for row groups, so everything downstream (the plan, the loader, positions) is
//! the same for every format.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::{ChunkReader, Length};

use crate::column::{ColumnKind, ColumnSpec};
use crate::error::DataError;
use crate::images::{is_image, ImageSet};
use crate::lines::{LineFile, LineFormat, RowProblem};
use crate::remote::{self, RemoteObject};

/// Where a file's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    /// A local file (at `SourceFile::path`).
    Local,
    /// An object in object storage.
    Remote(Arc<RemoteObject>),
}

/// What a file of a source is, with what opening it found.
#[derive(Debug, Clone)]
pub(crate) enum FileKind {
    /// A Parquet file, its footer parsed.
    Parquet {
        /// Where its bytes are.
        location: Location,
        /// Its footer.
        meta: ArrowReaderMetadata,
    },
    /// A JSON Lines, CSV, TSV or text file, scanned into units.
    Lines(Arc<LineFile>),
    /// A folder (or list) of image files.
    Images(Arc<ImageSet>),
}

/// One file of a source (a Parquet file, a line-based file or an image folder), opened.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    /// The file's name in messages: its local path, or its URL for a remote object.
    pub(crate) path: PathBuf,
    /// The same as text, as [`ParquetSource::files`] gives it.
    pub(crate) name: String,
    /// File name without extension, used for default row ids (`stem:row`).
    pub(crate) stem: String,
    /// Its columns.
    pub(crate) schema: SchemaRef,
    /// Its format and what opening it found.
    pub(crate) kind: FileKind,
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

/// A data set made of one or more files: Parquet, JSON Lines, CSV / TSV, plain text, or image
/// folders.
///
/// Opening reads only the Parquet footers (schema and row-group sizes), scans line-based files
/// for their record boundaries and lists image folders; data is read later, one row group (or
/// unit of records or images, which stands in for one) at a time, and only for the requested
/// columns. Cheap to clone.
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

/// The files below a directory, by kind, each list sorted by path.
#[derive(Default)]
struct Found {
    parquet: Vec<PathBuf>,
    lines: Vec<PathBuf>,
    /// Image files with their sizes.
    images: Vec<(PathBuf, u64)>,
}

/// Collects the Parquet files, the line-based files and the image files (with their sizes)
/// below `dir`, recursively, sorted by path.
fn collect_dir(dir: &Path, found: &mut Found) -> Result<(), DataError> {
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
            collect_dir(&path, found)?;
        } else if is_parquet(&path) {
            found.parquet.push(path);
        } else if !path.is_file() {
            continue;
        } else if LineFormat::from_path(&path).is_some() {
            found.lines.push(path);
        } else if is_image(&path) {
            let size = std::fs::metadata(&path).map_err(io)?.len();
            found.images.push((path, size));
        }
    }
    Ok(())
}

/// A file or object named by the user's paths and URLs.
#[derive(Debug)]
pub(crate) enum Resolved {
    Local(PathBuf),
    Remote(Arc<RemoteObject>),
    /// Image files: a folder's (`root` the folder) or ones named one by one (`root` empty),
    /// with their sizes.
    Images {
        root: PathBuf,
        images: Vec<(PathBuf, u64)>,
    },
}

/// Expands files, directories (recursively, sorted: the Parquet files below, or when there
/// are none the line-based files, or when there are none of those the image files, as one
/// image folder), glob patterns (sorted) and object-store URLs
/// (see [`remote::resolve_url`]; `file://` URLs are local paths). Image files named directly
/// or by a glob form one image set with the image files next to them in the list.
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
        resolve_local(p, &text, &mut out)?;
    }
    if out.is_empty() {
        return Err(DataError::NoFiles {
            pattern: "(no paths given)".into(),
        });
    }
    Ok(out)
}

/// Adds one local file to `out`: an image joins the image list at the end of `out` (or
/// starts one).
fn push_file(path: PathBuf, out: &mut Vec<Resolved>) -> Result<(), DataError> {
    if !is_image(&path) {
        out.push(Resolved::Local(path));
        return Ok(());
    }
    let size = std::fs::metadata(&path)
        .map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    match out.last_mut() {
        Some(Resolved::Images { root, images }) if root.as_os_str().is_empty() => {
            images.push((path, size));
        }
        _ => out.push(Resolved::Images {
            root: PathBuf::new(),
            images: vec![(path, size)],
        }),
    }
    Ok(())
}

/// Expands one local file, directory or glob pattern into `out`.
fn resolve_local(p: &Path, text: &str, out: &mut Vec<Resolved>) -> Result<(), DataError> {
    if p.is_file() {
        push_file(p.to_path_buf(), out)?;
    } else if p.is_dir() {
        // The Parquet files below, or when there are none the JSON Lines, CSV and text files,
        // or when there are none of those either the images (so a README.txt or labels.csv
        // beside Parquet files is not read as data).
        let mut found = Found::default();
        collect_dir(p, &mut found)?;
        if !found.parquet.is_empty() {
            out.extend(found.parquet.into_iter().map(Resolved::Local));
        } else if !found.lines.is_empty() {
            out.extend(found.lines.into_iter().map(Resolved::Local));
        } else if !found.images.is_empty() {
            out.push(Resolved::Images {
                root: p.to_path_buf(),
                images: found.images,
            });
        } else {
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
        for path in found {
            push_file(path, out)?;
        }
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
            Resolved::Images { root, images } => files.push(Some(open_images(root, images))),
            Resolved::Remote(object) => {
                let key = Path::new(&object.url);
                if LineFormat::from_path(key).is_some() || is_image(key) {
                    return Err(DataError::InvalidConfig {
                        reason: format!(
                            "{}: JSON Lines, CSV, text and image files are read from local paths only (object storage serves Parquet); copy it locally or convert it to Parquet",
                            object.url
                        ),
                    });
                }
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
            files[i] = Some(parquet_file(path, stem, Location::Remote(object), meta));
        }
    }
    Ok(files.into_iter().flatten().collect())
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn open_local(path: PathBuf) -> Result<SourceFile, DataError> {
    if let Some(format) = LineFormat::from_path(&path) {
        let lines = LineFile::open(&path, format)?;
        let rows: Vec<usize> = lines.units().iter().map(|u| u.rows).collect();
        let stem = file_stem(&path);
        return Ok(source_file(
            path,
            stem,
            lines.schema().clone(),
            FileKind::Lines(Arc::new(lines)),
            rows,
        ));
    }
    let file = File::open(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|source| {
        if is_parquet(&path) {
            DataError::Parquet {
                path: path.clone(),
                source,
            }
        } else {
            DataError::UnknownFormat { path: path.clone() }
        }
    })?;
    let stem = file_stem(&path);
    Ok(parquet_file(path, stem, Location::Local, meta))
}

/// An image set as a file of the source, named by its folder (or its first image).
fn open_images(root: PathBuf, images: Vec<(PathBuf, u64)>) -> SourceFile {
    let path = if root.as_os_str().is_empty() {
        images.first().map(|(p, _)| p.clone()).unwrap_or_default()
    } else {
        root.clone()
    };
    let set = ImageSet::new(root, images);
    let stem = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into());
    let rows = set.unit_rows();
    source_file(
        path,
        stem,
        set.schema().clone(),
        FileKind::Images(Arc::new(set)),
        rows,
    )
}

fn parquet_file(
    path: PathBuf,
    stem: String,
    location: Location,
    meta: ArrowReaderMetadata,
) -> SourceFile {
    let rg_rows = meta
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| usize::try_from(rg.num_rows()).unwrap_or(0))
        .collect();
    let name = match &location {
        Location::Remote(object) => object.url.clone(),
        Location::Local => path.display().to_string(),
    };
    let schema = meta.schema().clone();
    let mut f = source_file(
        path,
        stem,
        schema,
        FileKind::Parquet { location, meta },
        rg_rows,
    );
    f.name = name;
    f
}

fn source_file(
    path: PathBuf,
    stem: String,
    schema: SchemaRef,
    kind: FileKind,
    rg_rows: Vec<usize>,
) -> SourceFile {
    let mut rg_first_row = Vec::with_capacity(rg_rows.len());
    let mut first = 0usize;
    for &rows in &rg_rows {
        rg_first_row.push(first);
        first += rows;
    }
    SourceFile {
        name: path.display().to_string(),
        path,
        stem,
        schema,
        kind,
        rg_rows,
        rg_first_row,
    }
}

/// The columns of one row group of a source, with what was found wrong in its rows and where
/// each row is (for messages).
#[derive(Debug)]
pub(crate) struct GroupRead {
    /// One array per requested column, converted to its kind's canonical type.
    pub(crate) arrays: Vec<ArrayRef>,
    /// Rows that could not be parsed (line-based files) or read (image files).
    pub(crate) problems: Vec<RowProblem>,
    place: Place,
}

/// Where the rows of a [`GroupRead`] are.
#[derive(Debug)]
enum Place {
    /// Rows of a Parquet row group: the row index says it all.
    Rows,
    /// Line numbers of the records of a line-based file.
    Lines(Vec<usize>),
    /// Images of an image set, from this one on.
    Images(Arc<ImageSet>, usize),
}

impl GroupRead {
    /// Where row `row` (within the group) is: "line 17", "image cat/x.png"; `None` for
    /// Parquet.
    pub(crate) fn locate(&self, row: usize) -> Option<String> {
        match &self.place {
            Place::Rows => None,
            Place::Lines(lines) => lines.get(row).map(|l| format!("line {l}")),
            Place::Images(set, first) => Some(format!("image {}", set.relative(first + row))),
        }
    }

    /// The image file of row `row` of an image set.
    pub(crate) fn image_file(&self, row: usize) -> Option<PathBuf> {
        match &self.place {
            Place::Images(set, first) => Some(set.file(first + row)),
            _ => None,
        }
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
    /// Local files may also be JSON Lines (`.jsonl`, `.ndjson`, `.json`), CSV (`.csv`), TSV
    /// (`.tsv`) or text (`.txt`, a document per line), and a directory without Parquet files
    /// is read for those, or when it has none of them as an image folder (`image`, `path` and,
    /// with class subfolders, `label` columns); see the crate README's "Other inputs".
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
    /// of a format read here (or not valid Parquet), the files hold no rows at all, or object storage fails (naming the URL and the
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
            .schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    }

    /// Whether the first file has a column named `name`.
    pub fn has_column(&self, name: &str) -> bool {
        self.files[0]
            .schema
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
            let schema = &f.schema;
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
    /// in the order of `columns`, with the rows found broken (line-based files, image files).
    pub(crate) fn read_row_group(
        &self,
        file: usize,
        row_group: usize,
        columns: &[ColumnSpec],
    ) -> Result<GroupRead, DataError> {
        let f = &self.files[file];
        let schema = &f.schema;
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
        let convert = |arrays: Vec<ArrayRef>| -> Result<Vec<ArrayRef>, DataError> {
            arrays
                .into_iter()
                .zip(columns)
                .map(|(a, spec)| {
                    canonicalize(&spec.kind, a).map_err(|source| DataError::Arrow {
                        path: f.path.clone(),
                        column: spec.name.clone(),
                        source,
                    })
                })
                .collect()
        };
        match &f.kind {
            FileKind::Parquet { .. } => {}
            FileKind::Lines(lines) => {
                let unit = lines.read_unit(row_group, &roots)?;
                return Ok(GroupRead {
                    arrays: convert(unit.arrays)?,
                    problems: unit.problems,
                    place: Place::Lines(unit.lines),
                });
            }
            FileKind::Images(set) => {
                let (arrays, problems) = set.read_unit(row_group, &roots)?;
                return Ok(GroupRead {
                    arrays: convert(arrays)?,
                    problems,
                    place: Place::Images(set.clone(), set.unit_start(row_group)),
                });
            }
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
        Ok(GroupRead {
            arrays: out,
            problems: Vec::new(),
            place: Place::Rows,
        })
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
        let (arrays, problems) = match &f.kind {
            FileKind::Parquet { .. } => return self.read_parquet_batches(file, row_group, roots),
            FileKind::Lines(lines) => {
                let unit = lines.read_unit(row_group, roots)?;
                (unit.arrays, unit.problems)
            }
            FileKind::Images(set) => set.read_unit(row_group, roots)?,
        };
        let fields: Vec<Field> = roots.iter().map(|&r| f.schema.field(r).clone()).collect();
        if let Some(p) = problems.first() {
            let column = p.column.map_or_else(
                || fields.first().map(|c| c.name().clone()).unwrap_or_default(),
                |k| fields[k].name().clone(),
            );
            return Err(DataError::BadRow {
                path: f.path.clone(),
                row: f.rg_first_row[row_group] + p.row,
                column,
                reason: p.reason.clone(),
            });
        }
        let batch =
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|source| {
                DataError::Arrow {
                    path: f.path.clone(),
                    column: String::new(),
                    source,
                }
            })?;
        Ok(vec![batch])
    }

    /// [`ParquetSource::read_batches`] for a Parquet file.
    fn read_parquet_batches(
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
        let f = self.checked(file, row_groups, roots)?;
        let (location, meta) = match &f.kind {
            FileKind::Parquet { location, meta } => (location, meta),
            _ => {
                return Err(DataError::InvalidConfig {
                    reason: format!(
                        "{} is {}, not Parquet: the Parquet reader cannot read it (ParquetSource::read_columns reads any format)",
                        f.name,
                        self.format(file).unwrap_or("not Parquet"),
                    ),
                })
            }
        };
        let mask = ProjectionMask::roots(meta.parquet_schema(), roots.iter().copied());
        let chunks = match location {
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
                meta.metadata(),
                row_groups,
                &mask,
            )?)),
        };
        Ok(
            ParquetRecordBatchReaderBuilder::new_with_metadata(chunks, meta.clone())
                .with_projection(mask)
                .with_row_groups(row_groups.to_vec()),
        )
    }

    /// The Arrow schema of file `file` (whose column indices [`ParquetSource::reader_builder`]
    /// takes), or `None` past the last file.
    pub fn file_schema(&self, file: usize) -> Option<&arrow::datatypes::SchemaRef> {
        self.files.get(file).map(|f| &f.schema)
    }

    /// The format of file `file`: "Parquet", "JSON Lines", "CSV", "TSV", "text" or "image
    /// folder"; `None` past the last file.
    pub fn format(&self, file: usize) -> Option<&'static str> {
        self.files.get(file).map(|f| match &f.kind {
            FileKind::Parquet { .. } => "Parquet",
            FileKind::Lines(lines) => lines.format().name(),
            FileKind::Images(_) => "image folder",
        })
    }

    /// Reads the root columns `roots` (indices in [`ParquetSource::file_schema`]) of one row
    /// group of file `file` (for a line-based file or an image folder, one unit of records or
    /// images), whatever the file's format, as record batches. A row that cannot be parsed or
    /// read is an error naming the file and its line (or image).
    pub fn read_columns(
        &self,
        file: usize,
        row_group: usize,
        roots: &[usize],
    ) -> Result<Vec<RecordBatch>, DataError> {
        self.checked(file, &[row_group], roots)?;
        self.read_batches(file, row_group, roots)
    }

    /// File `file`, once `row_groups` and the root columns `roots` are known to be in it
    /// (each out-of-range index an error naming the file).
    fn checked(
        &self,
        file: usize,
        row_groups: &[usize],
        roots: &[usize],
    ) -> Result<&SourceFile, DataError> {
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
        let width = f.schema.fields().len();
        if let Some(&bad) = roots.iter().find(|&&c| c >= width) {
            return Err(DataError::InvalidConfig {
                reason: format!(
                    "column index {bad} is out of range: {} has {width} columns",
                    f.name
                ),
            });
        }
        Ok(f)
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
                .schema
                .field_with_name(column)
                .map(|f| f.data_type().clone());
            if field_type.as_ref().is_ok_and(is_int) {
                return Ok(None);
            }
            for rg in 0..f.rg_rows.len() {
                let read = self.read_row_group(file, rg, std::slice::from_ref(&spec))?;
                let strings = read.arrays[0].as_string::<i32>();
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

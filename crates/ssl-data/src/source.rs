//! A set of Parquet files read as one data set: path resolution, schema checks, row groups.

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

use crate::column::{ColumnKind, ColumnSpec};
use crate::error::DataError;

/// One Parquet file of a source, with its footer already parsed.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    pub(crate) path: PathBuf,
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

/// Expands files, directories (recursively, `*.parquet`, sorted) and glob patterns (sorted).
pub(crate) fn resolve_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let text = p.to_string_lossy();
        if p.is_file() {
            out.push(p.to_path_buf());
        } else if p.is_dir() {
            let before = out.len();
            collect_dir(p, &mut out)?;
            if out.len() == before {
                return Err(DataError::NoFiles {
                    pattern: text.into_owned(),
                });
            }
        } else if has_glob_chars(&text) {
            let entries = glob::glob(&text).map_err(|e| DataError::Glob {
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
                    pattern: text.into_owned(),
                });
            }
            out.extend(found);
        } else {
            return Err(DataError::FileNotFound {
                path: p.to_path_buf(),
            });
        }
    }
    if out.is_empty() {
        return Err(DataError::NoFiles {
            pattern: "(no paths given)".into(),
        });
    }
    Ok(out)
}

fn open_file(path: PathBuf) -> Result<SourceFile, DataError> {
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
    let mut rg_rows = Vec::new();
    let mut rg_first_row = Vec::new();
    let mut first = 0usize;
    for rg in meta.metadata().row_groups() {
        let rows = usize::try_from(rg.num_rows()).unwrap_or(0);
        rg_first_row.push(first);
        rg_rows.push(rows);
        first += rows;
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(SourceFile {
        path,
        stem,
        meta,
        rg_rows,
        rg_first_row,
    })
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
    /// Opens a source from files, directories (all `*.parquet` below, sorted) and glob patterns
    /// (e.g. `data/ucr/*_TRAIN.parquet`), in the order given.
    ///
    /// Errors when a path does not exist, a pattern matches nothing, a file is not Parquet, or
    /// the files hold no rows at all.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DataError> {
        let resolved = resolve_paths(paths)?;
        let files = resolved
            .into_iter()
            .map(open_file)
            .collect::<Result<Vec<_>, _>>()?;
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
        let names: Vec<String> = self
            .files
            .iter()
            .take(5)
            .map(|f| f.path.display().to_string())
            .collect();
        let more = self.files.len().saturating_sub(5);
        if more > 0 {
            format!("{} and {more} more files", names.join(", "))
        } else {
            names.join(", ")
        }
    }

    /// The files of the source, in reading order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
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
        let parquet_err = |source| DataError::Parquet {
            path: f.path.clone(),
            source,
        };
        let handle = File::open(&f.path).map_err(|source| DataError::Io {
            path: f.path.clone(),
            source,
        })?;
        let mask = ProjectionMask::roots(f.meta.parquet_schema(), roots.iter().copied());
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(handle, f.meta.clone())
            .with_projection(mask)
            .with_row_groups(vec![row_group])
            .with_batch_size(f.rg_rows[row_group].max(1))
            .build()
            .map_err(parquet_err)?;
        let mut batches: Vec<RecordBatch> = Vec::new();
        for batch in reader {
            batches.push(batch.map_err(|e| DataError::Parquet {
                path: f.path.clone(),
                source: parquet::errors::ParquetError::ArrowError(e.to_string()),
            })?);
        }
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
    }
}

//! Parquet input and output of the `features` modality: sequences from a list column, labels,
//! ids; embeddings out.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::file::properties::WriterProperties;
use ssl_core::seq::SeqExample;

use crate::features::DataConfig;
use crate::CliError;

/// Sequences, ids and (optionally) string labels read from Parquet.
pub struct SeriesTable {
    /// One example per row (steps x features).
    pub series: Vec<SeqExample>,
    /// Row ids (the id column, or `file_stem:row`).
    pub ids: Vec<String>,
    /// Labels as strings (integers are formatted), when a label column was asked for.
    pub labels: Option<Vec<String>>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> CliError {
    CliError::Config(format!("{}: {msg}", path.display()))
}

/// Expands files, directories (their `*.parquet`) and glob patterns, sorted.
pub fn expand_paths(specs: &[String]) -> Result<Vec<PathBuf>, CliError> {
    let mut out = Vec::new();
    for spec in specs {
        let p = Path::new(spec);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| CliError::Io {
                    path: p.to_path_buf(),
                    source: e,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(err(p, "directory holds no .parquet files"));
            }
            out.extend(files);
        } else if spec.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> = glob::glob(spec)
                .map_err(|e| CliError::Config(format!("bad glob pattern {spec}: {e}")))?
                .filter_map(Result::ok)
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(CliError::Config(format!("no file matches {spec}")));
            }
            out.extend(files);
        } else if p.is_file() {
            out.push(p.to_path_buf());
        } else {
            return Err(err(p, "file not found"));
        }
    }
    if out.is_empty() {
        return Err(CliError::Config("no input files given".into()));
    }
    Ok(out)
}

/// Values of a float list (f32 or f64) as f32; `None` for other types.
fn float_values(arr: &dyn Array) -> Option<Vec<f32>> {
    match arr.data_type() {
        DataType::Float32 => Some(
            arr.as_primitive::<Float32Type>()
                .iter()
                .map(|v| v.unwrap_or(f32::NAN))
                .collect(),
        ),
        DataType::Float64 => Some(
            arr.as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.map_or(f32::NAN, |x| x as f32))
                .collect(),
        ),
        _ => None,
    }
}

fn list_items(arr: &dyn Array, row: usize) -> Option<ArrayRef> {
    match arr.data_type() {
        DataType::List(_) => Some(arr.as_list::<i32>().value(row)),
        DataType::LargeList(_) => Some(arr.as_list::<i64>().value(row)),
        DataType::FixedSizeList(_, _) => Some(arr.as_fixed_size_list().value(row)),
        _ => None,
    }
}

/// Decodes one row of a `list<float>` (1 feature) or `list<list<float>>` (features x length)
/// column into a (steps x features) example; nulls become NaN gaps.
fn decode_row(col: &dyn Array, row: usize) -> Result<SeqExample, String> {
    if col.is_null(row) {
        return Err("the value is null".into());
    }
    let items = list_items(col, row).ok_or("not a list")?;
    if let Some(v) = float_values(items.as_ref()) {
        let n = v.len();
        return SeqExample::new(v, n, 1).map_err(|e| e.to_string());
    }
    let channels: Vec<Vec<f32>> = (0..items.len())
        .map(|c| {
            if items.is_null(c) {
                return Err(format!("channel {c} is null"));
            }
            let inner = list_items(items.as_ref(), c).ok_or("expected list<list<float>>")?;
            float_values(inner.as_ref()).ok_or_else(|| {
                format!(
                    "channel {c} holds {} values, expected floats",
                    inner.data_type()
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let f = channels.len();
    let steps = channels.iter().map(Vec::len).max().unwrap_or(0);
    if f == 0 || steps == 0 {
        return Err("the sequence is empty".into());
    }
    let mut values = vec![f32::NAN; steps * f];
    for (c, ch) in channels.iter().enumerate() {
        for (t, v) in ch.iter().enumerate() {
            values[t * f + c] = *v;
        }
    }
    SeqExample::new(values, steps, f).map_err(|e| e.to_string())
}

fn scalar_string(arr: &dyn Array, row: usize) -> Option<String> {
    if arr.is_null(row) {
        return None;
    }
    let s = arrow::util::display::array_value_to_string(arr, row).ok()?;
    Some(s)
}

/// Reads the sequence column (and label / id columns) of every file.
pub fn read_series(
    specs: &[String],
    cfg: &DataConfig,
    label_column: Option<&str>,
) -> Result<SeriesTable, CliError> {
    let mut table = SeriesTable {
        series: Vec::new(),
        ids: Vec::new(),
        labels: label_column.map(|_| Vec::new()),
    };
    let mut skipped: Vec<String> = Vec::new();
    for path in expand_paths(specs)? {
        let file = File::open(&path).map_err(|e| CliError::Io {
            path: path.clone(),
            source: e,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(&path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let index_of = |name: &str| {
            schema.index_of(name).map_err(|_| {
                err(
                    &path,
                    format!("no column `{name}` (columns: {})", names.join(", ")),
                )
            })
        };
        let mut wanted = vec![index_of(&cfg.column)?];
        let label_idx = label_column.map(index_of).transpose()?;
        let id_idx = (!cfg.id_column.is_empty())
            .then(|| index_of(&cfg.id_column))
            .transpose()?;
        wanted.extend(label_idx);
        wanted.extend(id_idx);
        let col_type = schema.field(wanted[0]).data_type();
        if !matches!(
            col_type,
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _)
        ) {
            return Err(err(
                &path,
                format!(
                    "column `{}` is {col_type}, expected list<float> or list<list<float>>",
                    cfg.column
                ),
            ));
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), wanted.clone());
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| err(&path, e))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut row0 = 0usize;
        for batch in reader {
            let batch =
                batch.map_err(|e| err(&path, format!("reading rows after row {row0}: {e}")))?;
            let col = batch
                .column_by_name(&cfg.column)
                .ok_or_else(|| err(&path, "projected column missing"))?;
            let labels = label_column.and_then(|l| batch.column_by_name(l));
            let ids = id_idx.and_then(|_| batch.column_by_name(&cfg.id_column));
            for r in 0..batch.num_rows() {
                let row = row0 + r;
                let label = match labels {
                    Some(l) => match scalar_string(l.as_ref(), r) {
                        Some(s) => Some(s),
                        None => {
                            let msg = format!(
                                "{} row {row}: label `{}` is null",
                                path.display(),
                                label_column.unwrap_or_default()
                            );
                            if cfg.skip_bad_rows {
                                skipped.push(msg);
                                continue;
                            }
                            return Err(CliError::Config(msg));
                        }
                    },
                    None => None,
                };
                match decode_row(col.as_ref(), r) {
                    Ok(e) => {
                        table.series.push(e);
                        table.ids.push(
                            ids.and_then(|c| scalar_string(c.as_ref(), r))
                                .unwrap_or_else(|| format!("{stem}:{row}")),
                        );
                        if let (Some(ls), Some(l)) = (table.labels.as_mut(), label) {
                            ls.push(l);
                        }
                    }
                    Err(reason) => {
                        let msg = format!(
                            "{} row {row}, column `{}`: {reason}",
                            path.display(),
                            cfg.column
                        );
                        if cfg.skip_bad_rows {
                            skipped.push(msg);
                        } else {
                            return Err(CliError::Config(format!(
                                "{msg} (set data.skip_bad_rows = true to skip such rows)"
                            )));
                        }
                    }
                }
            }
            row0 += batch.num_rows();
        }
    }
    if !skipped.is_empty() {
        eprintln!("skipped {} bad rows; first: {}", skipped.len(), skipped[0]);
    }
    if table.series.is_empty() {
        return Err(CliError::Config(format!(
            "no sequences read from {}",
            specs.join(", ")
        )));
    }
    let f = table.series[0].features;
    if let Some(bad) = table.series.iter().position(|e| e.features != f) {
        return Err(CliError::Config(format!(
            "sequence {bad} ({}) has {} features, the first has {f}",
            table.ids[bad], table.series[bad].features
        )));
    }
    Ok(table)
}

/// Writes `(id, embedding: FixedSizeList<f32>[dim])` with key-value metadata, to a temporary
/// name first and renamed when complete.
pub fn write_embeddings(
    out: &Path,
    ids: &[String],
    emb: &[f32],
    dim: usize,
    mut meta: BTreeMap<String, String>,
) -> Result<(), CliError> {
    meta.insert("dimension".into(), dim.to_string());
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "embedding",
                DataType::FixedSizeList(item.clone(), dim as i32),
                false,
            ),
        ],
        meta.into_iter()
            .collect::<std::collections::HashMap<String, String>>(),
    ));
    let tmp = out.with_extension("parquet.tmp");
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| CliError::Io {
            path: parent.to_path_buf(),
            source: e,
        })?;
    }
    let file = File::create(&tmp).map_err(|e| CliError::Io {
        path: tmp.clone(),
        source: e,
    })?;
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| err(&tmp, e))?;
    const ROWS: usize = 8192;
    for (chunk, vectors) in ids.chunks(ROWS).zip(emb.chunks(ROWS * dim)) {
        let values = Float32Array::from(vectors.to_vec());
        let list = FixedSizeListArray::try_new(item.clone(), dim as i32, Arc::new(values), None)
            .map_err(|e| err(&tmp, e))?;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(chunk.to_vec())), Arc::new(list)],
        )
        .map_err(|e| err(&tmp, e))?;
        writer.write(&batch).map_err(|e| err(&tmp, e))?;
    }
    let file = writer.into_inner().map_err(|e| err(&tmp, e))?;
    file.sync_all().map_err(|e| CliError::Io {
        path: tmp.clone(),
        source: e,
    })?;
    std::fs::rename(&tmp, out).map_err(|e| CliError::Io {
        path: out.to_path_buf(),
        source: e,
    })
}

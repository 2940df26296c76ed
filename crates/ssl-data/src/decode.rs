//! Decoding the rows of one row group into [`Row`]s, column by column.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float32Array, Int64Array, ListArray, StringArray,
    UInt8Array,
};

use crate::bad_rows::BadRow;
use crate::column::{ColumnKind, ColumnSpec};
use crate::error::DataError;
use crate::image_decode::{decode_image, header_size, raw_pixels, Pixels};
use crate::series::{build_series_row, SeriesRow};
use crate::source::ParquetSource;

/// A column spec with what was resolved for it when the loader was built.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedColumn {
    pub(crate) spec: ColumnSpec,
    /// Class names of a label column (sorted distinct strings, or the user's list).
    pub(crate) classes: Option<Arc<[String]>>,
    /// Class name to id, for string label columns.
    pub(crate) class_index: Option<HashMap<String, i64>>,
}

/// One decoded value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Text(String),
    Pixels(Pixels),
    Series(SeriesRow),
    Label(i64),
    /// The id column's slot (the id itself is in [`Row::id`]).
    Id,
}

/// One decoded row: a value per column spec, its id and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) values: Vec<Value>,
    pub(crate) file: usize,
    pub(crate) row: usize,
}

/// A row of a row group after decoding: not needed (skipped on resume), good or bad.
pub(crate) type DecodedRow = Option<Result<Row, BadRow>>;

/// Typed view of one canonicalised column.
enum Col<'a> {
    Str(&'a StringArray),
    Bin(&'a BinaryArray),
    Int(&'a Int64Array),
    Bytes(&'a ListArray, &'a UInt8Array),
    Series1(&'a ListArray, &'a Float32Array),
    Series2(&'a ListArray, &'a ListArray, &'a Float32Array),
}

fn typed(array: &ArrayRef) -> Result<Col<'_>, String> {
    use arrow::datatypes::DataType as T;
    Ok(match array.data_type() {
        T::Utf8 => Col::Str(array.as_string::<i32>()),
        T::Binary => Col::Bin(array.as_binary::<i32>()),
        T::Int64 => Col::Int(array.as_primitive()),
        T::List(f) => {
            let list = array.as_list::<i32>();
            match f.data_type() {
                T::UInt8 => Col::Bytes(list, list.values().as_primitive()),
                T::Float32 => Col::Series1(list, list.values().as_primitive()),
                T::List(_) => {
                    let inner = list.values().as_list::<i32>();
                    Col::Series2(list, inner, inner.values().as_primitive())
                }
                other => return Err(format!("unexpected list item type {other}")),
            }
        }
        other => return Err(format!("unexpected column type {other}")),
    })
}

fn list_range(list: &ListArray, i: usize) -> std::ops::Range<usize> {
    let o = list.value_offsets();
    o[i] as usize..o[i + 1] as usize
}

fn floats(
    values: &Float32Array,
    range: std::ops::Range<usize>,
) -> impl ExactSizeIterator<Item = Option<f32>> + Clone + '_ {
    let nulls = values.nulls();
    let raw = values.values();
    range.map(move |j| match nulls {
        Some(n) if n.is_null(j) => None,
        _ => Some(raw[j]),
    })
}

fn decode_value(col: &ResolvedColumn, c: &Col<'_>, i: usize) -> Result<Value, String> {
    match (&col.spec.kind, c) {
        (ColumnKind::Text, Col::Str(a)) => Ok(Value::Text(a.value(i).to_string())),
        (ColumnKind::Id, Col::Str(_)) => Ok(Value::Id),
        (
            ColumnKind::Image {
                color,
                resize,
                max_pixels,
            },
            Col::Bin(a),
        ) => decode_image(a.value(i), *color, *resize, *max_pixels).map(Value::Pixels),
        (ColumnKind::RawPixels { shape }, Col::Bytes(list, values)) => {
            let r = list_range(list, i);
            if values
                .nulls()
                .is_some_and(|n| r.clone().any(|j| n.is_null(j)))
            {
                return Err("null pixel value".into());
            }
            raw_pixels(&values.values()[r], *shape).map(Value::Pixels)
        }
        (ColumnKind::Series { length, channels }, Col::Series1(list, values)) => {
            build_series_row(&[floats(values, list_range(list, i))], *length, *channels)
                .map(Value::Series)
        }
        (ColumnKind::Series { length, channels }, Col::Series2(outer, inner, values)) => {
            let mut chans = Vec::new();
            for j in list_range(outer, i) {
                if inner.is_null(j) {
                    return Err(format!(
                        "channel {} is null",
                        j - list_range(outer, i).start
                    ));
                }
                chans.push(floats(values, list_range(inner, j)));
            }
            build_series_row(&chans, *length, *channels).map(Value::Series)
        }
        (ColumnKind::Label { .. }, Col::Int(a)) => {
            let id = a.value(i);
            if let Some(classes) = &col.classes {
                if id < 0 || id as usize >= classes.len() {
                    return Err(format!(
                        "label id {id} is outside the class list 0..{}",
                        classes.len()
                    ));
                }
            }
            Ok(Value::Label(id))
        }
        (ColumnKind::Label { .. }, Col::Str(a)) => {
            let name = a.value(i);
            match col.class_index.as_ref().and_then(|m| m.get(name)) {
                Some(&id) => Ok(Value::Label(id)),
                None => {
                    let classes = col.classes.as_deref().unwrap_or(&[]);
                    let shown: Vec<&str> = classes.iter().take(10).map(String::as_str).collect();
                    Err(format!(
                        "label '{name}' is not in the class list ({} classes: {}{})",
                        classes.len(),
                        shown.join(", "),
                        if classes.len() > 10 { ", ..." } else { "" }
                    ))
                }
            }
        }
        (kind, _) => Err(format!(
            "internal: no decoder for a {} column of this type",
            kind.name()
        )),
    }
}

/// Reads and decodes one row group. `needed[r] == false` leaves row `r` undecoded (`None`).
/// Errors that concern the whole row group (I/O, Parquet) are returned as `Err`; a row that
/// cannot be decoded becomes `Some(Err(bad_row))`.
pub(crate) fn decode_row_group(
    source: &ParquetSource,
    file: usize,
    row_group: usize,
    columns: &[ResolvedColumn],
    needed: Option<&[bool]>,
) -> Result<Vec<DecodedRow>, DataError> {
    let f = source.file(file);
    let n = f.rg_rows[row_group];
    if needed.is_some_and(|m| !m.iter().any(|&b| b)) {
        return Ok(vec![None; n]);
    }
    let specs: Vec<ColumnSpec> = columns.iter().map(|c| c.spec.clone()).collect();
    let read = source.read_row_group(file, row_group, &specs)?;
    let arrays = &read.arrays;
    let mut cols = Vec::with_capacity(arrays.len());
    for (a, spec) in arrays.iter().zip(&specs) {
        if a.len() != n {
            return Err(DataError::BadRow {
                path: f.path.clone(),
                row: f.rg_first_row[row_group],
                column: spec.name.clone(),
                reason: format!(
                    "row group {row_group} declares {n} rows but the column holds {}",
                    a.len()
                ),
            });
        }
        cols.push(typed(a).map_err(|reason| DataError::WrongColumnType {
            path: f.path.clone(),
            column: spec.name.clone(),
            expected: spec.kind.expected_types().into(),
            found: reason,
        })?);
    }
    let id_col = columns.iter().position(|c| c.spec.kind == ColumnKind::Id);
    let first = f.rg_first_row[row_group];
    // Rows that could not be parsed or read, by row: (column index or the whole row, reason).
    let mut broken: HashMap<usize, (Option<usize>, &str)> = HashMap::new();
    for p in &read.problems {
        broken.entry(p.row).or_insert((p.column, p.reason.as_str()));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if needed.is_some_and(|m| !m[i]) {
            out.push(None);
            continue;
        }
        let row = first + i;
        if let Some(&(column, reason)) = broken.get(&i) {
            out.push(Some(Err(BadRow {
                path: f.path.clone(),
                row,
                column: specs[column.unwrap_or(0)].name.clone(),
                reason: reason.to_string(),
            })));
            continue;
        }
        let mut values = Vec::with_capacity(cols.len());
        let mut bad = None;
        for ((col, c), a) in columns.iter().zip(&cols).zip(arrays) {
            if let (ColumnKind::Image { max_pixels, .. }, Col::Bin(b)) = (&col.spec.kind, c) {
                if !a.is_null(i) {
                    if let Some((width, height)) = header_size(b.value(i)) {
                        if u64::from(width) * u64::from(height) > *max_pixels {
                            return Err(DataError::ImageTooLarge {
                                path: read.image_file(i).unwrap_or_else(|| f.path.clone()),
                                row,
                                column: col.spec.name.clone(),
                                width,
                                height,
                                limit: *max_pixels,
                            });
                        }
                    }
                }
            }
            let decoded = if a.is_null(i) {
                Err(format!(
                    "null value (expected a {} value)",
                    col.spec.kind.name()
                ))
            } else {
                decode_value(col, c, i)
            };
            match decoded {
                Ok(v) => values.push(v),
                Err(reason) => {
                    bad = Some(BadRow {
                        path: f.path.clone(),
                        row,
                        column: col.spec.name.clone(),
                        reason: match read.locate(i) {
                            Some(place) => format!("{place}: {reason}"),
                            None => reason,
                        },
                    });
                    break;
                }
            }
        }
        if let Some(bad) = bad {
            out.push(Some(Err(bad)));
            continue;
        }
        let id = match id_col.map(|k| &cols[k]) {
            Some(Col::Str(a)) => a.value(i).to_string(),
            _ => format!("{}:{row}", f.stem),
        };
        out.push(Some(Ok(Row {
            id,
            values,
            file,
            row,
        })));
    }
    Ok(out)
}

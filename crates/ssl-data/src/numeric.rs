//! One numeric column read whole, in row order: the shape of a long series stored one
//! observation per row (a sensor log, a weekly CO2 record), which windowing then cuts up.

use std::path::Path;

use arrow::array::{Array, Float64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;

use crate::{DataError, ParquetSource};

/// Reads a numeric (integer or float) column of every file, in file and row order, as `f64`.
/// Nulls become NaN, so gaps stay where they were. `paths` are what [`ParquetSource::open`]
/// takes: files, directories, globs and object-store URLs; the column is read row group by
/// row group (by ranged GETs for a remote object).
///
/// Errors name the file and column: a missing column, or a column that is not numeric.
pub fn read_numeric_column<P: AsRef<Path>>(
    paths: &[P],
    column: &str,
) -> Result<Vec<f64>, DataError> {
    let source = ParquetSource::open(paths)?;
    let mut out = Vec::with_capacity(source.num_rows());
    for file in 0..source.num_files() {
        let f = source.file(file);
        let path = &f.path;
        let fields = f.schema.fields().clone();
        let Some(idx) = fields.iter().position(|f| f.name() == column) else {
            return Err(DataError::MissingColumn {
                path: path.clone(),
                column: column.to_string(),
                available: fields.iter().map(|f| f.name().clone()).collect(),
            });
        };
        let dt = fields[idx].data_type();
        if !dt.is_numeric() {
            return Err(DataError::WrongColumnType {
                path: path.clone(),
                column: column.to_string(),
                expected: "a numeric column (integer or float), one observation per row".into(),
                found: dt.to_string(),
            });
        }
        for row_group in 0..f.rg_rows.len() {
            for batch in source.read_batches(file, row_group, &[idx])? {
                let arrow_err = |e| DataError::Arrow {
                    path: path.clone(),
                    column: column.to_string(),
                    source: e,
                };
                let col = cast(batch.column(0), &DataType::Float64).map_err(arrow_err)?;
                let Some(values) = col.as_any().downcast_ref::<Float64Array>() else {
                    return Err(DataError::WrongColumnType {
                        path: path.clone(),
                        column: column.to_string(),
                        expected: "Float64 after casting".into(),
                        found: col.data_type().to_string(),
                    });
                };
                out.extend((0..values.len()).map(|i| {
                    if values.is_null(i) {
                        f64::NAN
                    } else {
                        values.value(i)
                    }
                }));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use std::fs::File;
    use std::sync::Arc;

    #[test]
    fn reads_in_order_with_nulls_as_nan_and_names_bad_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Float64, true),
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Float64Array::from(vec![Some(1.5), None, Some(3.0)])),
                Arc::new(Int64Array::from(vec![7, 8, 9])),
                Arc::new(StringArray::from(vec!["a", "b", "c"])),
            ],
        )
        .unwrap();
        let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let v = read_numeric_column(&[&p], "v").unwrap();
        assert_eq!(v[0], 1.5);
        assert!(v[1].is_nan());
        assert_eq!(v[2], 3.0);
        assert_eq!(read_numeric_column(&[&p], "n").unwrap(), [7.0, 8.0, 9.0]);
        let e = read_numeric_column(&[&p], "s").unwrap_err().to_string();
        assert!(e.contains("'s'") && e.contains("a.parquet"), "{e}");
        let e = read_numeric_column(&[&p], "zz").unwrap_err().to_string();
        assert!(e.contains("'zz'") && e.contains("v, n, s"), "{e}");
    }
}

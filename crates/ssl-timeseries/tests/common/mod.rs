//! Small Parquet files the pipeline tests write.
// Each test file is its own crate and uses a subset of these.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Float32Builder, ListBuilder, StringArray};
use arrow::record_batch::RecordBatch;

/// Writes `columns` as one record batch to the Parquet file `path`.
pub fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// `rows` labelled sine waves of 32 steps (column `x`), two periods (`label`: `slow`,
/// `fast`); the file's path, as the pipelines take it.
pub fn labelled_series(path: &Path, rows: usize) -> Vec<String> {
    let mut x = ListBuilder::new(Float32Builder::new());
    let mut labels = Vec::new();
    for i in 0..rows {
        let period = [8.0f32, 3.0][i % 2];
        let v: Vec<f32> = (0..32).map(|t| ((t + i) as f32 / period).sin()).collect();
        x.values().append_slice(&v);
        x.append(true);
        labels.push(["slow", "fast"][i % 2]);
    }
    let labels: ArrayRef = Arc::new(StringArray::from(labels));
    write(path, vec![("x", Arc::new(x.finish())), ("label", labels)]);
    vec![path.display().to_string()]
}

/// One long series of `steps` steps (column `y`): a sine of period 6 on a slight trend.
pub fn long_series(path: &Path, steps: usize) -> Vec<String> {
    let y: Vec<f32> = (0..steps)
        .map(|t| (t as f32 / 6.0).sin() + 0.01 * t as f32)
        .collect();
    write(
        path,
        vec![("y", Arc::new(Float32Array::from(y)) as ArrayRef)],
    );
    vec![path.display().to_string()]
}

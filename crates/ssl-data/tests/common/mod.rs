//! Helpers shared by the behaviour tests: small Parquet files written on the fly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// Writes `columns` as a Parquet file with row groups of `rows_per_group` rows.
pub fn write(path: &Path, columns: Vec<(&str, ArrayRef)>, rows_per_group: usize) -> PathBuf {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    path.to_path_buf()
}

/// A file with `n` rows: `id` (Utf8 "p{prefix}-{i}"), `value` (Int64 i).
pub fn id_file(dir: &Path, name: &str, n: usize, rows_per_group: usize) -> PathBuf {
    let ids: ArrayRef = Arc::new(arrow::array::StringArray::from_iter_values(
        (0..n).map(|i| format!("{name}-{i}")),
    ));
    let values: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(0..n as i64));
    write(
        &dir.join(format!("{name}.parquet")),
        vec![("id", ids), ("value", values)],
        rows_per_group,
    )
}

/// PNG bytes of a `w x h` grey image whose pixel (x, y) is `seed + x + y`.
pub fn grey_png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img =
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([seed.wrapping_add((x + y) as u8)]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// JPEG bytes of a `w x h` RGB image.
pub fn rgb_jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// The first bytes of a grey PNG of `w x h` pixels: signature and IHDR (with its CRC), no
/// pixel data. Enough for a header check; decoding it fails.
#[allow(dead_code)]
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&w.to_be_bytes());
    chunk.extend_from_slice(&h.to_be_bytes());
    chunk.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    out
}

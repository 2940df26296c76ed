//! A synthetic image-caption set for tests, examples and benchmarks: coloured shapes on a
//! dark background, captioned with their colour and shape ("a red circle"), with `shape` and
//! `color` label columns for zero-shot checks. Seeded, so every run sees the same pairs.
//! [`write_parquet`] writes such a set as the Parquet file the pipeline reads.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use ssl_core::SslRng;
use ssl_vision::ImageSet;

use crate::data::PairSet;
use crate::{MultimodalError, Result};

/// The shapes drawn.
pub const SHAPES: [&str; 4] = ["square", "circle", "cross", "ring"];
/// The colours used, with their RGB values.
pub const COLORS: [(&str, [f32; 3]); 4] = [
    ("red", [1.0, 0.1, 0.1]),
    ("green", [0.1, 0.9, 0.1]),
    ("blue", [0.1, 0.2, 1.0]),
    ("yellow", [1.0, 0.9, 0.1]),
];

fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    match shape {
        0 => dx.abs() <= r && dy.abs() <= r,
        1 => d <= r,
        2 => (dx.abs() <= r / 3.0 && dy.abs() <= r) || (dy.abs() <= r / 3.0 && dx.abs() <= r),
        _ => d <= r && d >= r * 0.55,
    }
}

/// `n` RGB images of `size x size` pixels with captions and labels, from `seed`.
pub fn toy_pairs(n: usize, size: usize, seed: u64) -> Result<PairSet> {
    let mut rng = SslRng::derived(seed, "toy-pairs");
    let plane = size * size;
    let mut data = vec![0f32; n * 3 * plane];
    let mut captions = Vec::with_capacity(n);
    let mut shapes = Vec::with_capacity(n);
    let mut colors = Vec::with_capacity(n);
    let templates = [
        "a {c} {s}",
        "{c} {s}",
        "the {s} is {c}",
        "one {c} {s} on black",
    ];
    for i in 0..n {
        let s = rng.below(SHAPES.len());
        let c = rng.below(COLORS.len());
        let sz = size as f32;
        let r = sz * rng.uniform_range(0.2, 0.32);
        let cx = rng.uniform_range(r, sz - r);
        let cy = rng.uniform_range(r, sz - r);
        let rgb = COLORS[c].1;
        let img = &mut data[i * 3 * plane..(i + 1) * 3 * plane];
        for y in 0..size {
            for x in 0..size {
                let on = inside(s, x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, r);
                for (ch, v) in rgb.iter().enumerate() {
                    let base = if on { *v } else { 0.05 };
                    img[ch * plane + y * size + x] = (base + 0.05 * rng.normal()).clamp(0.0, 1.0);
                }
            }
        }
        let t = templates[rng.below(templates.len())];
        captions.push(t.replace("{c}", COLORS[c].0).replace("{s}", SHAPES[s]));
        shapes.push(SHAPES[s].to_string());
        colors.push(COLORS[c].0.to_string());
    }
    PairSet::new(
        ImageSet::new(data, [3, size, size])?,
        captions,
        (0..n).map(|i| format!("toy:{i}")).collect(),
        vec![("shape".into(), shapes), ("color".into(), colors)],
    )
}

/// Writes `pairs` as a Parquet file of the layout [`read_pairs`](crate::read_pairs) reads by
/// default: `image` (PNG bytes, RGB; the pixels rounded to 8 bits), `caption`, and one text
/// column per label column (`shape`, `color` for [`toy_pairs`]), in row groups of
/// `rows_per_group` rows (at least 1).
pub fn write_parquet(pairs: &PairSet, path: &Path, rows_per_group: usize) -> Result<()> {
    let [channels, h, w] = pairs.images.shape;
    let bad = |e: String| MultimodalError::InvalidInput(format!("{}: {e}", path.display()));
    if channels != 3 {
        return Err(bad(format!("{channels} channels: only RGB is written")));
    }
    let plane = h * w;
    let mut pngs = Vec::with_capacity(pairs.len());
    for px in pairs.images.data.chunks(3 * plane) {
        let mut rgb = vec![0u8; 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                rgb[3 * p + c] = (px[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
            .ok_or_else(|| bad("pixel buffer does not fill the image".into()))?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| bad(e.to_string()))?;
        pngs.push(bytes);
    }
    let mut fields = vec![
        Field::new("image", DataType::Binary, false),
        Field::new("caption", DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(BinaryArray::from_vec(
            pngs.iter().map(|b| b.as_slice()).collect(),
        )),
        Arc::new(StringArray::from(pairs.captions.clone())),
    ];
    for (name, labels) in &pairs.labels {
        fields.push(Field::new(name.as_str(), DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from(labels.clone())));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| bad(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .build();
    let file = std::fs::File::create(path).map_err(|e| MultimodalError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| bad(e.to_string()))?;
    writer.write(&batch).map_err(|e| bad(e.to_string()))?;
    writer.close().map_err(|e| bad(e.to_string()))?;
    Ok(())
}

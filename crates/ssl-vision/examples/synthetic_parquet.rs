//! Writes a Parquet file of synthetic grey PNG images (seeded stripes, blobs and noise) with a
//! `label` column, for trying the streaming pipeline at scale:
//!
//! ```text
//! cargo run --release -p ssl-vision --example synthetic_parquet -- big.parquet 100000 32 1000
//! ```
//! (path, images, side in pixels, rows per row group).

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, RecordBatch};
use ssl_core::SslRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().map_or("images.parquet", String::as_str);
    let n: usize = args.get(1).map_or(Ok(10_000), |s| s.parse())?;
    let side: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let group: usize = args.get(3).map_or(Ok(1000), |s| s.parse())?;
    let file = std::fs::File::create(path)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut writer = None;
    let mut rng = SslRng::new(7);
    for start in (0..n).step_by(group) {
        let rows = group.min(n - start);
        let mut pngs = Vec::with_capacity(rows);
        let mut labels = Vec::with_capacity(rows);
        for _ in 0..rows {
            let class = rng.below(10);
            let period = 2.0 + class as f32;
            let (cx, cy) = (rng.below(side), rng.below(side));
            let px: Vec<u8> = (0..side * side)
                .map(|p| {
                    let (y, x) = ((p / side) as f32, (p % side) as f32);
                    let stripe = 0.5 + 0.4 * ((x + y * 0.3) / period).sin();
                    let d = ((x - cx as f32).powi(2) + (y - cy as f32).powi(2)).sqrt();
                    let blob = if d < side as f32 / 6.0 { 0.3 } else { 0.0 };
                    let v = stripe + blob + rng.uniform_range(-0.1, 0.1);
                    (v.clamp(0.0, 1.0) * 255.0) as u8
                })
                .collect();
            let img = image::GrayImage::from_raw(side as u32, side as u32, px)
                .ok_or("image buffer of the wrong size")?;
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)?;
            pngs.push(out.into_inner());
            labels.push(class as i64);
        }
        let batch = RecordBatch::try_from_iter([
            (
                "image",
                Arc::new(BinaryArray::from_iter_values(pngs.iter())) as ArrayRef,
            ),
            ("label", Arc::new(Int64Array::from(labels)) as ArrayRef),
        ])?;
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(parquet::arrow::ArrowWriter::try_new(
                file.try_clone()?,
                batch.schema(),
                Some(props.clone()),
            )?),
        };
        w.write(&batch)?;
    }
    if let Some(w) = writer {
        w.close()?;
    }
    println!("wrote {n} images of {side}x{side} to {path} (row groups of {group})");
    Ok(())
}

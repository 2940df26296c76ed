//! Writes a synthetic series Parquet file for scale checks: `rows` labelled noisy sines of
//! `steps` steps (column `x`, `list<f32>`; `label`), or with `--long`, one long series of
//! `rows` observations (column `y`, one per row), in row groups of 10,000 rows.
//!
//! ```text
//! cargo run --release -p ssl-timeseries --example generate_series -- OUT.parquet ROWS STEPS
//! cargo run --release -p ssl-timeseries --example generate_series -- OUT.parquet ROWS --long
//! ```

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Float32Builder, ListBuilder, StringArray};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use ssl_core::SslRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: generate_series OUT.parquet ROWS (STEPS | --long)";
    let out = args.first().ok_or(usage)?;
    let rows: usize = args.get(1).ok_or(usage)?.parse()?;
    let long = args.get(2).is_some_and(|a| a == "--long");
    let steps: usize = if long {
        1
    } else {
        args.get(2).ok_or(usage)?.parse()?
    };
    let group = 10_000;
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut rng = SslRng::new(7);
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    for start in (0..rows).step_by(group) {
        let n = group.min(rows - start);
        let batch = if long {
            let y: Vec<f32> = (start..start + n)
                .map(|t| {
                    (t as f32 / 24.0).sin() + 0.3 * (t as f32 / 168.0).sin() + 0.1 * rng.normal()
                })
                .collect();
            RecordBatch::try_from_iter([("y", Arc::new(Float32Array::from(y)) as ArrayRef)])?
        } else {
            let mut x = ListBuilder::new(Float32Builder::new());
            let mut labels = Vec::with_capacity(n);
            for i in start..start + n {
                let period = [8.0f32, 3.0][i % 2];
                for t in 0..steps {
                    x.values()
                        .append_value(((t + i) as f32 / period).sin() + 0.1 * rng.normal());
                }
                x.append(true);
                labels.push(["slow", "fast"][i % 2]);
            }
            RecordBatch::try_from_iter([
                ("x", Arc::new(x.finish()) as ArrayRef),
                ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
            ])?
        };
        if writer.is_none() {
            let file = std::fs::File::create(out)?;
            writer = Some(ArrowWriter::try_new(
                file,
                batch.schema(),
                Some(props.clone()),
            )?);
        }
        if let Some(w) = &mut writer {
            w.write(&batch)?;
        }
    }
    if let Some(w) = writer {
        w.close()?;
    }
    println!("wrote {rows} rows to {out}");
    Ok(())
}

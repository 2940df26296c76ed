//! Pretrain, embed and evaluate through the pipeline API only: writes a small Parquet file of
//! labelled sine waves, pretrains a tiny TS2Vec/TCN for a few steps, embeds, probes.
//! `cargo run --release -p ssl-timeseries --example pretrain_from_parquet`
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, ListBuilder, StringArray};
use arrow::record_batch::RecordBatch;
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::timeseries::stored_config;
use ssl_timeseries::{embed_timeseries, eval_timeseries, pretrain_timeseries, TimeseriesConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (file, run) = (dir.path().join("series.parquet"), dir.path().join("run"));
    let (mut x, mut labels) = (ListBuilder::new(Float32Builder::new()), Vec::new());
    for i in 0..40 {
        let period = [16.0f32, 5.0][i % 2];
        x.values().append_slice(
            &(0..64)
                .map(|t| ((t + i) as f32 / period).sin())
                .collect::<Vec<_>>(),
        );
        x.append(true);
        labels.push(["slow", "fast"][i % 2]);
    }
    let x: ArrayRef = Arc::new(x.finish());
    let batch = RecordBatch::try_from_iter([
        ("x", x),
        ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
    ])?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&file)?, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;

    let data = vec![file.display().to_string()];
    let mut cfg = TimeseriesConfig::default();
    (cfg.train.max_steps, cfg.train.warmup_steps) = (20, 2);
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (16, 32, 3);
    let summary = pretrain_timeseries(cfg, &data, &run, &RunOptions::default())?;
    let (ckpt, cfg) = stored_config(&run)?;
    let written = embed_timeseries(&ckpt, &cfg, &data, &dir.path().join("embeddings.parquet"))?;
    let report = eval_timeseries(&ckpt, &cfg, &data, &[], None)?;
    println!(
        "loss {:.3} -> {:.3}; {} embeddings of dim {}",
        summary.first_loss, summary.last_loss, written.rows, written.dim
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

//! Pretrain, embed and evaluate through the pipeline API only: writes a small Parquet file of
//! labelled sine waves, pretrains a tiny TS2Vec/TCN for a few steps, embeds, probes.
//! `cargo run --release -p ssl-timeseries --example timeseries_pipeline`
use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, StringArray};
use arrow::datatypes::Float32Type;
use arrow::record_batch::RecordBatch;
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::timeseries::stored_config;
use ssl_timeseries::{embed_timeseries, eval_timeseries, pretrain_timeseries, TimeseriesConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (file, run) = (dir.path().join("series.parquet"), dir.path().join("run"));
    // 40 series of 64 steps in a `list<f32>` column, labelled by their period.
    let x =
        ListArray::from_iter_primitive::<Float32Type, _, _>((0..40).map(|i| {
            Some((0..64).map(move |t| Some(((t + i) as f32 / [16.0, 5.0][i % 2]).sin())))
        }));
    let label = StringArray::from_iter_values((0..40).map(|i| ["slow", "fast"][i % 2]));
    let batch = RecordBatch::try_from_iter([
        ("x", Arc::new(x) as ArrayRef),
        ("label", Arc::new(label) as ArrayRef),
    ])?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&file)?, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;

    let data = vec![file.display().to_string()];
    let mut cfg = TimeseriesConfig::default(); // TS2Vec on a TCN; the TOML keys of `ssl config timeseries`
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
        "loss {:.3} -> {:.3}; {written:?}",
        summary.first_loss, summary.last_loss
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

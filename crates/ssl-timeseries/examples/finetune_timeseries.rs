//! Fine-tune a pretrained time-series run as a classifier through the pipeline API only:
//! label fractions, pretrained against random initialisation, a report on a test split.
//!
//! With no arguments it writes a small Parquet file of labelled sine waves, pretrains a tiny
//! TS2Vec/TCN for a few steps and fine-tunes it (seconds):
//! `cargo run --release -p ssl-timeseries --example finetune_timeseries`
//!
//! On a pretrained run and your data (`label` column; fractions default to 0.1,1.0):
//! `cargo run --release -p ssl-timeseries --example finetune_timeseries -- RUN TRAIN.parquet TEST.parquet OUT [0.1,1.0] [full|frozen] [SEED] [LR]`
//! (SEED: `finetune.seed`, the seed of the label-fraction draw; LR: the peak rate,
//! `finetune.train.lr`, or `finetune.frozen_lr` in frozen mode)
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, StringArray};
use arrow::datatypes::Float32Type;
use arrow::record_batch::RecordBatch;
use ssl_core::finetune::FinetuneMode;
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::timeseries::stored_config;
use ssl_timeseries::{
    finetune_timeseries, finetune_timeseries_config, pretrain_timeseries, TimeseriesConfig,
};

/// `rows` sine waves of 64 steps labelled by their period.
fn write_sines(file: &Path, rows: usize, offset: usize) -> Result<(), Box<dyn std::error::Error>> {
    let periods = [16.0f32, 5.0];
    let x = ListArray::from_iter_primitive::<Float32Type, _, _>((0..rows).map(|i| {
        let p = periods[i % 2];
        Some((0..64).map(move |t| Some(((t + i + offset) as f32 / p).sin())))
    }));
    let label = StringArray::from_iter_values((0..rows).map(|i| ["slow", "fast"][i % 2]));
    let batch = RecordBatch::try_from_iter([
        ("x", Arc::new(x) as ArrayRef),
        ("label", Arc::new(label) as ArrayRef),
    ])?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(file)?, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut ft = finetune_timeseries_config(); // the `[finetune]` keys, time-series defaults
    let _tmp;
    let (run, train, test, out) = if args.len() >= 4 {
        if let Some(f) = args.get(4) {
            ft.label_fractions = f
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<f64>, _>>()?;
        } else {
            ft.label_fractions = vec![0.1, 1.0];
        }
        if args.get(5).map(String::as_str) == Some("frozen") {
            ft.mode = FinetuneMode::Frozen;
        }
        if let Some(seed) = args.get(6) {
            ft.seed = seed.parse()?; // the label-fraction draw
        }
        if let Some(lr) = args.get(7) {
            let lr: f64 = lr.parse()?;
            (ft.train.lr, ft.frozen_lr) = (lr, lr);
        }
        let p = |s: &String| Path::new(s).to_path_buf();
        (p(&args[0]), args[1].clone(), args[2].clone(), p(&args[3]))
    } else {
        let dir = tempfile::tempdir()?;
        let (train, test) = (
            dir.path().join("train.parquet"),
            dir.path().join("test.parquet"),
        );
        write_sines(&train, 40, 0)?;
        write_sines(&test, 20, 7)?;
        let run = dir.path().join("run");
        let mut cfg = TimeseriesConfig::default();
        (cfg.train.max_steps, cfg.train.warmup_steps) = (20, 2);
        (
            cfg.model.tcn.hidden,
            cfg.model.tcn.output,
            cfg.model.tcn.depth,
        ) = (16, 32, 3);
        let train_s = train.display().to_string();
        pretrain_timeseries(
            cfg,
            std::slice::from_ref(&train_s),
            &run,
            &RunOptions::default(),
        )?;
        ft.label_fractions = vec![0.1, 1.0];
        (ft.train.max_epochs, ft.train.max_steps) = (0.0, 40);
        let out = dir.path().join("finetune");
        _tmp = dir;
        (run, train_s, test.display().to_string(), out)
    };
    let (ckpt, cfg) = stored_config(&run)?; // the newest checkpoint and its configuration
    let report = finetune_timeseries(
        &ckpt,
        &cfg,
        &ft,
        &[train],
        &[test],
        &out,
        &RunOptions::default(),
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

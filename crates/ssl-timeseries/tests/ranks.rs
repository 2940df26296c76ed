//! Streaming pretraining over 2 ranks (threads): each rank streams its own row groups (or,
//! with fewer row groups than ranks, its rows; a long column: its share of each block's
//! windows), and both end at the same step with rank 0's checkpoint written.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array};
use arrow::record_batch::RecordBatch;
use parquet::file::properties::WriterProperties;
use ssl_core::run_dir::{RunOptions, RunSummary};
use ssl_timeseries::pipeline::timeseries;
use ssl_timeseries::TimeseriesConfig;

/// Runs `cfg` on `data` over 2 ranks as threads: each rank's last step.
fn two_ranks(cfg: &TimeseriesConfig, data: &[String], run: &Path) -> Vec<u64> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = ssl_core::ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let (cfg, data, run) = (cfg.clone(), data.to_vec(), run.to_path_buf());
                sc.spawn(move || {
                    let opts = RunOptions {
                        collective: Some(Arc::new(c)),
                        ..RunOptions::default()
                    };
                    let s: RunSummary = timeseries::pretrain(cfg, &data, &run, &opts).unwrap();
                    s.step
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tiny() -> TimeseriesConfig {
    let mut cfg = TimeseriesConfig::default();
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (cfg.train.max_steps, cfg.train.warmup_steps) = (3, 1);
    cfg.train.batch_size = 4;
    cfg.train.checkpoint_every_steps = 3;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.eval_every_steps = 2;
    cfg.data.health_examples = 4;
    cfg
}

#[test]
fn two_ranks_stream_series_per_row() {
    let dir = tempfile::tempdir().unwrap();
    // One row group: the ranks share its rows.
    let data = common::labelled_series(&dir.path().join("d.parquet"), 40);
    for kind in [timeseries::TaskKind::Ts2vec, timeseries::TaskKind::Masked] {
        let mut cfg = tiny();
        cfg.task.kind = kind;
        cfg.data.heldout_fraction = 0.2;
        let run = dir.path().join(format!("{kind:?}"));
        assert_eq!(two_ranks(&cfg, &data, &run), [3, 3], "{kind:?}");
        assert!(run
            .join("checkpoints/step-00000003/model.safetensors")
            .is_file());
    }
}

#[test]
fn two_ranks_stream_a_long_column() {
    let dir = tempfile::tempdir().unwrap();
    let y: Vec<f32> = (0..300).map(|t| (t as f32 / 6.0).sin()).collect();
    let batch =
        RecordBatch::try_from_iter([("y", Arc::new(Float32Array::from(y)) as ArrayRef)]).unwrap();
    let path = dir.path().join("long.parquet");
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(50))
        .build();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let data = vec![path.display().to_string()];
    let mut cfg = tiny();
    cfg.data.long_column = "y".into();
    cfg.task.kind = timeseries::TaskKind::Forecast;
    (cfg.task.forecast.context, cfg.task.forecast.horizon) = (16, 4);
    cfg.data.heldout_fraction = 0.25;
    let run = dir.path().join("run");
    assert_eq!(two_ranks(&cfg, &data, &run), [3, 3]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("eval_mse"), "{metrics}");
}

//! A streaming pretraining run stopped mid-epoch and resumed writes checkpoints bit-identical
//! to an uninterrupted run's: series per row (shuffled row groups, TS2Vec's random crops from
//! the trainer's rng) and a long column's windows (shuffled blocks, forecasting).

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Float32Builder, ListBuilder, StringArray};
use arrow::record_batch::RecordBatch;
use parquet::file::properties::WriterProperties;
use ssl_core::optim::ScheduleKind;
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::{features, timeseries};
use ssl_timeseries::{FeaturesConfig, TimeseriesConfig};

/// Writes `columns` to `path` in row groups of `rows_per_group` rows.
fn write_groups(path: &Path, columns: Vec<(&str, ArrayRef)>, rows_per_group: usize) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// 24 labelled series of 20..32 steps in 6 row groups: 3 batches of 8 per epoch.
fn rows(path: &Path) -> Vec<String> {
    let mut x = ListBuilder::new(Float32Builder::new());
    let mut labels = Vec::new();
    for i in 0..24 {
        let v: Vec<f32> = (0..20 + i % 13)
            .map(|t| ((t + i) as f32 / [8.0, 3.0][i % 2]).sin())
            .collect();
        x.values().append_slice(&v);
        x.append(true);
        labels.push(["slow", "fast"][i % 2]);
    }
    let labels: ArrayRef = Arc::new(StringArray::from(labels));
    write_groups(
        path,
        vec![("x", Arc::new(x.finish())), ("label", labels)],
        4,
    );
    vec![path.display().to_string()]
}

/// The model and optimizer files of `run`'s checkpoint at `step`.
fn checkpoint(run: &Path, step: u64) -> Vec<Vec<u8>> {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
        .collect()
}

/// Runs `pretrain(max_steps, resume, run)` to 7 steps at once, and to 4 then resumed to 7;
/// the step-7 checkpoints must be equal byte for byte.
fn assert_resume_is_bit_identical(
    dir: &Path,
    pretrain: impl Fn(u64, bool, &Path) -> ssl_core::run_dir::RunSummary,
) {
    let whole = dir.join("whole");
    assert_eq!(pretrain(7, false, &whole).step, 7);
    let parts = dir.join("parts");
    assert_eq!(pretrain(4, false, &parts).step, 4);
    // The stop falls mid-epoch: the stored stream position is inside an epoch's rows.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(parts.join("checkpoints/step-00000004/trainer_state.json"))
            .unwrap(),
    )
    .unwrap();
    let p = &state["data_position"];
    let offset = p["offset"].as_u64().or(p["loader"]["offset"].as_u64());
    assert!(offset.is_some_and(|o| o > 0), "{p}");
    let s = pretrain(7, true, &parts);
    assert_eq!((s.start_step, s.step), (4, 7));
    assert!(
        checkpoint(&whole, 7) == checkpoint(&parts, 7),
        "the resumed run's step-7 checkpoint differs from the uninterrupted run's"
    );
    // Not vacuous: training changed the weights between steps 4 and 7.
    assert!(checkpoint(&whole, 4)[0] != checkpoint(&whole, 7)[0]);
}

fn opts(resume: bool) -> RunOptions {
    RunOptions {
        resume,
        ..RunOptions::default()
    }
}

/// `steps` steps of batches of 8 with a checkpoint every 4; the stop at step 4 is
/// `max_steps = 4`, so the schedule must not depend on it (constant).
fn stop_at_4(train: &mut ssl_core::TrainConfig, steps: u64) {
    (train.max_steps, train.warmup_steps) = (steps, 1);
    train.batch_size = 8;
    train.checkpoint_every_steps = 4;
    train.checkpoint_every_minutes = 0.0;
    train.schedule = ScheduleKind::Constant;
}

#[test]
fn series_per_row_resume_mid_epoch_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = rows(&dir.path().join("rows.parquet"));
    assert_resume_is_bit_identical(dir.path(), |steps, resume, run| {
        let mut cfg = TimeseriesConfig::default();
        (
            cfg.model.tcn.hidden,
            cfg.model.tcn.output,
            cfg.model.tcn.depth,
        ) = (8, 8, 2);
        stop_at_4(&mut cfg.train, steps);
        cfg.data.health_examples = 4;
        cfg.data.heldout_fraction = 0.1;
        timeseries::pretrain(cfg, &data, run, &opts(resume)).unwrap()
    });
}

#[test]
fn features_resume_mid_epoch_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = rows(&dir.path().join("rows.parquet"));
    assert_resume_is_bit_identical(dir.path(), |steps, resume, run| {
        let mut cfg = FeaturesConfig::default();
        stop_at_4(&mut cfg.train, steps);
        cfg.task.kind = features::TaskKind::Contrastive;
        (
            cfg.model.dim,
            cfg.model.depth,
            cfg.model.heads,
            cfg.model.mlp_dim,
        ) = (16, 1, 2, 32);
        features::pretrain(cfg, &data, run, &opts(resume)).unwrap()
    });
}

#[test]
fn long_column_windows_resume_mid_epoch_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    // 135 steps in row groups of 10: 0.8 of them (108) give 24 windows of 16 every 4 steps,
    // 3 batches of 8 per epoch, cut across row-group boundaries.
    let y: Vec<f32> = (0..135)
        .map(|t| (t as f32 / 6.0).sin() + 0.01 * t as f32)
        .collect();
    let path = dir.path().join("long.parquet");
    write_groups(
        &path,
        vec![("y", Arc::new(Float32Array::from(y)) as ArrayRef)],
        10,
    );
    let data = vec![path.display().to_string()];
    assert_resume_is_bit_identical(dir.path(), |steps, resume, run| {
        let mut cfg = TimeseriesConfig::default();
        cfg.data.long_column = "y".into();
        cfg.task.kind = timeseries::TaskKind::Forecast;
        (cfg.task.forecast.context, cfg.task.forecast.horizon) = (12, 4);
        cfg.data.stride = 4;
        (
            cfg.model.tcn.hidden,
            cfg.model.tcn.output,
            cfg.model.tcn.depth,
        ) = (8, 8, 2);
        stop_at_4(&mut cfg.train, steps);
        cfg.data.health_examples = 4;
        timeseries::pretrain(cfg, &data, run, &opts(resume)).unwrap()
    });
}

#[test]
fn max_epochs_sets_the_steps_from_the_row_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = rows(&dir.path().join("rows.parquet"));
    let mut cfg = FeaturesConfig::default();
    cfg.train.max_epochs = 2.0;
    cfg.train.batch_size = 8;
    cfg.train.warmup_steps = 1;
    cfg.data.health_examples = 0;
    (
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.mlp_dim,
    ) = (8, 1, 2, 16);
    let run = dir.path().join("run");
    // 24 rows, 8 per step: 3 steps an epoch, 6 for two.
    let s = features::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.step, 6);
    let (_, stored) = features::stored_config(&run).unwrap();
    assert_eq!(stored.train.max_steps, 6);
}

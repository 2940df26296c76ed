//! A series too long for memory is refused at start with an error naming the keys, instead of
//! the allocator aborting the process (issue 26 case 5).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float32Builder, ListBuilder};
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::{features, timeseries};
use ssl_timeseries::{FeaturesConfig, TimeseriesConfig};

/// Two series of `steps` steps in column `x`.
fn long_series(path: &Path, steps: usize) -> Vec<String> {
    let mut x = ListBuilder::new(Float32Builder::new());
    for i in 0..2 {
        let v: Vec<f32> = (0..steps).map(|t| ((t + i) as f32 / 7.0).sin()).collect();
        x.values().append_slice(&v);
        x.append(true);
    }
    common::write(path, vec![("x", Arc::new(x.finish()) as ArrayRef)]);
    vec![path.display().to_string()]
}

fn assert_memory_error(e: &str) {
    assert!(e.contains("not enough memory"), "{e}");
    assert!(e.contains("200000 steps"), "{e}");
    assert!(e.contains("data.max_len"), "{e}");
    assert!(e.contains("train.max_memory_gb"), "{e}");
}

#[test]
fn a_200000_step_series_is_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = long_series(&dir.path().join("long.parquet"), 200_000);
    let opts = RunOptions::default();

    let run = dir.path().join("features");
    let started = Instant::now();
    let e = features::pretrain(FeaturesConfig::default(), &data, &run, &opts)
        .unwrap_err()
        .to_string();
    assert_memory_error(&e);
    assert!(e.contains("model.dim"), "{e}");
    assert!(!run.exists(), "a refused run leaves no directory");

    let run = dir.path().join("timeseries");
    let e = timeseries::pretrain(TimeseriesConfig::default(), &data, &run, &opts)
        .unwrap_err()
        .to_string();
    assert_memory_error(&e);
    assert!(!run.exists(), "a refused run leaves no directory");
    // Refused from the configuration and the series' length, before any allocation.
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());

    // data.max_len truncates the series and the run fits; train.max_memory_gb sets the limit.
    let mut cfg = FeaturesConfig::default();
    cfg.data.max_len = 16;
    (
        cfg.train.max_steps,
        cfg.train.warmup_steps,
        cfg.train.batch_size,
    ) = (1, 0, 2);
    (
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.mlp_dim,
    ) = (8, 1, 2, 16);
    cfg.data.health_examples = 0;
    let s = features::pretrain(cfg.clone(), &data, &dir.path().join("short"), &opts).unwrap();
    assert_eq!(s.step, 1);
    cfg.train.max_memory_gb = 1e-9;
    let e = features::pretrain(cfg, &data, &dir.path().join("tiny"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(train.max_memory_gb)"), "{e}");
}

//! Series as CSV, the form users have besides Parquet: UCR-style rows (the label, then the
//! values; no header) and a header row with the series as a JSON array in a cell. Both train
//! a few steps and embed every series.

use std::path::Path;

use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::timeseries;
use ssl_timeseries::TimeseriesConfig;

/// Series `i`: a sine of period 8 ("slow", label 1) or 3 ("fast", label 2), 32 steps.
fn series(i: usize) -> Vec<f32> {
    let period = [8.0f32, 3.0][i % 2];
    (0..32).map(|t| ((t + i) as f32 / period).sin()).collect()
}

fn tiny() -> TimeseriesConfig {
    let mut cfg = TimeseriesConfig::default();
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (
        cfg.train.max_steps,
        cfg.train.warmup_steps,
        cfg.train.batch_size,
    ) = (2, 1, 8);
    cfg
}

fn train_and_embed(dir: &Path, input: &Path, rows: usize) {
    let data = vec![input.display().to_string()];
    let run = dir.join(format!(
        "run-{}",
        input.file_name().unwrap().to_string_lossy()
    ));
    let s = timeseries::pretrain(tiny(), &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.step, 2, "{}", input.display());
    assert!(s.last_loss.is_finite(), "{}", input.display());
    let (ckpt, cfg) = timeseries::stored_config(&run).unwrap();
    let out = dir.join(format!(
        "emb-{}.parquet",
        input.file_name().unwrap().to_string_lossy()
    ));
    let e = timeseries::embed(&ckpt, &cfg, &data, &out).unwrap();
    assert_eq!(e.rows, rows, "{}", input.display());
}

#[test]
fn ucr_style_and_json_cell_csv_series_train_and_embed() {
    let dir = tempfile::tempdir().unwrap();
    let n = 24;
    let ucr: String = (0..n)
        .map(|i| {
            let values: Vec<String> = series(i).iter().map(|v| v.to_string()).collect();
            format!("{},{}\n", 1 + i % 2, values.join(","))
        })
        .collect();
    let ucr_path = dir.path().join("GunPoint_TRAIN.csv");
    std::fs::write(&ucr_path, ucr).unwrap();
    train_and_embed(dir.path(), &ucr_path, n);

    let cells: String = std::iter::once("x,label\n".to_string())
        .chain((0..n).map(|i| {
            let json = serde_json::to_string(&series(i)).unwrap();
            format!("\"{json}\",{}\n", ["slow", "fast"][i % 2])
        }))
        .collect();
    let cells_path = dir.path().join("series.csv");
    std::fs::write(&cells_path, cells).unwrap();
    train_and_embed(dir.path(), &cells_path, n);
}

//! Reading the series of a [`TimeseriesConfig`] from Parquet, as its task consumes them,
//! streaming: one series per row through the loader ([`RowsSpec`]), or the windows of a long
//! column cut lazily by global row index ([`LongWindows`]), neither ever held whole.

use candle_core::Device;
use ssl_core::{Parallel, TrainConfig};

use super::{TaskKind, TimeseriesConfig};
use crate::pipeline::common::{check_heldout_fraction, Prepared, RowsSpec, MAX_HELDOUT_EXAMPLES};
use crate::{LongColumn, LongSplit, LongWindowSource, LongWindows, Result, TsError, WindowPlan};

/// Which part of a long series.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The training steps (less the held-out end, with `data.heldout_fraction`).
    Train,
    /// The test end (`1 - data.train_fraction`, with the context before it), every step.
    Test,
    /// The whole series.
    All,
}

/// How the pipeline reads one series per row (labels from `label_column` when given):
/// forecasting cuts every window of each row, the other tasks take rows whole (normalised
/// with `data.normalize`).
pub(crate) fn rows_spec(cfg: &TimeseriesConfig, label_column: Option<&str>) -> RowsSpec {
    let d = &cfg.data;
    let forecast = cfg.task.kind == TaskKind::Forecast;
    RowsSpec {
        column: d.column.clone(),
        label_column: label_column.map(str::to_string),
        max_len: d.max_len,
        normalize: d.normalize,
        windows: forecast.then_some((cfg.window_len(), d.stride)),
        skip_bad_rows: d.skip_bad_rows,
        heldout_fraction: d.heldout_fraction,
        seed: cfg.train.seed,
        shuffle_buffer_mb: d.shuffle_buffer_mb,
    }
}

/// Steps of context before the held-out and test parts (forecasting's context, else none).
fn context(cfg: &TimeseriesConfig) -> usize {
    if cfg.task.kind == TaskKind::Forecast {
        cfg.task.forecast.context
    } else {
        0
    }
}

/// The long column of `cfg` in `paths` and its chronological split (held-out end included).
fn long_split(paths: &[String], cfg: &TimeseriesConfig) -> Result<(LongColumn, LongSplit)> {
    let d = &cfg.data;
    let column = LongColumn::open(paths, &d.long_column)?;
    let split = LongSplit::new(column.num_rows(), d.train_fraction, context(cfg))?;
    check_heldout_fraction(d.heldout_fraction)?;
    let split = split
        .hold_out(d.heldout_fraction)
        .map_err(|e| heldout_error(d.heldout_fraction, e))?;
    Ok((column, split))
}

/// The windows of `part` of the long column of `cfg`: training windows every `data.stride`
/// steps, test windows every step, each z-normalised when `data.normalize` is set (forecasting
/// normalises with RevIN instead).
pub(crate) fn long_windows(
    paths: &[String],
    cfg: &TimeseriesConfig,
    part: Part,
) -> Result<LongWindows> {
    let d = &cfg.data;
    let (column, split) = long_split(paths, cfg)?;
    let len = cfg.window_len();
    let plan = match part {
        Part::Train => WindowPlan::new(0, split.fit, len, d.stride)?,
        Part::Test => {
            let (a, b) = split.test();
            WindowPlan::new(a, b, len, 1)?
        }
        Part::All => WindowPlan::new(0, split.rows, len, d.stride)?,
    };
    let normalize = d.normalize && cfg.task.kind != TaskKind::Forecast;
    Ok(LongWindows::new(column, plan, normalize))
}

/// Prepares a streaming run on the long column of `cfg`: the training windows (every rank
/// reads each block and takes its share of the block's windows), the first
/// `data.health_examples` of them for embedding health, and the held-out windows (at most
/// [`MAX_HELDOUT_EXAMPLES`], spread evenly over the held-out end; every rank holds them and
/// evaluates its share).
pub(crate) fn prepare_long(
    paths: &[String],
    cfg: &TimeseriesConfig,
    train: &TrainConfig,
    par: &Parallel,
    device: &Device,
) -> Result<Prepared> {
    let d = &cfg.data;
    let windows = long_windows(paths, cfg, Part::Train)?;
    let (column, split) = long_split(paths, cfg)?;
    let heldout = match split.heldout() {
        Some((a, b)) => {
            let plan = WindowPlan::new(a, b, cfg.window_len(), d.stride)
                .map_err(|e| heldout_error(d.heldout_fraction, e))?;
            LongWindows::new(column, plan, windows_normalised(cfg)).spread(MAX_HELDOUT_EXAMPLES)?
        }
        None => Vec::new(),
    };
    let health = windows.first(d.health_examples)?;
    let count = windows.count();
    let what = format!("{count} windows of a {}-step series", split.rows);
    let source = LongWindowSource::new(
        windows,
        train.seed,
        par.rank,
        par.world,
        train.batch_size,
        device,
    )?;
    Ok(Prepared {
        source: Box::new(source),
        health,
        heldout,
        heldout_sharded: false,
        knn: None,
        width: 1,
        longest: cfg.window_len(),
        examples_per_epoch: count as u64,
        what,
    })
}

/// Whether windows are z-normalised one by one (`data.normalize`, not forecasting).
fn windows_normalised(cfg: &TimeseriesConfig) -> bool {
    cfg.data.normalize && cfg.task.kind != TaskKind::Forecast
}

/// A long series' held-out part that cannot be cut, naming `data.heldout_fraction`.
fn heldout_error(fraction: f64, e: TsError) -> TsError {
    TsError::Config(format!(
        "data.heldout_fraction = {fraction}: the held-out end of the training steps cannot be cut into windows ({e}); lower it or give a longer series"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float32Array};
    use arrow::record_batch::RecordBatch;

    use super::*;

    #[test]
    fn windows_of_a_long_column_are_normalised_when_data_normalize_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.parquet");
        let y: Vec<f32> = (0..120)
            .map(|t| 50.0 + 10.0 * (t as f32 / 5.0).sin())
            .collect();
        let batch =
            RecordBatch::try_from_iter([("y", Arc::new(Float32Array::from(y)) as ArrayRef)])
                .unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let paths = vec![path.display().to_string()];
        let mut cfg = TimeseriesConfig::default();
        cfg.data.long_column = "y".into();
        (cfg.data.window, cfg.data.stride) = (32, 8);
        let mean = |cfg: &TimeseriesConfig| {
            let w = long_windows(&paths, cfg, Part::Train)
                .unwrap()
                .first(1)
                .unwrap();
            assert!(!w.is_empty());
            let v = &w[0].values;
            v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
        };
        cfg.data.normalize = true;
        assert!(mean(&cfg).abs() < 1e-4, "{}", mean(&cfg));
        cfg.data.normalize = false;
        assert!(mean(&cfg) > 40.0, "{}", mean(&cfg));

        // The lazily cut windows are exactly those of the series read whole.
        let series = crate::read_long_series(&paths, "y").unwrap();
        let (train, _) = crate::chronological_split(&series, 0.8, 0).unwrap();
        let want = crate::windows(&train, 32, 8).unwrap();
        let got = long_windows(&paths, &cfg, Part::Train)
            .unwrap()
            .first(100)
            .unwrap();
        assert_eq!(got, want);
    }
}

//! Reading the series of a [`TimeseriesConfig`] from Parquet, as its task consumes them,
//! streaming: one series per row through the loader ([`RowsSpec`]), or the windows of a long
//! column cut lazily by global row index ([`LongWindows`]), neither ever held whole.

use candle_core::Device;
use ssl_core::{Parallel, TrainConfig};

use super::{TaskKind, TimeseriesConfig};
use crate::pipeline::common::{check_heldout_fraction, Prepared, RowsSpec, MAX_HELDOUT_EXAMPLES};
use crate::pipeline::stats::channel_stats_for_run;
use crate::{
    ChannelMoments, ChannelStats, LongColumn, LongSplit, LongWindowSource, LongWindows,
    Normalization, NormalizeMode, Result, TsError, WindowPlan,
};

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
/// forecasting cuts every window of each row, the other tasks take rows whole (scaled as
/// `data.normalize` says, with the run's channel statistics).
pub(crate) fn rows_spec(cfg: &TimeseriesConfig, label_column: Option<&str>) -> Result<RowsSpec> {
    Ok(rows_spec_with(cfg, label_column, normalization(cfg)?))
}

/// [`rows_spec`] with the series scaled by `normalization`.
pub(crate) fn rows_spec_with(
    cfg: &TimeseriesConfig,
    label_column: Option<&str>,
    normalization: Normalization,
) -> RowsSpec {
    let d = &cfg.data;
    let forecast = cfg.task.kind == TaskKind::Forecast;
    RowsSpec {
        column: d.column.clone(),
        label_column: label_column.map(str::to_string),
        max_len: d.max_len,
        normalization,
        windows: forecast.then_some((cfg.window_len(), d.stride)),
        skip_bad_rows: d.skip_bad_rows,
        heldout_fraction: d.heldout_fraction,
        seed: cfg.train.seed,
        shuffle_buffer_mb: d.shuffle_buffer_mb,
    }
}

/// What is done to each series (or window of a long series) that `cfg`'s model reads:
/// `data.normalize` with the stored channel statistics; nothing for forecasting (RevIN
/// scales its windows). An error for `"channel"` without statistics (a configuration never
/// pretrained).
pub fn normalization(cfg: &TimeseriesConfig) -> Result<Normalization> {
    if cfg.task.kind == TaskKind::Forecast {
        return Ok(Normalization::None);
    }
    let d = &cfg.data;
    Normalization::resolve(d.normalize, &d.channel_mean, &d.channel_std, "data")
}

/// Fills in `cfg.data.channel_mean` / `channel_std` for `data.normalize = "channel"` when
/// they are empty, measured on the training data of `paths` (one series per row: a seeded
/// sample of at most `data.stats_series` series summed over the ranks of `par`; a long
/// column: that many training windows spread evenly over its training steps, the same on
/// every rank). Nothing for the other modes or forecasting.
pub(crate) fn measure_normalization(
    paths: &[String],
    cfg: &mut TimeseriesConfig,
    par: &Parallel,
) -> Result<()> {
    let d = &cfg.data;
    if d.normalize != NormalizeMode::Channel || cfg.task.kind == TaskKind::Forecast {
        return Ok(());
    }
    if !d.channel_mean.is_empty() || !d.channel_std.is_empty() {
        // Configured (or stored by the run resumed): checked, kept.
        ChannelStats::new(d.channel_mean.clone(), d.channel_std.clone(), "data")?;
        return Ok(());
    }
    let stats = if d.long_column.is_empty() {
        let spec = rows_spec_with(cfg, None, Normalization::None);
        let configured = (d.channel_mean.as_slice(), d.channel_std.as_slice());
        channel_stats_for_run(
            d.normalize,
            configured,
            "data",
            paths,
            &spec,
            d.stats_series,
            par,
        )?
    } else {
        let (column, split) = long_split(paths, cfg)?;
        let plan = WindowPlan::new(0, split.fit, cfg.window_len(), d.stride)?;
        let mut moments = ChannelMoments::new();
        for w in
            LongWindows::new(column, plan, Normalization::None).spread(d.stats_series.max(1))?
        {
            moments.add(&w)?;
        }
        if par.is_main() {
            eprintln!(
                "data.normalize = \"channel\": mean / std measured on {} training windows",
                moments.series()
            );
        }
        // Every rank read the same windows: no sum over ranks.
        Some(moments.stats_over_ranks(&Parallel::single(), 1)?)
    };
    if let Some(s) = stats {
        cfg.data.channel_mean = s.mean;
        cfg.data.channel_std = s.std;
    }
    Ok(())
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
/// steps, test windows every step, each scaled as `data.normalize` says (forecasting
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
    Ok(LongWindows::new(column, plan, normalization(cfg)?))
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
            LongWindows::new(column, plan, normalization(cfg)?).spread(MAX_HELDOUT_EXAMPLES)?
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
        // TS2Vec sizes a long series by its own steps, not by its overlapping windows.
        values: split.fit as u64,
        what,
    })
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
        cfg.data.normalize = NormalizeMode::Series;
        assert!(mean(&cfg).abs() < 1e-4, "{}", mean(&cfg));
        cfg.data.normalize = NormalizeMode::None;
        assert!(mean(&cfg) > 40.0, "{}", mean(&cfg));
        // "channel": the training part's statistics, measured once, then every window
        // scaled by them (its level against the others kept).
        cfg.data.normalize = NormalizeMode::Channel;
        assert!(normalization(&cfg).is_err(), "no statistics yet");
        measure_normalization(&paths, &mut cfg, &Parallel::single()).unwrap();
        let (m, s) = (cfg.data.channel_mean[0], cfg.data.channel_std[0]);
        assert!((m - 50.0).abs() < 1.0 && (s - 7.07).abs() < 0.5, "{m} {s}");
        let first = long_windows(&paths, &cfg, Part::Train)
            .unwrap()
            .first(1)
            .unwrap();
        let raw: Vec<f32> = (0..32)
            .map(|t| 50.0 + 10.0 * (t as f32 / 5.0).sin())
            .collect();
        for (got, want) in first[0].values.iter().zip(&raw) {
            assert!((got - (want - m) / s).abs() < 1e-4, "{got} against {want}");
        }

        // The lazily cut windows are exactly those of the series read whole.
        cfg.data.normalize = NormalizeMode::None;
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

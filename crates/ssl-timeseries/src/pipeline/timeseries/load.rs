//! Reading the series of a [`TimeseriesConfig`] from Parquet, as its task consumes them.

use ssl_core::seq::SeqExample;
use ssl_core::Parallel;

use super::{TaskKind, TimeseriesConfig};
use crate::pipeline::common::{check_heldout_fraction, read_rows, truncate, Loaded};
use crate::{chronological_split, read_long_series, windows, Result, TsError};

/// Which part of a long series.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Train,
    Test,
    All,
}

/// Reads a data set; with `par`, one-series-per-row data is read as this rank's share of the
/// rows (a long series is always read whole: its windows are cut from all of it). The
/// training part (`Part::Train`) holds out `data.heldout_fraction` into `Loaded::heldout`:
/// rows by global row index, or the last part of a long series' training steps.
pub(crate) fn load(
    paths: &[String],
    cfg: &TimeseriesConfig,
    label_column: Option<&str>,
    part: Part,
    par: Option<&Parallel>,
) -> Result<Loaded> {
    let d = &cfg.data;
    let forecast = cfg.task.kind == TaskKind::Forecast;
    if !d.long_column.is_empty() {
        let series = read_long_series(paths, &d.long_column)?;
        let len = cfg.window_len();
        let context = if forecast {
            cfg.task.forecast.context
        } else {
            0
        };
        let (train, test) = chronological_split(&series, d.train_fraction, context)?;
        let mut held = None;
        let (s, stride) = match part {
            Part::Train if d.heldout_fraction != 0.0 => {
                check_heldout_fraction(d.heldout_fraction)?;
                // Windows overlap: the held-out windows are the training steps' last part.
                let (fit, tail) = chronological_split(&train, 1.0 - d.heldout_fraction, context)
                    .map_err(|e| heldout_error(d.heldout_fraction, e))?;
                held = Some(tail);
                (fit, d.stride)
            }
            Part::Train => (train, d.stride),
            Part::Test => (test, 1),
            Part::All => (series, d.stride),
        };
        let cut = |s: &SeqExample| -> Result<Vec<SeqExample>> {
            let mut examples = windows(s, len, stride)?;
            // Windows are the examples here: normalised one by one as rows are (forecasting
            // normalises with RevIN instead).
            if d.normalize && !forecast {
                for e in &mut examples {
                    e.normalize_instance();
                }
            }
            Ok(examples)
        };
        let examples = cut(&s)?;
        let heldout = match &held {
            Some(tail) => cut(tail).map_err(|e| heldout_error(d.heldout_fraction, e))?,
            None => Vec::new(),
        };
        let ids = (0..examples.len()).map(|i| format!("window:{i}")).collect();
        return Ok(Loaded {
            rows: (0..examples.len()).collect(),
            examples,
            ids,
            labels: None,
            sharded: false,
            heldout,
            heldout_labels: None,
        });
    }
    let set = read_rows(
        paths,
        &d.column,
        label_column,
        &d.id_column,
        d.skip_bad_rows,
        par,
        "series",
    )?;
    let mut examples = Vec::with_capacity(set.series.len());
    let mut ids = Vec::new();
    let mut rows = Vec::with_capacity(set.series.len());
    for ((e, id), row) in set.series.into_iter().zip(set.ids).zip(set.row_index) {
        let mut e = truncate(e, d.max_len)?;
        if forecast {
            // Forecasting on one-series-per-row data: every window of each row.
            for (k, w) in windows(&e, cfg.window_len(), d.stride)?
                .into_iter()
                .enumerate()
            {
                examples.push(w);
                ids.push(format!("{id}:{k}"));
                rows.push(row);
            }
            continue;
        }
        if d.normalize {
            e.normalize_instance();
        }
        examples.push(e);
        ids.push(id);
        rows.push(row);
    }
    let labels = if forecast { None } else { set.labels };
    let mut loaded = Loaded {
        examples,
        ids,
        labels,
        rows,
        sharded: par.is_some(),
        heldout: Vec::new(),
        heldout_labels: None,
    };
    if part == Part::Train {
        // A forecasting row's windows stay together: all trained on or all held out.
        loaded.hold_out(d.heldout_fraction, cfg.train.seed)?;
    }
    Ok(loaded)
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
            let l = load(&paths, cfg, None, Part::Train, None).unwrap();
            assert!(!l.examples.is_empty());
            let v = &l.examples[0].values;
            v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
        };
        cfg.data.normalize = true;
        assert!(mean(&cfg).abs() < 1e-4, "{}", mean(&cfg));
        cfg.data.normalize = false;
        assert!(mean(&cfg) > 40.0, "{}", mean(&cfg));
    }
}

//! Series from Parquet: one series per row (`list<f32|f64>` or `list<list<...>>` as channels x
//! length, ragged lengths allowed), or one long series stored one observation per row and cut
//! into windows. Gaps (NaN, null) stay NaN in [`SeqExample`]s, and `SeqBatch` turns them into
//! masked steps: they are never fed to a model as numbers.

use std::path::Path;

use ssl_core::seq::SeqExample;
use ssl_data::{read_all, read_numeric_column, ColumnSpec, ReadOptions, SeriesBatch, Share};

use crate::{Result, TsError};

/// Series, ids and (optionally) labels read from Parquet.
#[derive(Debug, Clone)]
pub struct SeriesSet {
    /// One series per row (steps x channels); gaps are NaN.
    pub series: Vec<SeqExample>,
    /// Row ids (the id column, or `file_stem:row`).
    pub ids: Vec<String>,
    /// Labels as strings, when a label column was asked for.
    pub labels: Option<Vec<String>>,
    /// Each series' global row index in the source (files in order, rows in file order).
    pub row_index: Vec<usize>,
    /// Which part of the source was read (everything, or one rank's share).
    pub share: Share,
}

/// Reads the series column (channels x length per row) and optional label / id columns of
/// every file, directory or glob. `skip_bad_rows` skips (and reports on stderr) rows that
/// cannot be decoded instead of failing on the first.
pub fn read_series<P: AsRef<Path>>(
    paths: &[P],
    column: &str,
    label_column: Option<&str>,
    id_column: Option<&str>,
    skip_bad_rows: bool,
) -> Result<SeriesSet> {
    read_series_with(
        paths,
        column,
        label_column,
        id_column,
        &ReadOptions {
            skip_bad_rows,
            ..Default::default()
        },
    )
}

/// [`read_series`] with every [`ReadOptions`]: `rank` and `world_size` read one rank's share
/// of the rows (see [`ssl_data::read_all`]).
pub fn read_series_with<P: AsRef<Path>>(
    paths: &[P],
    column: &str,
    label_column: Option<&str>,
    id_column: Option<&str>,
    options: &ReadOptions,
) -> Result<SeriesSet> {
    let mut columns = vec![ColumnSpec::series(column)];
    if let Some(l) = label_column {
        columns.push(ColumnSpec::label(l));
    }
    if let Some(id) = id_column.filter(|s| !s.is_empty()) {
        columns.push(ColumnSpec::id(id));
    }
    let table = read_all(paths, &columns, options)?;
    if table.bad_rows.count > 0 {
        eprintln!(
            "skipped {} bad rows: {}",
            table.bad_rows.count, table.bad_rows
        );
    }
    let batch = &table.batch;
    let series = series_examples(batch.series(column)?)?;
    let keep = empty_series_policy(
        &series,
        batch.ids(),
        &table.row_index,
        column,
        options.skip_bad_rows,
    )?;
    let labels: Option<Vec<String>> = match label_column {
        None => None,
        Some(name) => Some(batch.label_column(name)?.strings()),
    };
    let pick = |i: &usize| keep.is_empty() || keep[*i];
    let series = series
        .into_iter()
        .enumerate()
        .filter(|(i, _)| pick(i))
        .map(|(_, s)| s)
        .collect();
    let kept = |v: &[String]| -> Vec<String> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| pick(i))
            .map(|(_, s)| s.clone())
            .collect()
    };
    let labels = labels.map(|l| kept(&l));
    let ids = kept(batch.ids());
    let row_index = (table.row_index.iter().enumerate())
        .filter(|(i, _)| pick(i))
        .map(|(_, r)| *r)
        .collect();
    Ok(SeriesSet {
        series,
        ids,
        labels,
        row_index,
        share: table.share.clone(),
    })
}

/// The rows of a decoded series column as examples (steps x channels, gaps NaN).
pub(crate) fn series_examples(s: &SeriesBatch) -> Result<Vec<SeqExample>> {
    let (b, c, l) = (s.lengths.len(), s.channels, s.length);
    let mut series = Vec::with_capacity(b);
    for i in 0..b {
        let steps = s.lengths[i];
        let mut values = vec![f32::NAN; steps * c];
        for ch in 0..c {
            for t in 0..steps {
                let k = (i * c + ch) * l + t;
                if s.mask[k] != 0 {
                    values[t * c + ch] = s.values[k];
                }
            }
        }
        series.push(SeqExample::new(values, steps, c)?);
    }
    Ok(series)
}

/// Why a series carries nothing to learn or embed: empty, or without one observed value.
pub(crate) fn empty_series_reason(s: &SeqExample) -> Option<&'static str> {
    if s.steps == 0 {
        Some("is empty (no steps)")
    } else if !s.values.iter().any(|v| v.is_finite()) {
        Some("has no observed value (every step is NaN or null)")
    } else {
        None
    }
}

/// Empty series (no steps) and series without one observed value (every step NaN or null)
/// carry nothing to learn or embed: an error naming the row, or, with `skip_bad_rows`, a
/// count on stderr. Returns which series to keep (empty when all are).
fn empty_series_policy(
    series: &[SeqExample],
    ids: &[String],
    row_index: &[usize],
    column: &str,
    skip_bad_rows: bool,
) -> Result<Vec<bool>> {
    let why = empty_series_reason;
    let bad: Vec<usize> = (0..series.len())
        .filter(|&i| why(&series[i]).is_some())
        .collect();
    let Some(&first) = bad.first() else {
        return Ok(Vec::new());
    };
    let name = |i: usize| {
        let id = ids.get(i).map_or("?", String::as_str);
        match row_index.get(i) {
            Some(r) => format!("`{id}` (row {r})"),
            None => format!("`{id}`"),
        }
    };
    if !skip_bad_rows {
        return Err(TsError::InvalidInput(format!(
            "column `{column}`: the series of row {} {}; set data.skip_bad_rows = true to skip such rows ({} in all)",
            name(first),
            why(&series[first]).unwrap_or_default(),
            bad.len()
        )));
    }
    let shown: Vec<String> = bad.iter().take(5).map(|&i| name(i)).collect();
    eprintln!(
        "skipped {} empty or all-missing series in column `{column}`: {}{}",
        bad.len(),
        shown.join(", "),
        if bad.len() > 5 { ", ..." } else { "" }
    );
    let mut keep = vec![true; series.len()];
    for i in bad {
        keep[i] = false;
    }
    Ok(keep)
}

/// Reads one long univariate series stored one observation per row (numeric column, file and
/// row order). Nulls and NaN become gaps.
pub fn read_long_series<P: AsRef<Path>>(paths: &[P], column: &str) -> Result<SeqExample> {
    let v = read_numeric_column(paths, column)?;
    let n = v.len();
    Ok(SeqExample::new(
        v.into_iter().map(|x| x as f32).collect(),
        n,
        1,
    )?)
}

/// Cuts `series` into windows of `length` steps every `stride` steps, from the start.
/// Windows without any observed value are dropped. Errors when the series is shorter than one
/// window or `length`/`stride` is 0.
pub fn windows(series: &SeqExample, length: usize, stride: usize) -> Result<Vec<SeqExample>> {
    if length == 0 || stride == 0 {
        return Err(TsError::Config(format!(
            "window length and stride must be at least 1 (got {length}, {stride})"
        )));
    }
    if series.steps < length {
        return Err(TsError::InvalidInput(format!(
            "a series of {} steps is shorter than one window of {length}",
            series.steps
        )));
    }
    let f = series.features;
    let mut out = Vec::new();
    let mut start = 0;
    while start + length <= series.steps {
        let values = series.values[start * f..(start + length) * f].to_vec();
        if values.iter().any(|v| v.is_finite()) {
            out.push(SeqExample::new(values, length, f)?);
        }
        start += stride;
    }
    Ok(out)
}

/// Splits a long series chronologically: the first `train_fraction` of the steps for training,
/// and the rest for testing with the `context` steps before it prepended (so the first test
/// window forecasts the first test step from training-period history, never the reverse).
pub fn chronological_split(
    series: &SeqExample,
    train_fraction: f64,
    context: usize,
) -> Result<(SeqExample, SeqExample)> {
    if !(0.0..1.0).contains(&train_fraction) || train_fraction == 0.0 {
        return Err(TsError::Config(format!(
            "train fraction must be in (0, 1), got {train_fraction}"
        )));
    }
    let f = series.features;
    let cut = (series.steps as f64 * train_fraction).round() as usize;
    if cut < context || cut >= series.steps {
        return Err(TsError::InvalidInput(format!(
            "a series of {} steps cannot be split at {cut} with {context} steps of context",
            series.steps
        )));
    }
    let train = SeqExample::new(series.values[..cut * f].to_vec(), cut, f)?;
    let start = cut - context;
    let test = SeqExample::new(series.values[start * f..].to_vec(), series.steps - start, f)?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_series_and_drop_empty_ones() {
        let mut v: Vec<f32> = (0..10).map(|x| x as f32).collect();
        for x in &mut v[4..8] {
            *x = f32::NAN;
        }
        let s = SeqExample::new(v, 10, 1).unwrap();
        let w = windows(&s, 3, 2).unwrap();
        // starts 0, 2, 4 (4,5,6 all NaN: dropped), 6
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].values, [0., 1., 2.]);
        assert_eq!(w[2].values[2], 8.0);
        assert!(windows(&s, 11, 1).is_err());
        assert!(windows(&s, 0, 1).is_err());
    }

    #[test]
    fn split_keeps_order_and_context() {
        let s = SeqExample::new((0..10).map(|x| x as f32).collect(), 10, 1).unwrap();
        let (tr, te) = chronological_split(&s, 0.8, 3).unwrap();
        assert_eq!(tr.values, [0., 1., 2., 3., 4., 5., 6., 7.]);
        assert_eq!(te.values, [5., 6., 7., 8., 9.]);
        assert!(chronological_split(&s, 0.8, 9).is_err());
        assert!(chronological_split(&s, 1.0, 1).is_err());
    }
}

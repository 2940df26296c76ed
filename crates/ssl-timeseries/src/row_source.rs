//! One series per row, streamed: loader batches (this rank's row groups, a seeded shuffle
//! window bounded in bytes, decoding threads, bounded prefetch) turned into examples on a
//! background thread by a pure function of the batch ([`RowTransform`]: held-out rows dropped
//! by global row index, empty series refused or skipped, truncation, per-series
//! normalisation, forecasting windows), and [`SeriesRowSource`], the trainer's resumable
//! [`BatchSource`] over them. Anything random in a task (crops, masks) is drawn by the task
//! from the trainer's `Ctx` rng, never here, so a resumed run is bit-identical.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Device;
use serde_json::Value;
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{BatchSource, CoreError};
use ssl_data::{Batch, ColumnSpec, ExampleStream, LoaderConfig, ParquetSource, StreamPosition};

use crate::data::{empty_series_reason, series_examples};
use crate::{windows, Normalization, Result, RowLocator, TsError};

/// The default bound on the decoded rows a shuffle window holds (`data.shuffle_buffer_mb`).
pub const DEFAULT_SHUFFLE_BUFFER_MB: f64 = 256.0;

/// At most this many rows are shuffled together, however small they are.
pub const MAX_SHUFFLE_ROWS: usize = 10_000;

/// Which rows of the held-out split a transform keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Every row, each tagged with whether it is held out.
    All,
    /// Rows not held out (training).
    Train,
    /// Held-out rows only.
    Heldout,
}

/// How a loader batch of one-series-per-row data becomes examples: a pure function of the
/// batch (so an [`ExampleStream`] resumes exactly).
#[derive(Debug, Clone)]
pub struct RowTransform {
    /// The series column.
    pub column: String,
    /// The label column, when labels are read.
    pub label_column: Option<String>,
    /// Truncate series to this many steps (0: no limit).
    pub max_len: usize,
    /// How each series is scaled (`data.normalize`; not forecasting windows).
    pub normalization: Normalization,
    /// Forecasting on rows: every window of `(len, stride)` of each row (ids `id:k`).
    pub windows: Option<(usize, usize)>,
    /// `(seed, fraction)` of the held-out split by global row index (fraction 0: none).
    pub heldout: (u64, f64),
    /// Which side of the split to keep.
    pub split: Split,
    /// Skip (and count) empty and all-missing series instead of failing.
    pub skip_bad_rows: bool,
    /// Names a row's file, row group and row in errors.
    pub locator: Arc<RowLocator>,
    /// Empty or all-missing series skipped so far (shared by the clones of a transform).
    pub skipped: Arc<AtomicUsize>,
}

/// One example of one-series-per-row data.
#[derive(Debug, Clone)]
pub struct RowExample {
    /// The series (or one forecasting window of it), steps x channels, gaps NaN.
    pub example: SeqExample,
    /// Its global row index.
    pub row: usize,
    /// Its id (the id column, or `file_stem:row`; a window's `id:k`).
    pub id: String,
    /// Its label, when a label column was read.
    pub label: Option<String>,
    /// Whether the row is held out of training.
    pub heldout: bool,
}

impl RowTransform {
    /// The loader columns this transform reads (`id_column`: "" for `file_stem:row` ids).
    pub fn columns(&self, id_column: &str) -> Vec<ColumnSpec> {
        let mut columns = vec![ColumnSpec::series(&self.column)];
        if let Some(l) = &self.label_column {
            columns.push(ColumnSpec::label(l));
        }
        if !id_column.is_empty() {
            columns.push(ColumnSpec::id(id_column));
        }
        columns
    }

    /// Whether global row `row` is held out.
    pub fn is_heldout(&self, row: usize) -> bool {
        let (seed, fraction) = self.heldout;
        fraction > 0.0 && ssl_data::is_heldout(row, seed, fraction)
    }

    /// The examples of one loader batch, in the batch's order.
    pub fn apply(&self, batch: Batch) -> Result<Vec<RowExample>> {
        let series = series_examples(batch.series(&self.column)?)?;
        let labels: Option<Vec<String>> = match &self.label_column {
            None => None,
            Some(name) => Some(batch.label_column(name)?.strings()),
        };
        let mut out = Vec::with_capacity(series.len());
        for (i, e) in series.into_iter().enumerate() {
            let row = batch.rows()[i];
            if let Some(why) = empty_series_reason(&e) {
                let at = self.locator.locate(row);
                if !self.skip_bad_rows {
                    return Err(TsError::InvalidInput(format!(
                        "column `{}`: the series of row {row} (`{}`, {at}) {why}; set data.skip_bad_rows = true to skip such rows",
                        self.column,
                        batch.ids()[i]
                    )));
                }
                let n = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= 5 || n.is_power_of_two() {
                    eprintln!(
                        "skipped an empty or all-missing series in column `{}` ({at}; {n} so far)",
                        self.column
                    );
                }
                continue;
            }
            let heldout = self.is_heldout(row);
            match self.split {
                Split::Train if heldout => continue,
                Split::Heldout if !heldout => continue,
                _ => {}
            }
            let id = batch.ids()[i].clone();
            let label = labels.as_ref().map(|l| l[i].clone());
            let mut e = truncate(e, self.max_len)?;
            if let Some((len, stride)) = self.windows {
                // Forecasting on rows: every window of the row (a row's windows stay together:
                // all trained on or all held out).
                for (k, w) in windows(&e, len, stride)?.into_iter().enumerate() {
                    out.push(RowExample {
                        example: w,
                        row,
                        id: format!("{id}:{k}"),
                        label: None,
                        heldout,
                    });
                }
                continue;
            }
            self.normalization.apply(&mut e).map_err(|err| {
                TsError::InvalidInput(format!(
                    "column `{}`: row {row} ({}): {err}",
                    self.column,
                    self.locator.locate(row)
                ))
            })?;
            out.push(RowExample {
                example: e,
                row,
                id,
                label,
                heldout,
            });
        }
        Ok(out)
    }
}

/// Truncates `e` to `max_len` steps (0 = no limit).
pub(crate) fn truncate(e: SeqExample, max_len: usize) -> Result<SeqExample> {
    if max_len > 0 && e.steps > max_len {
        return Ok(SeqExample::new(
            e.values[..max_len * e.features].to_vec(),
            max_len,
            e.features,
        )?);
    }
    Ok(e)
}

/// Rows of a shuffle window that fit `budget_mb` when a decoded row takes `row_bytes` (the
/// loader decodes a whole window before emitting), between the batch size and
/// [`MAX_SHUFFLE_ROWS`].
pub fn shuffle_rows(budget_mb: f64, row_bytes: usize, batch_size: usize) -> usize {
    let rows = (budget_mb.max(0.0) * 1024.0 * 1024.0 / row_bytes.max(1) as f64) as usize;
    rows.clamp(batch_size.clamp(1, MAX_SHUFFLE_ROWS), MAX_SHUFFLE_ROWS)
}

/// Opens an [`ExampleStream`] of `transform`'s examples over `source` at `position`.
pub fn row_stream(
    source: &ParquetSource,
    loader: LoaderConfig,
    position: StreamPosition,
    transform: RowTransform,
) -> Result<ExampleStream<RowExample, TsError>> {
    // A whole epoch without an example would have the consumer wait forever: an error instead.
    let limit = source.num_rows() / loader.batch_size.max(1) + source.num_row_groups() + 2;
    let mut empty = 0usize;
    ExampleStream::new(source, loader, position, 4, move |batch: Batch| {
        let rows = batch.len();
        let out = transform.apply(batch)?;
        if out.is_empty() && rows > 0 {
            empty += 1;
            if empty > limit {
                return Err(TsError::InvalidInput(format!(
                    "no series to train on in a whole pass over the data (column `{}`): every row of this rank's share is held out (data.heldout_fraction) or skipped",
                    transform.column
                )));
            }
        } else if !out.is_empty() {
            empty = 0;
        }
        Ok(out)
    })
}

/// The trainer's source of one-series-per-row data: batches of `batch_size` examples from an
/// endless, shuffled [`ExampleStream`] (the loader configuration says which rank's row groups),
/// resumable from its [`StreamPosition`] (the JSON of [`BatchSource::position`]).
pub struct SeriesRowSource {
    source: ParquetSource,
    loader: LoaderConfig,
    transform: RowTransform,
    stream: ExampleStream<RowExample, TsError>,
    batch_size: usize,
    device: Device,
}

impl SeriesRowSource {
    /// A source at the start of epoch 0; `loader` should stream forever (`epochs: None`).
    pub fn new(
        source: &ParquetSource,
        loader: LoaderConfig,
        transform: RowTransform,
        batch_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(TsError::Config("batch size must be at least 1".into()));
        }
        let stream = row_stream(
            source,
            loader.clone(),
            StreamPosition::default(),
            transform.clone(),
        )?;
        Ok(SeriesRowSource {
            source: source.clone(),
            loader,
            transform,
            stream,
            batch_size,
            device: device.clone(),
        })
    }
}

impl BatchSource<SeqBatch> for SeriesRowSource {
    fn next_batch(&mut self) -> ssl_core::Result<SeqBatch> {
        let examples = self.stream.take(self.batch_size).map_err(CoreError::from)?;
        if examples.is_empty() {
            return Err(CoreError::InvalidInput(
                "the data set has no sequences".into(),
            ));
        }
        let refs: Vec<&SeqExample> = examples.iter().map(|e| &e.example).collect();
        SeqBatch::from_examples(&refs, &self.device)
    }

    fn epoch(&self) -> u64 {
        self.stream.epoch()
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.stream.position()).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let p: StreamPosition = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not a series stream position: {e}"
            ))
        })?;
        self.stream = row_stream(&self.source, self.loader.clone(), p, self.transform.clone())
            .map_err(CoreError::from)?;
        Ok(())
    }
}

//! One long series stored one observation per row, read by range of global row index: the
//! footers are parsed once, and any rows `[start, end)` are read on demand (only the row groups
//! they touch, rows outside skipped), so windows are cut lazily and the column is never held
//! whole. The chronological split and the windows are positions in this index.

use std::path::{Path, PathBuf};

use arrow::array::{Array, Float64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use ssl_data::{DataError, ParquetSource};

use crate::{Result, TsError};

/// One file of a [`LongColumn`].
#[derive(Debug, Clone)]
struct LongFile {
    /// The file's path or URL.
    path: PathBuf,
    /// Its index in the source.
    index: usize,
    /// The column's index among the file's root fields.
    field: usize,
    /// Rows of each row group.
    rg_rows: Vec<usize>,
    /// Global index of the file's first row.
    first_row: usize,
}

impl LongFile {
    fn rows(&self) -> usize {
        self.rg_rows.iter().sum()
    }
}

/// A numeric column (integer or float) of a set of Parquet files, in file and row order: one
/// long series, one observation per row. Nulls and NaN are gaps (NaN).
#[derive(Debug, Clone)]
pub struct LongColumn {
    column: String,
    /// The files (local or in object storage), opened once (footers).
    source: ParquetSource,
    files: Vec<LongFile>,
    rows: usize,
}

impl LongColumn {
    /// Opens `column` of every file, directory or glob of `paths` (footers only). Errors name
    /// the file: a missing column, or one that is not numeric.
    pub fn open<P: AsRef<Path>>(paths: &[P], column: &str) -> Result<Self> {
        let source = ParquetSource::open(paths)?;
        let mut files = Vec::new();
        let mut first_row = 0;
        for (index, path) in source.files().into_iter().enumerate() {
            let fields = source
                .file_schema(index)
                .map(|s| s.fields().clone())
                .unwrap_or_default();
            let Some(field) = fields.iter().position(|f| f.name() == column) else {
                return Err(DataError::MissingColumn {
                    path: PathBuf::from(path),
                    column: column.to_string(),
                    available: fields.iter().map(|f| f.name().clone()).collect(),
                }
                .into());
            };
            let dt = fields[field].data_type();
            if !dt.is_numeric() {
                return Err(DataError::WrongColumnType {
                    path: PathBuf::from(path),
                    column: column.to_string(),
                    expected: "a numeric column (integer or float), one observation per row".into(),
                    found: dt.to_string(),
                }
                .into());
            }
            let f = LongFile {
                path: PathBuf::from(path),
                index,
                field,
                rg_rows: source.row_group_rows(index).to_vec(),
                first_row,
            };
            first_row += f.rows();
            files.push(f);
        }
        Ok(LongColumn {
            column: column.to_string(),
            source,
            files,
            rows: first_row,
        })
    }

    /// Observations (rows) over every file, from the footers.
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Where global row `row` is: "file F, row group G, row R" (R within the file).
    pub fn locate(&self, row: usize) -> String {
        for f in &self.files {
            if row < f.first_row + f.rows() {
                let mut local = row - f.first_row;
                for (g, &n) in f.rg_rows.iter().enumerate() {
                    if local < n {
                        return format!(
                            "file {}, row group {g}, row {}",
                            f.path.display(),
                            row - f.first_row
                        );
                    }
                    local -= n;
                }
            }
        }
        format!("row {row} (past the {} rows of the data)", self.rows)
    }

    /// The observations of global rows `[start, end)` as `f32` (through `f64`, as
    /// [`ssl_data::read_numeric_column`] reads them); nulls become NaN. Reads only the row
    /// groups holding those rows.
    pub fn read(&self, start: usize, end: usize) -> Result<Vec<f32>> {
        let end = end.min(self.rows);
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        for f in &self.files {
            let (lo, hi) = (f.first_row, f.first_row + f.rows());
            let (a, b) = (start.max(lo), end.min(hi));
            if a >= b {
                continue;
            }
            self.read_file(f, a - lo, b - lo, &mut out)?;
        }
        if out.len() != end.saturating_sub(start) {
            return Err(TsError::InvalidInput(format!(
                "column `{}`: read {} values for rows {start}..{end}",
                self.column,
                out.len()
            )));
        }
        Ok(out)
    }

    /// Appends rows `[a, b)` of file `f` (indices within the file) to `out`.
    fn read_file(&self, f: &LongFile, a: usize, b: usize, out: &mut Vec<f32>) -> Result<()> {
        let parquet_err = |e| DataError::Parquet {
            path: f.path.clone(),
            source: e,
        };
        // The row groups that hold [a, b), and the rows to skip / keep within them.
        let mut groups = Vec::new();
        let mut selectors = Vec::new();
        let mut rg_start = 0;
        for (g, &n) in f.rg_rows.iter().enumerate() {
            let (lo, hi) = (rg_start, rg_start + n);
            rg_start = hi;
            let (s, e) = (a.max(lo), b.min(hi));
            if s >= e {
                continue;
            }
            groups.push(g);
            if s > lo {
                selectors.push(RowSelector::skip(s - lo));
            }
            selectors.push(RowSelector::select(e - s));
            if hi > e {
                selectors.push(RowSelector::skip(hi - e));
            }
        }
        let builder = self.source.reader_builder(f.index, &groups, &[f.field])?;
        let reader = builder
            .with_row_selection(RowSelection::from(selectors))
            .with_batch_size(64 * 1024)
            .build()
            .map_err(parquet_err)?;
        for batch in reader {
            let batch = batch.map_err(|e| DataError::Arrow {
                path: f.path.clone(),
                column: self.column.clone(),
                source: e,
            })?;
            let arrow_err = |e| DataError::Arrow {
                path: f.path.clone(),
                column: self.column.clone(),
                source: e,
            };
            let col = cast(batch.column(0), &DataType::Float64).map_err(arrow_err)?;
            let values = col.as_any().downcast_ref::<Float64Array>().ok_or_else(|| {
                TsError::InvalidInput(format!(
                    "{}: column `{}` did not cast to f64",
                    f.path.display(),
                    self.column
                ))
            })?;
            for i in 0..values.len() {
                out.push(if values.is_null(i) {
                    f32::NAN
                } else {
                    values.value(i) as f32
                });
            }
        }
        Ok(())
    }
}

/// Windows of `len` steps every `stride` steps cut from rows `[start, end)` of a long series:
/// window `k` covers rows `start + k * stride ..` `+ len`. (Windows without an observed value
/// are dropped when cut: see [`crate::data::windows`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPlan {
    /// First row of the part.
    pub start: usize,
    /// One past its last row.
    pub end: usize,
    /// Steps per window.
    pub len: usize,
    /// Steps between window starts.
    pub stride: usize,
}

impl WindowPlan {
    /// A plan; an error when `len` or `stride` is 0 or the part is shorter than one window
    /// (the errors [`crate::data::windows`] gives).
    pub fn new(start: usize, end: usize, len: usize, stride: usize) -> Result<Self> {
        if len == 0 || stride == 0 {
            return Err(TsError::Config(format!(
                "window length and stride must be at least 1 (got {len}, {stride})"
            )));
        }
        let steps = end.saturating_sub(start);
        if steps < len {
            return Err(TsError::InvalidInput(format!(
                "a series of {steps} steps is shorter than one window of {len}"
            )));
        }
        Ok(WindowPlan {
            start,
            end,
            len,
            stride,
        })
    }

    /// Windows in the part (before dropping those without an observed value).
    pub fn count(&self) -> usize {
        (self.end - self.start - self.len) / self.stride + 1
    }

    /// The first row of window `k`.
    pub fn first_row(&self, k: usize) -> usize {
        self.start + k * self.stride
    }

    /// The rows windows `[k0, k1)` span: `[first_row(k0), first_row(k1 - 1) + len)`.
    pub fn rows_of(&self, k0: usize, k1: usize) -> (usize, usize) {
        (self.first_row(k0), self.first_row(k1 - 1) + self.len)
    }
}

/// The chronological parts of a long series of `rows` steps, as [`crate::chronological_split`]
/// cuts them: training rows `[0, cut)` with `cut = round(rows x train_fraction)`, test rows
/// `[cut - context, rows)`; with a held-out fraction ([`LongSplit::hold_out`]), the training
/// rows again split into fitted rows `[0, fit)` (`fit = round(cut x (1 - fraction))`) and
/// held-out rows `[fit - context, cut)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongSplit {
    /// Rows trained on: `[0, fit)`.
    pub fit: usize,
    /// End of the training part (held-out rows end here): `cut`.
    pub cut: usize,
    /// Rows of the whole series.
    pub rows: usize,
    /// Steps of context prepended to the held-out and test parts.
    pub context: usize,
}

impl LongSplit {
    /// The split of a series of `rows` steps (nothing held out); the errors
    /// [`crate::chronological_split`] gives.
    pub fn new(rows: usize, train_fraction: f64, context: usize) -> Result<Self> {
        let cut = split_point(rows, train_fraction, context)?;
        Ok(LongSplit {
            fit: cut,
            cut,
            rows,
            context,
        })
    }

    /// The training rows split again: the last `heldout_fraction` held out (0: none).
    pub fn hold_out(self, heldout_fraction: f64) -> Result<Self> {
        if heldout_fraction <= 0.0 {
            return Ok(self);
        }
        let fit = split_point(self.cut, 1.0 - heldout_fraction, self.context)?;
        Ok(LongSplit { fit, ..self })
    }

    /// The held-out rows (the training rows' end, with context): `[fit - context, cut)`; `None`
    /// without a held-out part.
    pub fn heldout(&self) -> Option<(usize, usize)> {
        (self.fit < self.cut).then(|| (self.fit - self.context, self.cut))
    }

    /// The test rows, with context: `[cut - context, rows)`.
    pub fn test(&self) -> (usize, usize) {
        (self.cut - self.context, self.rows)
    }
}

/// Where [`crate::chronological_split`] cuts `steps` steps at `fraction` with `context`.
fn split_point(steps: usize, fraction: f64, context: usize) -> Result<usize> {
    if !(0.0..1.0).contains(&fraction) || fraction == 0.0 {
        return Err(TsError::Config(format!(
            "train fraction must be in (0, 1), got {fraction}"
        )));
    }
    let cut = (steps as f64 * fraction).round() as usize;
    if cut < context || cut >= steps {
        return Err(TsError::InvalidInput(format!(
            "a series of {steps} steps cannot be split at {cut} with {context} steps of context"
        )));
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float32Array};
    use arrow::record_batch::RecordBatch;
    use parquet::file::properties::WriterProperties;
    use ssl_core::seq::SeqExample;

    use super::*;
    use crate::chronological_split;

    /// `n` values `0, 1, 2...` (every 7th null) in files of `per_file` rows, row groups of
    /// `rg` rows.
    fn write(dir: &Path, n: usize, per_file: usize, rg: usize) -> Vec<String> {
        let mut paths = Vec::new();
        for (f, start) in (0..n).step_by(per_file).enumerate() {
            let v: Vec<Option<f32>> = (start..(start + per_file).min(n))
                .map(|i| (i % 7 != 3).then_some(i as f32))
                .collect();
            let batch =
                RecordBatch::try_from_iter([("y", Arc::new(Float32Array::from(v)) as ArrayRef)])
                    .unwrap();
            let path = dir.join(format!("part-{f}.parquet"));
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(rg))
                .build();
            let file = std::fs::File::create(&path).unwrap();
            let mut w =
                parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            paths.push(path.display().to_string());
        }
        paths
    }

    #[test]
    fn ranges_across_row_groups_and_files_equal_the_whole_column_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write(dir.path(), 1000, 300, 64);
        let col = LongColumn::open(&paths, "y").unwrap();
        assert_eq!(col.num_rows(), 1000);
        let all: Vec<f32> = ssl_data::read_numeric_column(&paths, "y")
            .unwrap()
            .into_iter()
            .map(|x| x as f32)
            .collect();
        for (a, b) in [
            (0, 1000),
            (0, 1),
            (63, 65),
            (290, 610),
            (999, 1000),
            (500, 500),
        ] {
            let got = col.read(a, b).unwrap();
            let want = &all[a..b];
            assert_eq!(got.len(), want.len(), "{a}..{b}");
            for (g, w) in got.iter().zip(want) {
                assert!(g == w || (g.is_nan() && w.is_nan()), "{a}..{b}: {g} vs {w}");
            }
        }
        assert!(col
            .locate(310)
            .contains("part-1.parquet, row group 0, row 10"));
        assert!(
            col.locate(559)
                .contains("part-1.parquet, row group 4, row 259"),
            "{}",
            col.locate(559)
        );
        let err = LongColumn::open(&paths, "z").unwrap_err().to_string();
        assert!(err.contains("z"), "{err}");
    }

    #[test]
    fn the_split_and_window_plan_match_the_in_memory_ones() {
        let s = SeqExample::new((0..200).map(|x| x as f32).collect(), 200, 1).unwrap();
        let (train, test) = chronological_split(&s, 0.8, 24).unwrap();
        let (fit, tail) = chronological_split(&train, 0.75, 24).unwrap();
        let split = LongSplit::new(200, 0.8, 24)
            .unwrap()
            .hold_out(0.25)
            .unwrap();
        assert_eq!(split.fit, fit.steps);
        assert_eq!(split.cut, train.steps);
        let (h0, h1) = split.heldout().unwrap();
        assert_eq!(tail.values[0] as usize, h0);
        assert_eq!(h1 - h0, tail.steps);
        let (t0, t1) = split.test();
        assert_eq!(test.values[0] as usize, t0);
        assert_eq!(t1 - t0, test.steps);
        assert!(LongSplit::new(200, 0.8, 24).unwrap().hold_out(0.9).is_err());
        assert_eq!(LongSplit::new(200, 0.8, 24).unwrap().heldout(), None);

        let w = crate::windows(&fit, 28, 3).unwrap();
        let plan = WindowPlan::new(0, split.fit, 28, 3).unwrap();
        assert_eq!(plan.count(), w.len());
        assert_eq!(
            plan.first_row(plan.count() - 1),
            w.last().unwrap().values[0] as usize
        );
        assert!(WindowPlan::new(0, 10, 11, 1).is_err());
    }
}

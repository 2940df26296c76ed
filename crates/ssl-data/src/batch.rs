//! Batches: decoded rows collated into flat, tensor-ready buffers.

use std::sync::Arc;

use crate::decode::{ResolvedColumn, Row, Value};
use crate::error::DataError;
use crate::position::Position;

/// Images of a batch: `f32` in `[0, 1]`, laid out `(B, C, H, W)` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    /// `B * C * H * W` values.
    pub data: Vec<f32>,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
}

/// Series of a batch, padded to a common length `L`, laid out `(B, C, L)` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesBatch {
    /// `B * C * L` values; padding, NaN and null positions hold `0.0`.
    pub values: Vec<f32>,
    /// `B * C * L` flags: 1 where a value was observed, 0 for padding, NaN or null.
    pub mask: Vec<u8>,
    /// Each row's own length (before padding; after truncation to a fixed length).
    pub lengths: Vec<usize>,
    /// `C`.
    pub channels: usize,
    /// `L`.
    pub length: usize,
}

impl SeriesBatch {
    /// `[B, C, L]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.lengths.len(), self.channels, self.length]
    }

    /// The mask as `f32` (1.0 observed, 0.0 missing), for multiplying into losses.
    pub fn mask_f32(&self) -> Vec<f32> {
        self.mask.iter().map(|&m| f32::from(m)).collect()
    }
}

/// Labels of a batch as class ids.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelBatch {
    /// One class id per row.
    pub ids: Vec<i64>,
    /// Class names indexed by id, when known (string labels, or a class list given by the user).
    pub classes: Option<Arc<[String]>>,
}

impl LabelBatch {
    /// Each row's label as text: its class name when the column's classes are known (a
    /// string column), else the integer id written out.
    pub fn strings(&self) -> Vec<String> {
        self.ids
            .iter()
            .map(|&id| {
                self.classes
                    .as_ref()
                    .and_then(|names| usize::try_from(id).ok().and_then(|k| names.get(k)))
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            })
            .collect()
    }
}

/// One column of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchColumn {
    /// Text, one string per row.
    Text(Vec<String>),
    /// Images or raw pixels.
    Image(ImageBatch),
    /// Numeric series.
    Series(SeriesBatch),
    /// Class labels.
    Label(LabelBatch),
}

impl BatchColumn {
    /// Kind name: text, image, series or label.
    pub fn kind(&self) -> &'static str {
        match self {
            BatchColumn::Text(_) => "text",
            BatchColumn::Image(_) => "image",
            BatchColumn::Series(_) => "series",
            BatchColumn::Label(_) => "label",
        }
    }
}

/// A batch of rows: ids plus one [`BatchColumn`] per requested column (the id column, if any,
/// is not repeated among the columns: it is [`Batch::ids`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    ids: Vec<String>,
    columns: Vec<(String, BatchColumn)>,
    position: Position,
    /// Each row's global row index (over the source's files in order).
    rows: Vec<usize>,
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row ids: the id column's values, or `file_stem:row` without an id column.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The loader position right after this batch (resuming from it continues after it).
    pub fn position(&self) -> Position {
        self.position
    }

    /// All columns, in the order of the column specs.
    pub fn columns(&self) -> &[(String, BatchColumn)] {
        &self.columns
    }

    /// A column by name.
    pub fn column(&self, name: &str) -> Option<&BatchColumn> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Each row's global row index: its position in the source's files read in order (the
    /// index [`crate::is_heldout`] and row caps use), whatever the shuffle and the rank.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The rows at `keep` (indices into this batch, in the order given).
    pub(crate) fn select(&self, keep: &[usize]) -> Batch {
        let columns = self
            .columns
            .iter()
            .map(|(name, col)| {
                let col = match col {
                    BatchColumn::Text(t) => {
                        BatchColumn::Text(keep.iter().map(|&i| t[i].clone()).collect())
                    }
                    BatchColumn::Image(img) => {
                        let [_, c, h, w] = img.shape;
                        let per = c * h * w;
                        BatchColumn::Image(ImageBatch {
                            data: keep
                                .iter()
                                .flat_map(|&i| img.data[i * per..(i + 1) * per].iter().copied())
                                .collect(),
                            shape: [keep.len(), c, h, w],
                        })
                    }
                    BatchColumn::Series(s) => {
                        let per = s.channels * s.length;
                        BatchColumn::Series(SeriesBatch {
                            values: keep
                                .iter()
                                .flat_map(|&i| s.values[i * per..(i + 1) * per].iter().copied())
                                .collect(),
                            mask: keep
                                .iter()
                                .flat_map(|&i| s.mask[i * per..(i + 1) * per].iter().copied())
                                .collect(),
                            lengths: keep.iter().map(|&i| s.lengths[i]).collect(),
                            channels: s.channels,
                            length: s.length,
                        })
                    }
                    BatchColumn::Label(l) => BatchColumn::Label(LabelBatch {
                        ids: keep.iter().map(|&i| l.ids[i]).collect(),
                        classes: l.classes.clone(),
                    }),
                };
                (name.clone(), col)
            })
            .collect();
        Batch {
            ids: keep.iter().map(|&i| self.ids[i].clone()).collect(),
            columns,
            position: self.position,
            rows: keep.iter().map(|&i| self.rows[i]).collect(),
        }
    }

    /// Moves the columns out (ids first).
    pub fn into_parts(self) -> (Vec<String>, Vec<(String, BatchColumn)>) {
        (self.ids, self.columns)
    }

    fn missing(&self, name: &str, kind: &'static str) -> DataError {
        DataError::NoSuchBatchColumn {
            name: name.to_string(),
            kind,
            available: self
                .columns
                .iter()
                .map(|(n, c)| format!("{n} ({})", c.kind()))
                .collect(),
        }
    }

    /// The text column `name`.
    pub fn text(&self, name: &str) -> Result<&[String], DataError> {
        match self.column(name) {
            Some(BatchColumn::Text(t)) => Ok(t),
            _ => Err(self.missing(name, "text")),
        }
    }

    /// The image (or raw-pixel) column `name`.
    pub fn image(&self, name: &str) -> Result<&ImageBatch, DataError> {
        match self.column(name) {
            Some(BatchColumn::Image(t)) => Ok(t),
            _ => Err(self.missing(name, "image")),
        }
    }

    /// The series column `name`.
    pub fn series(&self, name: &str) -> Result<&SeriesBatch, DataError> {
        match self.column(name) {
            Some(BatchColumn::Series(t)) => Ok(t),
            _ => Err(self.missing(name, "series")),
        }
    }

    /// The label column `name` (ids and class names).
    pub fn label_column(&self, name: &str) -> Result<&LabelBatch, DataError> {
        match self.column(name) {
            Some(BatchColumn::Label(t)) => Ok(t),
            _ => Err(self.missing(name, "label")),
        }
    }

    /// The class ids of the label column `name`.
    pub fn labels(&self, name: &str) -> Result<&[i64], DataError> {
        self.label_column(name).map(|l| l.ids.as_slice())
    }
}

/// Collects rows into a batch; the first row fixes image sizes and series channel counts.
pub(crate) struct BatchBuilder {
    columns: Arc<Vec<ResolvedColumn>>,
    /// Global index of each file's first row.
    file_first_rows: Arc<[usize]>,
    rows: Vec<Row>,
}

impl BatchBuilder {
    pub(crate) fn new(columns: Arc<Vec<ResolvedColumn>>, file_first_rows: Arc<[usize]>) -> Self {
        Self {
            columns,
            file_first_rows,
            rows: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.rows.clear();
    }

    /// Adds a row, or says (column index, reason) why it does not fit the rows already in.
    pub(crate) fn push(&mut self, row: Row) -> Result<(), (Row, usize, String)> {
        if let Some(first) = self.rows.first() {
            for (k, (a, b)) in first.values.iter().zip(&row.values).enumerate() {
                let reason = match (a, b) {
                    (Value::Pixels(a), Value::Pixels(b))
                        if (a.channels, a.height, a.width) != (b.channels, b.height, b.width) =>
                    {
                        Some(format!(
                            "image is {}x{}x{} (CxHxW) but the batch's first image is {}x{}x{}; set `resize` to batch images of different sizes",
                            b.channels, b.height, b.width, a.channels, a.height, a.width
                        ))
                    }
                    (Value::Series(a), Value::Series(b)) if a.channels != b.channels => Some(format!(
                        "series has {} channel(s) but the batch's first row has {}",
                        b.channels, a.channels
                    )),
                    _ => None,
                };
                if let Some(reason) = reason {
                    return Err((row, k, reason));
                }
            }
        }
        self.rows.push(row);
        Ok(())
    }

    /// Name of column `k`.
    pub(crate) fn column_name(&self, k: usize) -> &str {
        &self.columns[k].spec.name
    }

    /// Collates the rows into a batch and empties the builder.
    pub(crate) fn finish(&mut self, position: Position) -> Batch {
        let rows = std::mem::take(&mut self.rows);
        let b = rows.len();
        let mut columns = Vec::new();
        for (k, col) in self.columns.iter().enumerate() {
            let name = col.spec.name.clone();
            let column = match rows.first().map(|r| &r.values[k]) {
                Some(Value::Id) => continue,
                Some(Value::Text(_)) => BatchColumn::Text(
                    rows.iter()
                        .map(|r| match &r.values[k] {
                            Value::Text(t) => t.clone(),
                            _ => String::new(),
                        })
                        .collect(),
                ),
                Some(Value::Label(_)) => BatchColumn::Label(LabelBatch {
                    ids: rows
                        .iter()
                        .map(|r| match r.values[k] {
                            Value::Label(l) => l,
                            _ => -1,
                        })
                        .collect(),
                    classes: col.classes.clone(),
                }),
                Some(Value::Pixels(p0)) => {
                    let (c, h, w) = (p0.channels, p0.height, p0.width);
                    let mut data = Vec::with_capacity(b * c * h * w);
                    for r in &rows {
                        if let Value::Pixels(p) = &r.values[k] {
                            data.extend_from_slice(&p.data);
                        }
                    }
                    BatchColumn::Image(ImageBatch {
                        data,
                        shape: [b, c, h, w],
                    })
                }
                Some(Value::Series(s0)) => {
                    let c = s0.channels;
                    let l = rows
                        .iter()
                        .map(|r| match &r.values[k] {
                            Value::Series(s) => s.len,
                            _ => 0,
                        })
                        .max()
                        .unwrap_or(0);
                    let mut values = vec![0.0f32; b * c * l];
                    let mut mask = vec![0u8; b * c * l];
                    let mut lengths = Vec::with_capacity(b);
                    for (i, r) in rows.iter().enumerate() {
                        if let Value::Series(s) = &r.values[k] {
                            for ch in 0..c {
                                let dst = (i * c + ch) * l;
                                let src = ch * s.len;
                                values[dst..dst + s.len]
                                    .copy_from_slice(&s.values[src..src + s.len]);
                                mask[dst..dst + s.len].copy_from_slice(&s.mask[src..src + s.len]);
                            }
                            lengths.push(s.length);
                        }
                    }
                    BatchColumn::Series(SeriesBatch {
                        values,
                        mask,
                        lengths,
                        channels: c,
                        length: l,
                    })
                }
                None => empty_column(&col.spec.kind, col.classes.clone()),
            };
            columns.push((name, column));
        }
        Batch {
            rows: rows
                .iter()
                .map(|r| self.file_first_rows[r.file] + r.row)
                .collect(),
            ids: rows.into_iter().map(|r| r.id).collect(),
            columns,
            position,
        }
    }
}

fn empty_column(kind: &crate::column::ColumnKind, classes: Option<Arc<[String]>>) -> BatchColumn {
    use crate::column::ColumnKind as K;
    match kind {
        K::Text | K::Id => BatchColumn::Text(Vec::new()),
        K::Image { color, resize, .. } => {
            let [h, w] = resize.unwrap_or([0, 0]);
            BatchColumn::Image(ImageBatch {
                data: Vec::new(),
                shape: [0, color.channels(), h, w],
            })
        }
        K::RawPixels { shape } => BatchColumn::Image(ImageBatch {
            data: Vec::new(),
            shape: [0, shape[0], shape[1], shape[2]],
        }),
        K::Series { channels, .. } => BatchColumn::Series(SeriesBatch {
            values: Vec::new(),
            mask: Vec::new(),
            lengths: Vec::new(),
            channels: channels.unwrap_or(0),
            length: 0,
        }),
        K::Label { .. } => BatchColumn::Label(LabelBatch {
            ids: Vec::new(),
            classes,
        }),
    }
}

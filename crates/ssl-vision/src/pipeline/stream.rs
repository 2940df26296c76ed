//! Images streamed from Parquet for the pipeline: decoded (and resized) in the loader's
//! decoding threads, filtered on the stream's thread by global row index (the `data.max_images`
//! cap as a seeded sample, the held-out split), and handed out as examples, so the data set is
//! never held whole.
//!
//! - [`RowSample`]: exactly `k` global row indices chosen by a seeded hash (a cap that is a
//!   sample of the whole source, not its first rows), decided from the footers' row count in
//!   `O(k)` memory;
//! - [`ImageReader`]: the source, the columns and the row filters of a run, which start
//!   [`ExampleStream`]s of [`ImageExample`]s;
//! - [`StreamingImageSource`]: the training [`BatchSource`] over such a stream, resumable
//!   mid-epoch through its [`StreamPosition`].

use std::collections::BinaryHeap;

use candle_core::Device;
use serde_json::Value;
use ssl_core::{BatchSource, CoreError, Parallel};
use ssl_data::{Batch, ColumnSpec, ExampleStream, LoaderConfig, ParquetSource, StreamPosition};

use super::config::{VisionConfig, VisionDataConfig};
use crate::vit::Images;
use crate::{Result, VisionError};

/// SplitMix64 of a row index with a seed and a salt: the key a [`RowSample`] orders rows by.
fn row_key(row: usize, seed: u64, salt: u64) -> u64 {
    let mut z = (row as u64)
        ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ salt.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded sample of global row indices: the `k` rows (of those an inner sample keeps, when
/// there is one) with the smallest keys `(hash(seed, salt, row), row)`; every row when the
/// sample is unbounded. Deciding it takes one pass over the row indices `0..num_rows` (from the
/// footers, no data read) with a heap of `k` keys; afterwards [`RowSample::keeps`] is a hash and
/// a comparison, the same on every rank and in every later reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSample {
    seed: u64,
    salt: u64,
    /// The largest key kept; `None`: no bound.
    limit: Option<(u64, usize)>,
    /// Rows must be kept by this sample first.
    within: Option<Box<RowSample>>,
    /// Rows kept.
    count: usize,
}

impl RowSample {
    /// Every one of `num_rows` rows.
    pub fn all(num_rows: usize) -> Self {
        RowSample {
            seed: 0,
            salt: 0,
            limit: None,
            within: None,
            count: num_rows,
        }
    }

    /// The `k` rows of `0..num_rows` (of those `within` keeps) with the smallest seeded keys;
    /// all of them when there are no more than `k`.
    pub fn smallest(
        num_rows: usize,
        k: usize,
        seed: u64,
        salt: u64,
        within: Option<RowSample>,
    ) -> Self {
        let eligible = within.as_ref().map_or(num_rows, |w| w.count);
        let mut sample = RowSample {
            seed,
            salt,
            limit: None,
            within: within.map(Box::new),
            count: eligible.min(k),
        };
        if k >= eligible {
            return sample;
        }
        let mut heap: BinaryHeap<(u64, usize)> = BinaryHeap::with_capacity(k + 1);
        for row in 0..num_rows {
            if sample.within.as_ref().is_some_and(|w| !w.keeps(row)) {
                continue;
            }
            let key = (row_key(row, seed, salt), row);
            if heap.len() < k {
                heap.push(key);
            } else if heap.peek().is_some_and(|top| key < *top) {
                heap.pop();
                heap.push(key);
            }
        }
        // k == 0 keeps nothing: a limit below every key.
        sample.limit = Some(heap.peek().copied().unwrap_or((0, 0)));
        if k == 0 {
            sample.limit = None;
            sample.count = 0;
        }
        sample
    }

    /// Whether global row `row` is in the sample.
    pub fn keeps(&self, row: usize) -> bool {
        if self.count == 0 {
            return false;
        }
        if self.within.as_ref().is_some_and(|w| !w.keeps(row)) {
            return false;
        }
        match self.limit {
            None => true,
            Some(limit) => (row_key(row, self.seed, self.salt), row) <= limit,
        }
    }

    /// Rows in the sample (of the source's rows; rows skipped as bad are counted).
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the sample keeps no row.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Which of the kept rows a stream delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// Every kept row.
    All,
    /// The kept rows not held out (`data.heldout_fraction`).
    Train,
    /// The held-out kept rows.
    Heldout,
}

/// One image of a stream, with its global row index (and id and label when asked for).
#[derive(Debug, Clone)]
pub(crate) struct ImageExample {
    /// `C * H * W` values in `[0, 1]`.
    pub pixels: Vec<f32>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
    /// Global row index.
    pub row: usize,
    /// The id (`data.id_column`, or `file_stem:row`); empty unless asked for.
    pub id: String,
    /// The label's class id, when a label column is read.
    pub label: Option<i64>,
    /// The label as text (its class name, or the integer written out), when a label column
    /// is read: what fine-tuning maps to class ids over the training and test sets together.
    pub label_text: Option<String>,
}

/// `data.resize` as the loader's `[height, width]`, checked.
pub(crate) fn resize_of(cfg: &VisionDataConfig) -> Result<Option<[usize; 2]>> {
    match cfg.resize.as_slice() {
        [] => Ok(None),
        [h, w] if *h == 0 || *w == 0 => Err(VisionError::Config(format!(
            "data.resize = [{h}, {w}]: height and width must be at least 1 (or [] to keep the images' size)"
        ))),
        [h, w] => Ok(Some([*h, *w])),
        other => Err(VisionError::Config(format!(
            "data.resize = {other:?}: give [height, width] or []"
        ))),
    }
}

/// What a run reads: the source, the columns, the `data.max_images` sample and the held-out
/// split; it starts streams of [`ImageExample`]s.
#[derive(Debug, Clone)]
pub(crate) struct ImageReader {
    source: ParquetSource,
    columns: Vec<ColumnSpec>,
    image: String,
    label: Option<String>,
    sample: RowSample,
    /// Rows left out although the sample keeps them.
    exclude: Option<RowSample>,
    seed: u64,
    heldout_fraction: f64,
    skip_bad_rows: bool,
}

impl ImageReader {
    /// Opens the Parquet files, directories or globs `paths` (footers only) to read as `cfg`
    /// says, with the label column `label`; `seed` seeds the `max_images` sample and the
    /// held-out split. The sample is decided here (a pass over the row indices, no data).
    pub fn open(
        paths: &[String],
        cfg: &VisionDataConfig,
        label: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        let resize = resize_of(cfg)?;
        let frac = cfg.heldout_fraction;
        if !(0.0..1.0).contains(&frac) {
            return Err(VisionError::Config(format!(
                "data.heldout_fraction = {frac}: must be in [0, 1)"
            )));
        }
        let mut columns = vec![ColumnSpec::image(cfg.column.as_str(), cfg.color, resize)
            .with_max_pixels(cfg.max_image_pixels)];
        if let Some(l) = label {
            columns.push(ColumnSpec::label(l));
        }
        if !cfg.id_column.is_empty() {
            columns.push(ColumnSpec::id(cfg.id_column.as_str()));
        }
        let source = ParquetSource::open(paths)?;
        source.check_columns(&columns)?;
        let n = source.num_rows();
        let sample = if cfg.max_images == 0 || cfg.max_images >= n {
            RowSample::all(n)
        } else {
            RowSample::smallest(n, cfg.max_images, seed, 0x4d41_5849, None)
        };
        Ok(ImageReader {
            source,
            columns,
            image: cfg.column.clone(),
            label: label.map(str::to_string),
            sample,
            exclude: None,
            seed,
            heldout_fraction: frac,
            skip_bad_rows: cfg.skip_bad_rows,
        })
    }

    /// The source.
    pub fn source(&self) -> &ParquetSource {
        &self.source
    }

    /// The rows the `max_images` sample keeps.
    pub fn sample(&self) -> &RowSample {
        &self.sample
    }

    /// Replaces the row sample (e.g. by a sample within it).
    pub fn with_sample(mut self, sample: RowSample) -> Self {
        self.sample = sample;
        self
    }

    /// Leaves out the rows `rows` keeps.
    pub fn excluding(mut self, rows: RowSample) -> Self {
        self.exclude = Some(rows);
        self
    }

    /// Rows kept by the sample (before the held-out split; from the footers).
    pub fn kept_rows(&self) -> usize {
        self.sample.len()
    }

    /// Expected training images per epoch over every rank: the kept rows less the held-out
    /// fraction (from the footers; bad rows skipped are not known yet).
    pub fn training_rows(&self) -> u64 {
        (self.kept_rows() as f64 * (1.0 - self.heldout_fraction)).round() as u64
    }

    /// A loader configuration reading this source's columns.
    pub fn loader(&self, batch_size: usize, shuffle: bool, epochs: Option<u64>) -> LoaderConfig {
        LoaderConfig {
            batch_size: batch_size.max(1),
            seed: self.seed,
            shuffle,
            // Without shuffling, each row group is its own window.
            shuffle_buffer: 1,
            epochs,
            skip_bad_rows: self.skip_bad_rows,
            ..LoaderConfig::new(self.columns.clone())
        }
    }

    /// Starts a stream of the rows of `split` at `position`, with ids when `ids`.
    pub fn stream(
        &self,
        loader: LoaderConfig,
        split: Split,
        position: StreamPosition,
        ids: bool,
    ) -> Result<ExampleStream<ImageExample, VisionError>> {
        let (image, label) = (self.image.clone(), self.label.clone());
        let sample = self.sample.clone();
        let exclude = self.exclude.clone();
        let (seed, frac) = (self.seed, self.heldout_fraction);
        ExampleStream::new(&self.source, loader, position, 2, move |batch: Batch| {
            let rows = Rows {
                sample: &sample,
                exclude: exclude.as_ref(),
                split,
                seed,
                frac,
            };
            examples_of(&batch, &image, label.as_deref(), &rows, ids)
        })
    }
}

/// Which rows a stream keeps.
struct Rows<'a> {
    sample: &'a RowSample,
    exclude: Option<&'a RowSample>,
    split: Split,
    seed: u64,
    frac: f64,
}

impl Rows<'_> {
    fn keeps(&self, row: usize) -> bool {
        if !self.sample.keeps(row) || self.exclude.is_some_and(|x| x.keeps(row)) {
            return false;
        }
        let held = self.frac > 0.0 && ssl_data::is_heldout(row, self.seed, self.frac);
        match self.split {
            Split::All => true,
            Split::Train => !held,
            Split::Heldout => held,
        }
    }
}

/// The examples of one loader batch that `rows` keeps.
fn examples_of(
    batch: &Batch,
    image: &str,
    label: Option<&str>,
    rows: &Rows<'_>,
    ids: bool,
) -> Result<Vec<ImageExample>> {
    let img = batch.image(image)?;
    let labels = label.map(|l| batch.label_column(l)).transpose()?;
    let label_texts = labels.map(|l| l.strings());
    let [_, c, h, w] = img.shape;
    let per = c * h * w;
    let mut out = Vec::new();
    for (k, &row) in batch.rows().iter().enumerate() {
        if !rows.keeps(row) {
            continue;
        }
        out.push(ImageExample {
            pixels: img.data[k * per..(k + 1) * per].to_vec(),
            shape: [c, h, w],
            row,
            id: if ids {
                batch.ids()[k].clone()
            } else {
                String::new()
            },
            label: labels.map(|l| l.ids[k]),
            label_text: label_texts.as_ref().map(|t| t[k].clone()),
        });
    }
    Ok(out)
}

/// The files of `source`, in words (for messages).
pub(crate) fn describe(source: &ParquetSource) -> String {
    let files = source.files();
    match files.as_slice() {
        [one] => one.to_string(),
        [first, ..] => format!("{} files ({} first)", files.len(), first),
        [] => "no files".into(),
    }
}

/// Checks that `e` has the shape `want`, naming its row (and id) otherwise.
pub(crate) fn check_example_shape(e: &ImageExample, want: [usize; 3]) -> Result<()> {
    if e.shape == want {
        return Ok(());
    }
    let id = if e.id.is_empty() {
        String::new()
    } else {
        format!(" ({})", e.id)
    };
    Err(VisionError::Config(format!(
        "the image of global row {}{id} is {:?} (channels, height, width) but the model takes {want:?}; set data.resize (and data.color) so every image has one size",
        e.row, e.shape
    )))
}

/// Rows of a training shuffle window holding about `mb` MiB of decoded images of `shape`
/// (at least one batch): the loader decodes a whole window before it emits a row.
pub(crate) fn shuffle_rows(mb: f64, shape: [usize; 3], batch: usize) -> usize {
    let per = (shape.iter().product::<usize>() * 4).max(1) as f64;
    (((mb.max(0.0) * (1u64 << 20) as f64) / per) as usize).max(batch.max(1))
}

/// Endless, seeded, resumable batches of training images streamed from Parquet (the
/// `data.max_images` sample less the held-out rows): this rank's row groups, reshuffled each
/// epoch in windows of about `data.shuffle_buffer_mb` MiB of decoded pixels, decoded and
/// resized in the loader's threads. The pixels are raw (`[0, 1]`); the task normalises and
/// augments them from the trainer's random stream, which is what keeps a resumed run
/// bit-identical. Its position (saved in checkpoints) is the stream's [`StreamPosition`].
pub struct StreamingImageSource {
    reader: ImageReader,
    loader: LoaderConfig,
    shape: [usize; 3],
    batch_size: usize,
    device: Device,
    start: StreamPosition,
    stream: Option<ExampleStream<ImageExample, VisionError>>,
}

impl StreamingImageSource {
    /// Rows the loader skipped so far under `data.skip_bad_rows` (undecodable images).
    pub fn bad_rows(&self) -> ssl_data::BadRowReport {
        self.stream
            .as_ref()
            .map(ExampleStream::bad_rows)
            .unwrap_or_default()
    }

    /// The training stream of the images of `paths` for the completed configuration `cfg`
    /// (image shape filled in, see [`VisionConfig::complete`]), this rank's share under `par`,
    /// batches of `batch_size` on `device`. Nothing is read until the first batch.
    pub fn new(
        paths: &[String],
        cfg: &VisionConfig,
        batch_size: usize,
        par: &Parallel,
        device: &Device,
    ) -> Result<Self> {
        let reader = ImageReader::open(paths, &cfg.data, None, cfg.train.seed)?;
        Self::from_reader(reader, cfg, batch_size, par, device)
    }

    /// [`StreamingImageSource::new`] over an opened reader.
    pub(crate) fn from_reader(
        reader: ImageReader,
        cfg: &VisionConfig,
        batch_size: usize,
        par: &Parallel,
        device: &Device,
    ) -> Result<Self> {
        let shape = [
            cfg.model.channels,
            cfg.model.image_height,
            cfg.model.image_width,
        ];
        if shape.contains(&0) {
            return Err(VisionError::Config(
                "the image shape is not known yet: complete the configuration first".into(),
            ));
        }
        if batch_size == 0 {
            return Err(VisionError::Config("batch size must be at least 1".into()));
        }
        let loader = LoaderConfig {
            shuffle_buffer: shuffle_rows(cfg.data.shuffle_buffer_mb, shape, batch_size),
            rank: par.rank,
            world_size: par.world,
            ..reader.loader(batch_size, true, None)
        };
        Ok(StreamingImageSource {
            reader,
            loader,
            shape,
            batch_size,
            device: device.clone(),
            start: StreamPosition::default(),
            stream: None,
        })
    }

    /// The rows of a shuffle window.
    pub fn shuffle_buffer(&self) -> usize {
        self.loader.shuffle_buffer
    }

    fn next(&mut self) -> Result<Images> {
        if self.stream.is_none() {
            let s = self
                .reader
                .stream(self.loader.clone(), Split::Train, self.start, false)?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("just started");
        let examples = stream.take(self.batch_size)?;
        if examples.len() < self.batch_size {
            return Err(VisionError::InvalidInput(format!(
                "the image stream of {} ended after {} of a batch's {} images",
                describe(self.reader.source()),
                examples.len(),
                self.batch_size
            )));
        }
        let [c, h, w] = self.shape;
        let mut data = Vec::with_capacity(examples.len() * c * h * w);
        for e in &examples {
            check_example_shape(e, self.shape)?;
            data.extend_from_slice(&e.pixels);
        }
        Images::from_vec(data, [examples.len(), c, h, w], &self.device)
    }
}

impl BatchSource<Images> for StreamingImageSource {
    fn next_batch(&mut self) -> ssl_core::Result<Images> {
        Ok(self.next()?)
    }

    fn epoch(&self) -> u64 {
        match &self.stream {
            Some(s) => s.epoch(),
            None => self.start.loader.epoch,
        }
    }

    fn position(&self) -> Value {
        let p = match &self.stream {
            Some(s) => s.position(),
            None => self.start,
        };
        serde_json::to_value(p).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let p: StreamPosition = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not an image stream position: {e}"
            ))
        })?;
        self.stream = None;
        self.start = p;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_sample_keeps_exactly_k_seeded_rows() {
        let s = RowSample::smallest(1000, 100, 7, 1, None);
        let kept: Vec<usize> = (0..1000).filter(|&r| s.keeps(r)).collect();
        assert_eq!(kept.len(), 100);
        assert_eq!(s.len(), 100);
        // Spread over the rows, not the first ones.
        assert!(kept.iter().any(|&r| r > 500), "{kept:?}");
        let other = RowSample::smallest(1000, 100, 8, 1, None);
        assert!((0..1000).any(|r| other.keeps(r) != s.keeps(r)));
        // A sample within a sample.
        let inner = RowSample::smallest(1000, 10, 3, 2, Some(s.clone()));
        let kept_inner: Vec<usize> = (0..1000).filter(|&r| inner.keeps(r)).collect();
        assert_eq!(kept_inner.len(), 10);
        assert!(kept_inner.iter().all(|&r| s.keeps(r)));
        // Bounds: all, none.
        let all = RowSample::smallest(10, 20, 0, 0, None);
        assert!((0..10).all(|r| all.keeps(r)));
        let none = RowSample::smallest(10, 0, 0, 0, None);
        assert!((0..10).all(|r| !none.keeps(r)) && none.is_empty());
    }

    #[test]
    fn a_zero_resize_is_refused_by_key() {
        let data = VisionDataConfig {
            resize: vec![0, 0],
            ..VisionDataConfig::default()
        };
        let err = ImageReader::open(&["missing.parquet".to_string()], &data, None, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.resize = [0, 0]"), "{err}");
    }

    #[test]
    fn shuffle_windows_are_bounded_by_bytes() {
        // 224x224x3 f32 is 588 KiB: 256 MiB hold 445 images.
        assert_eq!(shuffle_rows(256.0, [3, 224, 224], 64), 445);
        // Never below a batch.
        assert_eq!(shuffle_rows(0.0, [3, 224, 224], 64), 64);
    }
}

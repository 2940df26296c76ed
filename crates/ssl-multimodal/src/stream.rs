//! Image-caption pairs streamed from Parquet: the training [`StreamingPairSource`] (an endless,
//! seeded, sharded, resumable stream that never holds the data set) and [`collect_pairs`],
//! a bounded pass that keeps the rows it is asked for and stops at a cap (the statistics
//! sample, the held-out set).
//!
//! Images are decoded and resized in the loader's decoding workers; captions are tokenized,
//! held-out rows dropped (by global row index, see [`RowSplit`]) and the pair filter applied
//! (a score threshold fixed before training) in the stream's transform thread, ahead of the
//! trainer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Device;
use serde_json::Value;
use ssl_core::{BatchSource, CoreError, Ctx, SslRng};
use ssl_data::{
    Batch, ColumnSpec, DataError, ExampleStream, LoaderConfig, ParquetSource, StreamPosition,
};
use ssl_text::{SpecialIds, TextBatch, TokenizedSeq};
use ssl_vision::{ImageSet, Images};
use tokenizers::Tokenizer;

use crate::data::{tokenize_captions, PairColumns, PairSet};
use crate::model::{pair_scores, ClipModel};
use crate::rows::RowSplit;
use crate::task::PairBatch;
use crate::{MultimodalError, Result};

/// Default bound of a training stream's decoded shuffle window (`data.shuffle_buffer_mb`).
pub const DEFAULT_SHUFFLE_BUFFER_MB: usize = 256;

/// Bytes a decoded pair takes besides its pixels (caption, id, bookkeeping): an estimate.
const PAIR_OVERHEAD_BYTES: usize = 256;

/// Loader batches the transform thread prepares ahead of the trainer.
const AHEAD: usize = 2;

/// The loader's column specs for pairs: image, caption, the text label columns, the id.
pub fn pair_specs(cols: &PairColumns, image: bool, caption: bool) -> Result<Vec<ColumnSpec>> {
    let resize = match cols.resize.as_slice() {
        [] => None,
        [h, w] => Some([*h, *w]),
        other => {
            return Err(MultimodalError::Config(format!(
                "data.resize = {other:?}: give [height, width] or []"
            )))
        }
    };
    let mut specs = Vec::new();
    if image {
        specs.push(
            ColumnSpec::image(cols.image.as_str(), cols.color, resize)
                .with_max_pixels(cols.max_image_pixels),
        );
    }
    if caption {
        specs.push(ColumnSpec::text(cols.caption.as_str()));
    }
    for l in &cols.labels {
        specs.push(ColumnSpec::text(l.as_str()));
    }
    if !cols.id.is_empty() {
        specs.push(ColumnSpec::id(cols.id.as_str()));
    }
    Ok(specs)
}

/// Rows of a shuffle window holding about `bytes` of decoded pairs of `shape` `[C, H, W]`
/// (at least one batch): the loader decodes a whole window before emitting from it.
pub fn window_rows(shape: [usize; 3], bytes: usize, batch_size: usize) -> usize {
    let per = shape.iter().product::<usize>() * 4 + PAIR_OVERHEAD_BYTES;
    (bytes / per).max(batch_size).max(1)
}

/// The blank-caption rule: an error naming the row, or (with `skip_bad_rows`) counted.
fn blank_caption(cols: &PairColumns, row: usize, id: &str, blanks: &AtomicUsize) -> Result<()> {
    if !cols.skip_bad_rows {
        return Err(MultimodalError::InvalidInput(format!(
            "column `{}`: the caption of row {row} (`{id}`) is empty; set data.skip_bad_rows = true to skip such rows",
            cols.caption
        )));
    }
    blanks.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The image block of a loader batch, checked against `shape` when given.
fn batch_images<'a>(
    batch: &'a Batch,
    cols: &PairColumns,
    shape: Option<[usize; 3]>,
) -> Result<&'a ssl_data::ImageBatch> {
    let img = batch.image(&cols.image)?;
    let [_, c, h, w] = img.shape;
    if let Some(want) = shape {
        if [c, h, w] != want {
            return Err(MultimodalError::Config(format!(
                "the images of rows from {} are [{c}, {h}, {w}] (channels, height, width) but the model takes {want:?}; set data.resize / data.color",
                batch.ids().first().map(String::as_str).unwrap_or("?")
            )));
        }
    }
    Ok(img)
}

/// A pair filter fixed before training: another run's model scores each training pair (the
/// cosine of the image with its caption) and pairs scoring under `threshold` are dropped.
pub struct PairFilter {
    /// The scoring model.
    pub model: ClipModel,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Its caption length.
    pub max_seq_len: usize,
    /// Where it runs.
    pub device: Device,
    /// The lowest score kept (from a sample's quantile, see `pipeline::filter_threshold`).
    pub threshold: f32,
}

impl PairFilter {
    /// Scores of the pairs `(pixels (B, C, H, W), captions)` in one forward pass per tower.
    pub fn scores(
        &self,
        pixels: Vec<f32>,
        shape: [usize; 4],
        captions: &[String],
    ) -> Result<Vec<f32>> {
        let ids: Vec<String> = (0..captions.len()).map(|i| format!("pair {i}")).collect();
        let seqs = tokenize_captions(&self.tok, captions, &ids, self.max_seq_len)?;
        let pad = SpecialIds::of(&self.tok)?.pad;
        let mut rng = SslRng::new(0);
        let images = Images::from_vec(pixels, shape, &self.device)?;
        let img = self
            .model
            .encode_image(&images, &mut Ctx::inference(&mut rng))?;
        let text = TextBatch {
            seqs,
            pad_id: pad,
            device: self.device.clone(),
        }
        .tensors()?;
        let txt = self
            .model
            .encode_text(&text, &mut Ctx::inference(&mut rng))?;
        pair_scores(&img, &txt)
    }
}

/// One training pair as the stream hands it out.
#[derive(Debug, Clone)]
struct StreamedPair {
    pixels: Vec<f32>,
    seq: TokenizedSeq,
}

/// What the stream's thread does to each loader batch: drop held-out and capped-out rows,
/// check captions, tokenize, filter. A pure function of the batch (resume depends on it).
struct PairTransform {
    cols: PairColumns,
    split: RowSplit,
    tok: Tokenizer,
    max_seq_len: usize,
    shape: [usize; 3],
    filter: Option<PairFilter>,
    blanks: Arc<AtomicUsize>,
    filtered: Arc<AtomicUsize>,
}

impl PairTransform {
    fn apply(&self, batch: Batch) -> Result<Vec<StreamedPair>> {
        let img = batch_images(&batch, &self.cols, Some(self.shape))?;
        let captions = batch.text(&self.cols.caption)?;
        let per: usize = self.shape.iter().product();
        let mut keep = Vec::with_capacity(batch.len());
        for (k, &row) in batch.rows().iter().enumerate() {
            if !self.split.is_training(row) {
                continue;
            }
            if captions[k].trim().is_empty() {
                blank_caption(&self.cols, row, &batch.ids()[k], &self.blanks)?;
                continue;
            }
            keep.push(k);
        }
        if let Some(f) = &self.filter {
            if !keep.is_empty() {
                let px: Vec<f32> = keep
                    .iter()
                    .flat_map(|&k| img.data[k * per..(k + 1) * per].iter().copied())
                    .collect();
                let caps: Vec<String> = keep.iter().map(|&k| captions[k].clone()).collect();
                let [c, h, w] = self.shape;
                let scores = f.scores(px, [keep.len(), c, h, w], &caps)?;
                let before = keep.len();
                keep = keep
                    .into_iter()
                    .zip(scores)
                    .filter(|(_, s)| *s >= f.threshold)
                    .map(|(k, _)| k)
                    .collect();
                self.filtered
                    .fetch_add(before - keep.len(), Ordering::Relaxed);
            }
        }
        let caps: Vec<String> = keep.iter().map(|&k| captions[k].clone()).collect();
        let ids: Vec<String> = keep
            .iter()
            .map(|&k| format!("{} (global row {})", batch.ids()[k], batch.rows()[k]))
            .collect();
        let seqs = tokenize_captions(&self.tok, &caps, &ids, self.max_seq_len)?;
        Ok(keep
            .iter()
            .zip(seqs)
            .map(|(&k, seq)| StreamedPair {
                pixels: img.data[k * per..(k + 1) * per].to_vec(),
                seq,
            })
            .collect())
    }
}

/// How a [`StreamingPairSource`] reads its pairs.
#[derive(Debug, Clone)]
pub struct PairStreamConfig {
    /// Columns and decoding (`data.*`).
    pub columns: PairColumns,
    /// Which rows are training pairs.
    pub split: RowSplit,
    /// Pairs per batch (`train.batch_size`, at least 2).
    pub batch_size: usize,
    /// Seed of the row-group order and shuffle windows (`train.seed`).
    pub seed: u64,
    /// This process's rank and the number of ranks: each reads its own row groups.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Longest caption in tokens (`max_seq_len`).
    pub max_seq_len: usize,
    /// Image shape `[C, H, W]` the model takes; other images are an error naming the rows.
    pub shape: [usize; 3],
    /// Bound of the decoded shuffle window in bytes (`data.shuffle_buffer_mb`).
    pub shuffle_bytes: usize,
    /// Decoding threads (0: the number of cores, at most 4).
    pub workers: usize,
}

/// Endless batches of training pairs streamed from Parquet: row groups dealt to ranks, a
/// seeded shuffle window bounded in bytes, images decoded in the loader's workers, captions
/// tokenized (and filtered) on the stream's thread; held-out rows never appear. Its position
/// (a [`StreamPosition`] as JSON) resumes it exactly, mid-epoch included.
pub struct StreamingPairSource {
    source: ParquetSource,
    loader: LoaderConfig,
    transform: Arc<PairTransform>,
    stream: ExampleStream<StreamedPair, MultimodalError>,
    batch_size: usize,
    shape: [usize; 3],
    pad_id: u32,
    device: Device,
}

impl StreamingPairSource {
    /// Opens the stream at the start of epoch 0 (configuration errors surface here).
    pub fn new(
        source: &ParquetSource,
        cfg: PairStreamConfig,
        tok: &Tokenizer,
        filter: Option<PairFilter>,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size < 2 {
            return Err(MultimodalError::Config(
                "train.batch_size must be at least 2 (a contrastive batch needs negatives)".into(),
            ));
        }
        let loader = LoaderConfig {
            columns: pair_specs(
                &PairColumns {
                    labels: Vec::new(),
                    ..cfg.columns.clone()
                },
                true,
                true,
            )?,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            shuffle: true,
            shuffle_buffer: window_rows(cfg.shape, cfg.shuffle_bytes, cfg.batch_size),
            epochs: None,
            rank: cfg.rank,
            world_size: cfg.world,
            skip_bad_rows: cfg.columns.skip_bad_rows,
            prefetch: 2,
            workers: cfg.workers,
            drop_last: false,
        };
        let transform = Arc::new(PairTransform {
            cols: cfg.columns,
            split: cfg.split,
            tok: tok.clone(),
            max_seq_len: cfg.max_seq_len,
            shape: cfg.shape,
            filter,
            blanks: Arc::new(AtomicUsize::new(0)),
            filtered: Arc::new(AtomicUsize::new(0)),
        });
        let stream = Self::open(source, &loader, &transform, StreamPosition::default())?;
        Ok(StreamingPairSource {
            source: source.clone(),
            loader,
            transform,
            stream,
            batch_size: cfg.batch_size,
            shape: cfg.shape,
            pad_id: SpecialIds::of(tok)?.pad,
            device: device.clone(),
        })
    }

    fn open(
        source: &ParquetSource,
        loader: &LoaderConfig,
        transform: &Arc<PairTransform>,
        at: StreamPosition,
    ) -> Result<ExampleStream<StreamedPair, MultimodalError>> {
        let t = transform.clone();
        ExampleStream::new(source, loader.clone(), at, AHEAD, move |b| t.apply(b))
    }

    /// Rows of the decoded shuffle window (from `data.shuffle_buffer_mb`).
    pub fn window_rows(&self) -> usize {
        self.loader.shuffle_buffer
    }

    /// Rows the loader skipped so far under `data.skip_bad_rows` (undecodable images or
    /// captions).
    pub fn bad_rows(&self) -> ssl_data::BadRowReport {
        self.stream.bad_rows()
    }

    /// Training rows met so far with an empty caption (skipped under `data.skip_bad_rows`).
    pub fn blank_captions(&self) -> usize {
        self.transform.blanks.load(Ordering::Relaxed)
    }

    /// Training pairs the pair filter dropped so far.
    pub fn filtered(&self) -> usize {
        self.transform.filtered.load(Ordering::Relaxed)
    }

    /// The stream's position (what [`BatchSource::position`] stores, as a struct).
    pub fn stream_position(&self) -> StreamPosition {
        self.stream.position()
    }
}

impl BatchSource<PairBatch> for StreamingPairSource {
    fn next_batch(&mut self) -> ssl_core::Result<PairBatch> {
        let pairs = self.stream.take(self.batch_size)?;
        if pairs.len() < 2 {
            return Err(CoreError::InvalidInput(
                "the pair stream ended: no training pairs are left after the held-out split, data.max_pairs and the pair filter".into(),
            ));
        }
        let n = pairs.len();
        let [c, h, w] = self.shape;
        let mut px = Vec::with_capacity(n * c * h * w);
        let mut seqs = Vec::with_capacity(n);
        for p in pairs {
            px.extend_from_slice(&p.pixels);
            seqs.push(p.seq);
        }
        let build = || -> Result<PairBatch> {
            let images = Images::from_vec(px, [n, c, h, w], &self.device)?;
            let text = TextBatch {
                seqs,
                pad_id: self.pad_id,
                device: self.device.clone(),
            }
            .tensors()?;
            PairBatch::new(images, text)
        };
        Ok(build()?)
    }

    fn epoch(&self) -> u64 {
        self.stream.epoch()
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.stream.position()).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let at: StreamPosition = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not a pair stream position: {e}"
            ))
        })?;
        self.stream = Self::open(&self.source, &self.loader, &self.transform, at)?;
        Ok(())
    }
}

/// What [`collect_pairs`] read.
#[derive(Debug, Clone)]
pub struct Collected {
    /// The pairs kept, in the order read.
    pub set: PairSet,
    /// Their global row indices.
    pub rows: Vec<usize>,
    /// Kept rows with an empty caption, skipped under `skip_bad_rows`.
    pub blank_captions: usize,
    /// Rows the loader skipped as undecodable under `skip_bad_rows`.
    pub bad_rows: ssl_data::BadRowReport,
}

/// How [`collect_pairs`] walks the source.
#[derive(Debug, Clone, Copy)]
pub struct CollectOrder {
    /// Shuffled row-group order and rows (seeded), else file order.
    pub shuffle: Option<u64>,
    /// Rows per loader batch (and shuffle window, when shuffled).
    pub window: usize,
}

/// What a bounded pass ([`visit_pairs`]) met besides the pairs.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Pairs kept (handed to the visitor).
    pub kept: usize,
    /// Kept rows with an empty caption, skipped under `skip_bad_rows`.
    pub blank_captions: usize,
    /// Rows the loader skipped as undecodable under `skip_bad_rows`.
    pub bad_rows: ssl_data::BadRowReport,
}

/// Reads the pairs of `source` whose global row index satisfies `keep`, one pass at most,
/// stopping once `cap` pairs are kept (0: no cap), and hands them to `visit` a loader batch
/// at a time with their global row indices: a bounded read in constant memory (the
/// statistics sample, the held-out set, `ssl eval`'s input). Every row's columns of `cols`
/// are decoded (label columns too). Progress is reported as `label` (a line every few
/// seconds in a log).
pub fn visit_pairs(
    source: &ParquetSource,
    cols: &PairColumns,
    order: CollectOrder,
    keep: impl Fn(usize) -> bool,
    cap: usize,
    label: &str,
    mut visit: impl FnMut(PairSet, Vec<usize>) -> Result<()>,
) -> Result<PassReport> {
    let config = LoaderConfig {
        columns: pair_specs(cols, true, true)?,
        batch_size: order.window.clamp(1, 1024),
        seed: order.shuffle.unwrap_or(0),
        shuffle: order.shuffle.is_some(),
        shuffle_buffer: order.window.max(1),
        epochs: Some(1),
        skip_bad_rows: cols.skip_bad_rows,
        prefetch: 2,
        ..LoaderConfig::default()
    };
    let total = if cap > 0 { cap } else { source.num_rows() };
    let progress = ssl_core::monitor::Progress::task(label, total as u64, "pairs");
    let mut loader = ssl_data::DataLoader::new(source, config)?;
    let blanks = AtomicUsize::new(0);
    let mut kept = 0;
    while let Some(batch) = loader.next_batch()? {
        if cap > 0 && kept >= cap {
            break;
        }
        let img = batch_images(&batch, cols, None)?;
        let [_, c, h, w] = img.shape;
        let per = c * h * w;
        let caps = batch.text(&cols.caption)?;
        let label_cols = cols
            .labels
            .iter()
            .map(|l| batch.text(l))
            .collect::<std::result::Result<Vec<_>, DataError>>()?;
        let mut take = Vec::new();
        for (k, &row) in batch.rows().iter().enumerate() {
            if cap > 0 && kept + take.len() >= cap {
                break;
            }
            if !keep(row) {
                continue;
            }
            if caps[k].trim().is_empty() {
                blank_caption(cols, row, &batch.ids()[k], &blanks)?;
                continue;
            }
            take.push(k);
        }
        if take.is_empty() {
            continue;
        }
        let px: Vec<f32> = take
            .iter()
            .flat_map(|&k| img.data[k * per..(k + 1) * per].iter().copied())
            .collect();
        let labels = cols
            .labels
            .iter()
            .zip(&label_cols)
            .map(|(name, l)| (name.clone(), take.iter().map(|&k| l[k].clone()).collect()))
            .collect();
        let set = PairSet::new(
            ImageSet::new(px, [c, h, w])?,
            take.iter().map(|&k| caps[k].clone()).collect(),
            take.iter().map(|&k| batch.ids()[k].clone()).collect(),
            labels,
        )?;
        let rows = take.iter().map(|&k| batch.rows()[k]).collect();
        kept += take.len();
        progress.inc(take.len() as u64);
        visit(set, rows)?;
    }
    progress.finish();
    Ok(PassReport {
        kept,
        blank_captions: blanks.load(Ordering::Relaxed),
        bad_rows: loader.bad_rows(),
    })
}

/// [`visit_pairs`] collecting the pairs in memory (all images of one shape, else an error
/// naming the rows): for bounded sets.
pub fn collect_pairs(
    source: &ParquetSource,
    cols: &PairColumns,
    order: CollectOrder,
    keep: impl Fn(usize) -> bool,
    cap: usize,
    label: &str,
) -> Result<Collected> {
    let mut all: Option<PairSet> = None;
    let mut rows_all = Vec::new();
    let report = visit_pairs(source, cols, order, keep, cap, label, |set, rows| {
        rows_all.extend(rows);
        match &mut all {
            None => all = Some(set),
            Some(a) => a.append(set)?,
        }
        Ok(())
    })?;
    let set = match all {
        Some(s) => s,
        None => {
            let shape = match cols.resize.as_slice() {
                [h, w] => [cols.color.channels(), *h, *w],
                _ => [cols.color.channels(), 1, 1],
            };
            PairSet::new(
                ImageSet::new(Vec::new(), shape)?,
                Vec::new(),
                Vec::new(),
                cols.labels
                    .iter()
                    .map(|l| (l.clone(), Vec::new()))
                    .collect(),
            )?
        }
    };
    Ok(Collected {
        set,
        rows: rows_all,
        blank_captions: report.blank_captions,
        bad_rows: report.bad_rows,
    })
}

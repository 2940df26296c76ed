//! Streaming the documents of a text run: which rows train and which are held out (by global
//! row index), the training sequences as a resumable [`BatchSource`] on
//! [`ssl_data::ExampleStream`], and the bounded reads made before training (the held-out
//! sequences, the online k-NN bank, the sequences-per-document estimate of
//! `train.max_epochs`). Nothing here holds the data set: memory is bounded by a loader window
//! ([`SHUFFLE_ROWS`] rows) and a few batches.

use std::sync::Arc;

use candle_core::Device;
use serde_json::{json, Value};
use ssl_core::probe::KNN_BANK_MAX;
use ssl_core::BatchSource;
use ssl_data::{is_heldout, Batch, ExampleStream, LoaderConfig, ParquetSource, StreamPosition};
use tokenizers::Tokenizer;

use super::config::{DataConfig, TextConfig};
use super::docs::{doc_columns, docs_of_batch, Docs};
use super::tokenizer::tokenize;
use crate::{Result, TextBatch, TextError, TokenizedSeq};

/// Rows of each loader batch of a text stream. Training sequences are packed per loader
/// batch (`input.mode = "packed"` drops each batch's incomplete last block).
pub const LOADER_BATCH_ROWS: usize = 256;

/// Rows shuffled together in the training stream (`LoaderConfig::shuffle_buffer`): windows of
/// whole row groups holding at least this many rows are decoded and shuffled at once, so the
/// memory a stream holds is about this many documents' text (plus one row group).
pub const SHUFFLE_ROWS: usize = 4096;

/// Documents tokenized (at most) to estimate sequences per document for `train.max_epochs`.
pub const EPOCH_ESTIMATE_DOCS: usize = 2048;

/// Bytes of text tokenized (at most, whole loader batches) for the same estimate: long
/// documents make a smaller sample (one loader batch at least), so the estimate takes a few
/// seconds at most.
pub const EPOCH_ESTIMATE_BYTES: usize = 1 << 20;

/// Salt of the `data.max_docs` sample's hash (so it is independent of the held-out split).
const MAX_DOCS_SALT: u64 = 0x6d61_785f_646f_6373;
/// Salt of the shuffle of the online k-NN bank's reader.
const KNN_SALT: u64 = 0x6b6e_6e5f_6261_6e6b;

/// Which global rows a text run uses: `data.max_docs` as a seeded sample of the rows (row `i`
/// is kept when a seeded hash of `i` falls below `max_docs / rows`, so about `max_docs` rows,
/// spread over the whole source, whichever rank or reader sees them), and among them the
/// held-out split (`data.heldout_fraction`, [`ssl_data::is_heldout`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowFilter {
    seed: u64,
    heldout_fraction: f64,
    sample: f64,
}

impl RowFilter {
    /// The filter of `cfg` with `seed` (`train.seed`) over a source of `num_rows` rows.
    pub fn new(cfg: &DataConfig, seed: u64, num_rows: usize) -> Self {
        let sample = if cfg.max_docs == 0 || cfg.max_docs >= num_rows {
            1.0
        } else {
            cfg.max_docs as f64 / num_rows as f64
        };
        RowFilter {
            seed,
            heldout_fraction: cfg.heldout_fraction,
            sample,
        }
    }

    /// The fraction of rows the `data.max_docs` sample keeps (1: all).
    pub fn sample_fraction(&self) -> f64 {
        self.sample
    }

    /// Whether row `i` is in the `data.max_docs` sample.
    pub fn sampled(&self, i: usize) -> bool {
        self.sample >= 1.0 || is_heldout(i, self.seed ^ MAX_DOCS_SALT, self.sample)
    }

    /// Whether row `i` is a training document (sampled, not held out).
    pub fn training(&self, i: usize) -> bool {
        self.sampled(i) && !is_heldout(i, self.seed, self.heldout_fraction)
    }

    /// Whether row `i` is a held-out document (sampled and held out).
    pub fn heldout(&self, i: usize) -> bool {
        self.sampled(i) && is_heldout(i, self.seed, self.heldout_fraction)
    }
}

/// Turns loader batches into documents and packed sequences: the pure function of a batch that
/// a text stream's transform runs.
#[derive(Clone)]
pub struct DocPacker {
    tok: Arc<Tokenizer>,
    cfg: Arc<TextConfig>,
    filter: RowFilter,
    label: Option<String>,
}

impl DocPacker {
    /// A packer tokenizing with `tok` as `cfg` says (input mode, entity spans from
    /// `data.entity_column` when set, `data.entity_terms`), keeping rows by `filter`, reading
    /// the `label` column when given.
    pub fn new(tok: &Tokenizer, cfg: &TextConfig, filter: RowFilter, label: Option<&str>) -> Self {
        DocPacker {
            tok: Arc::new(tok.clone()),
            cfg: Arc::new(cfg.clone()),
            filter,
            label: label.map(str::to_string),
        }
    }

    /// The row filter.
    pub fn filter(&self) -> RowFilter {
        self.filter
    }

    /// A loader configuration reading the packer's columns in batches of
    /// [`LOADER_BATCH_ROWS`] (one epoch, in file order, one rank: change what differs).
    pub fn loader(&self) -> LoaderConfig {
        LoaderConfig {
            columns: doc_columns(&self.cfg.data, self.label.as_deref(), true),
            batch_size: LOADER_BATCH_ROWS,
            seed: self.cfg.train.seed,
            shuffle: false,
            shuffle_buffer: SHUFFLE_ROWS,
            epochs: Some(1),
            skip_bad_rows: self.cfg.data.skip_bad_rows,
            prefetch: 2,
            ..LoaderConfig::default()
        }
    }

    /// The documents of `batch` whose global row satisfies `keep`.
    pub fn docs(&self, batch: &Batch, keep: impl Fn(usize) -> bool) -> Result<Docs> {
        docs_of_batch(
            batch,
            batch.rows(),
            &self.cfg.data,
            self.label.as_deref(),
            true,
            keep,
        )
    }

    /// The sequences of `docs`, tokenized and packed together as [`tokenize`] does.
    pub fn pack(&self, docs: &Docs) -> Result<Vec<TokenizedSeq>> {
        tokenize(&self.tok, &docs.texts, docs.entities.as_deref(), &self.cfg)
    }
}

/// Counts of the rows read since a stream last produced a training sequence.
#[derive(Debug, Default, Clone, Copy)]
struct Dry {
    rows: usize,
    train: usize,
    held: usize,
}

impl Dry {
    /// The error of a stream that read `rows` rows without a training sequence.
    fn error(&self, frac: f64) -> TextError {
        let why = if self.train + self.held == 0 {
            format!(
                "none of the {} rows read is in the data.max_docs sample",
                self.rows
            )
        } else if self.train == 0 {
            format!(
                "all documents were held out for perplexity (data.heldout_fraction = {frac}); \
                 add documents or set data.heldout_fraction = 0"
            )
        } else {
            "all training documents are empty or blank".to_string()
        };
        TextError::InvalidInput(format!("nothing to train on: {why}"))
    }
}

/// The training sequences of Parquet files, streamed: a seeded shuffled endless
/// [`ExampleStream`] over this rank's row groups whose transform keeps the training rows
/// ([`RowFilter::training`]), tokenizes them and packs them into sequences per loader batch;
/// batches of `train.batch_size` sequences. Its position (saved in checkpoints) is the stream's
/// [`StreamPosition`], so a resumed run continues with exactly the sequences that would have
/// followed.
///
/// A stream that reads twice the source's rows without a single training sequence (every
/// document held out, outside the `data.max_docs` sample, or blank) fails with
/// [`TextError::InvalidInput`] naming the cause.
pub struct StreamingTextSource {
    source: ParquetSource,
    loader: LoaderConfig,
    packer: DocPacker,
    stream: ExampleStream<TokenizedSeq, TextError>,
    batch_size: usize,
    pad_id: u32,
    device: Device,
}

impl StreamingTextSource {
    /// Rows the loader skipped so far under `data.skip_bad_rows` (null or non-text cells).
    pub fn bad_rows(&self) -> ssl_data::BadRowReport {
        self.stream.bad_rows()
    }

    /// A source over `source` for rank `rank` of `world`, with the packer's tokenizer and
    /// configuration (`train.batch_size`, `train.seed`, `data.skip_bad_rows`).
    pub fn new(
        source: &ParquetSource,
        packer: DocPacker,
        rank: usize,
        world: usize,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let batch_size = packer.cfg.train.batch_size;
        if batch_size == 0 {
            return Err(TextError::Config("batch_size must be at least 1".into()));
        }
        if source.num_rows() == 0 {
            return Err(TextError::InvalidInput(
                "nothing to train on: the data holds no documents".into(),
            ));
        }
        let loader = LoaderConfig {
            shuffle: true,
            epochs: None,
            rank,
            world_size: world,
            ..packer.loader()
        };
        let stream = Self::open(source, &loader, &packer, StreamPosition::default())?;
        Ok(StreamingTextSource {
            source: source.clone(),
            loader,
            packer,
            stream,
            batch_size,
            pad_id,
            device: device.clone(),
        })
    }

    fn open(
        source: &ParquetSource,
        loader: &LoaderConfig,
        packer: &DocPacker,
        position: StreamPosition,
    ) -> Result<ExampleStream<TokenizedSeq, TextError>> {
        let packer = packer.clone();
        let limit = 2 * source.num_rows().max(1);
        let frac = packer.cfg.data.heldout_fraction;
        let mut dry = Dry::default();
        ExampleStream::new(source, loader.clone(), position, 4, move |batch: Batch| {
            let f = packer.filter;
            let docs = packer.docs(&batch, |i| f.training(i))?;
            let seqs = packer.pack(&docs)?;
            if seqs.is_empty() {
                dry.rows += batch.len();
                dry.train += docs.texts.len();
                dry.held += batch.rows().iter().filter(|&&i| f.heldout(i)).count();
                if dry.rows >= limit {
                    return Err(dry.error(frac));
                }
            } else {
                dry = Dry::default();
            }
            Ok(seqs)
        })
    }
}

impl BatchSource<TextBatch> for StreamingTextSource {
    fn next_batch(&mut self) -> ssl_core::Result<TextBatch> {
        let seqs = self.stream.take(self.batch_size)?;
        if seqs.len() < self.batch_size {
            return Err(TextError::Pipeline("the training text stream ended".into()).into());
        }
        Ok(TextBatch {
            seqs,
            pad_id: self.pad_id,
            device: self.device.clone(),
        })
    }

    fn epoch(&self) -> u64 {
        self.stream.epoch()
    }

    fn position(&self) -> Value {
        json!({ "stream": self.stream.position() })
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let pos: StreamPosition = position
            .get("stream")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| {
                ssl_core::CoreError::InvalidInput(format!(
                    "the text stream's position lacks `stream` (a checkpoint of an in-memory \
                     text source cannot be resumed by the streaming one): {position}"
                ))
            })?;
        self.stream = Self::open(&self.source, &self.loader, &self.packer, pos)?;
        Ok(())
    }
}

/// What [`read_heldout`] collects.
#[derive(Debug, Clone, Default)]
pub struct HeldoutSet {
    /// This rank's held-out sequences (at most the cap).
    pub seqs: Vec<TokenizedSeq>,
    /// Held-out documents read.
    pub docs: usize,
    /// Labelled held-out documents kept for the online k-NN (text, label).
    pub labelled: Vec<(String, String)>,
}

/// Reads this rank's held-out documents ([`RowFilter::heldout`]) in file order and packs them
/// per loader batch, until `max_seqs` sequences (0: all) and, when the packer reads a label
/// column, `max_labelled` labelled documents are collected; then stops reading. Memory is the
/// sets collected and one loader window.
pub fn read_heldout(
    source: &ParquetSource,
    packer: &DocPacker,
    rank: usize,
    world: usize,
    max_seqs: usize,
    max_labelled: usize,
) -> Result<HeldoutSet> {
    let loader = LoaderConfig {
        rank,
        world_size: world,
        ..packer.loader()
    };
    let p = packer.clone();
    let want_labels = packer.label.is_some() && max_labelled > 0;
    let mut stream: ExampleStream<(Vec<TokenizedSeq>, Docs), TextError> = ExampleStream::new(
        source,
        loader,
        StreamPosition::default(),
        2,
        move |b: Batch| {
            let f = p.filter;
            let docs = p.docs(&b, |i| f.heldout(i))?;
            let seqs = p.pack(&docs)?;
            Ok(vec![(seqs, docs)])
        },
    )?;
    let bar = ssl_core::monitor::Progress::task("held-out set", 0, "sequences");
    let mut out = HeldoutSet::default();
    loop {
        let seqs_done = max_seqs > 0 && out.seqs.len() >= max_seqs;
        let labels_done = !want_labels || out.labelled.len() >= max_labelled;
        if seqs_done && labels_done {
            break;
        }
        let Some((seqs, docs)) = stream.take(1)?.pop() else {
            break;
        };
        out.docs += docs.texts.len();
        if !seqs_done {
            bar.inc(seqs.len() as u64);
            out.seqs.extend(seqs);
        }
        if want_labels && !labels_done {
            if let Some(labels) = docs.labels {
                out.labelled.extend(docs.texts.into_iter().zip(labels));
            }
        }
    }
    bar.finish();
    if max_seqs > 0 {
        out.seqs.truncate(max_seqs);
    }
    if want_labels {
        out.labelled.truncate(max_labelled);
    }
    Ok(out)
}

/// The online k-NN bank: up to [`KNN_BANK_MAX`] labelled training documents (text, label),
/// the first of a seeded shuffled pass (row groups and rows within windows shuffled), so only
/// the first windows are read. Empty when the packer reads no label column.
pub fn read_knn_bank(source: &ParquetSource, packer: &DocPacker) -> Result<Vec<(String, String)>> {
    if packer.label.is_none() {
        return Ok(Vec::new());
    }
    let loader = LoaderConfig {
        shuffle: true,
        seed: packer.cfg.train.seed ^ KNN_SALT,
        ..packer.loader()
    };
    let p = packer.clone();
    let mut stream: ExampleStream<(String, String), TextError> = ExampleStream::new(
        source,
        loader,
        StreamPosition::default(),
        2,
        move |b: Batch| {
            let f = p.filter;
            let docs = p.docs(&b, |i| f.training(i))?;
            let labels = docs.labels.unwrap_or_default();
            Ok(docs.texts.into_iter().zip(labels).collect())
        },
    )?;
    stream.take(KNN_BANK_MAX)
}

/// The estimate of training sequences per epoch (over every rank) of `train.max_epochs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochEstimate {
    /// Training documents tokenized for the estimate.
    pub sample_docs: usize,
    /// Sequences per training document in that sample.
    pub seqs_per_doc: f64,
    /// Expected training documents in the source (rows x the `data.max_docs` sample x (1 -
    /// held-out fraction)).
    pub train_docs: f64,
    /// `train_docs x seqs_per_doc`, rounded up.
    pub seqs: u64,
}

/// Estimates the training sequences of one epoch: the first training documents (file order;
/// [`EPOCH_ESTIMATE_DOCS`] documents or [`EPOCH_ESTIMATE_BYTES`] bytes of text, whichever
/// comes first, in whole loader batches) tokenized and packed as training packs them give
/// sequences per document, times the expected training documents of the source.
pub fn estimate_epoch(source: &ParquetSource, packer: &DocPacker) -> Result<EpochEstimate> {
    let p = packer.clone();
    let mut stream: ExampleStream<(usize, usize, usize), TextError> = ExampleStream::new(
        source,
        packer.loader(),
        StreamPosition::default(),
        2,
        move |b: Batch| {
            let f = p.filter;
            let docs = p.docs(&b, |i| f.training(i))?;
            let bytes = docs.texts.iter().map(String::len).sum();
            Ok(vec![(docs.texts.len(), bytes, p.pack(&docs)?.len())])
        },
    )?;
    let (mut docs, mut bytes, mut seqs) = (0usize, 0usize, 0usize);
    while docs < EPOCH_ESTIMATE_DOCS && bytes < EPOCH_ESTIMATE_BYTES {
        let Some((d, b, s)) = stream.take(1)?.pop() else {
            break;
        };
        docs += d;
        bytes += b;
        seqs += s;
    }
    if docs == 0 || seqs == 0 {
        return Err(TextError::InvalidInput(
            "train.max_epochs: no training sequence in the data to estimate an epoch from \
             (every document held out, outside data.max_docs, or blank)"
                .into(),
        ));
    }
    let f = packer.filter;
    let train_docs =
        source.num_rows() as f64 * f.sample_fraction() * (1.0 - f.heldout_fraction.clamp(0.0, 1.0));
    let seqs_per_doc = seqs as f64 / docs as f64;
    Ok(EpochEstimate {
        sample_docs: docs,
        seqs_per_doc,
        train_docs,
        seqs: (train_docs * seqs_per_doc).ceil().max(1.0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_docs_is_a_seeded_sample_spread_over_the_rows() {
        let cfg = DataConfig {
            max_docs: 1000,
            heldout_fraction: 0.1,
            ..DataConfig::default()
        };
        let f = RowFilter::new(&cfg, 7, 10_000);
        let kept: Vec<usize> = (0..10_000).filter(|&i| f.sampled(i)).collect();
        assert!((900..1100).contains(&kept.len()), "{}", kept.len());
        // Spread over the whole source, not the first rows.
        assert!(kept.iter().any(|&i| i > 9000) && kept.iter().any(|&i| i < 1000));
        // Held-out and training rows partition the sample.
        for i in 0..10_000 {
            assert_eq!(f.sampled(i), f.training(i) || f.heldout(i));
            assert!(!(f.training(i) && f.heldout(i)));
        }
        let held = kept.iter().filter(|&&i| f.heldout(i)).count() as f64;
        assert!((held / kept.len() as f64 - 0.1).abs() < 0.04);
        // Another seed, another sample; no cap, every row.
        let g = RowFilter::new(&cfg, 8, 10_000);
        assert!((0..10_000).any(|i| f.sampled(i) != g.sampled(i)));
        let all = RowFilter::new(&DataConfig::default(), 7, 10_000);
        assert!((0..10_000).all(|i| all.sampled(i)));
    }
}

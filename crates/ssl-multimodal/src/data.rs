//! Image-caption pairs: reading them from Parquet (image bytes + caption + optional label
//! columns) through ssl-data, a seeded hold-out split, caption tokenization, and an endless,
//! resumable, seeded batch source.

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ssl_core::{BatchSource, CoreError, SslRng};
use ssl_data::{read_all, BadRowReport, ColorMode, ColumnSpec, ReadOptions, Share};
use ssl_text::{tokenize_texts, InputConfig, InputMode, SpecialIds, TextBatch, TokenizedSeq};
use ssl_vision::ImageSet;
use tokenizers::Tokenizer;

use crate::task::PairBatch;
use crate::{MultimodalError, Result};

/// Image-caption pairs in memory, with optional text label columns (for zero-shot evaluation).
#[derive(Debug, Clone, PartialEq)]
pub struct PairSet {
    /// Raw `[0, 1]` pixels.
    pub images: ImageSet,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Row ids (the id column, or `file:row`).
    pub ids: Vec<String>,
    /// `(column, one label per pair)` for every label column read.
    pub labels: Vec<(String, Vec<String>)>,
}

impl PairSet {
    /// Checks that every part has one entry per image.
    pub fn new(
        images: ImageSet,
        captions: Vec<String>,
        ids: Vec<String>,
        labels: Vec<(String, Vec<String>)>,
    ) -> Result<Self> {
        let n = images.len();
        let bad = captions.len() != n || ids.len() != n || labels.iter().any(|(_, l)| l.len() != n);
        if bad {
            return Err(MultimodalError::InvalidInput(format!(
                "{n} images but {} captions, {} ids and label columns of {:?} values",
                captions.len(),
                ids.len(),
                labels.iter().map(|(_, l)| l.len()).collect::<Vec<_>>()
            )));
        }
        Ok(PairSet {
            images,
            captions,
            ids,
            labels,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    /// True without pairs.
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// The pairs at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> PairSet {
        PairSet {
            images: self.images.select(idx),
            captions: idx.iter().map(|&i| self.captions[i].clone()).collect(),
            ids: idx.iter().map(|&i| self.ids[i].clone()).collect(),
            labels: self
                .labels
                .iter()
                .map(|(c, l)| (c.clone(), idx.iter().map(|&i| l[i].clone()).collect()))
                .collect(),
        }
    }

    /// Appends the pairs of `other` (same image shape and label columns, else an error naming
    /// `other`'s first row).
    pub fn append(&mut self, other: PairSet) -> Result<()> {
        let names = |p: &PairSet| p.labels.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>();
        if other.images.shape != self.images.shape || names(&other) != names(self) {
            return Err(MultimodalError::Config(format!(
                "the images of rows from {} are {:?} (channels, height, width) with label columns {:?} but earlier ones {:?} with {:?}; set data.resize",
                other.ids.first().map(String::as_str).unwrap_or("?"),
                other.images.shape,
                names(&other),
                self.images.shape,
                names(self)
            )));
        }
        self.images.data.extend(other.images.data);
        self.captions.extend(other.captions);
        self.ids.extend(other.ids);
        for ((_, l), (_, m)) in self.labels.iter_mut().zip(other.labels) {
            l.extend(m);
        }
        Ok(())
    }

    /// The labels of column `name`.
    pub fn label_column(&self, name: &str) -> Result<&[String]> {
        self.labels
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, l)| l.as_slice())
            .ok_or_else(|| {
                MultimodalError::InvalidInput(format!(
                    "label column `{name}` was not read (read: {:?})",
                    self.labels.iter().map(|(c, _)| c).collect::<Vec<_>>()
                ))
            })
    }
}

/// Which columns hold the pairs, and how images are decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairColumns {
    /// Image column (PNG/JPEG bytes or a Hugging Face `{bytes, path}` struct).
    pub image: String,
    /// Caption column (text).
    pub caption: String,
    /// Id column ("" = `file:row`).
    pub id: String,
    /// Text label columns to read along (zero-shot evaluation).
    pub labels: Vec<String>,
    /// `grey` or `rgb` (alpha is dropped).
    pub color: ColorMode,
    /// Resize every image to `[height, width]` (empty: keep; all images must then agree).
    pub resize: Vec<usize>,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// The largest image accepted, in pixels (checked from each image's header before
    /// decoding; also bounds `resize`): `data.max_image_pixels`.
    pub max_image_pixels: u64,
}

impl Default for PairColumns {
    fn default() -> Self {
        PairColumns {
            image: "image".into(),
            caption: "caption".into(),
            id: String::new(),
            labels: Vec::new(),
            color: ColorMode::Rgb,
            resize: vec![32, 32],
            skip_bad_rows: false,
            max_image_pixels: ssl_data::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// Reads every row of the Parquet files, directories or globs in `paths`; returns the pairs
/// and the rows skipped under `skip_bad_rows`.
pub fn read_pairs(paths: &[String], cols: &PairColumns) -> Result<(PairSet, BadRowReport)> {
    let r = read_pairs_of(paths, cols, 0, 1)?;
    Ok((r.set, r.bad_rows))
}

/// Pairs read from a source, or from one rank's share of it.
#[derive(Debug, Clone)]
pub struct PairsRead {
    /// The pairs, in file order.
    pub set: PairSet,
    /// Rows skipped under `skip_bad_rows`.
    pub bad_rows: BadRowReport,
    /// Each pair's global row index in the source (files in order, rows in file order).
    pub row_index: Vec<usize>,
    /// Which part of the source was read.
    pub share: Share,
}

/// [`read_pairs`] for rank `rank` of `world_size`: only that rank's share of the rows (its
/// row groups; see [`ssl_data::read_all`]), with their global row indices.
pub fn read_pairs_of(
    paths: &[String],
    cols: &PairColumns,
    rank: usize,
    world_size: usize,
) -> Result<PairsRead> {
    let resize = match cols.resize.as_slice() {
        [] => None,
        [h, w] => Some([*h, *w]),
        other => {
            return Err(MultimodalError::Config(format!(
                "data.resize = {other:?}: give [height, width] or []"
            )))
        }
    };
    let mut specs = vec![
        ColumnSpec::image(cols.image.as_str(), cols.color, resize)
            .with_max_pixels(cols.max_image_pixels),
        ColumnSpec::text(cols.caption.as_str()),
    ];
    for l in &cols.labels {
        specs.push(ColumnSpec::text(l.as_str()));
    }
    if !cols.id.is_empty() {
        specs.push(ColumnSpec::id(cols.id.as_str()));
    }
    let table = read_all(
        paths,
        &specs,
        &ReadOptions {
            skip_bad_rows: cols.skip_bad_rows,
            rank,
            world_size,
            ..Default::default()
        },
    )?;
    let batch = table.batch;
    let img = batch.image(&cols.image)?;
    let [_, c, h, w] = img.shape;
    let images = ImageSet::new(img.data.clone(), [c, h, w])?;
    let captions = batch.text(&cols.caption)?.to_vec();
    let mut labels = Vec::new();
    for l in &cols.labels {
        labels.push((l.clone(), batch.text(l)?.to_vec()));
    }
    let set = PairSet::new(images, captions, batch.ids().to_vec(), labels)?;
    // A blank caption is a pair with nothing to match: an error naming the row, or skipped
    // and counted with `data.skip_bad_rows`.
    let blank: Vec<usize> = (0..set.len())
        .filter(|&i| set.captions[i].trim().is_empty())
        .collect();
    let (set, row_index) = match blank.first() {
        None => (set, table.row_index),
        Some(&first) if !cols.skip_bad_rows => {
            return Err(MultimodalError::InvalidInput(format!(
                "column `{}`: the caption of row {} (`{}`) is empty ({} such rows); set data.skip_bad_rows = true to skip them",
                cols.caption,
                table.row_index.get(first).copied().unwrap_or(first),
                set.ids[first],
                blank.len()
            )))
        }
        Some(_) => {
            let keep: Vec<usize> = (0..set.len())
                .filter(|&i| !set.captions[i].trim().is_empty())
                .collect();
            eprintln!(
                "skipped {} pairs with an empty caption in column `{}`",
                blank.len(),
                cols.caption
            );
            let rows = keep.iter().map(|&i| table.row_index[i]).collect();
            (set.select(&keep), rows)
        }
    };
    Ok(PairsRead {
        set,
        bad_rows: table.bad_rows,
        row_index,
        share: table.share,
    })
}

/// A seeded split of `0..n` into (train, held out) with `round(n * fraction)` held out.
pub fn holdout_split(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(MultimodalError::Config(format!(
            "hold-out fraction {fraction} must be in [0, 1)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SslRng::derived(seed, "pair-holdout").shuffle(&mut order);
    let k = ((n as f64) * fraction).round() as usize;
    let mut test = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Ok((train, test))
}

/// Tokenizes one caption per pair (`[CLS] tokens [SEP]`, truncated to `max_len`). A caption
/// with no token is an error naming its row id.
pub fn tokenize_captions(
    tok: &Tokenizer,
    captions: &[String],
    ids: &[String],
    max_len: usize,
) -> Result<Vec<TokenizedSeq>> {
    let cfg = InputConfig {
        mode: InputMode::Document,
        max_seq_len: max_len,
    };
    let seqs = tokenize_texts(tok, captions, &cfg, None, &[])?;
    if seqs.len() == captions.len() {
        return Ok(seqs);
    }
    // Some caption produced no token: find it to name it.
    for (i, c) in captions.iter().enumerate() {
        if tokenize_texts(tok, std::slice::from_ref(c), &cfg, None, &[])?.is_empty() {
            let id = ids.get(i).map(String::as_str).unwrap_or("?");
            return Err(MultimodalError::InvalidInput(format!(
                "the caption of row {id} ({c:?}) has no token after tokenization"
            )));
        }
    }
    Err(MultimodalError::InvalidInput(format!(
        "{} captions gave {} token sequences",
        captions.len(),
        seqs.len()
    )))
}

/// The pairs at `idx` as a batch on `device`.
pub fn pair_batch(
    images: &ImageSet,
    seqs: &[TokenizedSeq],
    pad_id: u32,
    idx: &[usize],
    device: &Device,
) -> Result<PairBatch> {
    let imgs = images.select(idx).batch(0, idx.len(), device)?;
    let text = TextBatch {
        seqs: idx.iter().map(|&i| seqs[i].clone()).collect(),
        pad_id,
        device: device.clone(),
    }
    .tensors()?;
    PairBatch::new(imgs, text)
}

/// Position of an [`InMemoryPairSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PairCursor {
    /// Epoch.
    pub epoch: u64,
    /// Index of the next pair in the epoch's order.
    pub offset: usize,
}

/// Endless batches of pairs, reshuffled each epoch from `(seed, epoch)`; a trailing partial
/// batch is dropped (unless the set is smaller than one batch).
pub struct InMemoryPairSource {
    images: ImageSet,
    seqs: Vec<TokenizedSeq>,
    pad_id: u32,
    batch_size: usize,
    seed: u64,
    device: Device,
    cursor: PairCursor,
    order: Vec<usize>,
}

impl InMemoryPairSource {
    /// A source over the images and their tokenized captions.
    pub fn new(
        images: ImageSet,
        seqs: Vec<TokenizedSeq>,
        tok: &Tokenizer,
        batch_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if images.is_empty() || images.len() != seqs.len() {
            return Err(MultimodalError::InvalidInput(format!(
                "{} images and {} captions: need the same positive number",
                images.len(),
                seqs.len()
            )));
        }
        if batch_size < 2 {
            return Err(MultimodalError::Config(
                "train.batch_size must be at least 2 (a contrastive batch needs negatives)".into(),
            ));
        }
        let pad_id = SpecialIds::of(tok)?.pad;
        let mut s = InMemoryPairSource {
            images,
            seqs,
            pad_id,
            batch_size,
            seed,
            device: device.clone(),
            cursor: PairCursor::default(),
            order: Vec::new(),
        };
        s.order = s.epoch_order(0);
        Ok(s)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.seqs.len()).collect();
        SslRng::derived(
            self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            "pair-epoch-order",
        )
        .shuffle(&mut order);
        order
    }
}

impl BatchSource<PairBatch> for InMemoryPairSource {
    fn next_batch(&mut self) -> ssl_core::Result<PairBatch> {
        let n = self.seqs.len();
        let bs = self.batch_size.min(n);
        if self.cursor.offset + bs > n {
            self.cursor = PairCursor {
                epoch: self.cursor.epoch + 1,
                offset: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
        let idx = self.order[self.cursor.offset..self.cursor.offset + bs].to_vec();
        self.cursor.offset += bs;
        Ok(pair_batch(
            &self.images,
            &self.seqs,
            self.pad_id,
            &idx,
            &self.device,
        )?)
    }

    fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.cursor).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let c: PairCursor = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not a pair cursor: {e}"
            ))
        })?;
        self.cursor = c;
        self.order = self.epoch_order(c.epoch);
        Ok(())
    }
}

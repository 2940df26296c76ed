//! Embeddings of either tower of a trained run, in the shared space, to Parquet: the input
//! streamed in file order and the embeddings written in row groups as they are computed, in
//! constant memory for any row count.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use serde::Serialize;
use ssl_core::{Ctx, SslRng};
use ssl_data::{DataLoader, EmbedSummary, EmbeddingWriter, LoaderConfig, ParquetSource};
use ssl_text::{SpecialIds, TextBatch};
use ssl_vision::Images;

use super::{LoadedRun, MultimodalConfig, Tower};
use crate::stream::pair_specs;
use crate::{tokenize_captions, MultimodalError, Result};

/// What [`embed`] wrote, and with which tower.
#[derive(Debug, Clone, Serialize)]
pub struct MultimodalEmbedSummary {
    /// The file, rows and width (`model.embed_dim`).
    pub written: EmbedSummary,
    /// The tower that ran.
    pub tower: Tower,
}

impl std::fmt::Display for MultimodalEmbedSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.written;
        write!(
            f,
            "wrote {} {} embeddings of dimension {} to {}",
            w.rows,
            self.tower.name(),
            w.dim,
            w.out.display()
        )
    }
}

/// Checks that the images have the shape the model was trained on.
pub fn check_shape(set: &crate::PairSet, cfg: &MultimodalConfig) -> Result<()> {
    check_image_shape(set.images.shape, cfg, "the images")
}

/// Checks an image shape `[C, H, W]` against the model's; `what` names the images.
fn check_image_shape(shape: [usize; 3], cfg: &MultimodalConfig, what: &str) -> Result<()> {
    let m = &cfg.model.image;
    let want = [m.channels, m.image_height, m.image_width];
    if shape != want {
        return Err(MultimodalError::Config(format!(
            "{what} are {shape:?} (channels, height, width) but the model was trained on {want:?}; set data.resize / data.color",
        )));
    }
    Ok(())
}

/// Embeds every row of `data` with the tower `cfg.embed.tower` of the checkpoint `ckpt`
/// (trained with `cfg`, see [`stored_config`](super::stored_config)) and writes
/// `(id, embedding)` rows, L2-normalised, to the Parquet file `out` (atomically, with the
/// checkpoint and tower in its metadata). The rows stream through a loader in file order
/// (one batch of `train.batch_size` decoded at a time, a few prefetched) and each batch's
/// embeddings are written as they are computed. `data.max_pairs` does not apply: every row
/// is embedded (rows the loader cannot decode are skipped and counted under
/// `data.skip_bad_rows`). Progress: `embed`.
pub fn embed(
    ckpt: &Path,
    cfg: &MultimodalConfig,
    data: &[String],
    out: &Path,
) -> Result<MultimodalEmbedSummary> {
    let run = LoadedRun::load(ckpt, cfg.clone())?;
    let bs = cfg.train.batch_size.max(1);
    let tower = cfg.embed.tower;
    let cols = cfg.data.columns(&[]);
    let source = ParquetSource::open(data)?;
    let loader_cfg = LoaderConfig {
        columns: pair_specs(&cols, tower == Tower::Image, tower == Tower::Text)?,
        batch_size: bs,
        shuffle: false,
        epochs: Some(1),
        skip_bad_rows: cfg.data.skip_bad_rows,
        prefetch: 2,
        ..LoaderConfig::default()
    };
    let mut loader = DataLoader::new(&source, loader_cfg)?;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-multimodal CLIP".to_string());
    meta.insert("checkpoint".to_string(), run.ckpt.display().to_string());
    meta.insert("tower".to_string(), tower.name().to_string());
    meta.insert("normalized".to_string(), "true".to_string());
    let dim = cfg.model.embed_dim;
    let mut writer = EmbeddingWriter::create(out, dim, meta)?;
    let pad = SpecialIds::of(&run.tok)?.pad;
    let mut rng = SslRng::new(0);
    let progress = ssl_core::monitor::Progress::task("embed", source.num_rows() as u64, "rows");
    while let Some(batch) = loader.next_batch()? {
        let emb = match tower {
            Tower::Image => {
                let img = batch.image(&cols.image)?;
                let [n, c, h, w] = img.shape;
                check_image_shape(
                    [c, h, w],
                    cfg,
                    &format!(
                        "the images of rows from {}",
                        batch.ids().first().map(String::as_str).unwrap_or("?")
                    ),
                )?;
                let images = Images::from_vec(img.data.clone(), [n, c, h, w], &run.device)?;
                run.model
                    .encode_image(&images, &mut Ctx::inference(&mut rng))?
            }
            Tower::Text => {
                let captions = batch.text(&cols.caption)?;
                let seqs = tokenize_captions(&run.tok, captions, batch.ids(), cfg.max_seq_len)?;
                let input = TextBatch {
                    seqs,
                    pad_id: pad,
                    device: run.device.clone(),
                }
                .tensors()?;
                run.model
                    .encode_text(&input, &mut Ctx::inference(&mut rng))?
            }
        };
        let flat = emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        writer.write(batch.ids(), &flat)?;
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    let bad = loader.bad_rows();
    if bad.count > 0 {
        eprintln!("skipped {} bad rows: {bad}", bad.count);
    }
    let rows = writer.finish()?;
    Ok(MultimodalEmbedSummary {
        written: EmbedSummary {
            out: out.to_path_buf(),
            rows,
            dim,
        },
        tower,
    })
}

//! Embeddings of either tower of a trained run, in the shared space, to Parquet.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use serde::Serialize;
use ssl_data::{read_all, write_embeddings, ColumnSpec, EmbedSummary, ReadOptions};
use ssl_text::SpecialIds;

use super::{LoadedRun, MultimodalConfig, Tower};
use crate::{
    embed_images, embed_token_seqs, read_pairs, tokenize_captions, MultimodalError, Result,
};

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
    let m = &cfg.model.image;
    let want = [m.channels, m.image_height, m.image_width];
    if set.images.shape != want {
        return Err(MultimodalError::Config(format!(
            "the images are {:?} (channels, height, width) but the model was trained on {want:?}; set data.resize / data.color",
            set.images.shape
        )));
    }
    Ok(())
}

/// Embeds every row of `data` with the tower `cfg.embed.tower` of the checkpoint `ckpt`
/// (trained with `cfg`, see [`stored_config`](super::stored_config)) and writes
/// `(id, embedding)` rows, L2-normalised, to the Parquet file `out` (atomically, with the
/// checkpoint and tower in its metadata). `data.max_pairs` does not apply: every row is
/// embedded.
pub fn embed(
    ckpt: &Path,
    cfg: &MultimodalConfig,
    data: &[String],
    out: &Path,
) -> Result<MultimodalEmbedSummary> {
    let run = LoadedRun::load(ckpt, cfg.clone())?;
    let bs = cfg.train.batch_size.max(1);
    let (ids, emb) = match cfg.embed.tower {
        Tower::Image => {
            let (set, bad) = read_pairs(data, &cfg.data.columns(&[]))?;
            if bad.count > 0 {
                eprintln!("skipped {} bad rows: {bad}", bad.count);
            }
            check_shape(&set, cfg)?;
            let e = embed_images(&run.model, &set.images, bs, &run.device)?;
            (set.ids, e)
        }
        Tower::Text => {
            let mut cols = vec![ColumnSpec::text(cfg.data.caption_column.as_str())];
            if !cfg.data.id_column.is_empty() {
                cols.push(ColumnSpec::id(cfg.data.id_column.as_str()));
            }
            let table = read_all(
                data,
                &cols,
                &ReadOptions {
                    skip_bad_rows: cfg.data.skip_bad_rows,
                    ..Default::default()
                },
            )?;
            let captions = table.batch.text(&cfg.data.caption_column)?.to_vec();
            let ids = table.batch.ids().to_vec();
            let seqs = tokenize_captions(&run.tok, &captions, &ids, cfg.max_seq_len)?;
            let pad = SpecialIds::of(&run.tok)?.pad;
            let e = embed_token_seqs(&run.model, &seqs, pad, bs, &run.device)?;
            (ids, e)
        }
    };
    let dim = emb.dim(1)?;
    let flat = emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let tower = cfg.embed.tower;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-multimodal CLIP".to_string());
    meta.insert("checkpoint".to_string(), run.ckpt.display().to_string());
    meta.insert("tower".to_string(), tower.name().to_string());
    meta.insert("normalized".to_string(), "true".to_string());
    Ok(MultimodalEmbedSummary {
        written: write_embeddings(out, &ids, &flat, dim, meta)?,
        tower,
    })
}

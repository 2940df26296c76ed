//! `embed`: pooled encoder embeddings of images, in batches, written to Parquet.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use ssl_core::nn::MatmulPrecision;
use ssl_data::{write_embeddings, EmbedSummary};

use super::config::VisionConfig;
use super::images::load_images;
use super::task::{load_model, VisionTask};
use crate::{ImageSet, Pooling, Result};

/// Pooled embeddings of every image of `images`, `batch` at a time, in evaluation mode:
/// the row-major values and the embedding width.
pub fn embed_images(
    task: &dyn VisionTask,
    images: &ImageSet,
    pooling: Pooling,
    batch: usize,
    device: &Device,
    precision: MatmulPrecision,
) -> Result<(Vec<f32>, usize)> {
    embed_image_batches(task, images, pooling, batch, device, precision, true)
}

/// [`embed_images`], with a progress bar only when `progress` is set (not while a training
/// progress line is showing).
pub(crate) fn embed_image_batches(
    task: &dyn VisionTask,
    images: &ImageSet,
    pooling: Pooling,
    batch: usize,
    device: &Device,
    precision: MatmulPrecision,
    progress: bool,
) -> Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut dim = 0;
    let bar =
        progress.then(|| ssl_core::monitor::Progress::task("embed", images.len() as u64, "images"));
    for start in (0..images.len()).step_by(batch.max(1)) {
        let b = images.batch(start, batch.max(1), device)?;
        let e = task.embed_with(&b, pooling, precision)?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        if let Some(p) = &bar {
            p.inc((images.len() - start).min(batch.max(1)) as u64);
        }
    }
    if let Some(p) = bar {
        p.finish();
    }
    Ok((out, dim))
}

/// Embeds the images of `data` with the model of checkpoint directory `ckpt` configured by
/// `cfg` (see [`super::stored_config`]; pooling from `model.pooling`, batches of
/// `train.batch_size`) and writes `(id, embedding)` rows to the Parquet file `out`, with the
/// model, checkpoint, pooling and task in its metadata.
pub fn embed(ckpt: &Path, cfg: &VisionConfig, data: &[String], out: &Path) -> Result<EmbedSummary> {
    let (task, device) = load_model(ckpt, cfg)?;
    let loaded = load_images(data, &cfg.data, None)?;
    cfg.check_shape(&loaded.images)?;
    let (emb, dim) = embed_images(
        task.as_ref(),
        &loaded.images,
        cfg.model.pooling,
        cfg.train.batch_size,
        &device,
        cfg.train.matmul_precision,
    )?;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-vision ViT".to_string());
    meta.insert("checkpoint".to_string(), ckpt.display().to_string());
    meta.insert(
        "pooling".to_string(),
        format!("{:?}", cfg.model.pooling).to_lowercase(),
    );
    meta.insert(
        "task".to_string(),
        format!("{:?}", cfg.task.kind).to_lowercase(),
    );
    Ok(write_embeddings(out, &loaded.ids, &emb, dim, meta)?)
}

//! `embed`: pooled encoder embeddings of images streamed from Parquet, in batches, written to
//! Parquet as they are computed.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use ssl_core::nn::MatmulPrecision;
use ssl_data::{EmbedSummary, EmbeddingWriter, StreamPosition};

use super::config::VisionConfig;
use super::stream::{check_example_shape, ImageExample, ImageReader, Split};
use super::task::{load_model, VisionTask};
use crate::{ImageSet, Images, Pooling, Result};

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
///
/// The images stream in file order (one epoch, `data.max_images` as a seeded sample of rows)
/// and each batch's embeddings go to the writer as they are computed, which writes them in
/// row groups: memory stays that of a few batches whatever the row count.
pub fn embed(ckpt: &Path, cfg: &VisionConfig, data: &[String], out: &Path) -> Result<EmbedSummary> {
    let (task, device) = load_model(ckpt, cfg)?;
    // The run's product precision, where it is not slower on this machine.
    let precision = ssl_core::inference_precision(&cfg.train, &device);
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
    let reader = ImageReader::open(data, &cfg.data, None, cfg.train.seed)?;
    let bs = cfg.train.batch_size.max(1);
    let mut stream = reader.stream(
        reader.loader(bs, false, Some(1)),
        Split::All,
        StreamPosition::default(),
        true,
    )?;
    let shape = [
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
    ];
    let dim = task.encoder().config().dim;
    let mut writer = EmbeddingWriter::create(out, dim, meta)?;
    let bar = ssl_core::monitor::Progress::task("embed", reader.kept_rows() as u64, "images");
    loop {
        let examples = stream.take(bs)?;
        if examples.is_empty() {
            break;
        }
        let (ids, batch) = examples_batch(&examples, shape, &device)?;
        let e = task.embed_with(&batch, cfg.model.pooling, precision)?;
        let values = e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        writer.write(&ids, &values)?;
        bar.inc(examples.len() as u64);
    }
    bar.finish();
    let rows = writer.finish()?;
    Ok(EmbedSummary {
        out: out.to_path_buf(),
        rows,
        dim,
    })
}

/// The ids of streamed `examples` and their pixels as one batch, each checked against `shape`.
pub(crate) fn examples_batch(
    examples: &[ImageExample],
    shape: [usize; 3],
    device: &Device,
) -> Result<(Vec<String>, Images)> {
    let [c, h, w] = shape;
    let mut data = Vec::with_capacity(examples.len() * c * h * w);
    let mut ids = Vec::with_capacity(examples.len());
    for e in examples {
        check_example_shape(e, shape)?;
        data.extend_from_slice(&e.pixels);
        ids.push(e.id.clone());
    }
    let batch = Images::from_vec(data, [examples.len(), c, h, w], device)?;
    Ok((ids, batch))
}

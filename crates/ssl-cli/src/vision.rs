//! The `vision` modality: images from a Parquet column (PNG/JPEG bytes or a Hugging Face
//! `{bytes, path}` struct), a ViT trained with MAE or SimCLR; previews of reconstructions;
//! embeddings; linear-probe / k-NN evaluation against a random-init encoder of the same shape
//! and raw pixels. The pipeline is ssl-vision's ([`ssl_vision::pipeline`]); this module layers
//! the configuration, supplies the embedded sample and prints.

use std::path::Path;

use ssl_core::run_dir::RunOptions;

use crate::{config, CliError};

pub use ssl_vision::VisionConfig;

/// The embedded default data: 1,500 images (28x28 grey) with labels, sampled with a fixed
/// seed from the Fashion-MNIST training split (MIT licence, Zalando Research).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/fashion_mnist_sample.parquet");

/// `ssl pretrain vision`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: VisionConfig = config::resolve(&VisionConfig::default(), base.as_deref(), set)?;
    // An unknown device stops the run before the embedded sample is announced, as before.
    ssl_core::parse_device(&cfg.train.device)?;
    let _embedded;
    let paths: Vec<String> = if data.is_empty() {
        let (dir, p) = config::write_embedded("fashion_mnist_sample.parquet", EMBEDDED_TRAIN)?;
        eprintln!("no --data given: training on the embedded sample (1,500 Fashion-MNIST images, 28x28 grey)");
        _embedded = dir;
        vec![p]
    } else {
        data.to_vec()
    };
    ssl_vision::pretrain(cfg, &paths, out, &RunOptions::interactive(resume)?)?;
    Ok(())
}

/// A checkpoint's stored configuration with `set` applied.
fn stored(
    checkpoint: &Path,
    set: &[String],
) -> Result<(std::path::PathBuf, VisionConfig), CliError> {
    config::from_checkpoint(checkpoint, "vision", set)
}

/// `ssl embed vision` (pooling from `model.pooling`: `cls` or `mean`).
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = stored(checkpoint, set)?;
    ssl_vision::embed(&ckpt, &cfg, data, out)?;
    Ok(())
}

/// `ssl eval vision`: one JSON object with the pretrained encoder's probes, the same for a
/// randomly initialised encoder of the same shape, and for raw (normalised) pixels.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = stored(checkpoint, set)?;
    let report = ssl_vision::eval(&ckpt, &cfg, data, test, label_column)?;
    // Through a JSON value: keys print sorted, as they always have.
    println!(
        "{}",
        serde_json::to_value(&report).map_err(|e| CliError::Config(e.to_string()))?
    );
    Ok(())
}

//! The `multimodal` modality: CLIP-style contrastive training of an image tower (ViT) and a
//! text tower (BERT) on image-caption pairs from Parquet; embeddings of either tower; recall@K
//! both ways on held-out pairs and zero-shot classification from class names, each against
//! chance and against untrained towers. The pipeline is `ssl_multimodal::{pretrain, embed,
//! eval}`; this shell layers the configuration, supplies the embedded sample and prints.

use std::path::Path;

use ssl_core::run_dir::RunOptions;
pub use ssl_multimodal::MultimodalConfig;

use crate::{config, CliError};

/// The embedded default data: 400 Noto emoji (Apache-2.0 images, 32x32 PNG) with their
/// names as captions and their Unicode category and subcategory (MIT data).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/emoji_sample.parquet");

/// `ssl pretrain multimodal`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: MultimodalConfig =
        config::resolve(&MultimodalConfig::default(), base.as_deref(), set)?;
    // An unknown device stops the run before the embedded sample is announced, as before.
    ssl_core::parse_device(&cfg.train.device)?;
    let _embedded;
    let paths: Vec<String> = if data.is_empty() {
        let (dir, p) = config::write_embedded("emoji_sample.parquet", EMBEDDED_TRAIN)?;
        eprintln!(
            "no --data given: training on the embedded sample (400 emoji, 32x32, with their names)"
        );
        _embedded = dir;
        vec![p]
    } else {
        data.to_vec()
    };
    ssl_multimodal::pretrain(cfg, &paths, out, &RunOptions::interactive(resume)?)?.print();
    Ok(())
}

/// `ssl embed multimodal` (`--set embed.tower=image|text`): normalised embeddings in the
/// shared space.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, MultimodalConfig) =
        config::from_checkpoint(checkpoint, "multimodal", set)?;
    let s = ssl_multimodal::embed(&ckpt, &cfg, data, out)?;
    eprintln!(
        "wrote {} {} embeddings of dimension {} to {}",
        s.rows,
        s.tower.name(),
        s.dim,
        s.out.display()
    );
    Ok(())
}

/// `ssl eval multimodal`: one JSON object with recall@K both ways on the held-out pairs
/// (the run's seeded hold-out of `--data`, or `--test`), zero-shot accuracy over the label
/// columns, for the trained model and for untrained towers of the same shape.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, MultimodalConfig) =
        config::from_checkpoint(checkpoint, "multimodal", set)?;
    let report = ssl_multimodal::eval(&ckpt, &cfg, data, test, label_column)?;
    let json = serde_json::to_string(&report).map_err(|e| CliError::Config(e.to_string()))?;
    println!("{json}");
    Ok(())
}

//! Towers from other runs (`[init]`): the configuration an `ssl pretrain text` or
//! `ssl pretrain vision` run stored, read as that crate's typed configuration, and the
//! encoder weights of its checkpoint.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ssl_core::checkpoint::{resolve_checkpoint, MODEL_FILE};
use ssl_core::read_safetensors;
use ssl_text::TextConfig;
use ssl_vision::VisionConfig;

use super::MultimodalConfig;
use crate::{ClipModel, Result, TEXT_PREFIX, VISION_PREFIX};

/// The checkpoint and stored configuration of a text run or checkpoint (`init.text_from`).
pub fn text_run(dir: &str) -> Result<(PathBuf, TextConfig)> {
    Ok(ssl_core::run_dir::stored_config(Path::new(dir), "text")?)
}

/// The checkpoint and stored configuration of a vision run or checkpoint (`init.image_from`).
pub fn vision_run(dir: &str) -> Result<(PathBuf, VisionConfig)> {
    Ok(ssl_core::run_dir::stored_config(Path::new(dir), "vision")?)
}

/// Takes the tower settings of the `[init]` runs into `cfg.model`: the vision run's ViT and
/// pixel normalisation (`task.augment.mean` / `std`), the text run's BERT.
pub fn tower_settings_from_runs(cfg: &mut MultimodalConfig) -> Result<()> {
    if !cfg.init.image_from.is_empty() {
        let (_, vision) = vision_run(&cfg.init.image_from)?;
        cfg.model.image = vision.model;
        cfg.model.image_mean = vision.task.augment.mean;
        cfg.model.image_std = vision.task.augment.std;
    }
    if !cfg.init.text_from.is_empty() {
        let (_, text) = text_run(&cfg.init.text_from)?;
        cfg.model.text = text.model.config;
    }
    Ok(())
}

/// Loads the encoders of the `[init]` runs (`vit.*` of a vision run, `bert.*` of a text run)
/// into the towers of a fresh `model`, reporting each on stderr.
pub fn init_towers(cfg: &MultimodalConfig, model: &ClipModel, device: &Device) -> Result<()> {
    for (from, src_prefix, dst_prefix) in [
        (&cfg.init.image_from, "vit", VISION_PREFIX),
        (&cfg.init.text_from, "bert", TEXT_PREFIX),
    ] {
        if from.is_empty() {
            continue;
        }
        let ckpt = resolve_checkpoint(Path::new(from))?;
        let file = ckpt.join(MODEL_FILE);
        let values = read_safetensors(&file, device)?;
        let report = model.load_tower(&values, src_prefix, dst_prefix, &file)?;
        let n = report
            .loaded
            .iter()
            .filter(|k| k.starts_with(dst_prefix))
            .count();
        eprintln!(
            "{dst_prefix}: {n} tensors from {} ({} of its tensors unused)",
            file.display(),
            report.unexpected.len()
        );
    }
    Ok(())
}

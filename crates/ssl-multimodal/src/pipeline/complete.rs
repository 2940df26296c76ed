//! Completing a configuration from the data and the tokenizer before training.

use ssl_core::Parallel;
use ssl_text::SpecialIds;
use ssl_vision::{channel_stats_over_ranks, ImageSet};
use tokenizers::Tokenizer;

use super::{tower_settings_from_runs, MultimodalConfig};
use crate::{MultimodalError, Result};

/// Fills the data-dependent parts of the configuration (image shape, normalisation,
/// vocabulary; the tower settings of `init.*`) and checks it. `train_images` is a sample of
/// training images (the same on every rank, see
/// [`training_sample`](super::training_sample)): the normalisation statistics are taken over
/// every rank's sample.
pub fn complete_config(
    cfg: &mut MultimodalConfig,
    train_images: &ImageSet,
    tok: &Tokenizer,
    par: &Parallel,
) -> Result<()> {
    if cfg.train.accum_steps != 1 {
        return Err(MultimodalError::Config(format!(
            "train.accum_steps = {}: accumulating separate micro-batches loses the negatives across them; set model.micro_batch (gradient caching) instead",
            cfg.train.accum_steps
        )));
    }
    tower_settings_from_runs(cfg)?;
    let [c, h, w] = train_images.shape;
    let m = &mut cfg.model.image;
    for (key, have, want) in [
        ("model.image.channels", m.channels, c),
        ("model.image.image_height", m.image_height, h),
        ("model.image.image_width", m.image_width, w),
    ] {
        if have != 0 && have != want {
            return Err(MultimodalError::Config(format!(
                "{key} = {have} but the data's images have {want} (set data.resize / data.color to match)"
            )));
        }
    }
    m.channels = c;
    m.image_height = h;
    m.image_width = w;
    if cfg.model.image_mean.is_empty() || cfg.model.image_std.is_empty() {
        let (mean, std) = channel_stats_over_ranks(par, &train_images.data, c, h * w)?;
        if cfg.model.image_mean.is_empty() {
            cfg.model.image_mean = mean;
        }
        if cfg.model.image_std.is_empty() {
            cfg.model.image_std = std.iter().map(|s| s.max(1e-3)).collect();
        }
    }
    let sp = SpecialIds::of(tok)?;
    let vocab = tok.get_vocab_size(true);
    if !cfg.init.text_from.is_empty() && cfg.model.text.vocab_size != vocab {
        return Err(MultimodalError::Config(format!(
            "the text tower of {} has {} tokens but the tokenizer {vocab}: use that run's tokenizer",
            cfg.init.text_from, cfg.model.text.vocab_size
        )));
    }
    cfg.model.text.vocab_size = vocab;
    cfg.model.text.pad_token_id = sp.pad;
    if cfg.max_seq_len > cfg.model.text.max_position_embeddings {
        return Err(MultimodalError::Config(format!(
            "max_seq_len = {} exceeds model.text.max_position_embeddings = {}",
            cfg.max_seq_len, cfg.model.text.max_position_embeddings
        )));
    }
    cfg.model.validate()?;
    cfg.train.validate()?;
    Ok(())
}

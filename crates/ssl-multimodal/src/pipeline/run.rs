//! A trained multimodal run: its configuration, tokenizer and model, loaded from a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::{parse_device, ParamStore};
use ssl_text::{check_vocab, load_tokenizer};
use tokenizers::Tokenizer;

use super::MultimodalConfig;
use crate::{ClipModel, Result};

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the
/// multimodal configuration stored with it.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, MultimodalConfig)> {
    Ok(ssl_core::run_dir::stored_config(checkpoint, "multimodal")?)
}

/// Builds a model of `cfg` with fresh parameters (seeded by `train.seed`).
pub fn build_model(cfg: &MultimodalConfig, device: &Device) -> Result<(ParamStore, ClipModel)> {
    let store = ParamStore::new(device);
    let model = ClipModel::new(&cfg.model, &store.builder(cfg.train.seed))?;
    Ok((store, model))
}

/// A trained run's model, configuration and tokenizer.
pub struct LoadedRun {
    /// The checkpoint directory.
    pub ckpt: PathBuf,
    /// Its configuration.
    pub cfg: MultimodalConfig,
    /// The model with the checkpoint's weights.
    pub model: ClipModel,
    /// The caption tokenizer.
    pub tok: Tokenizer,
    /// Where the model lives (`train.device`).
    pub device: Device,
}

impl LoadedRun {
    /// Loads the checkpoint directory `ckpt` with the configuration `cfg` (its stored one, see
    /// [`stored_config`], possibly with overrides): the tokenizer `tokenizer.file` and the
    /// weights, on `train.device`.
    pub fn load(ckpt: &Path, cfg: MultimodalConfig) -> Result<Self> {
        let device = parse_device(&cfg.train.device)?;
        let tok_path = Path::new(&cfg.tokenizer.file);
        let tok = load_tokenizer(tok_path)?;
        check_vocab(&tok, tok_path, cfg.model.text.vocab_size, false)?;
        let (store, model) = build_model(&cfg, &device)?;
        store.load_safetensors(&ckpt.join(MODEL_FILE))?;
        Ok(LoadedRun {
            ckpt: ckpt.to_path_buf(),
            cfg,
            model,
            tok,
            device,
        })
    }

    /// Loads a run or checkpoint with its stored configuration.
    pub fn open(checkpoint: &Path) -> Result<Self> {
        let (ckpt, cfg) = stored_config(checkpoint)?;
        Self::load(&ckpt, cfg)
    }
}

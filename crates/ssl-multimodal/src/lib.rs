//! # ssl-multimodal
//!
//! One embedding space for images and their captions, learned from pairs alone (CLIP,
//! Radford et al. 2021, following open_clip), on top of `ssl-core`, `ssl-vision` and
//! `ssl-text`:
//!
//! - [`ClipModel`]: a ViT image tower ([`ssl_vision::VisionTransformer`], optionally from an
//!   MAE checkpoint) and a BERT text tower ([`ssl_text::BertModel`] with a trained tokenizer,
//!   optionally from an MLM checkpoint), bias-free projections to `embed_dim`, L2-normalised
//!   embeddings, a learnable `logit_scale` (ln(1/0.07), clamped to ln 100 after every
//!   optimizer step through [`ssl_core::PretextTask::after_step`]); either tower can be
//!   frozen (LiT);
//! - [`loss`]: CLIP's symmetric cross-entropy with per-direction weights, SigLIP's sigmoid
//!   loss with a learnable bias, in-batch alignment accuracy;
//! - gradient caching ([`ClipModel::grad_cache`]): batches larger than memory with every
//!   negative kept, with the same gradients as one big batch;
//! - [`data`]: pairs from Parquet into memory (image bytes + caption + label columns), caption
//!   tokenization, an in-memory resumable batch source; [`stream`]: the streaming training
//!   source ([`StreamingPairSource`]: sharded, shuffled in a window bounded in bytes, resumable
//!   mid-epoch) and bounded reads; [`RowSplit`]: the seeded `data.max_pairs` sample and
//!   hold-out by global row index;
//! - [`eval`](mod@eval): recall@K both ways against chance, zero-shot classification from class names
//!   with prompt templates; [`filter`]: dropping the lowest-scoring pairs;
//! - [`toy`]: a synthetic coloured-shapes set for tests and examples;
//! - [`export`]: the towers as Hugging Face directories (`ViTModel`, `BertModel`) with the
//!   projections beside them ([`export_hf`]; `pretrain` writes them to `RUN/hf`);
//! - [`pipeline`]: the whole pipeline as library calls, what `ssl pretrain|embed|eval
//!   multimodal` run: [`MultimodalConfig`] (the TOML keys), [`pretrain`], [`embed`], [`eval()`];
//!   towers start from text and vision runs through their typed configurations.
//!
//! ```no_run
//! use candle_core::Device;
//! use ssl_core::{LoopTrainer, ParamStore, TrainConfig, Trainer};
//! use ssl_multimodal::*;
//!
//! # fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
//! let pairs = toy::toy_pairs(256, 16, 0)?;
//! let tok = train_caption_tokenizer(&pairs.captions, 200)?;
//! let seqs = tokenize_captions(&tok, &pairs.captions, &pairs.ids, 16)?;
//! let mut cfg = ClipConfig::default();
//! cfg.image.image_height = 16;
//! cfg.image.image_width = 16;
//! cfg.image.patch_size = 4;
//! cfg.text.vocab_size = tok.get_vocab_size(true);
//! let store = ParamStore::new(&Device::Cpu);
//! let model = ClipModel::new(&cfg, &store.builder(0))?;
//! let mut data = InMemoryPairSource::new(pairs.images.clone(), seqs, &tok, 64, 0, &Device::Cpu)?;
//! let train = TrainConfig { max_steps: 100, batch_size: 64, ..TrainConfig::default() };
//! LoopTrainer::new(train, None)?.fit(&model, &mut data, None)?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod data;
mod error;
pub mod eval;
pub mod export;
pub mod filter;
pub mod loss;
mod model;
pub mod pipeline;
mod rows;
pub mod stream;
mod task;
pub mod toy;

pub use data::{
    holdout_split, pair_batch, read_pairs, read_pairs_of, tokenize_captions, InMemoryPairSource,
    PairColumns, PairCursor, PairSet, PairsRead,
};
pub use error::{MultimodalError, Result};
pub use eval::{
    embed_images, embed_texts, embed_token_seqs, recall_at_k, retrieval, zero_shot,
    RetrievalReport, ZeroShotReport,
};
pub use export::{export_hf, write_clip_hf_dir};
pub use filter::keep_best_pairs;
pub use loss::{clip_loss, siglip_loss, LossConfig, LossKind};
pub use model::{cosine_matrix, pair_scores, ClipConfig, ClipModel, TEXT_PREFIX, VISION_PREFIX};
pub use pipeline::{
    embed, eval, pretrain, stored_config, InitSection, LoadedRun, MmEmbedSection, MmEvalSection,
    MmTokenizerSection, MultimodalConfig, MultimodalDataConfig, MultimodalEmbedSummary,
    MultimodalEvalReport, MultimodalRunSummary, MultimodalScores, Tower,
};
pub use rows::RowSplit;
pub use stream::{PairFilter, PairStreamConfig, StreamingPairSource};
pub use task::PairBatch;

/// Trains a WordPiece tokenizer (lower-cased, BERT's special tokens) of at most `vocab_size`
/// tokens on the captions.
pub fn train_caption_tokenizer(
    captions: &[String],
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer> {
    let cfg = ssl_text::TokenizerConfig {
        kind: ssl_text::TokenizerKind::WordPiece,
        vocab_size,
        min_frequency: 1,
        ..ssl_text::TokenizerConfig::default()
    };
    Ok(ssl_text::train_from_texts(captions.iter(), &cfg)?)
}

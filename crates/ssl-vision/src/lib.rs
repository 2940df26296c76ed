//! # ssl-vision
//!
//! Self-supervised vision transformers on unlabelled images, and defect detection trained on
//! normal images only, on top of `ssl-core`:
//!
//! - [`VisionTransformer`]: a ViT encoder (class token, fixed 2-D sin-cos positions, the shared
//!   pre-norm [`ssl_core::nn::TransformerStack`], Hugging Face ViT key names) for any image
//!   size, patch size and channel count, with presets (tiny, small, base);
//! - [`MaeTask`]: the masked autoencoder of facebookresearch/mae as an
//!   [`ssl_core::PretextTask`]; [`random_masking`] is its pure per-sample masking;
//! - [`SimClrTask`]: SimCLR-style two-view contrastive learning with NT-Xent on the same ViT,
//!   its views crop + flip then colour jitter, grey-scale and blur ([`SimClrConfig`]);
//! - [`augment`]: seeded random resized crop, horizontal flip, normalisation;
//! - [`photometric`]: torchvision's colour jitter ops, grey-scale and Gaussian blur;
//! - [`preview`]: PNG grids of original | masked | reconstruction;
//! - [`export`]: the encoder as a Hugging Face directory `transformers.ViTModel` loads
//!   ([`export_hf`]; `pretrain` writes one to `RUN/hf`);
//! - [`detect`]: reconstruction-error and PatchCore-style scorers, threshold calibration
//!   and heat-maps;
//! - [`pipeline`]: what `ssl pretrain|embed|eval vision` run, as library calls ([`pretrain`],
//!   [`embed`], [`eval`], [`finetune`] with a typed [`VisionConfig`]), and
//!   [`detect::pipeline`] for
//!   `ssl detect fit|score` ([`detect_fit`], [`detect_score`]).
//!
//! The pipeline, from Parquet images to the probe report:
//!
//! ```no_run
//! use ssl_core::run_dir::RunOptions;
//! use ssl_vision::{embed, eval, pretrain, stored_config, VisionConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let data = vec!["images.parquet".to_string()]; // `image` (PNG/JPEG) and `label` columns
//! let mut cfg = VisionConfig::default();
//! cfg.train.max_steps = 600;
//! let run = std::path::Path::new("runs/mae");
//! pretrain(cfg, &data, run, &RunOptions::default())?;
//! let (ckpt, cfg) = stored_config(run)?; // the completed configuration
//! embed(&ckpt, &cfg, &data, "emb.parquet".as_ref())?;
//! let report = eval(&ckpt, &cfg, &data, &[], None)?;
//! println!("{}", serde_json::to_string(&report)?);
//! # Ok(()) }
//! ```
//!
//! The building blocks, trained by hand:
//!
//! ```no_run
//! use candle_core::Device;
//! use ssl_core::{LoopTrainer, ParamStore, TrainConfig, Trainer};
//! use ssl_vision::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let images = ImageSet::new(vec![0.5; 64 * 28 * 28], [1, 28, 28])?;
//! let vit = ViTConfig { image_height: 28, image_width: 28, channels: 1, patch_size: 4,
//!                       dim: 64, depth: 4, heads: 4, ..ViTConfig::default() };
//! let mae = MaeConfig { decoder_dim: 32, decoder_depth: 2, decoder_heads: 4, ..MaeConfig::default() };
//! let store = ParamStore::new(&Device::Cpu);
//! let task = MaeTask::new(&vit, &mae, &AugmentConfig::default(), &store.builder(0))?;
//! let mut data = InMemoryImageSource::new(images, 32, 0, &Device::Cpu)?;
//! let train = recipe_train_config(1.5e-4, 32, 1, 200);
//! LoopTrainer::new(train, None)?.fit(&task, &mut data, None)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod augment;
mod contrastive;
pub mod detect;
mod error;
pub mod export;
mod mae;
pub mod masking;
pub mod patch;
pub mod photometric;
pub mod pipeline;
pub mod pos_embed;
pub mod preview;
mod recipe;
mod source;
mod unshuffle;
mod vit;

pub use augment::AugmentConfig;
pub use contrastive::{SimClrConfig, SimClrTask};
pub use detect::pipeline::{
    detect_fit, detect_score, detector_config, DetectFitConfig, DetectFitReport, DetectScoreSummary,
};
pub use error::{Result, VisionError};
pub use export::{export_hf, write_vit_hf_dir, Normalisation};
pub use mae::{MaeConfig, MaeTask};
pub use masking::{random_masking, MaskSample};
pub use pipeline::{
    build_task, channel_stats_over_ranks, embed, embed_images, eval, finetune, finetune_config,
    load_model, pretrain, stored_config, FeatureProbe, RowSample, StreamingImageSource,
    VisionConfig, VisionDataConfig, VisionEvalReport, VisionRunSummary, VisionTask,
    VisionTaskConfig, VisionTaskKind, VitBatch, VitEncoder, FINETUNE_BASE_LR,
};
pub use recipe::{recipe_train_config, scaled_lr};
pub use source::{ImageCursor, ImageSet, InMemoryImageSource};
pub use vit::{Images, Pooling, ViTConfig, VisionTransformer};

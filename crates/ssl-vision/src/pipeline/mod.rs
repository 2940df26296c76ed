//! The vision pipeline as library calls: what `ssl pretrain|embed|eval vision` run.
//!
//! - [`VisionConfig`]: the typed configuration (the TOML keys of a run: `[train]`, `[data]`,
//!   `[model]`, `[task]`), with its defaults;
//! - [`pretrain`]: images streamed from Parquet ([`StreamingImageSource`]: decoded in the
//!   loader's threads, shuffled in windows bounded in bytes, resumable mid-epoch), MAE or
//!   SimCLR training with previews, checkpoints and metrics in a run directory
//!   (data-parallel over ranks when started so); what needs the data set as a whole is
//!   measured on a bounded sample (normalisation statistics) or read up to a cap (held-out
//!   images), and `data.max_images` is a seeded sample of global row indices ([`RowSample`]);
//! - [`stored_config`] / [`load_model`]: a run's configuration and model from a checkpoint;
//! - [`embed`]: embeddings of images streamed in and written to Parquet row group by row group;
//! - [`finetune`]: the run's ViT fine-tuned as a classifier (full with layer-wise decay, or
//!   frozen), per label fraction from the pretrained weights and from random initialisation,
//!   scored on a test split ([`finetune_config`]: MAE's fine-tuning recipe, scaled);
//! - [`eval`]: linear-probe and k-NN accuracy against a random-init encoder and raw pixels
//!   (the images streamed; the features of every row held for the probes).
//!
//! Defect detection on a pretrained MAE is [`crate::detect::pipeline`].

mod config;
mod embed;
mod eval;
mod finetune;
mod heldout;
mod online_knn;
mod pretrain;
mod previews;
mod stats;
pub(crate) mod stream;
mod task;

pub use config::{VisionConfig, VisionDataConfig, VisionTaskConfig, VisionTaskKind, VitPreset};
pub use embed::{embed, embed_images};
pub use eval::{eval, FeatureProbe, VisionEvalReport};
pub use finetune::{finetune, finetune_config, VitBatch, VitEncoder, FINETUNE_BASE_LR};
pub use pretrain::{pretrain, VisionRunSummary};
pub use stats::channel_stats_over_ranks;
pub use stream::{RowSample, StreamingImageSource};
pub use task::{build_task, load_model, stored_config, VisionTask};

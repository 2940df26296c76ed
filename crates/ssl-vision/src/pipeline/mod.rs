//! The vision pipeline as library calls: what `ssl pretrain|embed|eval vision` run.
//!
//! - [`VisionConfig`]: the typed configuration (the TOML keys of a run: `[train]`, `[data]`,
//!   `[model]`, `[task]`), with its defaults;
//! - [`pretrain`]: images from Parquet, MAE or SimCLR training with previews, checkpoints and
//!   metrics in a run directory (data-parallel over ranks when started so);
//! - [`stored_config`] / [`load_model`]: a run's configuration and model from a checkpoint;
//! - [`embed`]: embeddings of images written to Parquet;
//! - [`eval`]: linear-probe and k-NN accuracy against a random-init encoder and raw pixels.
//!
//! Defect detection on a pretrained MAE is [`crate::detect::pipeline`].

mod config;
mod embed;
mod eval;
mod images;
mod online_knn;
mod pretrain;
mod previews;
mod stats;
mod task;

pub use config::{VisionConfig, VisionDataConfig, VisionTaskConfig, VisionTaskKind};
pub use embed::{embed, embed_images};
pub use eval::{eval, FeatureProbe, VisionEvalReport};
pub use images::{load_images, load_rank_images, LoadedImages};
pub use pretrain::{pretrain, VisionRunSummary};
pub use stats::channel_stats_over_ranks;
pub use task::{build_task, load_model, stored_config, VisionTask};

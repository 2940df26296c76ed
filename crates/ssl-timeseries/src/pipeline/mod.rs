//! The pipelines: configuration in, run directory, embeddings and evaluation reports out.
//! What the `ssl` binary runs as its `timeseries` and `features` modalities, callable from any
//! Rust application.
//!
//! - [`timeseries`]: series with a selectable encoder (PatchTST, TS2Vec's dilated
//!   convolutions, GRU, LSTM, transformer) and task (TS2Vec, masked reconstruction,
//!   forecasting);
//! - [`features`]: numeric feature sequences on ssl-core's transformer with its masked,
//!   contrastive or denoising task;
//! - [`common`]: what both share (the training run, batched embedding, the pretext loss).
//!
//! Each has `pretrain(cfg, data, out, &RunOptions)`, `stored_config(checkpoint)`,
//! `embed(ckpt, &cfg, data, out)` and `eval(ckpt, &cfg, data, test, label_column)`.

pub mod common;
pub mod features;
pub mod timeseries;

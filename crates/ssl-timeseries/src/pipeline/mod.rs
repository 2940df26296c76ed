//! The pipelines: configuration in, run directory, embeddings and evaluation reports out.
//! What the `ssl` binary runs as its `timeseries` and `features` modalities, callable from any
//! Rust application.
//!
//! - [`timeseries`]: series with a selectable encoder (PatchTST, TS2Vec's dilated
//!   convolutions, GRU, LSTM, transformer) and task (TS2Vec, masked reconstruction,
//!   forecasting);
//! - [`features`]: numeric feature sequences on ssl-core's transformer with its masked,
//!   contrastive or denoising task;
//! - [`common`]: what both share (the start of a run, reading one sequence per row, the
//!   training run, batched embedding, the pretext loss and probes).
//!
//! Each has `pretrain(cfg, data, out, &RunOptions)`, `stored_config(checkpoint)`,
//! `embed(ckpt, &cfg, data, out)`, `eval(ckpt, &cfg, data, test, label_column)`, and
//! `build_task`: the configured task, boxed (`Box<dyn PretextTask<Batch = SeqBatch>>`).

pub mod common;
pub mod features;
mod online_knn;
mod stats;
pub mod timeseries;

//! The whole multimodal pipeline as library calls, what `ssl pretrain|embed|eval multimodal`
//! run: [`MultimodalConfig`] (the TOML keys, stored with every checkpoint), [`pretrain`]
//! (pairs streamed from Parquet to a run directory), [`embed`] (either tower to Parquet,
//! streamed) and [`eval`] (recall@K both ways and zero-shot accuracy against untrained
//! towers, on a held-out set read until `data.max_heldout_pairs`).
//!
//! Nothing holds the data set: training pairs stream ([`crate::StreamingPairSource`]), the
//! tokenizer trains on a capped caption stream, the image statistics and the pair filter's
//! threshold come from a bounded seeded sample ([`training_sample`]), the held-out split is
//! by global row index ([`crate::RowSplit`]) and `train.max_epochs` becomes steps from the
//! Parquet footers' row counts.
//!
//! Towers can start from other runs (`[init]`): their stored configurations are read as
//! [`ssl_text::TextConfig`] and [`ssl_vision::VisionConfig`].
//!
//! ```no_run
//! use std::path::Path;
//! use ssl_core::run_dir::RunOptions;
//! use ssl_multimodal::{embed, eval, pretrain, stored_config, MultimodalConfig};
//!
//! # fn main() -> ssl_multimodal::Result<()> {
//! let data = vec!["pairs.parquet".to_string()];
//! let mut cfg = MultimodalConfig::default();
//! cfg.train.max_steps = 50;
//! pretrain(cfg, &data, Path::new("run"), &RunOptions::default())?.print();
//! let (ckpt, cfg) = stored_config(Path::new("run"))?;
//! embed(&ckpt, &cfg, &data, Path::new("images.parquet"))?;
//! let report = eval(&ckpt, &cfg, &data, &[], None)?;
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok(()) }
//! ```

mod complete;
mod config;
mod embed;
mod eval;
mod pretrain;
mod run;
mod split;
mod tokenizer;
mod towers;

pub use complete::complete_config;
pub use config::{
    ClipPreset, InitSection, MmEmbedSection, MmEvalSection, MmTokenizerSection, MultimodalConfig,
    MultimodalDataConfig, Tower,
};
pub use embed::{check_shape, embed, MultimodalEmbedSummary};
pub use eval::{
    eval, evaluate, scores_of_embeddings, MultimodalEvalReport, MultimodalScores, RecallAtK,
};
pub use pretrain::{pretrain, MultimodalRunSummary};
pub use run::{build_model, stored_config, LoadedRun};
pub use split::{
    eval_pairs, filter_scores, filter_threshold, filtering, heldout_pairs, pair_filter,
    read_run_pairs, row_split, shuffle_bytes, training_sample, visit_eval_pairs,
};
pub use tokenizer::{run_tokenizer, save_shared_tokenizer, shared_tokenizer};
pub use towers::{init_towers, text_run, tower_settings_from_runs, vision_run};

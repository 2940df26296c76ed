//! The text pipeline as library calls, what `ssl pretrain|embed|eval text` and
//! `ssl tokenizer train` run:
//!
//! - [`TextConfig`]: the typed configuration of a run (the TOML keys users write);
//! - [`pretrain`]: masked-LM pretraining into a run directory, with the held-out perplexity
//!   curve ([`HELDOUT_FILE`]) and a Hugging Face export, data-parallel over ranks, the
//!   documents streamed ([`StreamingTextSource`]: the data set is never held whole);
//! - [`stored_config`], [`embed`], [`eval`]: a trained model's configuration, its pooled
//!   embeddings written to Parquet, and its evaluation report ([`TextEvalReport`]);
//! - [`finetune`]: sequence classification fine-tuned from a pretrained model (or a Hugging
//!   Face BERT directory) at several label fractions, beside random initialisation
//!   ([`finetune_config`]: BERT's recipe);
//! - [`train_tokenizer_report`]: a tokenizer trained on a Parquet column, with its fertility
//!   on held-out documents.

mod config;
mod docs;
mod embed;
mod eval;
mod finetune;
mod heldout;
mod online_knn;
mod pretrain;
mod stream;
mod tokenizer;

pub use config::{
    DataConfig, EmbedSection, ModelSection, TextConfig, TokenizerSection, ADAPT_LR, SCRATCH_LR,
};
pub use docs::{doc_columns, docs_of_batch, read_docs, read_docs_of, Docs};
pub use embed::{embed, embed_documents, stored_config, TextModel};
pub use eval::{eval, TextEvalReport, TextProbeReport};
pub use finetune::{
    finetune, finetune_config, finetune_lr, finetune_run_dir, BertFeatures, TextClassifier,
    FINETUNE_REPORT_FILE,
};
pub use heldout::{heldout_eval, read_curve, HeldoutCurve, HeldoutPoint};
pub use online_knn::OnlineKnn;
pub use pretrain::{build_model, pretrain, TextRunSummary, HELDOUT_FILE};
pub use stream::{
    estimate_epoch, read_heldout, read_knn_bank, DocPacker, EpochEstimate, HeldoutSet, RowFilter,
    StreamingTextSource, EPOCH_ESTIMATE_BYTES, EPOCH_ESTIMATE_DOCS, LOADER_BATCH_ROWS,
    SHUFFLE_ROWS,
};
pub use tokenizer::{
    broadcast_tokenizer, make_tokenizer, shared_tokenizer, tokenize, tokenizer_from_json,
    train_tokenizer_report, FertilityReport,
};

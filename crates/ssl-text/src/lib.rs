//! # ssl-text
//!
//! Domain-specific text embeddings by masked language modelling, BERT style:
//!
//! - [`tokenizer`]: train BPE / WordPiece / Unigram tokenizers on a Parquet text column,
//!   streamed through ssl-data, saved as a `tokenizer.json` Hugging Face loads unchanged; a
//!   fertility (tokens per word) report;
//! - [`masking`]: token, whole-word, span (SpanBERT) and entity-aware masking as pure
//!   functions of the tokens and a seeded RNG;
//! - [`data`]: documents, lines or packed blocks of `max_seq_len` (`group_texts`), truncation,
//!   dynamic padding, a resumable in-memory batch source (the streaming one the pipeline
//!   trains from is [`StreamingTextSource`]);
//! - [`bert`]: `BertForMaskedLM` on ssl-core's shared transformer stack with Hugging Face key
//!   names, implementing [`ssl_core::Encoder`] and [`ssl_core::PretextTask`];
//! - [`hf`]: load a Hugging Face directory (fresh MLM head when it has none) and export one
//!   that `transformers.BertForMaskedLM.from_pretrained` loads;
//! - [`pipeline`]: the whole pipeline as library calls: [`TextConfig`] (the TOML keys of
//!   `ssl pretrain text`), pretraining, embedding, evaluation, fine-tuning for classification
//!   ([`finetune`]) and tokenizer training.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bert;
pub mod data;
mod error;
pub mod hf;
pub mod masking;
pub mod pipeline;
pub mod tokenizer;

pub use bert::{evaluate_mlm, BertConfig, BertForMaskedLM, BertModel, MlmAccum, MlmEval, Pooling};
pub use data::{
    tokenize_texts, BertInput, CharSpans, InMemoryTextSource, InputConfig, InputMode, TextBatch,
    TokenizedSeq,
};
pub use error::{Result, TextError};
pub use hf::{export_hf_dir, load_hf_dir, HfModel};
pub use masking::{mask_sequence, MaskStrategy, Masked, MaskingConfig};
pub use pipeline::{
    broadcast_tokenizer, build_model, embed, eval, finetune, finetune_config, finetune_lr,
    finetune_run_dir, heldout_eval, make_tokenizer, pretrain, read_curve, read_docs, read_docs_of,
    shared_tokenizer, stored_config, tokenize, tokenizer_from_json, train_tokenizer_report,
    BertFeatures, DataConfig, DocPacker, Docs, EmbedSection, FertilityReport, HeldoutCurve,
    HeldoutPoint, ModelSection, RowFilter, StreamingTextSource, TextClassifier, TextConfig,
    TextEvalReport, TextModel, TextProbeReport, TextRunSummary, TokenizerSection, ADAPT_LR,
    FINETUNE_REPORT_FILE, HELDOUT_FILE, SCRATCH_LR,
};
pub use tokenizer::{
    check_token_ids, check_vocab, fertility, load_tokenizer, save_tokenizer, split_long_words,
    train_from_parquet, train_from_texts, Fertility, SpecialIds, TokenizerConfig, TokenizerKind,
    DEFAULT_MAX_WORD_CHARS,
};

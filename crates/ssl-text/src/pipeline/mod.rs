//! The text pipeline as library calls: the typed configuration of a run ([`TextConfig`]),
//! masked-LM pretraining with a held-out perplexity curve and a Hugging Face export,
//! embedding, evaluation and tokenizer training.

mod config;

pub use config::{DataConfig, EmbedSection, ModelSection, TextConfig, TokenizerSection};

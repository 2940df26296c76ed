//! The configuration of a text pretraining run: the TOML keys of `ssl pretrain text` (and of
//! `config.toml` in a run directory), with their defaults.

use serde::{Deserialize, Serialize};
use ssl_core::memory::{check_fits, product_bytes};
use ssl_core::TrainConfig;

use crate::{
    BertConfig, InputConfig, InputMode, MaskingConfig, Pooling, Result, TextError, TokenizerConfig,
};

/// `[data]`: which columns to read, the held-out split and entity annotations.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Text column.
    pub column: String,
    /// Label column for `ssl eval text`.
    pub label_column: String,
    /// Id column carried into embeddings ("" = row number).
    pub id_column: String,
    /// Fraction of documents held out (seeded hash of the row index) for perplexity.
    pub heldout_fraction: f64,
    /// Use about this many documents (0: all): a seeded sample of the rows by global row
    /// index (row `i` kept when a hash of `i` and `train.seed` falls below `max_docs / rows`),
    /// spread over the whole data, not the first rows; the held-out split applies within it.
    pub max_docs: usize,
    /// Evaluate held-out perplexity on at most this many sequences (0: all); the held-out
    /// documents are read (in file order) only until this many sequences are collected.
    pub heldout_max_seqs: usize,
    /// Terms whose occurrences are entities for entity-aware masking (case-insensitive).
    pub entity_terms: Vec<String>,
    /// A text column holding each document's entity spans for entity-aware masking, as JSON
    /// `[[start, end], ...]` in characters, end exclusive ("" = none; null or "" = no spans).
    /// Used with `entity_terms` when both are given.
    pub entity_column: String,
    /// Skip (and count on stderr) rows that cannot be read (a null or non-text cell)
    /// instead of stopping at the first, here and in tokenizer training.
    pub skip_bad_rows: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            column: "text".into(),
            label_column: "label".into(),
            id_column: String::new(),
            heldout_fraction: 0.05,
            max_docs: 0,
            heldout_max_seqs: 512,
            entity_terms: Vec::new(),
            entity_column: String::new(),
            skip_bad_rows: false,
        }
    }
}

/// `[tokenizer]`: an existing tokenizer, or how to train one.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// An existing `tokenizer.json` ("" = train one on the training documents).
    pub file: String,
    /// Training settings.
    pub train: TokenizerConfig,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection {
            file: String::new(),
            train: TokenizerConfig {
                vocab_size: 4000,
                ..TokenizerConfig::default()
            },
        }
    }
}

/// `[model]`: the BERT to pretrain (a size preset, explicit sizes, or a Hugging Face
/// directory to adapt).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Size preset (tiny, mini, small, base); "" = use `config` as given.
    pub preset: String,
    /// A Hugging Face directory to adapt (config.json, model.safetensors, tokenizer.json).
    pub init_from: String,
    /// The BERT configuration (Hugging Face names); sizes come from the preset when set (other
    /// sizes written here with a preset set are refused: set `preset = ""` to use them),
    /// vocab_size and pad_token_id from the tokenizer.
    pub config: BertConfig,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny".into(),
            init_from: String::new(),
            config: BertConfig::preset("tiny", 0).unwrap_or_default(),
        }
    }
}

/// `[embed]`: how `embed` and `eval` pool a document into one vector.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedSection {
    /// Mean over non-padding tokens, or the `[CLS]` token.
    pub pooling: Pooling,
    /// Hidden state pooled: 0 = embeddings, 1..L = that layer, -1 = last.
    pub layer: i64,
}

impl Default for EmbedSection {
    fn default() -> Self {
        EmbedSection {
            pooling: Pooling::Mean,
            layer: -1,
        }
    }
}

/// The whole configuration of a text run (`ssl pretrain text`; stored as the run's
/// `config.toml` and in every checkpoint).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Training loop. `train.lr = 0` (the default) picks the rate by where the model starts:
    /// 2e-3 from random initialisation, 5e-5 when `model.init_from` adapts a pretrained
    /// checkpoint (a from-scratch rate undoes what the checkpoint learned: 100 steps at 2e-3
    /// took all-MiniLM-L6-v2's sentiment probe from 0.76 to 0.57, 5e-5 kept 0.75). Any other
    /// value is used as given; the run's `config.toml` stores the rate it used. A fresh MLM
    /// head (`model.init_from` without one) trains at least at 2e-3
    /// ([`TextConfig::fresh_head_lr_scale`]).
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// Tokenizer.
    pub tokenizer: TokenizerSection,
    /// Model.
    pub model: ModelSection,
    /// Inputs (packing, max_seq_len).
    pub input: InputConfig,
    /// Masking strategy.
    pub masking: MaskingConfig,
    /// Embedding extraction.
    pub embed: EmbedSection,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            train: TrainConfig {
                max_steps: 150,
                batch_size: 16,
                // Chosen by `TextConfig::resolve_lr` from `model.init_from`.
                lr: 0.0,
                warmup_steps: 15,
                weight_decay: 0.01,
                checkpoint_every_steps: 50,
                checkpoint_every_minutes: 30.0,
                health_every: 0,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
            tokenizer: TokenizerSection::default(),
            model: ModelSection::default(),
            input: InputConfig {
                mode: InputMode::Packed,
                max_seq_len: 64,
            },
            masking: MaskingConfig::default(),
            embed: EmbedSection::default(),
        }
    }
}

/// `train.lr` of a run from random initialisation when `train.lr = 0` (the default).
pub const SCRATCH_LR: f64 = 2e-3;

/// `train.lr` of a run that adapts `model.init_from` when `train.lr = 0` (the default): the
/// rate of BERT's fine-tuning recipe and of transformers' `run_mlm.py`.
pub const ADAPT_LR: f64 = 5e-5;

impl TextConfig {
    /// Replaces `train.lr = 0` (the default: "by the start") with [`SCRATCH_LR`] from random
    /// initialisation or [`ADAPT_LR`] when `model.init_from` is set; any other `train.lr` is
    /// kept. `pretrain` calls it first.
    pub fn resolve_lr(&mut self) {
        if self.train.lr == 0.0 {
            self.train.lr = if self.model.init_from.is_empty() {
                SCRATCH_LR
            } else {
                ADAPT_LR
            };
        }
    }

    /// The learning rate's factor for a freshly initialised MLM head when `model.init_from` has
    /// none (sentence-transformers checkpoints ship the encoder only): the head trains at
    /// least at [`SCRATCH_LR`], `max(1, SCRATCH_LR / train.lr)` (40 at the default
    /// [`ADAPT_LR`]), the checkpoint's parameters at `train.lr`. At the adaptation rate a
    /// random head learns too slowly: 150 steps on fortunes left all-MiniLM-L6-v2 at held-out
    /// perplexity 944 (masked accuracy 0.06) while its gradients, still noise, moved the
    /// encoder. Call after [`TextConfig::resolve_lr`].
    pub fn fresh_head_lr_scale(&self) -> f64 {
        if self.train.lr > 0.0 && self.train.lr < SCRATCH_LR {
            SCRATCH_LR / self.train.lr
        } else {
            1.0
        }
    }

    /// The model's sizes: `model.preset`'s, or `model.config`'s when the preset is `""`.
    /// A preset together with sizes in `model.config` that are neither the default preset's
    /// (untouched) nor the preset's own is refused, naming both keys: the preset would
    /// silently replace the sizes the user wrote. An unknown preset is refused by name.
    pub fn model_sizes(&self) -> Result<BertConfig> {
        let m = &self.model;
        if m.preset.is_empty() {
            return Ok(m.config.clone());
        }
        let p = BertConfig::preset(&m.preset, 0)?;
        let untouched = BertConfig::preset(&ModelSection::default().preset, 0)?;
        let sizes = |b: &BertConfig| {
            (
                b.hidden_size,
                b.num_hidden_layers,
                b.num_attention_heads,
                b.intermediate_size,
            )
        };
        let given = sizes(&m.config);
        if given != sizes(&untouched) && given != sizes(&p) {
            return Err(TextError::Config(format!(
                "model.preset = \"{}\" sets the sizes, and model.config gives others \
                 (hidden_size {}, num_hidden_layers {}, num_attention_heads {}, \
                 intermediate_size {}): set model.preset = \"\" to use model.config's sizes",
                m.preset, given.0, given.1, given.2, given.3
            )));
        }
        let mut c = m.config.clone();
        c.hidden_size = p.hidden_size;
        c.num_hidden_layers = p.num_hidden_layers;
        c.num_attention_heads = p.num_attention_heads;
        c.intermediate_size = p.intermediate_size;
        Ok(c)
    }

    /// A coarse estimate, in bytes, of a training step's dominant allocations: the batch's
    /// activations over every layer and its vocabulary logits, `train.batch_size x
    /// input.max_seq_len x (hidden x layers x 16 + vocabulary x 4) x 4` bytes (sizes from
    /// `model.preset` or `model.config`, the vocabulary from `tokenizer.train.vocab_size` or
    /// `model.config.vocab_size`, whichever is larger).
    pub fn memory_estimate(&self) -> u64 {
        let (layers, hidden) = match BertConfig::preset(&self.model.preset, 0) {
            Ok(p) => (p.num_hidden_layers, p.hidden_size),
            Err(_) => (
                self.model.config.num_hidden_layers,
                self.model.config.hidden_size,
            ),
        };
        let vocab = self
            .tokenizer
            .train
            .vocab_size
            .max(self.model.config.vocab_size) as u64;
        let per_token = product_bytes(&[hidden as u64, layers as u64, 16])
            .saturating_add(vocab.saturating_mul(4));
        product_bytes(&[
            self.train.batch_size as u64,
            self.input.max_seq_len as u64,
            per_token,
            4,
        ])
    }

    /// Refuses, before anything is allocated, a configuration whose
    /// [`memory_estimate`](Self::memory_estimate) exceeds the memory available (or
    /// `train.max_memory_gb`).
    pub fn check_memory(&self) -> Result<()> {
        self.model_sizes()?;
        Ok(check_fits(
            self.memory_estimate(),
            "a text training batch (activations and logits)",
            "train.batch_size x input.max_seq_len x the model's size (model.preset or \
             model.config) and vocabulary (tokenizer.train.vocab_size)",
            self.train.memory_limit(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preset_never_silently_replaces_sizes_the_user_wrote() {
        let mut cfg = TextConfig::default();
        assert_eq!(cfg.model_sizes().unwrap().hidden_size, 128); // tiny
        cfg.model.preset = "mini".into();
        assert_eq!(cfg.model_sizes().unwrap().num_hidden_layers, 4);
        // Sizes written by the user with a preset still set: refused, naming both keys.
        cfg.model.config.hidden_size = 96;
        let err = cfg.check_memory().unwrap_err().to_string();
        assert!(
            err.contains("model.preset") && err.contains("hidden_size 96"),
            "{err}"
        );
        // Without a preset, the written sizes are the model.
        cfg.model.preset.clear();
        assert_eq!(cfg.model_sizes().unwrap().hidden_size, 96);
        cfg.model.preset = "huge".into();
        assert!(cfg.model_sizes().unwrap_err().to_string().contains("huge"));
    }

    #[test]
    fn a_fresh_head_trains_at_least_at_the_from_scratch_rate() {
        let mut cfg = TextConfig::default();
        cfg.model.init_from = "some/checkpoint".into();
        cfg.resolve_lr();
        assert_eq!(cfg.train.lr, ADAPT_LR);
        assert!((cfg.fresh_head_lr_scale() * cfg.train.lr - SCRATCH_LR).abs() < 1e-12);
        for (lr, scale) in [(5e-4, 4.0), (SCRATCH_LR, 1.0), (1e-2, 1.0)] {
            cfg.train.lr = lr;
            assert!((cfg.fresh_head_lr_scale() - scale).abs() < 1e-9, "{lr}");
        }
    }
}

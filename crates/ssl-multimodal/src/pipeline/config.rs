//! The typed configuration of a multimodal run: the TOML keys `ssl pretrain multimodal`
//! reads and every checkpoint stores (as JSON), with their defaults.

use serde::{Deserialize, Serialize};
use ssl_core::TrainConfig;
use ssl_data::ColorMode;
use ssl_text::TokenizerConfig;
use ssl_vision::ViTConfig;

use crate::{ClipConfig, PairColumns};

/// `[data]`: where the pairs are.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalDataConfig {
    /// Image column (PNG/JPEG bytes or a `{bytes, path}` struct).
    pub image_column: String,
    /// Caption column.
    pub caption_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// `rgb` or `grey` (alpha is dropped).
    pub color: ColorMode,
    /// Resize every image to `[height, width]` (empty: keep; all images must then agree).
    pub resize: Vec<usize>,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Use about this many pairs for training and evaluation: a seeded sample of the rows by
    /// global row index, spread over the whole source (0: all; `ssl embed` embeds every row).
    pub max_pairs: usize,
    /// Fraction of pairs held out (seeded by `train.seed`, by global row index) from
    /// training, for `ssl eval` and the evaluation during training.
    pub heldout_fraction: f64,
    /// The held-out set read for evaluation (recall@K, zero-shot, `eval_loss`): the first this
    /// many held-out pairs in file order (0: all; each is decoded and held in memory).
    pub max_heldout_pairs: usize,
    /// Training pairs in the seeded sample that fixes the image shape, the pixel
    /// normalisation (`model.image_mean` / `image_std` when empty) and the pair filter's
    /// score threshold.
    pub sample_pairs: usize,
    /// Bound, in MiB, of the decoded shuffle window of the training stream: the loader decodes
    /// whole row groups holding about this many bytes of pixels and shuffles rows within
    /// them (at least one batch). The loader decodes the next window while the current one
    /// is consumed: the stream's memory is about twice this (measured: peak RSS 412 MB at 64,
    /// 868 MB at 256 on 32x32 pairs).
    pub shuffle_buffer_mb: usize,
    /// A trained multimodal run or checkpoint that scores the training pairs for filtering.
    pub filter_checkpoint: String,
    /// Drop this fraction of the training pairs, those the filter model scores lowest: the
    /// score threshold is this quantile of the sampled pairs' scores (`data.sample_pairs`),
    /// applied to each pair as it streams.
    pub filter_drop_fraction: f64,
    /// The largest image accepted, in pixels (width x height, read from each image's header
    /// before decoding; also bounds `resize`). A larger one stops the run with an error.
    pub max_image_pixels: u64,
}

impl Default for MultimodalDataConfig {
    fn default() -> Self {
        MultimodalDataConfig {
            image_column: "image".into(),
            caption_column: "caption".into(),
            id_column: String::new(),
            color: ColorMode::Rgb,
            resize: vec![32, 32],
            skip_bad_rows: false,
            max_pairs: 0,
            heldout_fraction: 0.2,
            max_heldout_pairs: 1000,
            sample_pairs: 1000,
            shuffle_buffer_mb: crate::stream::DEFAULT_SHUFFLE_BUFFER_MB,
            filter_checkpoint: String::new(),
            filter_drop_fraction: 0.0,
            max_image_pixels: ssl_data::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

impl MultimodalDataConfig {
    /// The columns to read, with the text label columns `labels` (zero-shot evaluation).
    pub fn columns(&self, labels: &[String]) -> PairColumns {
        PairColumns {
            image: self.image_column.clone(),
            caption: self.caption_column.clone(),
            id: self.id_column.clone(),
            labels: labels.to_vec(),
            color: self.color,
            resize: self.resize.clone(),
            skip_bad_rows: self.skip_bad_rows,
            max_image_pixels: self.max_image_pixels,
        }
    }
}

/// `[tokenizer]`.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmTokenizerSection {
    /// An existing `tokenizer.json` ("" = train one on the training captions, streamed, at
    /// most `train.max_docs` of them).
    pub file: String,
    /// Training settings.
    pub train: TokenizerConfig,
}

impl Default for MmTokenizerSection {
    fn default() -> Self {
        MmTokenizerSection {
            file: String::new(),
            train: TokenizerConfig {
                vocab_size: 1000,
                min_frequency: 1,
                max_docs: 100_000,
                ..TokenizerConfig::default()
            },
        }
    }
}

/// `[init]`: start the towers from other runs.
#[derive(schemars::JsonSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitSection {
    /// An `ssl pretrain vision` MAE run or checkpoint: its encoder (`vit.*`) becomes the image
    /// tower, with its ViT settings and pixel normalisation.
    pub image_from: String,
    /// An `ssl pretrain text` run or checkpoint: its encoder (`bert.*`) becomes the text
    /// tower, with its BERT settings and tokenizer.
    pub text_from: String,
}

/// `[eval]`.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmEvalSection {
    /// Recall@K cut-offs.
    pub ks: Vec<usize>,
    /// Text label columns for zero-shot classification (missing columns are an error).
    pub zero_shot_columns: Vec<String>,
    /// Prompt templates; `{}` is the class name.
    pub templates: Vec<String>,
}

impl Default for MmEvalSection {
    fn default() -> Self {
        MmEvalSection {
            ks: vec![1, 5, 10],
            zero_shot_columns: vec!["category".into(), "subcategory".into()],
            templates: vec![
                "an emoji of {}".into(),
                "{}".into(),
                "a picture of {}".into(),
            ],
        }
    }
}

/// Which tower [`embed`](crate::embed) runs.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Tower {
    /// Images (the image column).
    #[default]
    Image,
    /// Captions (the caption column).
    Text,
}

impl Tower {
    /// `image` or `text`, as in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
        }
    }
}

/// `[embed]`.
#[derive(schemars::JsonSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmEmbedSection {
    /// `image` or `text` (`--set embed.tower=text`).
    pub tower: Tower,
}

/// The CLIP sizes `model.preset` names: each sets `model.embed_dim`, the image tower's
/// `dim`, `depth`, `heads` and `mlp_ratio` and the text tower's `hidden_size`,
/// `num_hidden_layers`, `num_attention_heads` and `intermediate_size` (patch size, image
/// size, positions and vocabulary depend on the data and are not part of a preset).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipPreset {
    /// Embedding 64; image 64 wide, 2 layers, 4 heads, mlp_ratio 2; text 64 wide, 2 layers,
    /// 4 heads, feed-forward 128: the default, sized for the embedded sample (about a minute
    /// on 2 cores).
    Micro,
    /// Embedding 384; image ViT-S (384, 12 layers, 6 heads, mlp_ratio 4); text 384 wide, 12
    /// layers, 6 heads, feed-forward 1536.
    Small,
    /// CLIP ViT-B: embedding 512; image ViT-B (768, 12 layers, 12 heads, mlp_ratio 4); text
    /// 512 wide, 12 layers, 8 heads, feed-forward 2048.
    Base,
}

impl ClipPreset {
    /// Every preset.
    pub const ALL: [ClipPreset; 3] = [ClipPreset::Micro, ClipPreset::Small, ClipPreset::Base];

    /// `model` with this preset's sizes.
    pub fn apply(self, model: &ClipConfig) -> ClipConfig {
        // (embed_dim, image (dim, depth, heads, mlp_ratio), text (hidden, layers, heads, ffn))
        let (embed, (dim, depth, heads, mlp), (hidden, layers, theads, ffn)) = match self {
            ClipPreset::Micro => (64, (64, 2, 4, 2.0), (64, 2, 4, 128)),
            ClipPreset::Small => (384, (384, 12, 6, 4.0), (384, 12, 6, 1536)),
            ClipPreset::Base => (512, (768, 12, 12, 4.0), (512, 12, 8, 2048)),
        };
        let mut m = model.clone();
        m.embed_dim = embed;
        (m.image.dim, m.image.depth, m.image.heads, m.image.mlp_ratio) = (dim, depth, heads, mlp);
        m.text.hidden_size = hidden;
        m.text.num_hidden_layers = layers;
        m.text.num_attention_heads = theads;
        m.text.intermediate_size = ffn;
        m
    }
}

/// The multimodal pipeline's `[model]`: a preset's sizes under the explicit keys
/// ([`ssl_core::preset`]); every other key at [`MultimodalConfig`]'s default.
impl ssl_core::preset::Presets for ClipConfig {
    type Table = ClipConfig;
    type Name = ClipPreset;
    const ALL: &'static [ClipPreset] = &ClipPreset::ALL;
    const DEFAULT: ClipPreset = ClipPreset::Micro;
    const KEYS: &'static [&'static str] = &[
        "embed_dim",
        "image.dim",
        "image.depth",
        "image.heads",
        "image.mlp_ratio",
        "text.hidden_size",
        "text.num_hidden_layers",
        "text.num_attention_heads",
        "text.intermediate_size",
    ];
    fn preset(name: ClipPreset) -> Self {
        name.apply(&default_model())
    }
}

/// The `[model]` table as `ssl config multimodal` documents it: `preset` beside the keys.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct ClipModelSchema {
    /// Size preset of both towers and the embedding: sets the keys its values name; any of
    /// them given explicitly wins over it ("" = none: those keys as given).
    preset: ClipPreset,
    #[serde(flatten)]
    clip: ClipConfig,
}

fn default_model() -> ClipConfig {
    let clip = ClipConfig::default();
    ClipPreset::Micro.apply(&ClipConfig {
        image: ViTConfig {
            image_height: 0,
            image_width: 0,
            channels: 0,
            ..clip.image.clone()
        },
        image_mean: Vec::new(),
        image_std: Vec::new(),
        ..clip
    })
}

/// The whole configuration of a multimodal run (`ssl pretrain multimodal`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultimodalConfig {
    /// Training loop (`accum_steps` must stay 1: use `model.micro_batch` for gradient caching,
    /// which keeps every negative).
    pub train: TrainConfig,
    /// Data.
    pub data: MultimodalDataConfig,
    /// Caption tokenizer.
    pub tokenizer: MmTokenizerSection,
    /// Longest caption in tokens, `[CLS]` and `[SEP]` included.
    pub max_seq_len: usize,
    /// The two towers, the projections and the loss (image size and channels come from
    /// the data, vocabulary from the tokenizer, empty image_mean/std are measured).
    #[serde(
        serialize_with = "ssl_core::preset::serialize::<ClipConfig, _>",
        deserialize_with = "ssl_core::preset::deserialize::<ClipConfig, _>"
    )]
    #[schemars(with = "ClipModelSchema")]
    pub model: ClipConfig,
    /// Tower initialisation from other runs.
    pub init: InitSection,
    /// Evaluation.
    pub eval: MmEvalSection,
    /// Embedding extraction.
    pub embed: MmEmbedSection,
}

impl Default for MultimodalConfig {
    fn default() -> Self {
        MultimodalConfig {
            // Sized for the embedded sample: about a minute in release on 2 cores (README).
            // open_clip's AdamW: betas (0.9, 0.98), eps 1e-6, weight decay 0.2, cosine.
            train: TrainConfig {
                max_steps: 300,
                batch_size: 64,
                lr: 1e-3,
                warmup_steps: 30,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.2,
                grad_clip: 1.0,
                checkpoint_every_steps: 100,
                checkpoint_every_minutes: 30.0,
                health_every: 50,
                ..TrainConfig::default()
            },
            data: MultimodalDataConfig::default(),
            tokenizer: MmTokenizerSection::default(),
            max_seq_len: 24,
            model: default_model(),
            init: InitSection::default(),
            eval: MmEvalSection::default(),
            embed: MmEmbedSection::default(),
        }
    }
}

impl MultimodalConfig {
    /// A coarse estimate, in bytes, of a training step's activations in both towers once the
    /// image size is known: per pair, the image tower's `patches x dim x depth x 16` and the
    /// text tower's `max_seq_len x hidden x layers x 16` values of 4 bytes; `train.batch_size`
    /// pairs (capped by the `pairs` a rank holds), or `model.micro_batch` of them when
    /// gradient caching is on.
    pub fn memory_estimate(&self, pairs: usize) -> u64 {
        use ssl_core::memory::product_bytes;
        let (im, tx) = (&self.model.image, &self.model.text);
        let p = im.patch_size.max(1);
        let patches = ((im.image_height / p).max(1) * (im.image_width / p).max(1)) as u64;
        let image = product_bytes(&[patches, im.dim as u64, im.depth as u64, 16]);
        let text = product_bytes(&[
            self.max_seq_len as u64,
            tx.hidden_size as u64,
            tx.num_hidden_layers as u64,
            16,
        ]);
        let mut batch = self.train.batch_size.min(pairs.max(1));
        if self.model.micro_batch > 0 {
            batch = batch.min(self.model.micro_batch);
        }
        product_bytes(&[batch as u64, image.saturating_add(text), 4])
    }

    /// Refuses, before the towers and batches are allocated, a configuration whose
    /// [`memory_estimate`](Self::memory_estimate) exceeds the memory available (or
    /// `train.max_memory_gb`).
    pub fn check_memory(&self, pairs: usize) -> crate::Result<()> {
        Ok(ssl_core::memory::check_fits(
            self.memory_estimate(pairs),
            "a multimodal training batch (both towers' activations)",
            "train.batch_size (or model.micro_batch) x the image tower (image size / \
             patch_size x dim x depth) and the text tower (max_seq_len x hidden_size x layers)",
            self.train.memory_limit(),
        )?)
    }
}

#[cfg(test)]
mod preset_tests {
    use super::*;

    /// The defaults with `model` keys set over them, as `--set` layers them.
    fn with_model(keys: serde_json::Value) -> std::result::Result<ClipConfig, String> {
        let mut cfg = serde_json::to_value(MultimodalConfig::default()).unwrap();
        for (k, v) in keys.as_object().unwrap() {
            cfg["model"][k] = v.clone();
        }
        serde_json::from_value::<MultimodalConfig>(cfg)
            .map(|c| c.model)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn presets_size_both_towers_and_explicit_keys_win() {
        assert_eq!(MultimodalConfig::default().model, default_model());
        let m = with_model(serde_json::json!({ "preset": "base" })).unwrap();
        assert_eq!(
            (m.embed_dim, m.image.dim, m.text.hidden_size),
            (512, 768, 512)
        );
        assert_eq!(m.image.patch_size, default_model().image.patch_size);
        let m = with_model(
            serde_json::json!({ "preset": "small", "text": { "num_hidden_layers": 2 } }),
        )
        .unwrap();
        assert_eq!(
            (m.image.depth, m.text.num_hidden_layers, m.text.hidden_size),
            (12, 2, 384)
        );
        let err = with_model(serde_json::json!({ "preset": "large" })).unwrap_err();
        assert!(
            err.contains("large") && err.contains("micro, small, base"),
            "{err}"
        );
    }
}

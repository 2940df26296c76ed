//! The typed configuration of the vision pipeline: the TOML keys of `ssl pretrain vision`
//! (`[train]`, `[data]`, `[model]`, `[task]`), their defaults, and the data-dependent values
//! filled in before training (image shape, normalisation statistics, scaled learning rate).

use serde::{Deserialize, Serialize};
use ssl_core::memory::{check_fits, product_bytes};
use ssl_core::{Parallel, TrainConfig};
use ssl_data::ColorMode;

use super::stats::channel_stats_over_ranks;
use crate::{
    scaled_lr, AugmentConfig, ImageSet, MaeConfig, Pooling, Result, SimClrConfig, ViTConfig,
    VisionError,
};

/// Which pretext task.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionTaskKind {
    /// Masked autoencoder.
    Mae,
    /// SimCLR two-view contrastive learning.
    Simclr,
}

/// `[data]`: where the images are.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionDataConfig {
    /// Image column (binary PNG/JPEG or a `{bytes, path}` struct).
    pub column: String,
    /// Label column for `ssl eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings and scores ("" = `file:row`).
    pub id_column: String,
    /// `grey` or `rgb`.
    pub color: ColorMode,
    /// Resize every image to `[height, width]` (empty: keep; all images must then agree).
    pub resize: Vec<usize>,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Use at most this many images (0: all): a seeded sample of exactly this many global row
    /// indices (by `train.seed`, decided from the footers' row count), not the first rows.
    pub max_images: usize,
    /// Training images (the first of the normalisation sample) for embedding-health figures.
    pub health_examples: usize,
    /// Training images the normalisation statistics are measured on (when
    /// `task.augment.mean` / `std` are empty): the first ones of a seeded pass over the
    /// row groups (one row group at a time, rows shuffled), this many over all ranks together
    /// (each rank reads its share and the moments are summed). Bounds the preparation's time.
    pub stats_images: usize,
    /// Decoded pixels of one training shuffle window, in MiB (default 256): the loader
    /// decodes a whole window of row groups before it emits a row, and decodes the next
    /// window while the current one is consumed, so about twice this is resident. Rows are
    /// shuffled within a window (and row groups across the epoch). A window is at least one
    /// row group and one batch: write large images in row groups of a few hundred rows.
    pub shuffle_buffer_mb: f64,
    /// Held-out images kept for the held-out evaluation (over all ranks; read at the start,
    /// in row order, until this many are found), also bounded to 256 MiB of pixels.
    pub heldout_max_images: usize,
    /// Fraction of images held out from pretraining, chosen by a seeded hash of the global row
    /// index (`ssl_data::is_heldout`, as text does), for the held-out pretext loss
    /// (`eval_loss` in metrics.jsonl every `train.eval_every_steps`). 0 (the default): train
    /// on every image, as before, with no held-out evaluation.
    pub heldout_fraction: f64,
    /// The largest image accepted, in pixels (width x height, read from each image's header
    /// before decoding; also bounds `resize`). A larger one stops the run with an error.
    pub max_image_pixels: u64,
}

impl Default for VisionDataConfig {
    fn default() -> Self {
        VisionDataConfig {
            column: "image".into(),
            label_column: "label".into(),
            id_column: String::new(),
            color: ColorMode::Grey,
            resize: Vec::new(),
            skip_bad_rows: false,
            max_images: 0,
            health_examples: 64,
            stats_images: 4096,
            shuffle_buffer_mb: 256.0,
            heldout_max_images: 1000,
            heldout_fraction: 0.0,
            max_image_pixels: ssl_data::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// `[task]`: which pretext task and its settings.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionTaskConfig {
    /// The task.
    pub kind: VisionTaskKind,
    /// MAE's rule: when `train.lr` is 0 (the default), the learning rate is
    /// `base_lr x batch x accum_steps / 256`, with the real batch (`train.batch_size` capped
    /// by the images a rank holds). A positive `train.lr` is used as given instead.
    pub base_lr: f64,
    /// MAE settings.
    pub mae: MaeConfig,
    /// SimCLR settings.
    pub simclr: SimClrConfig,
    /// Augmentation and normalisation (empty mean/std: measured on the training images).
    pub augment: AugmentConfig,
    /// Write a reconstruction grid every N steps (MAE; 0: only at the end).
    pub preview_every: u64,
    /// Held-out images in each reconstruction grid.
    pub preview_images: usize,
}

impl Default for VisionTaskConfig {
    fn default() -> Self {
        VisionTaskConfig {
            kind: VisionTaskKind::Mae,
            // MAE's 1.5e-4 is tuned for 800 epochs at batch 4096; a one-minute run needs more.
            base_lr: 1.5e-3 * 4.0,
            mae: MaeConfig {
                mask_ratio: 0.75,
                // MAE's recipe: per-patch normalised targets; on Fashion-MNIST (3,000 steps,
                // mean pooling) k-NN 0.754 against 0.743 without (crates/ssl-vision/README.md).
                norm_pix_loss: true,
                decoder_dim: 64,
                decoder_depth: 2,
                decoder_heads: 4,
                decoder_mlp_ratio: 2.0,
            },
            simclr: SimClrConfig::default(),
            augment: AugmentConfig {
                mean: Vec::new(),
                std: Vec::new(),
                ..AugmentConfig::default()
            },
            preview_every: 200,
            preview_images: 8,
        }
    }
}

/// The ViT sizes `model.preset` names: each sets `model.dim`, `depth`, `heads` and
/// `mlp_ratio` (the patch size, image size and channels depend on the data and are not part
/// of a preset).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitPreset {
    /// dim 64, depth 4, heads 4, mlp_ratio 2: the default, sized for 28x28 images (the
    /// embedded sample trains in about a minute on 2 cores).
    Micro,
    /// ViT-Ti (DeiT, MAE): dim 192, depth 12, heads 3, mlp_ratio 4.
    Tiny,
    /// ViT-S: dim 384, depth 12, heads 6, mlp_ratio 4.
    Small,
    /// ViT-B: dim 768, depth 12, heads 12, mlp_ratio 4.
    Base,
}

impl VitPreset {
    /// Every preset.
    pub const ALL: [VitPreset; 4] = [
        VitPreset::Micro,
        VitPreset::Tiny,
        VitPreset::Small,
        VitPreset::Base,
    ];

    /// `(dim, depth, heads, mlp_ratio)`.
    pub fn sizes(self) -> (usize, usize, usize, f64) {
        match self {
            VitPreset::Micro => (64, 4, 4, 2.0),
            VitPreset::Tiny => (192, 12, 3, 4.0),
            VitPreset::Small => (384, 12, 6, 4.0),
            VitPreset::Base => (768, 12, 12, 4.0),
        }
    }

    /// `model` with this preset's sizes.
    pub fn apply(self, model: &ViTConfig) -> ViTConfig {
        let (dim, depth, heads, mlp_ratio) = self.sizes();
        ViTConfig {
            dim,
            depth,
            heads,
            mlp_ratio,
            ..model.clone()
        }
    }
}

/// The vision pipeline's `[model]`: a preset's sizes under the explicit keys
/// ([`ssl_core::preset`]); every other key at [`VisionConfig`]'s default.
impl ssl_core::preset::Presets for ViTConfig {
    type Table = ViTConfig;
    type Name = VitPreset;
    const ALL: &'static [VitPreset] = &VitPreset::ALL;
    const DEFAULT: VitPreset = VitPreset::Micro;
    const KEYS: &'static [&'static str] = &["dim", "depth", "heads", "mlp_ratio"];
    fn preset(name: VitPreset) -> Self {
        name.apply(&default_model())
    }
}

/// The `[model]` table as `ssl config vision` documents it: `preset` beside the ViT's keys.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct VisionModelSchema {
    /// Size preset: sets `dim`, `depth`, `heads` and `mlp_ratio`; any of them given
    /// explicitly wins over it ("" = none: those keys as given).
    preset: VitPreset,
    #[serde(flatten)]
    vit: ViTConfig,
}

fn default_model() -> ViTConfig {
    VitPreset::Micro.apply(&ViTConfig {
        image_height: 0,
        image_width: 0,
        channels: 0,
        // 0: chosen from the image size by `auto_patch_size` when the data is seen.
        patch_size: 0,
        layer_norm_eps: 1e-6,
        // MAE trains the patch tokens, never the class token: on Fashion-MNIST the mean of
        // the patch tokens probes 2-3 points above it at every length measured (README).
        pooling: Pooling::Mean,
        ..ViTConfig::default()
    })
}

/// The whole configuration of a vision run (`ssl pretrain vision`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// Training loop (MAE's recipe: AdamW betas (0.9, 0.95), weight decay 0.05, cosine).
    pub train: TrainConfig,
    /// Data.
    pub data: VisionDataConfig,
    /// The ViT (image size and channels are filled in from the data).
    #[serde(
        serialize_with = "ssl_core::preset::serialize::<ViTConfig, _>",
        deserialize_with = "ssl_core::preset::deserialize::<ViTConfig, _>"
    )]
    #[schemars(with = "VisionModelSchema")]
    pub model: ViTConfig,
    /// The pretext task.
    pub task: VisionTaskConfig,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            // Sized for the embedded sample: about a minute in release on 2 cores (README).
            train: TrainConfig {
                // 2,000 steps: on Fashion-MNIST 800 gave a linear probe of 0.765, 2,000 0.777,
                // 3,000 0.782 (README); about 40 s on 2 cores for 28x28 images.
                max_steps: 2000,
                batch_size: 64,
                // 0: from `task.base_lr` scaled by the batch (see `VisionConfig::complete`).
                lr: 0.0,
                warmup_steps: 40,
                beta1: 0.9,
                beta2: 0.95,
                weight_decay: 0.05,
                grad_clip: 0.0,
                checkpoint_every_steps: 200,
                checkpoint_every_minutes: 30.0,
                health_every: 100,
                ..TrainConfig::default()
            },
            data: VisionDataConfig::default(),
            model: default_model(),
            task: VisionTaskConfig::default(),
        }
    }
}

impl VisionConfig {
    /// Fills the data-dependent parts of the configuration and checks it: the model's
    /// channels and image size from `images` (a non-zero setting must agree), the
    /// normalisation statistics when `task.augment.mean` / `std` are empty, and
    /// `train.lr` from `task.base_lr` when it is 0 ([`VisionConfig::lr_rule`]).
    ///
    /// `images` is this rank's share: with several ranks the normalisation statistics are
    /// taken over every rank's images (moments added over ranks), as one process would.
    /// Returns how the learning rate was chosen, in words (the pipeline prints it).
    pub fn complete(&mut self, images: &ImageSet, par: &Parallel) -> Result<String> {
        let [c, h, w] = images.shape;
        self.complete_with(
            images.shape,
            || channel_stats_over_ranks(par, &images.data, c, h * w),
            images.len(),
            par,
        )
    }

    /// [`VisionConfig::complete`] from what a streaming pass measured: the images' `shape`,
    /// `stats` (called, on every rank alike, only when `task.augment.mean` / `std` are empty;
    /// it returns the statistics over every rank) and the images this rank holds
    /// (`usize::MAX` when it holds more than a batch: the batch is not capped).
    pub(crate) fn complete_with(
        &mut self,
        shape: [usize; 3],
        stats: impl FnOnce() -> Result<(Vec<f32>, Vec<f32>)>,
        local_images: usize,
        par: &Parallel,
    ) -> Result<String> {
        let [c, h, w] = shape;
        self.task.simclr.validate()?;
        for (key, have, want) in [
            ("model.channels", self.model.channels, c),
            ("model.image_height", self.model.image_height, h),
            ("model.image_width", self.model.image_width, w),
        ] {
            if have != 0 && have != want {
                return Err(VisionError::Config(format!(
                    "{key} = {have} but the data's images have {want} (set data.resize to change the size)"
                )));
            }
        }
        self.model.channels = c;
        self.model.image_height = h;
        self.model.image_width = w;
        if self.model.patch_size == 0 {
            self.model.patch_size = auto_patch_size(h, w)?;
        }
        let aug = &mut self.task.augment;
        if aug.mean.is_empty() || aug.std.is_empty() {
            let (m, s) = stats()?;
            if aug.mean.is_empty() {
                aug.mean = m;
            }
            if aug.std.is_empty() {
                aug.std = s;
            }
        }
        // The batch a step really takes (a rank's images cap it), averaged over ranks so
        // every rank computes the same rate.
        let local_batch = self.train.batch_size.min(local_images) as f64;
        let real_batch = (par.sum_f64(&[local_batch])?[0] / par.world.max(1) as f64).round();
        let rule = self.choose_lr(real_batch as usize)?;
        self.model.validate()?;
        self.train.validate()?;
        Ok(rule)
    }

    /// Sets `train.lr` from `task.base_lr` and `real_batch` when `train.lr` is 0; returns the
    /// rule applied, in words. Negative or non-finite rates are refused by key.
    fn choose_lr(&mut self, real_batch: usize) -> Result<String> {
        let (lr, base) = (self.train.lr, self.task.base_lr);
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(VisionError::Config(format!(
                "train.lr = {lr}: must be a positive number (or 0: task.base_lr x batch / 256)"
            )));
        }
        if lr > 0.0 {
            return Ok(format!(
                "train.lr {lr:.3e} as given (task.base_lr not used)"
            ));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(VisionError::Config(format!(
                "task.base_lr = {base}: must be a positive number when train.lr is 0 (or set train.lr)"
            )));
        }
        let accum = self.train.accum_steps;
        self.train.lr = scaled_lr(base, real_batch, accum);
        let capped = if real_batch < self.train.batch_size {
            format!(
                " (train.batch_size {} capped by the images)",
                self.train.batch_size
            )
        } else {
            String::new()
        };
        Ok(format!(
            "task.base_lr {base:.3e} x batch {real_batch}{capped} x accum_steps {accum} / 256 = {:.3e} (set train.lr to use a rate as given)",
            self.train.lr
        ))
    }

    /// Checks that `images` match the model's shape, with a message naming the setting.
    pub fn check_shape(&self, images: &ImageSet) -> Result<()> {
        let want = [
            self.model.channels,
            self.model.image_height,
            self.model.image_width,
        ];
        if images.shape != want {
            return Err(VisionError::Config(format!(
                "the images are {:?} (channels, height, width) but the model was trained on {want:?}; set data.resize / data.color",
                images.shape
            )));
        }
        Ok(())
    }
}

/// The largest patch side ViT images use.
const MAX_AUTO_PATCH: usize = 16;
/// The fewest patches per side the automatic patch size leaves (images of 32 pixels a side
/// and more; smaller ones keep [`MIN_AUTO_GRID_SMALL`]).
const MIN_AUTO_GRID: usize = 8;
/// The fewest patches per side for images under 32 pixels a side.
const MIN_AUTO_GRID_SMALL: usize = 4;
/// The most patches per side the automatic patch size accepts.
const MAX_AUTO_GRID: usize = 32;

/// `model.patch_size = 0`: ViT's 16-pixel patches, smaller for small images so that the
/// grid keeps at least 8 patches a side (4 under 32 pixels): the largest common divisor `p`
/// of `height` and `width` with `p <= 16` and `min(height, width) / p` at least that
/// (28x28 -> 7, 32 -> 4, 64 -> 8, 96 -> 12, 224 -> 16, 300 -> 15). Measured (README): on
/// Fashion-MNIST patches of 7 (a 4x4 grid) probe as well as patches of 4 (7x7) for a quarter
/// of the time; on the 64x64 emoji patches of 8 (8x8) probe above patches of 16 (4x4).
/// Refused, naming the keys that fix it, when no such divisor leaves at most 32 patches a
/// side (a side under 4, or sizes such as 37x37 or 1000x1000 whose common divisors are too
/// small).
pub(crate) fn auto_patch_size(height: usize, width: usize) -> Result<usize> {
    let (short, long) = (height.min(width), height.max(width));
    let min_grid = if short >= 32 {
        MIN_AUTO_GRID
    } else {
        MIN_AUTO_GRID_SMALL
    };
    (1..=MAX_AUTO_PATCH.min(short))
        .rev()
        .find(|&p| height.is_multiple_of(p) && width.is_multiple_of(p) && short / p >= min_grid)
        .filter(|&p| long / p <= MAX_AUTO_GRID)
        .ok_or_else(|| {
            VisionError::Config(format!(
                "no patch size fits {height}x{width} images (model.patch_size = 0 looks for a \
                 common divisor of at most {MAX_AUTO_PATCH} leaving {min_grid} to \
                 {MAX_AUTO_GRID} patches a side); set model.patch_size, or data.resize"
            ))
        })
}

impl VisionConfig {
    /// A coarse estimate, in bytes, of a training step's activations once the image size is
    /// known ([`VisionConfig::complete`]): `batch x patches x model.dim x model.depth x 16 x
    /// 4` bytes, twice for SimCLR's two views; `batch` is `train.batch_size` capped by the
    /// `images` a rank holds.
    pub fn memory_estimate(&self, images: usize) -> u64 {
        let m = &self.model;
        let p = m.patch_size.max(1);
        let patches = ((m.image_height / p).max(1) * (m.image_width / p).max(1)) as u64;
        let views = match self.task.kind {
            VisionTaskKind::Simclr => 2,
            VisionTaskKind::Mae => 1,
        };
        product_bytes(&[
            self.train.batch_size.min(images.max(1)) as u64,
            views,
            patches,
            m.dim as u64,
            m.depth as u64,
            16,
            4,
        ])
    }

    /// Refuses, before the model and batches are allocated, a configuration whose
    /// [`memory_estimate`](Self::memory_estimate) exceeds the memory available (or
    /// `train.max_memory_gb`).
    pub fn check_memory(&self, images: usize) -> Result<()> {
        Ok(check_fits(
            self.memory_estimate(images),
            "a vision training batch (activations)",
            "train.batch_size x the patches per image (data.resize / model.patch_size) x \
             model.dim x model.depth",
            self.train.memory_limit(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` grey 14x14 images with varied pixels.
    fn images(n: usize) -> ImageSet {
        let data = (0..n * 196).map(|i| (i % 7) as f32 / 7.0).collect();
        ImageSet::new(data, [1, 14, 14]).unwrap()
    }

    fn completed(cfg: &mut VisionConfig, n: usize) -> Result<String> {
        cfg.complete(&images(n), &Parallel::single())
    }

    /// The defaults with `model` keys set over them, as `ssl pretrain vision --set` layers
    /// them.
    fn with_model(keys: serde_json::Value) -> std::result::Result<ViTConfig, String> {
        let mut cfg = serde_json::to_value(VisionConfig::default()).unwrap();
        for (k, v) in keys.as_object().unwrap() {
            cfg["model"][k] = v.clone();
        }
        serde_json::from_value::<VisionConfig>(cfg)
            .map(|c| c.model)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_preset_sets_the_sizes_and_explicit_keys_win() {
        assert_eq!(VisionConfig::default().model, default_model());
        for p in VitPreset::ALL {
            let name = serde_json::to_value(p).unwrap();
            let m = with_model(serde_json::json!({ "preset": name })).unwrap();
            let (dim, depth, heads, mlp) = p.sizes();
            assert_eq!(
                (m.dim, m.depth, m.heads, m.mlp_ratio),
                (dim, depth, heads, mlp)
            );
            // The data-dependent keys are the defaults'.
            assert_eq!(m.patch_size, default_model().patch_size);
        }
        let m = with_model(serde_json::json!({ "preset": "small", "depth": 6 })).unwrap();
        assert_eq!((m.dim, m.depth, m.heads), (384, 6, 6));
        // Without a preset the keys are used as given.
        let m = with_model(serde_json::json!({ "preset": "", "dim": 32 })).unwrap();
        assert_eq!((m.dim, m.depth), (32, 4));
    }

    #[test]
    fn the_automatic_patch_size_keeps_a_grid_of_eight_to_thirty_two() {
        for (h, w, p) in [
            (28, 28, 7),
            (32, 32, 4),
            (64, 64, 8),
            (96, 96, 12),
            (224, 224, 16),
            (300, 300, 15),
            (14, 14, 2),
            (28, 56, 7),
            (4, 4, 1),
        ] {
            assert_eq!(auto_patch_size(h, w).unwrap(), p, "{h}x{w}");
            let grid = (h.min(w) / p, h.max(w) / p);
            let min = if h.min(w) >= 32 { 8 } else { 4 };
            assert!(grid.0 >= min && grid.1 <= 32, "{h}x{w}: {grid:?}");
        }
        for (h, w) in [(3, 3), (37, 37), (1000, 1000), (4, 200)] {
            let err = auto_patch_size(h, w).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{h}x{w}")) && err.contains("model.patch_size"),
                "{err}"
            );
        }
        // The default leaves it to the data; a completed configuration has a real size.
        assert_eq!(VisionConfig::default().model.patch_size, 0);
        let mut cfg = VisionConfig::default();
        completed(&mut cfg, 10).unwrap();
        assert_eq!(cfg.model.patch_size, 2);
        // An explicit size is kept.
        let mut cfg = VisionConfig::default();
        cfg.model.patch_size = 7;
        completed(&mut cfg, 10).unwrap();
        assert_eq!(cfg.model.patch_size, 7);
    }

    #[test]
    fn an_unknown_preset_is_an_error_naming_the_valid_ones() {
        let err = with_model(serde_json::json!({ "preset": "huge" })).unwrap_err();
        assert!(
            err.contains("huge") && err.contains("micro, tiny, small, base"),
            "{err}"
        );
    }

    #[test]
    fn the_stored_configuration_rebuilds_the_same_model() {
        let mut cfg = VisionConfig::default();
        cfg.model = VitPreset::Base.apply(&cfg.model);
        cfg.model.depth = 2;
        // No preset has these sizes: every key is written, with `preset = ""`.
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(text.contains(r#""preset":"""#), "{text}");
        let back: VisionConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn an_explicit_train_lr_is_used_as_given() {
        let mut cfg = VisionConfig::default();
        cfg.train.lr = 0.25;
        let rule = completed(&mut cfg, 10).unwrap();
        assert_eq!(cfg.train.lr, 0.25);
        assert!(rule.contains("as given"), "{rule}");
    }

    #[test]
    fn the_default_rate_scales_base_lr_by_the_real_batch() {
        let mut cfg = VisionConfig::default();
        cfg.train.batch_size = 64;
        let rule = completed(&mut cfg, 100).unwrap();
        assert!((cfg.train.lr - cfg.task.base_lr * 64.0 / 256.0).abs() < 1e-12);
        assert!(
            rule.contains("task.base_lr") && rule.contains("batch 64"),
            "{rule}"
        );
        // A batch larger than the data is capped by it, and the rate with it.
        let mut cfg = VisionConfig::default();
        cfg.train.batch_size = 1_000_000_000;
        let rule = completed(&mut cfg, 10).unwrap();
        assert!((cfg.train.lr - cfg.task.base_lr * 10.0 / 256.0).abs() < 1e-12);
        assert!(rule.contains("capped"), "{rule}");
    }

    #[test]
    fn negative_or_missing_rates_are_refused_by_key() {
        let mut cfg = VisionConfig::default();
        cfg.train.lr = -1.0;
        let err = completed(&mut cfg, 10).unwrap_err().to_string();
        assert!(err.contains("train.lr = -1"), "{err}");
        let mut cfg = VisionConfig::default();
        cfg.task.base_lr = -1.0;
        let err = completed(&mut cfg, 10).unwrap_err().to_string();
        assert!(err.contains("task.base_lr = -1"), "{err}");
        let mut cfg = VisionConfig::default();
        cfg.task.base_lr = 0.0;
        let err = completed(&mut cfg, 10).unwrap_err().to_string();
        assert!(err.contains("task.base_lr = 0"), "{err}");
    }
}

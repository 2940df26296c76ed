//! The typed configuration of the vision pipeline: the TOML keys of `ssl pretrain vision`
//! (`[train]`, `[data]`, `[model]`, `[task]`), their defaults, and the data-dependent values
//! filled in before training (image shape, normalisation statistics, scaled learning rate).

use serde::{Deserialize, Serialize};
use ssl_core::{Parallel, TrainConfig};
use ssl_data::ColorMode;

use super::stats::channel_stats_over_ranks;
use crate::{
    scaled_lr, AugmentConfig, ImageSet, MaeConfig, Pooling, Result, SimClrConfig, ViTConfig,
    VisionError,
};

/// Which pretext task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionTaskKind {
    /// Masked autoencoder.
    Mae,
    /// SimCLR two-view contrastive learning.
    Simclr,
}

/// `[data]`: where the images are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Use at most this many images (0: all).
    pub max_images: usize,
    /// Images held out from the start of the data for embedding-health figures and previews.
    pub health_examples: usize,
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
            heldout_fraction: 0.0,
            max_image_pixels: ssl_data::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// `[task]`: which pretext task and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionTaskConfig {
    /// The task.
    pub kind: VisionTaskKind,
    /// When positive, `train.lr = base_lr x batch_size x accum_steps / 256` (MAE's rule).
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
                norm_pix_loss: false,
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

/// The whole configuration of a vision run (`ssl pretrain vision`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// Training loop (MAE's recipe: AdamW betas (0.9, 0.95), weight decay 0.05, cosine).
    pub train: TrainConfig,
    /// Data.
    pub data: VisionDataConfig,
    /// The ViT (image size and channels are filled in from the data).
    pub model: ViTConfig,
    /// The pretext task.
    pub task: VisionTaskConfig,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            // Sized for the embedded sample: about a minute in release on 2 cores (README).
            train: TrainConfig {
                max_steps: 800,
                batch_size: 64,
                lr: 1e-3,
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
            model: ViTConfig {
                image_height: 0,
                image_width: 0,
                channels: 0,
                patch_size: 7,
                dim: 64,
                depth: 4,
                heads: 4,
                mlp_ratio: 2.0,
                layer_norm_eps: 1e-6,
                pooling: Pooling::Cls,
            },
            task: VisionTaskConfig::default(),
        }
    }
}

impl VisionConfig {
    /// Fills the data-dependent parts of the configuration and checks it: the model's
    /// channels and image size from `images` (a non-zero setting must agree), the
    /// normalisation statistics when `task.augment.mean` / `std` are empty, and
    /// `train.lr` from `task.base_lr` when that is positive.
    ///
    /// `images` is this rank's share: with several ranks the normalisation statistics are
    /// taken over every rank's images (moments added over ranks), as one process would.
    pub fn complete(&mut self, images: &ImageSet, par: &Parallel) -> Result<()> {
        let [c, h, w] = images.shape;
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
        let aug = &mut self.task.augment;
        if aug.mean.is_empty() || aug.std.is_empty() {
            let (m, s) = channel_stats_over_ranks(par, &images.data, c, h * w)?;
            if aug.mean.is_empty() {
                aug.mean = m;
            }
            if aug.std.is_empty() {
                aug.std = s;
            }
        }
        if self.task.base_lr > 0.0 {
            self.train.lr = scaled_lr(
                self.task.base_lr,
                self.train.batch_size,
                self.train.accum_steps,
            );
        }
        self.model.validate()?;
        self.train.validate()?;
        Ok(())
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

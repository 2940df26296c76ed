//! The two-tower model (open_clip's `CLIP`): a ViT image tower and a BERT text tower, each
//! followed by a bias-free linear projection to a shared width, L2-normalised; a learnable
//! `logit_scale` (and for SigLIP a `logit_bias`).
//!
//! Keys follow Hugging Face `CLIPModel`: `vision_model.*` (ssl-vision's ViT keys),
//! `text_model.*` (ssl-text's BERT keys), `visual_projection.weight`,
//! `text_projection.weight`, `logit_scale`, and `logit_bias` (SigLIP).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::l2_normalize;
use ssl_core::nn::Linear;
use ssl_core::{Ctx, Encoder, Init, LoadReport, ParamBuilder, ParamStore};
use ssl_text::{BertConfig, BertInput, BertModel};
use ssl_vision::{Images, Pooling, ViTConfig, VisionTransformer};

use crate::loss::{clip_loss, siglip_loss, LossConfig, LossKind};
use crate::{MultimodalError, Result};

/// Key prefix of the image tower.
pub const VISION_PREFIX: &str = "vision_model";
/// Key prefix of the text tower.
pub const TEXT_PREFIX: &str = "text_model";

/// Configuration of a [`ClipModel`].
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClipConfig {
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    /// The image tower (ssl-vision's ViT).
    pub image: ViTConfig,
    /// The text tower (ssl-text's BERT; `vocab_size` and `pad_token_id` come from the tokenizer).
    pub text: BertConfig,
    /// The loss and its temperature.
    pub loss: LossConfig,
    /// Lock the image tower (LiT): its weights get no gradient; the projection still learns.
    pub freeze_image: bool,
    /// Lock the text tower; its projection still learns.
    pub freeze_text: bool,
    /// Gradient caching: split each batch into chunks of this many pairs, embed them all
    /// without a graph, take the loss over the whole batch (every negative kept), then
    /// back-propagate chunk by chunk. 0: one pass over the whole batch.
    pub micro_batch: usize,
    /// Per-channel pixel mean subtracted before the image tower (one value or one per channel).
    pub image_mean: Vec<f32>,
    /// Per-channel pixel standard deviation (one value or one per channel).
    pub image_std: Vec<f32>,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            embed_dim: 64,
            image: ViTConfig {
                image_height: 32,
                image_width: 32,
                channels: 3,
                patch_size: 8,
                dim: 64,
                depth: 2,
                heads: 4,
                mlp_ratio: 2.0,
                layer_norm_eps: 1e-6,
                pooling: Pooling::Cls,
            },
            text: BertConfig {
                vocab_size: 0,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 128,
                max_position_embeddings: 32,
                hidden_dropout_prob: 0.0,
                attention_probs_dropout_prob: 0.0,
                ..BertConfig::default()
            },
            loss: LossConfig::default(),
            freeze_image: false,
            freeze_text: false,
            micro_batch: 0,
            image_mean: vec![0.5],
            image_std: vec![0.25],
        }
    }
}

impl ClipConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if self.embed_dim == 0 {
            return Err(MultimodalError::Config(
                "model.embed_dim must be at least 1".into(),
            ));
        }
        self.image.validate()?;
        if self.text.vocab_size == 0 {
            return Err(MultimodalError::Config(
                "model.text.vocab_size is 0: it comes from the tokenizer".into(),
            ));
        }
        self.text.transformer()?.validate()?;
        self.loss.validate()?;
        let c = self.image.channels;
        for (k, v) in [
            ("image_mean", &self.image_mean),
            ("image_std", &self.image_std),
        ] {
            if v.len() != 1 && v.len() != c {
                return Err(MultimodalError::Config(format!(
                    "model.{k} has {} values: give one, or one per channel ({c})",
                    v.len()
                )));
            }
        }
        if self.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(MultimodalError::Config(format!(
                "model.image_std = {:?}: every value must be positive",
                self.image_std
            )));
        }
        Ok(())
    }
}

/// The CLIP-style two-tower model (see the module documentation). Its
/// [`ssl_core::PretextTask`] implementation lives in `task.rs`.
pub struct ClipModel {
    pub(crate) cfg: ClipConfig,
    vision: VisionTransformer,
    text: BertModel,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
    logit_bias: Option<Tensor>,
    mean: Tensor,
    std: Tensor,
    pub(crate) store: ParamStore,
    /// Ranks of a data-parallel run, whose embeddings join every rank's similarity matrix.
    pub(crate) ranks: Option<ssl_core::SharedCollective>,
}

fn channel_tensor(v: &[f32], c: usize, pb: &ParamBuilder) -> Result<Tensor> {
    let full: Vec<f32> = if v.len() == 1 {
        vec![v[0]; c]
    } else {
        v.to_vec()
    };
    Ok(Tensor::from_vec(full, (1, c, 1, 1), pb.device())?)
}

impl ClipModel {
    /// Creates every parameter under `pb`: the towers with their own initialisation, the
    /// projections N(0, width^-0.5) as open_clip, `logit_scale` at its configured start.
    pub fn new(cfg: &ClipConfig, pb: &ParamBuilder) -> Result<Self> {
        cfg.validate()?;
        let vision = VisionTransformer::new(&cfg.image, &pb.pp(VISION_PREFIX))?;
        let text = BertModel::new(&cfg.text, &pb.pp(TEXT_PREFIX))?;
        let dv = cfg.image.dim;
        let dt = cfg.text.hidden_size;
        let visual_projection = Linear::new(
            dv,
            cfg.embed_dim,
            false,
            Init::Normal((dv as f64).powf(-0.5)),
            &pb.pp("visual_projection"),
        )?;
        let text_projection = Linear::new(
            dt,
            cfg.embed_dim,
            false,
            Init::Normal((dt as f64).powf(-0.5)),
            &pb.pp("text_projection"),
        )?;
        let logit_scale = scalar_param(pb, "logit_scale", cfg.loss.logit_scale_init)?;
        let logit_bias = match cfg.loss.kind {
            LossKind::Siglip => Some(scalar_param(pb, "logit_bias", cfg.loss.siglip_bias_init)?),
            LossKind::Clip => None,
        };
        let c = cfg.image.channels;
        Ok(ClipModel {
            cfg: cfg.clone(),
            vision,
            text,
            visual_projection,
            text_projection,
            logit_scale,
            logit_bias,
            mean: channel_tensor(&cfg.image_mean, c, pb)?,
            std: channel_tensor(&cfg.image_std, c, pb)?,
            store: pb.store().clone(),
            ranks: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Every parameter, by name.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The image tower.
    pub fn vision(&self) -> &VisionTransformer {
        &self.vision
    }

    /// The text tower.
    pub fn text(&self) -> &BertModel {
        &self.text
    }

    /// The learnable log inverse temperature (a scalar tensor).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The current value of `logit_scale`.
    pub fn logit_scale_value(&self) -> Result<f64> {
        Ok(self
            .logit_scale
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// The SigLIP bias, when the loss is `siglip`.
    pub fn logit_bias(&self) -> Option<&Tensor> {
        self.logit_bias.as_ref()
    }

    /// The image tower's pooled output `(B, D_image)` of raw `[0, 1]` pixels, before the
    /// projection (detached when the tower is frozen).
    pub fn image_features(&self, images: &Images, ctx: &mut Ctx) -> Result<Tensor> {
        let px = images
            .pixels
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        let pooled = self.vision.pooled(&Images { pixels: px }, ctx)?;
        Ok(if self.cfg.freeze_image {
            pooled.detach()
        } else {
            pooled
        })
    }

    /// The text tower's pooled output `(B, D_text)` (mean over real tokens), before the
    /// projection (detached when the tower is frozen).
    pub fn text_features(&self, input: &BertInput, ctx: &mut Ctx) -> Result<Tensor> {
        let out = self.text.encode(input, ctx)?;
        Ok(if self.cfg.freeze_text {
            out.pooled.detach()
        } else {
            out.pooled
        })
    }

    /// L2-normalised image embeddings `(B, embed_dim)` of raw `[0, 1]` pixels.
    pub fn encode_image(&self, images: &Images, ctx: &mut Ctx) -> Result<Tensor> {
        let f = self.image_features(images, ctx)?;
        Ok(l2_normalize(&self.visual_projection.forward(&f)?)?)
    }

    /// L2-normalised text embeddings `(B, embed_dim)`.
    pub fn encode_text(&self, input: &BertInput, ctx: &mut Ctx) -> Result<Tensor> {
        let f = self.text_features(input, ctx)?;
        Ok(l2_normalize(&self.text_projection.forward(&f)?)?)
    }

    fn scale_for_loss(&self) -> Tensor {
        if self.cfg.loss.learn_logit_scale {
            self.logit_scale.clone()
        } else {
            self.logit_scale.detach()
        }
    }

    /// Data-parallel training: each training step gathers every rank's embeddings so the
    /// loss sees the negatives of all ranks (open_clip's `gather_with_grad = False`, full
    /// matrix on every rank). Give the same collective to the trainer.
    pub fn gather_across(&mut self, ranks: ssl_core::SharedCollective) {
        self.ranks = Some(ranks);
    }

    /// The configured loss of normalised embeddings whose row `i` are a pair.
    pub fn loss(&self, image: &Tensor, text: &Tensor) -> Result<Tensor> {
        self.loss_shared(image, text, 1)
    }

    /// [`ClipModel::loss`] as computed identically on each of `world` ranks: the gradient
    /// reaching `logit_scale` and `logit_bias` is divided by `world`, so that summing the
    /// ranks' gradients counts it once.
    pub(crate) fn loss_shared(
        &self,
        image: &Tensor,
        text: &Tensor,
        world: usize,
    ) -> Result<Tensor> {
        let share = |t: &Tensor| -> Result<Tensor> {
            if world <= 1 {
                return Ok(t.clone());
            }
            let f = 1.0 / world as f64;
            Ok(((t * f)? + (t.detach() * (1.0 - f))?)?)
        };
        let scale = share(&self.scale_for_loss())?;
        match (&self.cfg.loss.kind, &self.logit_bias) {
            (LossKind::Siglip, Some(b)) => siglip_loss(image, text, &scale, &share(b)?),
            _ => clip_loss(
                image,
                text,
                &scale,
                self.cfg.loss.image_to_text_weight,
                self.cfg.loss.text_to_image_weight,
            ),
        }
    }

    /// Clamps `logit_scale` into `[0, logit_scale_max]` (open_clip clamps after every
    /// optimizer step; the trainer calls this through `PretextTask::after_step`).
    pub fn clamp_logit_scale(&self) -> Result<()> {
        let v = self.logit_scale_value()?;
        let clamped = v.clamp(0.0, self.cfg.loss.logit_scale_max);
        if clamped != v {
            if let Some(var) = self.store.get("logit_scale") {
                var.set(&Tensor::new(clamped as f32, self.store.device())?)?;
            }
        }
        Ok(())
    }

    /// Initialises one tower from another model's tensors: every key `from_prefix.REST` of
    /// `values` sets `to_prefix.REST` (e.g. `vit` -> `vision_model` for an ssl-vision MAE
    /// checkpoint, `bert` -> `text_model` for an ssl-text MLM checkpoint). Every parameter of
    /// the tower must be found, with its shape; keys with no parameter are returned.
    pub fn load_tower(
        &self,
        values: &HashMap<String, Tensor>,
        from_prefix: &str,
        to_prefix: &str,
        source: &Path,
    ) -> Result<LoadReport> {
        let pre = format!("{from_prefix}.");
        let mapped: HashMap<String, Tensor> = values
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&pre)
                    .map(|rest| (format!("{to_prefix}.{rest}"), v.clone()))
            })
            .collect();
        if mapped.is_empty() {
            return Err(MultimodalError::InvalidInput(format!(
                "{}: no tensor starts with `{pre}`",
                source.display()
            )));
        }
        let report = self.store.load_from(&mapped, source)?;
        let tower = format!("{to_prefix}.");
        if let Some(m) = report.missing.iter().find(|m| m.starts_with(&tower)) {
            return Err(MultimodalError::InvalidInput(format!(
                "{}: the tower parameter `{m}` has no `{from_prefix}.` tensor (do the tower settings match the checkpoint's?)",
                source.display()
            )));
        }
        Ok(report)
    }
}

fn scalar_param(pb: &ParamBuilder, name: &str, value: f64) -> Result<Tensor> {
    let t = pb.get_with_decay(name, (), Init::Zeros, false)?;
    if let Some(var) = pb.store().get(&pb.path(name)) {
        var.set(&Tensor::new(value as f32, pb.device())?)?;
    }
    Ok(t)
}

/// Cosine similarities `(N_a, N_b)` of two sets of normalised embeddings, flat row-major.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    Ok(a.matmul(&b.t()?)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Row-wise dot products of two `(N, E)` embedding sets (the pair scores).
pub fn pair_scores(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    Ok((a * b)?
        .sum(D::Minus1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

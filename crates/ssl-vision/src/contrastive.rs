//! SimCLR-style contrastive learning on images: two augmented views of each image, a
//! projection head, NT-Xent (`ssl_core::loss::nt_xent`), on the same ViT as MAE.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use ssl_core::loss::{backward_across, nt_xent_across};
use ssl_core::nn::Linear;
use ssl_core::{Ctx, Encoder, ParamBuilder, ParamStore, PretextTask, TaskOutput};

use crate::augment::{augment_batch, normalize_batch, AugmentConfig};
use crate::vit::{Images, ViTConfig, VisionTransformer};
use crate::Result;

/// Settings of [`SimClrTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimClrConfig {
    /// NT-Xent temperature (SimCLR: 0.1-0.5).
    pub temperature: f64,
    /// Output width of the projection head.
    pub proj_dim: usize,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        SimClrConfig {
            temperature: 0.2,
            proj_dim: 128,
        }
    }
}

/// Two views per image from the augmentations; pooled ViT embeddings go through the
/// projection head (`projection.0` -> ReLU -> `projection.2`) into NT-Xent. Embeddings are
/// taken before the head. The encoder lives under `vit.`, as in [`crate::MaeTask`].
pub struct SimClrTask {
    encoder: VisionTransformer,
    proj1: Linear,
    proj2: Linear,
    cfg: SimClrConfig,
    augment: AugmentConfig,
    store: ParamStore,
    ranks: Option<ssl_core::SharedCollective>,
}

impl SimClrTask {
    /// Creates the encoder and the head under `pb`.
    pub fn new(
        vit: &ViTConfig,
        cfg: &SimClrConfig,
        augment: &AugmentConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        augment.validate(vit.channels)?;
        let encoder = VisionTransformer::new(vit, &pb.pp("vit"))?;
        let d = vit.dim;
        Ok(SimClrTask {
            encoder,
            proj1: Linear::torch_default(d, d, &pb.pp("projection.0"))?,
            proj2: Linear::torch_default(d, cfg.proj_dim, &pb.pp("projection.2"))?,
            cfg: *cfg,
            augment: augment.clone(),
            store: pb.store().clone(),
            ranks: None,
        })
    }

    /// Data-parallel training: every step gathers all ranks' projected views, so NT-Xent's
    /// negatives span every rank and the loss is the combined batch's. Every rank needs the
    /// same batch size.
    pub fn gather_across(&mut self, ranks: ssl_core::SharedCollective) {
        self.ranks = Some(ranks);
    }

    /// The encoder.
    pub fn encoder(&self) -> &VisionTransformer {
        &self.encoder
    }

    /// The augmentation and normalisation settings.
    pub fn augment(&self) -> &AugmentConfig {
        &self.augment
    }

    fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.proj2.forward(&self.proj1.forward(pooled)?.relu()?)?)
    }
}

impl PretextTask for SimClrTask {
    type Batch = Images;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        let v1 = augment_batch(&batch.pixels, &self.augment, ctx.rng)?;
        let v2 = augment_batch(&batch.pixels, &self.augment, ctx.rng)?;
        let z1 = self.project(&self.encoder.encode(&Images { pixels: v1 }, ctx)?.pooled)?;
        let z2 = self.project(&self.encoder.encode(&Images { pixels: v2 }, ctx)?.pooled)?;
        let ranks = self
            .ranks
            .as_ref()
            .map(|r| r.as_ref() as &dyn ssl_core::Collective);
        let (loss, acc) = nt_xent_across(&z1, &z2, self.cfg.temperature, ranks)?;
        Ok(TaskOutput {
            loss,
            weight: batch.len() as f64,
            metrics: vec![("alignment_accuracy".into(), acc)],
        })
    }

    /// Across ranks the loss is the combined batch's: see [`ssl_core::loss::backward_across`].
    fn forward_backward(
        &self,
        batch: &Images,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(TaskOutput, candle_core::backprop::GradStore)> {
        let out = self.forward(batch, ctx)?;
        backward_across(out, self.ranks.as_ref().map_or(1, |r| r.world_size()))
    }

    fn embed(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        let pixels = normalize_batch(&batch.pixels, &self.augment)?;
        Ok(self.encoder.encode(&Images { pixels }, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &Images) -> usize {
        batch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ssl_core::SslRng;

    #[test]
    fn gradients_reach_every_variable() {
        let vit = ViTConfig {
            image_height: 8,
            image_width: 8,
            channels: 3,
            patch_size: 4,
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_ratio: 2.0,
            ..ViTConfig::default()
        };
        let store = ParamStore::new(&Device::Cpu);
        let task = SimClrTask::new(
            &vit,
            &SimClrConfig {
                proj_dim: 8,
                ..Default::default()
            },
            &AugmentConfig::default(),
            &store.builder(0),
        )
        .unwrap();
        let mut rng = SslRng::new(0);
        let imgs = Images::from_vec(
            rng.uniform_vec(4 * 3 * 64, 0.0, 1.0),
            [4, 3, 8, 8],
            &Device::Cpu,
        )
        .unwrap();
        let out = task.forward(&imgs, &mut Ctx::train(&mut rng)).unwrap();
        let grads = out.loss.backward().unwrap();
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name} has a zero gradient");
        }
        assert_eq!(
            task.embed(&imgs, &mut Ctx::eval(&mut rng)).unwrap().dims(),
            [4, 16]
        );
    }
}

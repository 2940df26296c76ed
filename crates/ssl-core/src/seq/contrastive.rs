//! Contrastive learning on sequences: two augmented views, NT-Xent (SimCLR).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::loss::{backward_across, nt_xent_across};
use crate::nn::Linear;
use crate::seq::augment::{augment, SeqAugmentConfig};
use crate::seq::SeqBatch;
use crate::{Ctx, Encoder, ParamBuilder, ParamStore, PretextTask, Result, TaskOutput};

/// Settings of [`ContrastiveTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContrastiveConfig {
    /// Softmax temperature of NT-Xent.
    pub temperature: f64,
    /// Output width of the projection head.
    pub proj_dim: usize,
    /// The augmentations that make the two views.
    pub augment: SeqAugmentConfig,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        ContrastiveConfig {
            temperature: 0.1,
            proj_dim: 64,
            augment: SeqAugmentConfig::default(),
        }
    }
}

/// Two random views per example; pooled embeddings go through a projection head
/// (`projection.0` -> ReLU -> `projection.2`, as SimCLR) and NT-Xent pulls the views of one
/// example together and pushes the rest of the batch away. Embeddings are taken before the head.
pub struct ContrastiveTask<E> {
    encoder: E,
    proj1: Linear,
    proj2: Linear,
    cfg: ContrastiveConfig,
    store: ParamStore,
    ranks: Option<crate::SharedCollective>,
}

impl<E: Encoder<Input = SeqBatch>> ContrastiveTask<E> {
    /// Wraps `encoder`, creating the projection head under `pb`.
    pub fn new(encoder: E, cfg: ContrastiveConfig, pb: &ParamBuilder) -> Result<Self> {
        let d = encoder.dim();
        let proj1 = Linear::torch_default(d, d, &pb.pp("projection.0"))?;
        let proj2 = Linear::torch_default(d, cfg.proj_dim, &pb.pp("projection.2"))?;
        Ok(ContrastiveTask {
            encoder,
            proj1,
            proj2,
            cfg,
            store: pb.store().clone(),
            ranks: None,
        })
    }

    /// Data-parallel training: every step gathers all ranks' projected views, so NT-Xent's
    /// negatives span every rank and the loss is the combined batch's. Every rank needs the
    /// same batch size.
    pub fn gather_across(&mut self, ranks: crate::SharedCollective) {
        self.ranks = Some(ranks);
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        self.proj2.forward(&self.proj1.forward(pooled)?.relu()?)
    }
}

impl<E: Encoder<Input = SeqBatch>> PretextTask for ContrastiveTask<E> {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let v1 = augment(batch, &self.cfg.augment, ctx.rng)?;
        let v2 = augment(batch, &self.cfg.augment, ctx.rng)?;
        let z1 = self.project(&self.encoder.encode(&v1, ctx)?.pooled)?;
        let z2 = self.project(&self.encoder.encode(&v2, ctx)?.pooled)?;
        let ranks = self
            .ranks
            .as_ref()
            .map(|r| r.as_ref() as &dyn crate::Collective);
        let (loss, acc) = nt_xent_across(&z1, &z2, self.cfg.temperature, ranks)?;
        Ok(TaskOutput {
            loss,
            weight: batch.len() as f64,
            metrics: vec![("alignment_accuracy".into(), acc)],
        })
    }

    /// Across ranks the loss is the combined batch's: see [`backward_across`].
    fn forward_backward(
        &self,
        batch: &SeqBatch,
        ctx: &mut Ctx,
    ) -> Result<(TaskOutput, candle_core::backprop::GradStore)> {
        // The gradients are the graph's (the world factor scales the loss): fused ops may
        // deliver theirs aside.
        ctx.sinking(|ctx| {
            let out = self.forward(batch, ctx)?;
            backward_across(out, self.ranks.as_ref().map_or(1, |r| r.world_size()))
        })
    }

    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

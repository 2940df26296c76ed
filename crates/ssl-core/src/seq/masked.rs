//! Masked feature prediction: hide timesteps, predict their features from the context.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::loss::masked_mse;
use crate::nn::Linear;
use crate::seq::augment::timestep_mask;
use crate::seq::SeqBatch;
use crate::{Ctx, Encoder, Init, ParamBuilder, ParamStore, PretextTask, Result, TaskOutput};

/// Settings of [`MaskedFeatureTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskedFeatureConfig {
    /// Fraction of valid timesteps hidden.
    pub mask_prob: f64,
    /// Span length in timesteps (1: independent steps; >1: contiguous spans).
    pub span: usize,
}

impl Default for MaskedFeatureConfig {
    fn default() -> Self {
        MaskedFeatureConfig {
            mask_prob: 0.15,
            span: 1,
        }
    }
}

/// Hidden timesteps are zeroed in the input (features are normalised, so 0 is the mean);
/// a linear head (`head`) predicts every feature of every timestep from the encoder's tokens;
/// the loss is the MSE on hidden valid timesteps only.
pub struct MaskedFeatureTask<E> {
    encoder: E,
    head: Linear,
    cfg: MaskedFeatureConfig,
    store: ParamStore,
}

impl<E: Encoder<Input = SeqBatch>> MaskedFeatureTask<E> {
    /// Wraps `encoder`, creating the head under `pb` (the builder of the encoder's store).
    pub fn new(
        encoder: E,
        features: usize,
        cfg: MaskedFeatureConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        let head = Linear::new(
            encoder.dim(),
            features,
            true,
            Init::XavierUniform,
            &pb.pp("head"),
        )?;
        Ok(MaskedFeatureTask {
            encoder,
            head,
            cfg,
            store: pb.store().clone(),
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// The masked input and the mask (B, T) for `batch`.
    pub fn mask_batch(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<(SeqBatch, Tensor)> {
        let (b, t, _) = batch.x.dims3()?;
        let valid = batch.valid.flatten_all()?.to_vec1::<f32>()?;
        let m = timestep_mask(&valid, b, t, self.cfg.mask_prob, self.cfg.span, ctx.rng);
        let mask = Tensor::from_vec(m, (b, t), batch.x.device())?;
        let keep = (mask.ones_like()? - &mask)?.unsqueeze(D::Minus1)?;
        let x = batch.x.broadcast_mul(&keep)?;
        Ok((
            SeqBatch {
                x,
                valid: batch.valid.clone(),
            },
            mask,
        ))
    }
}

impl<E: Encoder<Input = SeqBatch>> PretextTask for MaskedFeatureTask<E> {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let (masked, mask) = self.mask_batch(batch, ctx)?;
        let out = self.encoder.encode(&masked, ctx)?;
        let pred = self.head.forward(&out.tokens)?;
        let (loss, count) = masked_mse(&pred, &batch.x, &mask)?;
        let mse = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: count,
            metrics: vec![("masked_mse".into(), mse)],
        })
    }

    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

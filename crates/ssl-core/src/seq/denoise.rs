//! Denoising reconstruction: corrupt the input, reconstruct the clean sequence.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::loss::masked_mse;
use crate::nn::Linear;
use crate::seq::SeqBatch;
use crate::{Ctx, Encoder, Init, ParamBuilder, ParamStore, PretextTask, Result, TaskOutput};

/// Settings of [`DenoisingTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenoisingConfig {
    /// Standard deviation of the additive Gaussian noise (on normalised features).
    pub noise_std: f32,
    /// Probability of zeroing each value (masking noise, 0: off).
    pub drop_prob: f64,
}

impl Default for DenoisingConfig {
    fn default() -> Self {
        DenoisingConfig {
            noise_std: 0.5,
            drop_prob: 0.5,
        }
    }
}

/// Gaussian and masking noise on every valid value; a linear head (`head`) reconstructs the
/// clean features at every valid timestep; MSE over valid timesteps.
pub struct DenoisingTask<E> {
    encoder: E,
    head: Linear,
    cfg: DenoisingConfig,
    store: ParamStore,
}

impl<E: Encoder<Input = SeqBatch>> DenoisingTask<E> {
    /// Wraps `encoder`, creating the head under `pb`.
    pub fn new(
        encoder: E,
        features: usize,
        cfg: DenoisingConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        let head = Linear::new(
            encoder.dim(),
            features,
            true,
            Init::XavierUniform,
            &pb.pp("head"),
        )?;
        Ok(DenoisingTask {
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

    /// The corrupted version of `batch`.
    pub fn corrupt(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<SeqBatch> {
        let (b, t, f) = batch.x.dims3()?;
        let valid = batch.valid.flatten_all()?.to_vec1::<f32>()?;
        let mut x = batch.x.flatten_all()?.to_vec1::<f32>()?;
        for (i, v) in x.iter_mut().enumerate() {
            if valid[i / f] < 0.5 {
                continue;
            }
            let noise = self.cfg.noise_std * ctx.rng.normal();
            let dropped = self.cfg.drop_prob > 0.0 && ctx.rng.bernoulli(self.cfg.drop_prob);
            *v = if dropped { 0.0 } else { *v + noise };
        }
        Ok(SeqBatch {
            x: Tensor::from_vec(x, (b, t, f), batch.x.device())?,
            valid: batch.valid.clone(),
        })
    }
}

impl<E: Encoder<Input = SeqBatch>> PretextTask for DenoisingTask<E> {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let noisy = self.corrupt(batch, ctx)?;
        let out = self.encoder.encode(&noisy, ctx)?;
        let pred = self.head.forward(&out.tokens)?;
        let (loss, count) = masked_mse(&pred, &batch.x, &batch.valid)?;
        let mse = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: count,
            metrics: vec![("reconstruction_mse".into(), mse)],
        })
    }

    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

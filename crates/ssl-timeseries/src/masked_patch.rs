//! PatchTST's self-supervised pretext task: hide a random subset of each channel's patches
//! (values set to 0, as the reference does), reconstruct their values from the visible ones,
//! MSE on the observed steps of masked patches only.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::Linear;
use ssl_core::seq::SeqBatch;
use ssl_core::{
    CoreError, Ctx, Encoder, Init, ParamBuilder, ParamStore, PretextTask, Result, SslRng,
    TaskOutput,
};

use crate::patchtst::PatchTstEncoder;

/// Settings of [`MaskedPatchTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskedPatchConfig {
    /// Fraction of each channel's observed patches hidden (PatchTST: 0.4).
    pub mask_ratio: f64,
}

impl Default for MaskedPatchConfig {
    fn default() -> Self {
        MaskedPatchConfig { mask_ratio: 0.4 }
    }
}

/// Chooses, per row of `patch_valid` (R x N, 0/1), `round(ratio * observed)` observed patches
/// (at least 1 where a row has any) uniformly at random: the top of a random permutation, as
/// MAE's argsort of noise. Returns an R x N 0/1 mask.
pub fn patch_mask(
    patch_valid: &[f32],
    rows: usize,
    n: usize,
    ratio: f64,
    rng: &mut SslRng,
) -> Vec<f32> {
    let mut mask = vec![0f32; rows * n];
    for r in 0..rows {
        let mut observed: Vec<usize> = (0..n).filter(|&p| patch_valid[r * n + p] > 0.5).collect();
        if observed.is_empty() {
            continue;
        }
        let k = ((ratio * observed.len() as f64).round() as usize).clamp(1, observed.len());
        rng.shuffle(&mut observed);
        for &p in &observed[..k] {
            mask[r * n + p] = 1.0;
        }
    }
    mask
}

/// Masked-patch reconstruction on a [`PatchTstEncoder`] with a linear head (`head`: D -> P).
pub struct MaskedPatchTask {
    encoder: PatchTstEncoder,
    head: Linear,
    cfg: MaskedPatchConfig,
    store: ParamStore,
}

impl MaskedPatchTask {
    /// Wraps `encoder`, creating the head under `pb` (the builder of the encoder's store).
    pub fn new(
        encoder: PatchTstEncoder,
        cfg: MaskedPatchConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.mask_ratio) || cfg.mask_ratio == 0.0 {
            return Err(CoreError::Config(format!(
                "mask_ratio must be in (0, 1), got {}",
                cfg.mask_ratio
            )));
        }
        let ec = encoder.config();
        let head = Linear::new(
            ec.transformer.dim,
            ec.patch_len,
            true,
            Init::XavierUniform,
            &pb.pp("head"),
        )?;
        Ok(MaskedPatchTask {
            encoder,
            head,
            cfg,
            store: pb.store().clone(),
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &PatchTstEncoder {
        &self.encoder
    }
}

impl PretextTask for MaskedPatchTask {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let p = self.encoder.patchify(batch)?;
        let (rows, n, _) = p.values.dims3()?;
        let pv = p.patch_valid.flatten_all()?.to_vec1::<f32>()?;
        let m = patch_mask(&pv, rows, n, self.cfg.mask_ratio, ctx.rng);
        let mask = Tensor::from_vec(m, (rows, n), p.values.device())?.unsqueeze(2)?;
        let visible = p.values.broadcast_mul(&(1.0 - &mask)?)?;
        let (tokens, _) = self.encoder.encode_patches(&visible, &p.patch_valid, ctx)?;
        let pred = self.head.forward(&tokens)?;
        let weight_mask = p.step_valid.broadcast_mul(&mask)?;
        let count = weight_mask
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if count <= 0.0 {
            return Err(CoreError::InvalidInput(
                "masked-patch batch has no observed step to reconstruct".into(),
            ));
        }
        let loss = ((pred - &p.values)?.sqr()?.mul(&weight_mask)?.sum_all()? / count)?;
        let mse = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_mask_rate_and_invariants_over_seeds() {
        let (rows, n) = (6, 20);
        let mut valid = vec![1f32; rows * n];
        for v in &mut valid[n..2 * n] {
            *v = 0.0; // row 1: nothing observed
        }
        for v in &mut valid[2 * n + 5..3 * n] {
            *v = 0.0; // row 2: 5 observed patches
        }
        let mut seen_first = [0usize; 20];
        for seed in 0..200 {
            let mut rng = SslRng::new(seed);
            let m = patch_mask(&valid, rows, n, 0.4, &mut rng);
            for i in 0..rows * n {
                assert!(m[i] <= valid[i]);
            }
            let per_row: Vec<f32> = (0..rows)
                .map(|r| m[r * n..(r + 1) * n].iter().sum())
                .collect();
            assert_eq!(per_row, [8., 0., 2., 8., 8., 8.]);
            for p in 0..n {
                seen_first[p] += m[p] as usize;
            }
        }
        // Every position is chosen about 40% of the time.
        for c in seen_first {
            assert!((50..110).contains(&c), "{c}");
        }
    }
}

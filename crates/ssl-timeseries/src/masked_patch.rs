//! PatchTST's self-supervised pretext task: hide a random subset of each channel's patches
//! (values set to 0, as the reference does), reconstruct their values from the visible ones,
//! MSE on the observed steps of masked patches only.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::select_rows;
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
        // The masked patches: the only ones the loss reads.
        let masked: Vec<u32> = (0..m.len())
            .filter(|&i| m[i] > 0.5)
            .map(|i| i as u32)
            .collect();
        let dev = p.values.device();
        let mask = Tensor::from_vec(m, (rows, n), dev)?.unsqueeze(2)?;
        let visible = p.values.broadcast_mul(&(1.0 - &mask)?)?;
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
        let tokens = self
            .encoder
            .encode_patch_rows(&visible, &p.patch_valid, &masked, ctx)?;
        let pred = self.head.forward(&tokens)?;
        let (values, weight_mask) = (
            select_rows(&p.values, &masked)?,
            select_rows(&weight_mask, &masked)?,
        );
        let loss = ((pred - values)?.sqr()?.mul(&weight_mask)?.sum_all()? / count)?;
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

    /// The loss on the masked patches' rows (the last block at those patches only) against
    /// the whole reconstruction weighted by the mask: the same value and gradients, with
    /// gaps (unobserved steps) and unequal lengths.
    #[test]
    fn loss_on_masked_rows_equals_the_masked_full_reconstruction() {
        use crate::patchtst::{PatchTstConfig, PatchTstEncoder};
        use candle_core::Device;
        use ssl_core::nn::TransformerConfig;
        use ssl_core::seq::{SeqBatch, SeqExample};
        let store = ParamStore::new(&Device::Cpu);
        let pb = store.builder(3);
        let cfg = PatchTstConfig {
            patch_len: 4,
            stride: 4,
            dropout: 0.0,
            transformer: TransformerConfig {
                dim: 16,
                depth: 2,
                heads: 2,
                mlp_dim: 32,
                ..TransformerConfig::default()
            },
        };
        let enc = PatchTstEncoder::new(&cfg, 2, &pb).unwrap();
        let task = MaskedPatchTask::new(enc, MaskedPatchConfig::default(), &pb).unwrap();
        let mut rng = SslRng::new(7);
        let ex: Vec<SeqExample> = [40, 33, 40]
            .iter()
            .map(|&steps| {
                let v = (0..steps * 2)
                    .map(|i| if i % 23 == 4 { f32::NAN } else { rng.normal() })
                    .collect();
                SeqExample::new(v, steps, 2).unwrap()
            })
            .collect();
        let batch = SeqBatch::from_examples(&ex.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let mut r1 = SslRng::new(11);
        let new = task.forward(&batch, &mut Ctx::eval(&mut r1)).unwrap().loss;
        // The reference: every patch reconstructed, the loss weighted by the same mask.
        let mut r2 = SslRng::new(11);
        let mut ctx = Ctx::eval(&mut r2);
        let p = task.encoder.patchify(&batch).unwrap();
        let (rows, n, _) = p.values.dims3().unwrap();
        let pv = p
            .patch_valid
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = patch_mask(&pv, rows, n, task.cfg.mask_ratio, ctx.rng);
        let mask = Tensor::from_vec(m, (rows, n), &Device::Cpu)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let visible = p.values.broadcast_mul(&(1.0 - &mask).unwrap()).unwrap();
        let (tokens, _) = task
            .encoder
            .encode_patches(&visible, &p.patch_valid, &mut ctx)
            .unwrap();
        let pred = task.head.forward(&tokens).unwrap();
        let wm = p.step_valid.broadcast_mul(&mask).unwrap();
        let count = wm.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (pred - &p.values).unwrap().sqr().unwrap().mul(&wm).unwrap();
        let old = (err.sum_all().unwrap() / f64::from(count)).unwrap();
        let (a, b) = (
            old.to_scalar::<f32>().unwrap(),
            new.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
        let (ga, gb) = (old.backward().unwrap(), new.backward().unwrap());
        let grads = |g: &candle_core::backprop::GradStore| -> Vec<Vec<f32>> {
            store
                .vars()
                .into_iter()
                .map(|(_, v)| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        let (ga, gb) = (grads(&ga), grads(&gb));
        let scale = ga.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in ga.iter().flatten().zip(gb.iter().flatten()) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
    }

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

//! MAE (He et al. 2022), following facebookresearch/mae `models_mae.py`: the encoder sees the
//! visible patches only; a lighter decoder appends mask tokens, unshuffles them with
//! `ids_restore`, adds its own sin-cos positions and predicts pixels; the loss is the MSE on
//! masked patches only, optionally against per-patch normalised targets (`norm_pix_loss`).
//!
//! Keys: the encoder under `vit.` (Hugging Face `ViTMAEForPreTraining` names), the decoder
//! under `decoder.`: `decoder_embed`, `mask_token`, `layer.{i}...`, `decoder_norm`, `decoder_pred`.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{add_broadcast, select_rows};
use ssl_core::nn::{LayerNorm, Linear, TransformerConfig, TransformerStack};
use ssl_core::{Ctx, Encoder, Init, ParamBuilder, ParamStore, PretextTask, TaskOutput};

use crate::augment::{augment_batch, normalize_batch, AugmentConfig};
use crate::masking::{gather_tokens, random_masking, MaskSample};
use crate::patch::patchify;
use crate::pos_embed::sincos_2d;
use crate::unshuffle::DecoderInputOp;
use crate::vit::{Images, ViTConfig, VisionTransformer};
use crate::{Result, VisionError};

/// Settings of [`MaeTask`] (defaults: MAE's; the decoder of `mae_vit_base_patch16`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaeConfig {
    /// Fraction of patches masked (0.75; 0.5-0.6 for X-ray-like data).
    pub mask_ratio: f64,
    /// Normalise each target patch by its own mean and variance.
    pub norm_pix_loss: bool,
    /// Decoder width (a multiple of 4).
    pub decoder_dim: usize,
    /// Decoder layers.
    pub decoder_depth: usize,
    /// Decoder attention heads.
    pub decoder_heads: usize,
    /// Decoder feed-forward width as a multiple of `decoder_dim`.
    pub decoder_mlp_ratio: f64,
}

impl Default for MaeConfig {
    fn default() -> Self {
        MaeConfig {
            mask_ratio: 0.75,
            norm_pix_loss: false,
            decoder_dim: 512,
            decoder_depth: 8,
            decoder_heads: 16,
            decoder_mlp_ratio: 4.0,
        }
    }
}

/// The masked autoencoder (see the module documentation).
pub struct MaeTask {
    encoder: VisionTransformer,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder: TransformerStack,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    decoder_pos: Tensor,
    cfg: MaeConfig,
    augment: AugmentConfig,
    store: ParamStore,
}

impl MaeTask {
    /// Creates encoder (under `vit.`) and decoder (under `decoder.`) parameters under `pb`.
    pub fn new(
        vit: &ViTConfig,
        cfg: &MaeConfig,
        augment: &AugmentConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.mask_ratio) {
            return Err(VisionError::Config(format!(
                "task.mae.mask_ratio = {} must be in [0, 1)",
                cfg.mask_ratio
            )));
        }
        augment.validate(vit.channels)?;
        let encoder = VisionTransformer::new(vit, &pb.pp("vit"))?;
        let (gh, gw) = vit.grid()?;
        let l = gh * gw;
        let keep = crate::masking::len_keep(l, cfg.mask_ratio);
        if keep == 0 || keep == l {
            return Err(VisionError::Config(format!(
                "task.mae.mask_ratio = {} keeps {keep} of {l} patches: at least one must be kept and one masked",
                cfg.mask_ratio
            )));
        }
        let dd = cfg.decoder_dim;
        let dec = pb.pp("decoder");
        let decoder_embed = Linear::new(
            vit.dim,
            dd,
            true,
            Init::XavierUniform,
            &dec.pp("decoder_embed"),
        )?;
        let mask_token = dec.get_with_decay("mask_token", (1, 1, dd), Init::Normal(0.02), false)?;
        let tcfg = TransformerConfig {
            dim: dd,
            depth: cfg.decoder_depth,
            heads: cfg.decoder_heads,
            mlp_dim: ((dd as f64) * cfg.decoder_mlp_ratio).round() as usize,
            ..vit.transformer()
        };
        let decoder = TransformerStack::new(&tcfg, &dec)?;
        let decoder_norm = LayerNorm::new(dd, vit.layer_norm_eps, &dec.pp("decoder_norm"))?;
        let decoder_pred = Linear::new(
            dd,
            vit.patch_dim(),
            true,
            Init::XavierUniform,
            &dec.pp("decoder_pred"),
        )?;
        let pos = sincos_2d(dd, gh, gw, true)?;
        let decoder_pos = Tensor::from_vec(pos, (1, l + 1, dd), pb.device())?;
        Ok(MaeTask {
            encoder,
            decoder_embed,
            mask_token,
            decoder,
            decoder_norm,
            decoder_pred,
            decoder_pos,
            cfg: cfg.clone(),
            augment: augment.clone(),
            store: pb.store().clone(),
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &VisionTransformer {
        &self.encoder
    }

    /// The settings.
    pub fn config(&self) -> &MaeConfig {
        &self.cfg
    }

    /// The augmentation and normalisation settings.
    pub fn augment(&self) -> &AugmentConfig {
        &self.augment
    }

    /// Raw `[0, 1]` images to model input: augmented and normalised in training mode,
    /// normalised only in evaluation mode.
    pub fn prepare(&self, images: &Images, ctx: &mut Ctx) -> Result<Tensor> {
        if ctx.train {
            augment_batch(&images.pixels, &self.augment, ctx.rng)
        } else {
            normalize_batch(&images.pixels, &self.augment)
        }
    }

    /// Encoder on the visible patches of `mask` only: `(B, 1 + len_keep, D)`, class token first.
    pub fn forward_encoder(
        &self,
        pixels: &Tensor,
        mask: &MaskSample,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let visible = self.encoder.embed_patches_at(pixels, &mask.ids_keep)?;
        Ok(self.encoder.forward_tokens(&visible, ctx)?.0)
    }

    /// Decoder: embed, append mask tokens, unshuffle with `ids_restore`, add positions,
    /// blocks, norm, pixel prediction. Returns `(B, L, p*p*C)` (class token dropped).
    pub fn forward_decoder(
        &self,
        latent: &Tensor,
        mask: &MaskSample,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let x = self.decoder_input(latent, mask)?;
        let x = self.decoder.forward(&x, None, ctx)?.last;
        let x = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?;
        Ok(x.narrow(1, 1, mask.num_patches)?)
    }

    /// The decoder blocks' input: embed, append mask tokens, unshuffle with `ids_restore`,
    /// class token first, add positions: `(B, L + 1, decoder_dim)`.
    fn decoder_input(&self, latent: &Tensor, mask: &MaskSample) -> Result<Tensor> {
        let x = self.decoder_embed.forward(latent)?;
        let l = mask.num_patches;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = DecoderInputOp {
                restore: mask.ids_restore.iter().flatten().copied().collect(),
                patches: l,
                pos: self.decoder_pos.flatten_all()?.to_vec1::<f32>()?,
            };
            return Ok(x
                .contiguous()?
                .apply_op2(&self.mask_token.contiguous()?, op)?);
        }
        self.decoder_input_composite(&x, mask)
    }

    /// [`MaeTask::decoder_input`] after the embedding, in candle's ops (any device; the
    /// reference of the CPU op's test).
    fn decoder_input_composite(&self, x: &Tensor, mask: &MaskSample) -> Result<Tensor> {
        let (b, n, dd) = x.dims3()?;
        let l = mask.num_patches;
        let n_mask = l + 1 - n;
        let tokens = self.mask_token.broadcast_as((b, n_mask, dd))?;
        let shuffled = Tensor::cat(&[&x.narrow(1, 1, n - 1)?, &tokens], 1)?;
        let unshuffled = gather_tokens(&shuffled, &mask.ids_restore)?;
        let x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &unshuffled], 1)?;
        Ok(add_broadcast(&x, &self.decoder_pos)?)
    }

    /// The regression target: patchified pixels, per-patch normalised with `norm_pix_loss`.
    pub fn target(&self, pixels: &Tensor) -> Result<Tensor> {
        let t = patchify(pixels, self.encoder.config().patch_size)?;
        if !self.cfg.norm_pix_loss {
            return Ok(t);
        }
        let n = t.dim(D::Minus1)? as f64;
        let mean = t.mean_keepdim(D::Minus1)?;
        let c = t.broadcast_sub(&mean)?;
        // unbiased variance, as torch.var
        let var = (c.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0).max(1.0))?;
        Ok(c.broadcast_div(&(var + 1e-6)?.sqrt()?)?)
    }

    /// Per-patch squared error `(B, L)` of `pred` against the target of `pixels`.
    pub fn patch_errors(&self, pixels: &Tensor, pred: &Tensor) -> Result<Tensor> {
        let target = self.target(pixels)?;
        Ok((pred - target)?.sqr()?.mean(D::Minus1)?)
    }

    /// MAE's `forward_loss`: mean over masked patches of the per-patch MSE. Returns the loss
    /// and the number of masked patches.
    pub fn forward_loss(
        &self,
        pixels: &Tensor,
        pred: &Tensor,
        mask: &MaskSample,
    ) -> Result<(Tensor, f64)> {
        let per_patch = self.patch_errors(pixels, pred)?;
        let m = mask
            .mask_tensor(pixels.device())?
            .to_dtype(per_patch.dtype())?;
        let count: f64 = mask.mask.iter().flatten().map(|v| f64::from(*v)).sum();
        if count <= 0.0 {
            return Err(VisionError::InvalidInput("the mask hides no patch".into()));
        }
        Ok(((per_patch * m)?.sum_all()? / count)?).map(|l| (l, count))
    }

    /// Masks `pixels` with `mask`, encodes, decodes: the prediction `(B, L, p*p*C)`.
    pub fn reconstruct(&self, pixels: &Tensor, mask: &MaskSample, ctx: &mut Ctx) -> Result<Tensor> {
        let latent = self.forward_encoder(pixels, mask, ctx)?;
        self.forward_decoder(&latent, mask, ctx)
    }

    /// Loss on already-prepared `pixels` with a given mask: [`Self::forward_loss`] of
    /// [`Self::reconstruct`], but the decoder's last block, norm and pixel prediction run
    /// only at the masked patches, the only ones the loss reads
    /// (`TransformerStack::forward_rows`).
    pub fn loss_with_mask(
        &self,
        pixels: &Tensor,
        mask: &MaskSample,
        ctx: &mut Ctx,
    ) -> Result<(Tensor, f64)> {
        let l = mask.num_patches;
        // The masked patches as rows of the decoder's tokens (class token first) and of the
        // targets.
        let (mut rows, mut at) = (Vec::new(), Vec::new());
        for (bi, m) in mask.mask.iter().enumerate() {
            for (p, _) in m.iter().enumerate().filter(|(_, v)| **v > 0.5) {
                rows.push((bi * (l + 1) + 1 + p) as u32);
                at.push((bi * l + p) as u32);
            }
        }
        if rows.is_empty() {
            return Err(VisionError::InvalidInput("the mask hides no patch".into()));
        }
        let latent = self.forward_encoder(pixels, mask, ctx)?;
        let x = self.decoder_input(&latent, mask)?;
        let h = self.decoder.forward_rows(&x, None, &rows, ctx)?;
        let pred = self.decoder_pred.forward(&self.decoder_norm.forward(&h)?)?;
        let target = select_rows(&self.target(pixels)?, &at)?;
        let count = rows.len() as f64;
        let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?;
        Ok(((per_patch.sum_all()? / count)?, count))
    }

    /// A fresh random masking for a batch of `b` images.
    pub fn sample_mask(&self, b: usize, ctx: &mut Ctx) -> Result<MaskSample> {
        let l = self.encoder.config().num_patches()?;
        random_masking(b, l, self.cfg.mask_ratio, ctx.rng)
    }
}

impl PretextTask for MaeTask {
    type Batch = Images;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        let pixels = self.prepare(batch, ctx)?;
        let mask = self.sample_mask(batch.len(), ctx)?;
        let (loss, count) = self.loss_with_mask(&pixels, &mask, ctx)?;
        let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: count,
            metrics: vec![("masked_mse".into(), v)],
        })
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
    use ssl_core::{SslRng, Trainer};

    fn tiny_vit() -> ViTConfig {
        ViTConfig {
            image_height: 8,
            image_width: 8,
            channels: 1,
            patch_size: 2,
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_ratio: 2.0,
            ..ViTConfig::default()
        }
    }

    fn tiny_mae() -> MaeConfig {
        MaeConfig {
            decoder_dim: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            decoder_mlp_ratio: 2.0,
            ..MaeConfig::default()
        }
    }

    fn build(norm_pix: bool) -> (ParamStore, MaeTask) {
        let store = ParamStore::new(&Device::Cpu);
        let cfg = MaeConfig {
            norm_pix_loss: norm_pix,
            ..tiny_mae()
        };
        let t = MaeTask::new(
            &tiny_vit(),
            &cfg,
            &AugmentConfig::default(),
            &store.builder(0),
        )
        .unwrap();
        (store, t)
    }

    fn images(seed: u64, n: usize) -> Images {
        let mut rng = SslRng::new(seed);
        Images::from_vec(
            rng.uniform_vec(n * 64, 0.0, 1.0),
            [n, 1, 8, 8],
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn loss_ignores_visible_patch_targets() {
        for norm_pix in [false, true] {
            let (_, task) = build(norm_pix);
            let mut rng = SslRng::new(1);
            let imgs = images(0, 3);
            let pixels = normalize_batch(&imgs.pixels, task.augment()).unwrap();
            let mask = random_masking(3, 16, 0.75, &mut rng).unwrap();
            let pred = task
                .reconstruct(&pixels, &mask, &mut Ctx::eval(&mut rng))
                .unwrap();
            let (l1, n) = task.forward_loss(&pixels, &pred, &mask).unwrap();
            assert_eq!(n, 3.0 * 12.0);
            // Change the target pixels of every visible patch only.
            let mut target = crate::patch::patchify(&pixels, 2)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            for (b, row) in target.iter_mut().enumerate() {
                for (p, patch) in row.iter_mut().enumerate() {
                    if mask.mask[b][p] == 0.0 {
                        for (k, v) in patch.iter_mut().enumerate() {
                            *v += 3.0 + k as f32;
                        }
                    }
                }
            }
            let flat: Vec<f32> = target.into_iter().flatten().flatten().collect();
            let changed = crate::patch::unpatchify(
                &Tensor::from_vec(flat, (3, 16, 4), &Device::Cpu).unwrap(),
                2,
                1,
                (4, 4),
            )
            .unwrap();
            let (l2, _) = task.forward_loss(&changed, &pred, &mask).unwrap();
            let (a, b) = (
                l1.to_scalar::<f32>().unwrap(),
                l2.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            // ...while changing a masked patch does change it.
            let mut v = changed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let masked = mask.mask[0].iter().position(|m| *m == 1.0).unwrap();
            let (r, c) = (masked / 4 * 2, masked % 4 * 2);
            v[r * 8 + c] += 5.0;
            let changed2 = Tensor::from_vec(v, (3, 1, 8, 8), &Device::Cpu).unwrap();
            let (l3, _) = task.forward_loss(&changed2, &pred, &mask).unwrap();
            assert!((l3.to_scalar::<f32>().unwrap() - b).abs() > 1e-3);
        }
    }

    /// The decoder input's CPU op against candle's composite: the same values and the same
    /// gradients for the embedded tokens and the mask token.
    #[test]
    fn the_decoder_input_op_equals_the_composite() {
        let (_store, task) = build(false);
        let mut rng = SslRng::new(6);
        let mask = random_masking(3, 16, 0.75, &mut rng).unwrap();
        let dd = task.mask_token.dim(2).unwrap();
        let x = candle_core::Var::from_vec(
            rng.normal_vec(3 * 5 * dd, 0.0, 1.0),
            (3, 5, dd),
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::from_vec(
            rng.normal_vec(3 * 17 * dd, 0.0, 1.0),
            (3, 17, dd),
            &Device::Cpu,
        )
        .unwrap();
        let run = |op: bool| {
            let out = if op {
                let op = DecoderInputOp {
                    restore: mask.ids_restore.iter().flatten().copied().collect(),
                    patches: 16,
                    pos: task.decoder_pos.flatten_all().unwrap().to_vec1().unwrap(),
                };
                x.as_tensor().apply_op2(&task.mask_token, op).unwrap()
            } else {
                task.decoder_input_composite(x.as_tensor(), &mask).unwrap()
            };
            let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            [
                v(&out),
                v(g.get(x.as_tensor()).unwrap()),
                v(g.get(&task.mask_token).unwrap()),
            ]
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, (a, b)) in ["values", "tokens' gradient", "mask token's gradient"]
            .iter()
            .zip(ours.iter().zip(&theirs))
        {
            assert_eq!(a.len(), b.len(), "{what}");
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        }
    }

    /// The training loss (the decoder's last block at the masked patches only) against
    /// `forward_loss` of the full reconstruction: the same value and gradients.
    #[test]
    fn loss_with_mask_equals_the_full_reconstructions_loss() {
        for norm_pix in [false, true] {
            let (store, task) = build(norm_pix);
            let mut rng = SslRng::new(4);
            let imgs = images(2, 3);
            let pixels = normalize_batch(&imgs.pixels, task.augment()).unwrap();
            let mask = random_masking(3, 16, 0.75, &mut rng).unwrap();
            let mut r0 = SslRng::new(9);
            let pred = task
                .reconstruct(&pixels, &mask, &mut Ctx::eval(&mut r0))
                .unwrap();
            let (full, n_full) = task.forward_loss(&pixels, &pred, &mask).unwrap();
            let mut r1 = SslRng::new(9);
            let (rows, n_rows) = task
                .loss_with_mask(&pixels, &mask, &mut Ctx::eval(&mut r1))
                .unwrap();
            assert_eq!(n_full, n_rows);
            let (a, b) = (
                full.to_scalar::<f32>().unwrap(),
                rows.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
            let (g_full, g_rows) = (full.backward().unwrap(), rows.backward().unwrap());
            for (name, var) in store.vars() {
                let v = |g: &candle_core::backprop::GradStore| {
                    g.get(var.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let (p, q) = (v(&g_full), v(&g_rows));
                let scale = p.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in p.iter().zip(&q) {
                    // The key bias's gradient is zero but for rounding (softmax ignores it).
                    assert!((x - y).abs() <= 1e-4 * scale + 1e-7, "{name}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn every_trainable_variable_gets_a_gradient() {
        let (store, task) = build(true);
        let mut rng = SslRng::new(2);
        let out = task
            .forward(&images(1, 4), &mut Ctx::train(&mut rng))
            .unwrap();
        let grads = out.loss.backward().unwrap();
        assert!(!store.vars().is_empty());
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name} has a zero gradient");
        }
    }

    #[test]
    fn encoder_sees_visible_patches_only() {
        let (_, task) = build(false);
        let mut rng = SslRng::new(3);
        let imgs = images(2, 2);
        let pixels = normalize_batch(&imgs.pixels, task.augment()).unwrap();
        let mask = random_masking(2, 16, 0.75, &mut rng).unwrap();
        let a = task
            .forward_encoder(&pixels, &mask, &mut Ctx::eval(&mut rng))
            .unwrap();
        assert_eq!(a.dims(), [2, 5, 16]);
        // Scribbling over masked patches leaves the latent unchanged.
        let mut v = pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for b in 0..2 {
            for p in 0..16 {
                if mask.mask[b][p] == 1.0 {
                    let (r, c) = (p / 4 * 2, p % 4 * 2);
                    v[b * 64 + r * 8 + c] = 9.0;
                }
            }
        }
        let px2 = Tensor::from_vec(v, (2, 1, 8, 8), &Device::Cpu).unwrap();
        let b = task
            .forward_encoder(&px2, &mask, &mut Ctx::eval(&mut rng))
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
    }

    #[test]
    fn loss_falls_on_a_tiny_set() {
        let (_, task) = build(false);
        // 16 images of smooth stripes: predictable from context.
        let mut data = Vec::new();
        for i in 0..16 {
            for y in 0..8 {
                for x in 0..8 {
                    data.push(((x as f32 + i as f32) * 0.7).sin() * 0.4 + 0.5 + 0.0 * y as f32);
                }
            }
        }
        let set = crate::source::ImageSet::new(data, [1, 8, 8]).unwrap();
        let mut src = crate::source::InMemoryImageSource::new(set, 8, 0, &Device::Cpu).unwrap();
        let cfg = ssl_core::TrainConfig {
            max_steps: 150,
            lr: 3e-3,
            warmup_steps: 10,
            beta2: 0.95,
            checkpoint_every_steps: 0,
            checkpoint_every_minutes: 0.0,
            health_every: 0,
            divergence_factor: 0.0,
            ..Default::default()
        };
        let report = ssl_core::LoopTrainer::new(cfg, None)
            .unwrap()
            .fit(&task, &mut src, None)
            .unwrap();
        assert!(
            report.params_without_grad.is_empty(),
            "{:?}",
            report.params_without_grad
        );
        let first: f64 = report.losses[..10].iter().map(|(_, l)| l).sum::<f64>() / 10.0;
        let last: f64 = report.losses[report.losses.len() - 10..]
            .iter()
            .map(|(_, l)| l)
            .sum::<f64>()
            / 10.0;
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}

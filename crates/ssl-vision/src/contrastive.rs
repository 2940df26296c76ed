//! SimCLR-style contrastive learning on images: two augmented views of each image, a
//! projection head, NT-Xent (`ssl_core::loss::nt_xent`), on the same ViT as MAE.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use ssl_core::loss::{backward_across, nt_xent_across};
use ssl_core::nn::Linear;
use ssl_core::{Ctx, Encoder, ParamBuilder, ParamStore, PretextTask, SslRng, TaskOutput};

use crate::augment::{augment_batch_with, normalize_batch, AugmentConfig};
use crate::photometric;
use crate::vit::{Images, ViTConfig, VisionTransformer};
use crate::{Result, VisionError};

/// Settings of [`SimClrTask`]: the loss, the head, and the photometric half of the views
/// (SimCLR's `RandomApply(ColorJitter, p)`, `RandomGrayscale`, `GaussianBlur`), applied in
/// that order after `task.augment`'s crop and flip and before normalisation. A probability of
/// 0 draws nothing, so with `jitter_p`, `grayscale_p` and `blur_p` all 0 the views (and the
/// random stream) are exactly the crop + flip views of `task.augment` alone.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimClrConfig {
    /// NT-Xent temperature (SimCLR: 0.1-0.5).
    pub temperature: f64,
    /// Output width of the projection head.
    pub proj_dim: usize,
    /// Colour-jitter strength s, 0 to 2.5 (SimCLR's paper: 1.0 on ImageNet, 0.5 on CIFAR-10):
    /// brightness, contrast and saturation factors uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s]
    /// and a hue shift uniform in [-0.2 s, 0.2 s] turns, applied in a random order
    /// (torchvision's `ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)`); 1-channel images get only
    /// brightness and contrast. 0: no jitter.
    pub color_jitter: f64,
    /// Probability that a view gets the colour jitter (SimCLR: 0.8).
    pub jitter_p: f64,
    /// Probability that a 3-channel view turns grey, every channel set to its ITU-R 601 luma
    /// 0.2989 R + 0.587 G + 0.114 B (SimCLR: 0.2); 1-channel images are left alone.
    pub grayscale_p: f64,
    /// Probability that a view is blurred (SimCLR: 0.5), for images whose shorter side is at
    /// least `blur_min_side`: a Gaussian with sigma uniform in `blur_sigma`, 2 * floor(side /
    /// 20) + 1 taps square (about 10 % of the shorter side, odd, as SimCLR's code; at least
    /// 3), reflect padding at the edges.
    pub blur_p: f64,
    /// Range of the blur's sigma in pixels, `[lo, hi]` (SimCLR: 0.1 to 2.0).
    pub blur_sigma: [f64; 2],
    /// Blur only images whose shorter side has at least this many pixels (default 64:
    /// SimCLR blurs its 224x224 ImageNet views but not its 32x32 CIFAR-10 ones, so 28x28
    /// Fashion-MNIST gets none; 0: blur any size).
    pub blur_min_side: usize,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        SimClrConfig {
            temperature: 0.2,
            proj_dim: 128,
            color_jitter: 0.5,
            jitter_p: 0.8,
            grayscale_p: 0.2,
            blur_p: 0.5,
            blur_sigma: [0.1, 2.0],
            blur_min_side: 64,
        }
    }
}

impl SimClrConfig {
    /// Checks every setting; the error names the `task.simclr.*` key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, v: String, rule: &str| {
            Err(VisionError::Config(format!(
                "task.simclr.{key} = {v} must be {rule}"
            )))
        };
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", self.temperature.to_string(), "positive");
        }
        if self.proj_dim == 0 {
            return bad("proj_dim", "0".into(), "at least 1");
        }
        if !(0.0..=2.5).contains(&self.color_jitter) {
            return bad(
                "color_jitter",
                self.color_jitter.to_string(),
                "in [0, 2.5] (the hue shift 0.2 s is at most half a turn)",
            );
        }
        for (key, p) in [
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, p.to_string(), "a probability in [0, 1]");
            }
        }
        let [lo, hi] = self.blur_sigma;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return bad(
                "blur_sigma",
                format!("{:?}", self.blur_sigma),
                "[lo, hi] with 0 < lo <= hi",
            );
        }
        Ok(())
    }

    /// Whether images of `height x width` are ever blurred under these settings.
    pub fn blurs(&self, height: usize, width: usize) -> bool {
        self.blur_p > 0.0 && height.min(width) >= self.blur_min_side
    }

    /// The photometric half of one view, in place on one raw `[0, 1]` image (planar
    /// `C x H x W`), drawing from `rng`: colour jitter with probability `jitter_p` (a random
    /// order of the four ops, then their factors, as torchvision's `ColorJitter.get_params`),
    /// grey-scale with probability `grayscale_p` (3 channels), blur with probability
    /// `blur_p` (see [`SimClrConfig::blurs`]). A probability of 0 draws nothing.
    pub fn apply_photometric(&self, img: &mut [f32], shape: [usize; 3], rng: &mut SslRng) {
        let [c, h, w] = shape;
        let hw = h * w;
        if self.jitter_p > 0.0 && self.color_jitter > 0.0 && rng.bernoulli(self.jitter_p) {
            let mut order = [0usize, 1, 2, 3];
            rng.shuffle(&mut order);
            let s = self.color_jitter as f32;
            let (lo, hi) = ((1.0 - 0.8 * s).max(0.0), 1.0 + 0.8 * s);
            let brightness = rng.uniform_range(lo, hi);
            let contrast = rng.uniform_range(lo, hi);
            let saturation = rng.uniform_range(lo, hi);
            let hue = rng.uniform_range(-0.2 * s, 0.2 * s);
            for op in order {
                match op {
                    0 => photometric::adjust_brightness(img, brightness),
                    1 => photometric::adjust_contrast(img, c, hw, contrast),
                    2 => photometric::adjust_saturation(img, c, hw, saturation),
                    _ => photometric::adjust_hue(img, c, hw, hue),
                }
            }
        }
        if c == 3 && self.grayscale_p > 0.0 && rng.bernoulli(self.grayscale_p) {
            photometric::grayscale(img, c, hw);
        }
        if self.blurs(h, w) && rng.bernoulli(self.blur_p) {
            let [lo, hi] = self.blur_sigma;
            let sigma = rng.uniform_range(lo as f32, hi as f32);
            let radius = (h.min(w) / 20).max(1);
            photometric::gaussian_blur(img, c, h, w, radius, sigma);
        }
    }

    /// One SimCLR view of a batch of raw `[0, 1]` images `(B, C, H, W)`: `augment`'s crop and
    /// flip, then [`SimClrConfig::apply_photometric`], then normalisation.
    pub fn view(
        &self,
        images: &Tensor,
        augment: &AugmentConfig,
        rng: &mut SslRng,
    ) -> Result<Tensor> {
        augment_batch_with(images, augment, rng, |img, shape, rng| {
            self.apply_photometric(img, shape, rng)
        })
    }
}

/// Two views per image from the augmentations (`task.augment`'s crop and flip, then
/// [`SimClrConfig`]'s colour jitter, grey-scale and blur); pooled ViT embeddings go through the
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
        cfg.validate()?;
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
        let v1 = self.cfg.view(&batch.pixels, &self.augment, ctx.rng)?;
        let v2 = self.cfg.view(&batch.pixels, &self.augment, ctx.rng)?;
        let z1 = self.project(&self.encoder.pooled(&Images { pixels: v1 }, ctx)?)?;
        let z2 = self.project(&self.encoder.pooled(&Images { pixels: v2 }, ctx)?)?;
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
        // The gradients are the graph's (the world factor scales the loss): fused ops may
        // deliver theirs aside.
        ctx.sinking(|ctx| {
            let out = self.forward(batch, ctx)?;
            backward_across(out, self.ranks.as_ref().map_or(1, |r| r.world_size()))
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
    use ssl_core::SslRng;

    fn raw() -> AugmentConfig {
        AugmentConfig {
            crop: false,
            hflip: false,
            mean: vec![0.0],
            std: vec![1.0],
            ..AugmentConfig::default()
        }
    }

    fn only(jitter_p: f64, grayscale_p: f64, blur_p: f64) -> SimClrConfig {
        SimClrConfig {
            jitter_p,
            grayscale_p,
            blur_p,
            blur_min_side: 0,
            ..SimClrConfig::default()
        }
    }

    fn images(n: usize, c: usize, side: usize, seed: u64) -> (Tensor, Vec<f32>) {
        let v = SslRng::new(seed).uniform_vec(n * c * side * side, 0.1, 0.9);
        let t = Tensor::from_vec(v.clone(), (n, c, side, side), &Device::Cpu).unwrap();
        (t, v)
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Probabilities of 0 draw nothing: the views and the random stream are the crop + flip
    /// ones of `task.augment` alone (the old SimCLR views).
    #[test]
    fn zero_probabilities_are_the_crop_flip_views() {
        let (img, _) = images(3, 3, 8, 1);
        let aug = AugmentConfig::default();
        let (mut a, mut b) = (SslRng::new(5), SslRng::new(5));
        let old = crate::augment::augment_batch(&img, &aug, &mut a).unwrap();
        let new = only(0.0, 0.0, 0.0).view(&img, &aug, &mut b).unwrap();
        assert_eq!(flat(&old), flat(&new));
        assert_eq!(a, b);
    }

    /// With probability 1 each op is applied to every image, as its definition in
    /// `photometric` with the factors drawn in torchvision's order.
    #[test]
    fn probability_one_applies_each_op_as_defined() {
        let (n, side) = (3, 8);
        let hw = side * side;
        // Jitter on RGB: the random order, then brightness, contrast, saturation, hue.
        let (img, v) = images(n, 3, side, 2);
        let cfg = only(1.0, 0.0, 0.0);
        let got = flat(&cfg.view(&img, &raw(), &mut SslRng::new(3)).unwrap());
        let mut rng = SslRng::new(3);
        for i in 0..n {
            let mut want = v[i * 3 * hw..(i + 1) * 3 * hw].to_vec();
            assert!(rng.bernoulli(1.0));
            let mut order = [0usize, 1, 2, 3];
            rng.shuffle(&mut order);
            let f: Vec<f32> = (0..3).map(|_| rng.uniform_range(0.6, 1.4)).collect();
            let hue = rng.uniform_range(-0.1, 0.1);
            for op in order {
                match op {
                    0 => photometric::adjust_brightness(&mut want, f[0]),
                    1 => photometric::adjust_contrast(&mut want, 3, hw, f[1]),
                    2 => photometric::adjust_saturation(&mut want, 3, hw, f[2]),
                    _ => photometric::adjust_hue(&mut want, 3, hw, hue),
                }
            }
            let have = &got[i * 3 * hw..(i + 1) * 3 * hw];
            assert_eq!(have, &want[..], "image {i}");
            assert_ne!(have, &v[i * 3 * hw..(i + 1) * 3 * hw]);
            assert!(have.iter().all(|x| (0.0..=1.0).contains(x)));
        }
        // Grey-scale: every channel is the luma.
        let got = flat(
            &only(0.0, 1.0, 0.0)
                .view(&img, &raw(), &mut SslRng::new(3))
                .unwrap(),
        );
        for i in 0..n {
            let mut want = v[i * 3 * hw..(i + 1) * 3 * hw].to_vec();
            photometric::grayscale(&mut want, 3, hw);
            assert_eq!(&got[i * 3 * hw..(i + 1) * 3 * hw], &want[..]);
        }
        // Blur: sigma drawn in [0.1, 2], 2 * floor(8 / 20) + 1 -> 3 taps (the minimum).
        let got = flat(
            &only(0.0, 0.0, 1.0)
                .view(&img, &raw(), &mut SslRng::new(3))
                .unwrap(),
        );
        let mut rng = SslRng::new(3);
        for i in 0..n {
            let mut want = v[i * 3 * hw..(i + 1) * 3 * hw].to_vec();
            assert!(rng.bernoulli(1.0));
            let sigma = rng.uniform_range(0.1, 2.0);
            photometric::gaussian_blur(&mut want, 3, side, side, 1, sigma);
            assert_eq!(&got[i * 3 * hw..(i + 1) * 3 * hw], &want[..]);
        }
    }

    /// Grey images get brightness and contrast only and never grey-scale; blur waits for
    /// `blur_min_side`.
    #[test]
    fn grey_images_and_small_images_are_spared_what_does_not_apply() {
        let (img, v) = images(4, 1, 8, 4);
        let unchanged = |cfg: SimClrConfig| {
            let mut rng = SslRng::new(6);
            let out = flat(&cfg.view(&img, &raw(), &mut rng).unwrap());
            (out == v, rng == SslRng::new(6))
        };
        assert_eq!(unchanged(only(0.0, 1.0, 0.0)), (true, true));
        let small = SimClrConfig {
            blur_min_side: 9,
            ..only(0.0, 0.0, 1.0)
        };
        assert_eq!(unchanged(small), (true, true));
        assert!(!unchanged(only(0.0, 0.0, 1.0)).0);
        // Jitter on one channel changes the image and stays in [0, 1].
        let out = flat(
            &only(1.0, 0.0, 0.0)
                .view(&img, &raw(), &mut SslRng::new(6))
                .unwrap(),
        );
        assert_ne!(out, v);
        assert!(out.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
    }

    #[test]
    fn probabilities_are_respected_and_seeds_repeat() {
        let n = 400;
        let (img, v) = images(n, 3, 2, 7);
        let count = |cfg: SimClrConfig, changed: &dyn Fn(&[f32], &[f32]) -> bool| {
            let out = flat(&cfg.view(&img, &raw(), &mut SslRng::new(8)).unwrap());
            (0..n)
                .filter(|&i| changed(&out[i * 12..(i + 1) * 12], &v[i * 12..(i + 1) * 12]))
                .count()
        };
        let grey = count(only(0.0, 0.2, 0.0), &|o, _| {
            o[..4] == o[4..8] && o[4..8] == o[8..]
        });
        assert!((50..=110).contains(&grey), "{grey} of {n} grey at p = 0.2");
        let jittered = count(only(0.8, 0.0, 0.0), &|o, i| o != i);
        assert!(
            (290..=350).contains(&jittered),
            "{jittered} of {n} at p = 0.8"
        );
        let (img, _) = images(2, 3, 8, 9);
        let aug = AugmentConfig::default();
        let cfg = SimClrConfig {
            blur_min_side: 0,
            ..SimClrConfig::default()
        };
        let a = flat(&cfg.view(&img, &aug, &mut SslRng::new(1)).unwrap());
        let b = flat(&cfg.view(&img, &aug, &mut SslRng::new(1)).unwrap());
        let c = flat(&cfg.view(&img, &aug, &mut SslRng::new(2)).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 2 * 3 * 64);
        assert!(a.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bad_settings_are_refused_by_key() {
        for (cfg, key) in [
            (only(1.5, 0.2, 0.5), "task.simclr.jitter_p"),
            (only(0.8, -0.1, 0.5), "task.simclr.grayscale_p"),
            (only(0.8, 0.2, f64::NAN), "task.simclr.blur_p"),
            (
                SimClrConfig {
                    color_jitter: 3.0,
                    ..SimClrConfig::default()
                },
                "task.simclr.color_jitter",
            ),
            (
                SimClrConfig {
                    blur_sigma: [2.0, 0.1],
                    ..SimClrConfig::default()
                },
                "task.simclr.blur_sigma",
            ),
            (
                SimClrConfig {
                    temperature: 0.0,
                    ..SimClrConfig::default()
                },
                "task.simclr.temperature",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        assert!(SimClrConfig::default().validate().is_ok());
    }

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

//! Contrastive image-text losses as stateless functions of the two embedding matrices:
//! CLIP's symmetric cross-entropy over the similarity matrix (open_clip `ClipLoss`) with
//! per-direction weights, and SigLIP's pairwise sigmoid loss with a learnable bias.
//!
//! Both take L2-normalised `(N, E)` embeddings where row `i` of `image` and row `i` of `text`
//! are a pair, and the learnable log-temperature `logit_scale` as a scalar tensor: the logits
//! are `exp(logit_scale) * image @ text^T`.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::cross_entropy;

use crate::{MultimodalError, Result};

/// Which contrastive objective.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Symmetric softmax cross-entropy (CLIP).
    #[default]
    Clip,
    /// Pairwise sigmoid loss with a learnable bias (SigLIP, Zhai et al. 2023).
    Siglip,
}

/// Settings of the loss and of its learnable temperature (defaults: CLIP's).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// `clip` or `siglip`.
    pub kind: LossKind,
    /// Initial `logit_scale` (log of the inverse temperature): CLIP ln(1/0.07) = 2.659;
    /// the SigLIP paper uses ln 10 = 2.303.
    pub logit_scale_init: f64,
    /// `logit_scale` is clamped to at most this after every optimizer step (CLIP: ln 100).
    pub logit_scale_max: f64,
    /// Learn `logit_scale` (false: keep it fixed at its initial value).
    pub learn_logit_scale: bool,
    /// Initial bias of the SigLIP logits (the paper: -10). Unused by `clip`.
    pub siglip_bias_init: f64,
    /// Weight of the image-to-text cross-entropy (`clip`; open_clip: 0.5).
    pub image_to_text_weight: f64,
    /// Weight of the text-to-image cross-entropy (`clip`; open_clip: 0.5). Lower the
    /// direction whose queries are noisier.
    pub text_to_image_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::Clip,
            logit_scale_init: (1.0f64 / 0.07).ln(),
            logit_scale_max: 100f64.ln(),
            learn_logit_scale: true,
            siglip_bias_init: -10.0,
            image_to_text_weight: 0.5,
            text_to_image_weight: 0.5,
        }
    }
}

impl LossConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, v: f64, why: &str| {
            Err(MultimodalError::Config(format!(
                "model.loss.{k} = {v}: {why}"
            )))
        };
        if !self.logit_scale_init.is_finite() {
            return bad("logit_scale_init", self.logit_scale_init, "must be finite");
        }
        if !(self.logit_scale_max.is_finite() && self.logit_scale_max >= self.logit_scale_init) {
            return bad(
                "logit_scale_max",
                self.logit_scale_max,
                "must be finite and at least logit_scale_init",
            );
        }
        if !self.siglip_bias_init.is_finite() {
            return bad("siglip_bias_init", self.siglip_bias_init, "must be finite");
        }
        for (k, w) in [
            ("image_to_text_weight", self.image_to_text_weight),
            ("text_to_image_weight", self.text_to_image_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return bad(k, w, "must be a non-negative number");
            }
        }
        if self.kind == LossKind::Clip
            && self.image_to_text_weight + self.text_to_image_weight <= 0.0
        {
            return Err(MultimodalError::Config(
                "model.loss.image_to_text_weight + text_to_image_weight must be positive".into(),
            ));
        }
        Ok(())
    }
}

fn check_pair(image: &Tensor, text: &Tensor) -> Result<usize> {
    let (n, e) = image.dims2()?;
    let (m, f) = text.dims2()?;
    if (n, e) != (m, f) {
        return Err(MultimodalError::InvalidInput(format!(
            "image embeddings are {n}x{e} but text embeddings {m}x{f}: pairs must match"
        )));
    }
    if n == 0 {
        return Err(MultimodalError::InvalidInput(
            "a contrastive loss needs at least one pair".into(),
        ));
    }
    Ok(n)
}

/// `exp(logit_scale) * image @ text^T`, `(N, N)`: row `i` scores image `i` against every text.
pub fn similarity_logits(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    check_pair(image, text)?;
    let sim = image.matmul(&text.t()?)?;
    Ok(sim.broadcast_mul(&logit_scale.exp()?)?)
}

/// CLIP's loss: `w_i2t * CE(logits, diag) + w_t2i * CE(logits^T, diag)`, a mean over pairs.
pub fn clip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    image_to_text_weight: f64,
    text_to_image_weight: f64,
) -> Result<Tensor> {
    let n = check_pair(image, text)?;
    let logits = similarity_logits(image, text, logit_scale)?;
    let targets = Tensor::arange(0u32, n as u32, image.device())?;
    let i2t = cross_entropy(&logits, &targets)?;
    let t2i = cross_entropy(&logits.t()?.contiguous()?, &targets)?;
    Ok(((i2t * image_to_text_weight)? + (t2i * text_to_image_weight)?)?)
}

/// `log(sigmoid(x))`, computed as `min(x, 0) - log(1 + exp(-|x|))` so it never overflows.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    let soft = (neg_abs.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0.0)? - soft)?)
}

/// SigLIP's loss: `-(1/N) sum_ij log sigmoid(z_ij (exp(logit_scale) x_i.y_j + bias))` with
/// `z_ii = 1` and `z_ij = -1` otherwise (a mean over the N images, as the paper).
pub fn siglip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let n = check_pair(image, text)?;
    let logits = similarity_logits(image, text, logit_scale)?.broadcast_add(bias)?;
    let mut z = vec![-1f32; n * n];
    for i in 0..n {
        z[i * n + i] = 1.0;
    }
    let z = Tensor::from_vec(z, (n, n), image.device())?.to_dtype(logits.dtype())?;
    let ls = log_sigmoid(&(logits * z)?)?;
    Ok((ls.sum_all()?.neg()? / n as f64)?)
}

/// Top-1 alignment accuracy within the batch: the fraction of images whose most similar text
/// is their own caption (`.0`), and of texts whose most similar image is their own (`.1`).
pub fn alignment_accuracy(image: &Tensor, text: &Tensor) -> Result<(f64, f64)> {
    let n = check_pair(image, text)?;
    let sim = image.matmul(&text.t()?)?;
    let i2t = sim
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let t2i = sim.argmax(0)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let hits = |v: &[u32]| {
        v.iter()
            .enumerate()
            .filter(|(i, &j)| *i == j as usize)
            .count()
    };
    Ok((hits(&i2t) as f64 / n as f64, hits(&t2i) as f64 / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: Vec<f64>, r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn clip_loss_matches_hand_computation() {
        // Two orthonormal pairs, one swapped half-way: sims [[1, 0], [0.6, 0.8]].
        let img = t(vec![1.0, 0.0, 0.6, 0.8], 2, 2);
        let txt = t(vec![1.0, 0.0, 0.0, 1.0], 2, 2);
        let s = 2.0f64;
        let scale = Tensor::new(s.ln(), &Device::Cpu).unwrap();
        let loss = clip_loss(&img, &txt, &scale, 0.5, 0.5)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        // logits = 2 * [[1, 0], [0.6, 0.8]]
        let (l00, l01, l10, l11) = (2.0, 0.0, 1.2, 1.6);
        let i2t = ((lse(l00, l01) - l00) + (lse(l10, l11) - l11)) / 2.0;
        let t2i = ((lse(l00, l10) - l00) + (lse(l01, l11) - l11)) / 2.0;
        let want = 0.5 * i2t + 0.5 * t2i;
        assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
        // Direction weights.
        let only_i2t = clip_loss(&img, &txt, &scale, 1.0, 0.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((only_i2t - i2t).abs() < 1e-12);
        let (a, b) = alignment_accuracy(&img, &txt).unwrap();
        assert_eq!((a, b), (1.0, 1.0));
    }

    #[test]
    fn siglip_loss_matches_hand_computation() {
        let img = t(vec![1.0, 0.0, 0.6, 0.8], 2, 2);
        let txt = t(vec![1.0, 0.0, 0.0, 1.0], 2, 2);
        let scale = Tensor::new(10f64.ln(), &Device::Cpu).unwrap();
        let bias = Tensor::new(-1.0f64, &Device::Cpu).unwrap();
        let got = siglip_loss(&img, &txt, &scale, &bias)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        let sims = [[1.0, 0.0], [0.6, 0.8]];
        let mut want = 0.0;
        for (i, row) in sims.iter().enumerate() {
            for (j, s) in row.iter().enumerate() {
                let z = if i == j { 1.0 } else { -1.0 };
                want -= ls(z * (10.0 * s - 1.0));
            }
        }
        want /= 2.0;
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        // Stable for large logits.
        let big = Tensor::new(&[-1000f64, 1000.0], &Device::Cpu).unwrap();
        let v = log_sigmoid(&big).unwrap().to_vec1::<f64>().unwrap();
        assert!((v[0] + 1000.0).abs() < 1e-9 && v[1].abs() < 1e-9, "{v:?}");
    }

    /// Central finite differences of the loss w.r.t. logit_scale, bias and every embedding
    /// entry, in f64, against candle's gradients.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let mut rng = ssl_core::SslRng::new(3);
        let (n, e) = (4, 3);
        let img0: Vec<f64> = rng
            .normal_vec(n * e, 0.0, 1.0)
            .iter()
            .map(|&x| x as f64)
            .collect();
        let txt0: Vec<f64> = rng
            .normal_vec(n * e, 0.0, 1.0)
            .iter()
            .map(|&x| x as f64)
            .collect();
        for kind in [LossKind::Clip, LossKind::Siglip] {
            let f = |img: &Tensor, txt: &Tensor, s: &Tensor, b: &Tensor| -> Tensor {
                match kind {
                    LossKind::Clip => clip_loss(img, txt, s, 0.7, 0.3).unwrap(),
                    LossKind::Siglip => siglip_loss(img, txt, s, b).unwrap(),
                }
            };
            let img = Var::from_vec(img0.clone(), (n, e), &dev).unwrap();
            let txt = Var::from_vec(txt0.clone(), (n, e), &dev).unwrap();
            let s = Var::from_tensor(&Tensor::new(0.8f64, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::new(-0.5f64, &dev).unwrap()).unwrap();
            let loss = f(
                img.as_tensor(),
                txt.as_tensor(),
                s.as_tensor(),
                b.as_tensor(),
            );
            let grads = loss.backward().unwrap();
            let h = 1e-6;
            let eval = |iv: &[f64], tv: &[f64], sv: f64, bv: f64| -> f64 {
                f(
                    &t(iv.to_vec(), n, e),
                    &t(tv.to_vec(), n, e),
                    &Tensor::new(sv, &dev).unwrap(),
                    &Tensor::new(bv, &dev).unwrap(),
                )
                .to_scalar::<f64>()
                .unwrap()
            };
            let gs = grads
                .get(s.as_tensor())
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let fd =
                (eval(&img0, &txt0, 0.8 + h, -0.5) - eval(&img0, &txt0, 0.8 - h, -0.5)) / (2.0 * h);
            assert!((gs - fd).abs() < 1e-6, "{kind:?} logit_scale {gs} vs {fd}");
            if kind == LossKind::Siglip {
                let gb = grads
                    .get(b.as_tensor())
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let fd = (eval(&img0, &txt0, 0.8, -0.5 + h) - eval(&img0, &txt0, 0.8, -0.5 - h))
                    / (2.0 * h);
                assert!((gb - fd).abs() < 1e-6, "bias {gb} vs {fd}");
            }
            let gi = grads
                .get(img.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let gt = grads
                .get(txt.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for k in 0..n * e {
                let (mut p, mut m) = (img0.clone(), img0.clone());
                p[k] += h;
                m[k] -= h;
                let fd = (eval(&p, &txt0, 0.8, -0.5) - eval(&m, &txt0, 0.8, -0.5)) / (2.0 * h);
                assert!(
                    (gi[k] - fd).abs() < 1e-6,
                    "{kind:?} image[{k}] {} vs {fd}",
                    gi[k]
                );
                let (mut p, mut m) = (txt0.clone(), txt0.clone());
                p[k] += h;
                m[k] -= h;
                let fd = (eval(&img0, &p, 0.8, -0.5) - eval(&img0, &m, 0.8, -0.5)) / (2.0 * h);
                assert!(
                    (gt[k] - fd).abs() < 1e-6,
                    "{kind:?} text[{k}] {} vs {fd}",
                    gt[k]
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_pairs() {
        let a = t(vec![1.0; 6], 3, 2);
        let b = t(vec![1.0; 4], 2, 2);
        let s = Tensor::new(0.0f64, &Device::Cpu).unwrap();
        assert!(clip_loss(&a, &b, &s, 0.5, 0.5).is_err());
        let mut c = LossConfig::default();
        assert!(c.validate().is_ok());
        c.image_to_text_weight = -1.0;
        assert!(c.validate().is_err());
    }
}

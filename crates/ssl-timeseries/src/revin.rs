//! Reversible instance normalisation (RevIN, Kim et al. 2022): each series window is
//! normalised by its own mean and standard deviation over observed steps before the model, and
//! forecasts are mapped back with the same statistics, so level and scale shifts between
//! windows do not have to be learnt.

use candle_core::{DType, Tensor, D};
use ssl_core::{Init, ParamBuilder, Result};

/// Per-(series, channel) statistics of one batch, (B, 1, C) each.
#[derive(Debug, Clone)]
pub struct RevinStats {
    /// Mean over observed steps.
    pub mean: Tensor,
    /// Standard deviation over observed steps (with `eps` inside the square root).
    pub std: Tensor,
}

/// RevIN with an optional learnable per-channel affine map (`revin.affine_weight`,
/// `revin.affine_bias`, as the reference implementation names them).
pub struct Revin {
    eps: f64,
    affine: Option<(Tensor, Tensor)>,
}

impl Revin {
    /// RevIN for `channels` channels; `affine` adds the learnable weight and bias under `pb`.
    pub fn new(channels: usize, affine: bool, pb: &ParamBuilder) -> Result<Self> {
        let affine = if affine {
            let pb = pb.pp("revin");
            Some((
                pb.get("affine_weight", channels, Init::Ones)?,
                pb.get("affine_bias", channels, Init::Zeros)?,
            ))
        } else {
            None
        };
        Ok(Revin { eps: 1e-5, affine })
    }

    /// Normalises `x` (B, T, C) with statistics over the steps where `valid` (B, T) is 1.
    /// Unobserved steps stay 0 in the output.
    pub fn normalize(&self, x: &Tensor, valid: &Tensor) -> Result<(Tensor, RevinStats)> {
        let m = valid.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
        let n = m.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
        let mean = x.broadcast_mul(&m)?.sum_keepdim(1)?.broadcast_div(&n)?;
        let centred = x.broadcast_sub(&mean)?.broadcast_mul(&m)?;
        let var = centred.sqr()?.sum_keepdim(1)?.broadcast_div(&n)?;
        let std = (var + self.eps)?.sqrt()?;
        let mut out = centred.broadcast_div(&std)?;
        if let Some((w, b)) = &self.affine {
            out = out.broadcast_mul(w)?.broadcast_add(b)?.broadcast_mul(&m)?;
        }
        Ok((out, RevinStats { mean, std }))
    }

    /// Maps normalised values `y` (B, H, C) back to the original scale.
    pub fn denormalize(&self, y: &Tensor, stats: &RevinStats) -> Result<Tensor> {
        let mut y = y.clone();
        if let Some((w, b)) = &self.affine {
            let w = w.abs()?.clamp(self.eps * self.eps, f64::INFINITY)?;
            y = y.broadcast_sub(b)?.broadcast_div(&w)?;
        }
        Ok(y.broadcast_mul(&stats.std)?.broadcast_add(&stats.mean)?)
    }

    /// Applies the same normalisation as [`Revin::normalize`] to other values of the same
    /// series (forecast targets), with the given statistics.
    pub fn apply(&self, y: &Tensor, stats: &RevinStats) -> Result<Tensor> {
        let mut out = y.broadcast_sub(&stats.mean)?.broadcast_div(&stats.std)?;
        if let Some((w, b)) = &self.affine {
            out = out.broadcast_mul(w)?.broadcast_add(b)?;
        }
        Ok(out.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ssl_core::ParamStore;

    #[test]
    fn normalise_then_denormalise_is_the_identity_and_ignores_gaps() {
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev);
        let r = Revin::new(2, true, &store.builder(0)).unwrap();
        let x = Tensor::new(&[[[1f32, 10.], [2., 20.], [0., 0.], [3., 30.]]], &dev).unwrap();
        let valid = Tensor::new(&[[1f32, 1., 0., 1.]], &dev).unwrap();
        let (n, stats) = r.normalize(&x, &valid).unwrap();
        let mean = stats.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((mean[0] - 2.0).abs() < 1e-6 && (mean[1] - 20.0).abs() < 1e-5);
        let nv = n.to_vec3::<f32>().unwrap();
        assert_eq!(nv[0][2], [0.0, 0.0], "gap stays 0");
        assert!((nv[0][0][0] + 1.2247).abs() < 1e-3);
        let back = r.denormalize(&n, &stats).unwrap().to_vec3::<f32>().unwrap();
        let orig = x.to_vec3::<f32>().unwrap();
        for t in [0, 1, 3] {
            for (c, b) in back[0][t].iter().enumerate() {
                assert!((b - orig[0][t][c]).abs() < 1e-4, "{t} {c}");
            }
        }
        let again = r.apply(&x, &stats).unwrap().to_vec3::<f32>().unwrap();
        assert!((again[0][3][1] - nv[0][3][1]).abs() < 1e-5);
    }
}

//! Gradient clipping by global L2 norm.

use candle_core::{DType, Tensor};

use crate::Result;

/// The global L2 norm of all gradients, computed in f64.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`, factor `max_norm / (norm + 1e-6)`); returns the norm before clipping.
/// `max_norm <= 0` disables clipping but still returns the norm.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * factor)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clips_to_max_norm_and_reports_pre_clip_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3f32, 0.], &dev).unwrap()),
            None,
            Some(Tensor::new(&[[0f32, 4.]], &dev).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-5);
        assert!(
            (global_norm(&g).unwrap() - n2).abs() < 1e-9,
            "no clip below the limit"
        );
    }
}

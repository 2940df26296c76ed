//! Gradient clipping by global L2 norm.

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::Result;

/// The global L2 norm of all gradients, computed in f64 (f32 CPU gradients in one parallel
/// pass over their memory, others through candle).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter().flatten() {
        sum += match cpu_f32(g) {
            Some(sq) => sq?,
            None => g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(sum.sqrt())
}

/// The sum of squares of a contiguous f32 CPU tensor, read in place; `None` for any other.
fn cpu_f32(g: &Tensor) -> Option<Result<f64>> {
    if g.dtype() != DType::F32 || !g.device().is_cpu() {
        return None;
    }
    let (storage, layout) = g.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(all)), Some((a, b))) => {
            Some(Ok(ssl_kernels::sum_squares(&all[a..b])))
        }
        _ => None,
    }
}

/// Clipping as a factor: for gradients `scale * grads`, returns their global norm and the
/// factor to multiply `grads` by so that the result is `scale * grads` clipped to norm
/// `max_norm` (PyTorch's `clip_grad_norm_`: clipped by `max_norm / (norm + 1e-6)` when that
/// is below 1). `max_norm <= 0` disables clipping. Pass the factor to
/// [`crate::optim::AdamW::step_scaled`] to apply division and clipping in the update's pass,
/// with no pass of their own over the gradients.
pub fn clip_scale(grads: &[Option<Tensor>], scale: f64, max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)? * scale.abs();
    let mut factor = scale;
    if max_norm > 0.0 && norm.is_finite() {
        let clip = max_norm / (norm + 1e-6);
        if clip < 1.0 {
            factor *= clip;
        }
    }
    Ok((norm, factor))
}

/// Scales `grads` so their global norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`, factor `max_norm / (norm + 1e-6)`); returns the norm before clipping.
/// `max_norm <= 0` disables clipping but still returns the norm.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let (norm, factor) = clip_scale(grads, 1.0, max_norm)?;
    if factor != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
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

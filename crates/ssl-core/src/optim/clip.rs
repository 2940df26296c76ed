//! Gradient clipping by global L2 norm.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::nn::ops::cpu_f32_view;

use crate::Result;

/// The global L2 norm of all gradients, computed in f64 (f32 CPU gradients read in place,
/// those tensors in parallel; others through candle, in order). Each tensor's sum of squares
/// depends on the tensor alone and the sums are added in order, so the norm does not depend
/// on the number of threads.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let host = grads
        .par_iter()
        .map(|g| g.as_ref().and_then(cpu_f32).transpose())
        .collect::<Result<Vec<Option<f64>>>>()?;
    let mut sum = 0f64;
    for (g, h) in grads.iter().zip(host) {
        let Some(g) = g else { continue };
        sum += match h {
            Some(sq) => sq,
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
    cpu_f32_view(&storage, layout).map(|v| Ok(ssl_kernels::sum_squares(v)))
}

/// Clipping as a factor: for gradients `scale * grads`, returns their global norm and the
/// factor to multiply `grads` by so that the result is `scale * grads` clipped to norm
/// `max_norm` (PyTorch's `clip_grad_norm_`: clipped by `max_norm / (norm + 1e-6)` when that
/// is below 1). `max_norm <= 0` disables clipping. Pass the factor to
/// [`crate::optim::AdamW::step_scaled`] to apply division and clipping in the update's pass,
/// with no pass of their own over the gradients.
///
/// The norm is infinite when the f32 update could not apply the factor: a factor or scaled
/// gradients beyond f32's range (a total loss weight of 0, say), so the trainer's guard skips
/// such a step as it skips any non-finite one.
pub fn clip_scale(grads: &[Option<Tensor>], scale: f64, max_norm: f64) -> Result<(f64, f64)> {
    let mut norm = global_norm(grads)? * scale.abs();
    let mut factor = scale;
    if max_norm > 0.0 && norm.is_finite() {
        let clip = max_norm / (norm + 1e-6);
        if clip < 1.0 {
            factor *= clip;
        }
    }
    if !(factor as f32).is_finite() || norm > f64::from(f32::MAX) {
        norm = f64::INFINITY;
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

    /// The norm over many tensors (sizes across the parallel chunking, an f64 one on
    /// candle's path) is bit for bit the same on one thread and on three.
    #[test]
    fn the_norm_does_not_depend_on_the_thread_count() {
        let mut rng = crate::SslRng::new(11);
        let mut grads: Vec<Option<Tensor>> = [3usize, 1000, 70_000, 200_000, 17, 65_536]
            .iter()
            .map(|&n| Some(Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), n, &Device::Cpu).unwrap()))
            .collect();
        grads.insert(2, None);
        grads.push(Some(
            Tensor::from_vec(rng.normal_vec(50, 0.0, 1.0), 50, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        ));
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| global_norm(&grads).unwrap())
        };
        let one = on(1);
        assert!(one > 0.0);
        assert_eq!(one.to_bits(), on(3).to_bits());
    }

    /// `clip_scale(g, s, max)` is `clip_grad_norm` of `g * s`: the same norm, and its factor
    /// times `g` gives the same clipped gradients; a factor beyond f32 reports an infinite
    /// norm (the guard's skip), as do gradients that would overflow once scaled.
    #[test]
    fn clip_scale_is_clipping_the_scaled_gradients() {
        let dev = Device::Cpu;
        let g = vec![
            Some(Tensor::new(&[3f32, 0.], &dev).unwrap()),
            Some(Tensor::new(&[[0f32, 4.]], &dev).unwrap().t().unwrap()),
        ];
        for (scale, max) in [(0.5, 1.0), (0.5, 10.0), (2.0, 0.0)] {
            let (norm, factor) = clip_scale(&g, scale, max).unwrap();
            let mut scaled: Vec<Option<Tensor>> = g
                .iter()
                .map(|t| t.as_ref().map(|t| (t * scale).unwrap()))
                .collect();
            let want = clip_grad_norm(&mut scaled, max).unwrap();
            assert!((norm - want).abs() < 1e-9, "{norm} vs {want}");
            for (a, b) in g.iter().zip(&scaled) {
                let a = (a.as_ref().unwrap() * factor).unwrap();
                let d = (a - b.as_ref().unwrap()).unwrap().abs().unwrap();
                let d = d.flatten_all().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
            }
        }
        let zeros = vec![Some(Tensor::zeros(3, DType::F32, &dev).unwrap())];
        let (norm, _) = clip_scale(&zeros, 1.0 / f64::MIN_POSITIVE, 1.0).unwrap();
        assert!(
            norm.is_infinite(),
            "a factor beyond f32 must read as non-finite"
        );
        let (norm, _) = clip_scale(&g, 1e38, 0.0).unwrap();
        assert!(
            norm.is_infinite(),
            "gradients beyond f32 once scaled: {norm}"
        );
    }

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

//! Losses shared by pretext tasks.

use candle_core::{DType, Tensor};

use crate::nn::ops::{cross_entropy, l2_normalize};
use crate::{gather_rows, Collective, CoreError, Result};

/// Mean squared error over the elements where `mask` is 1.
///
/// `pred` and `target` are (B, T, F); `mask` is (B, T) with 1 where the timestep counts.
/// Returns the loss and the number of counted elements (timesteps x F).
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<(Tensor, f64)> {
    let f = pred.dim(2)?;
    let m = mask.to_dtype(pred.dtype())?.unsqueeze(2)?;
    let count = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? * f as f64;
    if count <= 0.0 {
        return Err(CoreError::InvalidInput(
            "masked_mse: the mask selects no element".into(),
        ));
    }
    let se = (pred - target)?.sqr()?.broadcast_mul(&m)?.sum_all()?;
    Ok(((se / count)?, count))
}

/// NT-Xent / InfoNCE (SimCLR) over two views `a`, `b` of the same B examples.
///
/// Rows are L2-normalised; each of the 2B embeddings must pick its partner among the other
/// 2B - 1 by cosine similarity / `temperature`. Returns the mean loss and the fraction of
/// rows whose nearest other row is their partner (alignment accuracy).
pub fn nt_xent(a: &Tensor, b: &Tensor, temperature: f64) -> Result<(Tensor, f64)> {
    let (n, _) = a.dims2()?;
    if n < 2 {
        return Err(CoreError::InvalidInput(format!(
            "NT-Xent needs at least 2 examples per batch, got {n}"
        )));
    }
    if temperature <= 0.0 {
        return Err(CoreError::Config(format!(
            "contrastive temperature must be positive, got {temperature}"
        )));
    }
    let z = l2_normalize(&Tensor::cat(&[a, b], 0)?)?;
    let sim = (z.matmul(&z.t()?)? / temperature)?;
    let eye: Vec<f32> = (0..2 * n)
        .flat_map(|i| (0..2 * n).map(move |j| if i == j { -1e9 } else { 0.0 }))
        .collect();
    let eye = Tensor::from_vec(eye, (2 * n, 2 * n), a.device())?.to_dtype(sim.dtype())?;
    let sim = (sim + eye)?;
    let targets: Vec<u32> = (0..2 * n).map(|i| ((i + n) % (2 * n)) as u32).collect();
    let targets_t = Tensor::from_vec(targets.clone(), 2 * n, a.device())?;
    let loss = cross_entropy(&sim, &targets_t)?;
    let argmax = sim.argmax(1)?.to_vec1::<u32>()?;
    let acc = argmax.iter().zip(&targets).filter(|(p, t)| p == t).count() as f64 / (2 * n) as f64;
    Ok((loss, acc))
}

/// [`nt_xent`] of a data-parallel run: every rank's views are gathered (this rank's rows keep
/// their graph), so each embedding's negatives are the other views of all ranks, and every
/// rank gets the loss and accuracy of the combined batch. With `None` or one rank it is
/// [`nt_xent`]. Back-propagate it with [`backward_across`].
pub fn nt_xent_across(
    a: &Tensor,
    b: &Tensor,
    temperature: f64,
    ranks: Option<&dyn Collective>,
) -> Result<(Tensor, f64)> {
    match ranks.filter(|r| r.world_size() > 1) {
        None => nt_xent(a, b, temperature),
        Some(r) => nt_xent(&gather_rows(r, a)?, &gather_rows(r, b)?, temperature),
    }
}

/// The backward pass of a task whose loss is already the combined batch's on every rank (a
/// gathered contrastive loss): the gradients of `loss x weight x world`. The trainer sums them
/// over ranks and divides by the summed weight, which gives the combined batch's gradient
/// (each rank contributes the part that flows through its own rows).
pub fn backward_across(
    out: crate::TaskOutput,
    world: usize,
) -> Result<(crate::TaskOutput, candle_core::backprop::GradStore)> {
    let grads = (&out.loss * (out.weight * world.max(1) as f64))?.backward()?;
    Ok((out, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nt_xent_matches_reference_value() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32, 0.1], [0.1, 1.]], &dev).unwrap();
        let (loss, acc) = nt_xent(&a, &b, 0.5).unwrap();
        // Reference computed by hand (numpy) for these vectors.
        let cos = 1.0 / (1.01f64).sqrt();
        let cos2 = 0.1 / (1.01f64).sqrt();
        let cos3: f64 = 0.2 / 1.01;
        let row_a =
            -(cos / 0.5) + ((0.0f64 / 0.5).exp() + (cos / 0.5).exp() + (cos2 / 0.5).exp()).ln();
        let row_b =
            -(cos / 0.5) + ((cos / 0.5).exp() + (cos2 / 0.5).exp() + (cos3 / 0.5).exp()).ln();
        let expect = (row_a + row_b) / 2.0;
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - expect).abs() < 1e-5, "{got} vs {expect}");
        assert_eq!(acc, 1.0);
    }

    #[test]
    fn masked_mse_counts_only_masked() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[[[1f32, 1.], [5., 5.]]], &dev).unwrap();
        let t = Tensor::zeros((1, 2, 2), DType::F32, &dev).unwrap();
        let m = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
        let (l, n) = masked_mse(&p, &t, &m).unwrap();
        assert_eq!(n, 2.0);
        assert_eq!(l.to_scalar::<f32>().unwrap(), 1.0);
        assert!(masked_mse(&p, &t, &m.zeros_like().unwrap()).is_err());
    }
}

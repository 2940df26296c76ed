//! Cross-entropy of (N, C) logits against class indices as one CPU op: one pass forward
//! (row maximum, log-sum-exp, picked logit), one pass backward (`(softmax - onehot) / N`),
//! instead of the dozen allocating passes of the composite log-softmax.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::simd;

/// The op; the mean over rows is its output.
pub(crate) struct CrossEntropyOp;

fn logits_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused cross-entropy: logits must be f32");
    };
    let (n, c) = l.shape().dims2()?;
    if c == 0 {
        candle_core::bail!("cross-entropy: logits have no classes (shape ({n}, 0))");
    }
    match l.contiguous_offsets() {
        Some((a, b)) => Ok((&v[a..b], n, c)),
        None => candle_core::bail!("fused cross-entropy: logits must be contiguous"),
    }
}

fn targets_of<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    n: usize,
    c: usize,
) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("fused cross-entropy: targets must be u32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy: targets must be contiguous");
    };
    let t = &v[a..b];
    if t.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows of logits", t.len());
    }
    if let Some((row, bad)) = t.iter().enumerate().find(|(_, &x)| x as usize >= c) {
        candle_core::bail!("cross-entropy: target {bad} in row {row} is not below the {c} classes");
    }
    Ok(t)
}

/// Rows per parallel task: enough tasks to balance the threads, each long enough to pay for
/// its dispatch.
fn rows_per_task(n: usize) -> usize {
    (n / (4 * rayon::current_num_threads().max(1))).max(1)
}

/// Log-sum-exp of every row of `x` (n rows of width c), in parallel over row blocks.
fn log_sum_exps(x: &[f32], n: usize, c: usize) -> Vec<f32> {
    let mut lse = vec![0f32; n];
    let per = rows_per_task(n);
    lse.par_chunks_mut(per)
        .zip(x.par_chunks(per * c.max(1)))
        .for_each(|(o, rows)| simd::lse_rows(rows, c, o));
    lse
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n, c) = logits_of(s1, l1)?;
        let t = targets_of(s2, l2, n, c)?;
        let lse = log_sum_exps(x, n, c);
        let total: f64 = lse
            .iter()
            .zip(t)
            .enumerate()
            .map(|(i, (&l, &k))| f64::from(l - x[i * c + k as usize]))
            .sum();
        let mean = if n == 0 {
            f32::NAN
        } else {
            (total / n as f64) as f32
        };
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let (ls, ll) = logits.storage_and_layout();
        let (ts, tl) = targets.storage_and_layout();
        let (Storage::Cpu(lc), Storage::Cpu(tc)) = (&*ls, &*ts) else {
            candle_core::bail!("fused cross-entropy: inputs left the CPU");
        };
        let (x, n, c) = logits_of(lc, ll)?;
        let t = targets_of(tc, tl, n, c)?;
        let scale = g / n.max(1) as f32;
        let lse = log_sum_exps(x, n, c);
        let mut dx = vec![0f32; n * c];
        let per = rows_per_task(n);
        dx.par_chunks_mut(per * c.max(1))
            .zip(x.par_chunks(per * c.max(1)))
            .zip(lse.par_chunks(per))
            .for_each(|((d, rows), l)| simd::scaled_softmax_rows(rows, c, l, scale, d));
        for (i, &k) in t.iter().enumerate() {
            dx[i * c + k as usize] -= scale;
        }
        drop((ls, ts));
        Ok((
            Some(Tensor::from_vec(dx, logits.shape(), logits.device())?),
            None,
        ))
    }
}

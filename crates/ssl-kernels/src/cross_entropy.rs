//! Cross-entropy of (N, C) logits against class indices as one CPU op: one pass forward
//! (row maximum, log-sum-exp, picked logit), one pass backward (`(softmax - onehot) / N`),
//! instead of the dozen allocating passes of the composite log-softmax.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{product, MatRef, Op};
use super::simd;
use super::{block_rows, GradCell};

/// The op; the mean over rows is its output.
pub struct CrossEntropyOp;

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
    check_targets(t, n, c)?;
    Ok(t)
}

/// One target per row of `n` rows, each below the `c` classes, or an error naming the first
/// bad one.
fn check_targets(t: &[u32], n: usize, c: usize) -> candle_core::Result<()> {
    if t.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows of logits", t.len());
    }
    if let Some((row, bad)) = t.iter().enumerate().find(|(_, &x)| x as usize >= c) {
        candle_core::bail!("cross-entropy: target {bad} in row {row} is not below the {c} classes");
    }
    Ok(())
}

/// The mean over rows of `lse[i] - picked[i]` (the target's logit), summed in f64; NaN
/// without rows.
fn mean_loss(lse: &[f32], picked: impl Iterator<Item = f32>) -> f32 {
    let n = lse.len();
    if n == 0 {
        return f32::NAN;
    }
    let total: f64 = lse.iter().zip(picked).map(|(&l, p)| f64::from(l - p)).sum();
    (total / n as f64) as f32
}

/// Log-sum-exp of every row of `x` (n rows of width c), in parallel over row blocks.
fn log_sum_exps(x: &[f32], n: usize, c: usize) -> Vec<f32> {
    let mut lse = vec![0f32; n];
    let per = block_rows(n);
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
        let picked = t.iter().enumerate().map(|(i, &k)| x[i * c + k as usize]);
        let mean = mean_loss(&lse, picked);
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
        // The logits are candle's (borrowed): their copy becomes the gradient.
        let mut dx = x.to_vec();
        let per = block_rows(n);
        dx.par_chunks_mut(per * c.max(1))
            .zip(lse.par_chunks(per))
            .for_each(|(rows, l)| simd::scaled_softmax_rows(rows, c, l, scale));
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

/// What [`LinearCrossEntropyOp`]'s backward needs (and takes): the softmax's numerators
/// `exp(logit - row max)` and each row's `1 / sum` of them.
struct LinearSaved {
    exps: Vec<f32>,
    inv_sum: Vec<f32>,
}

/// A linear layer followed by the cross-entropy, as one op with inputs `x` (n, k), `w`
/// (c, k) and `b` (c): the logits `x W^T + b` (n, c) exist only inside the op, so no candle
/// node of that size is ever built (measured on BERT-mini's MLM head, 8000 words: the bias's
/// broadcast backward alone took 8 ms a step, the logits' gradient bookkeeping a few more).
/// Forward: one product, then one pass per row (bias, maximum and arg-max, the target's
/// logit, the exponentials written over the logits); backward: one scaling pass for
/// `(softmax - onehot) / n` over the saved exponentials (so one backward per forward; no
/// exponential taken twice), the two products and the bias's column sums.
pub struct LinearCrossEntropyOp {
    targets: Vec<u32>,
    bf16: bool,
    saved: Mutex<Option<LinearSaved>>,
    argmax: Arc<Mutex<Vec<u32>>>,
    weight_cell: Option<GradCell>,
}

impl LinearCrossEntropyOp {
    /// The op for `targets` (one class per row), products in bf16 when `bf16` (the caller
    /// checked the CPU) and the size rule of [`crate::linear_takes_bf16`] allows.
    pub fn new(targets: Vec<u32>, bf16: bool) -> Self {
        LinearCrossEntropyOp {
            targets,
            bf16,
            saved: Mutex::new(None),
            argmax: Arc::default(),
            weight_cell: None,
        }
    }

    /// The same op, its backward adding the weight's gradient to `cell` (in place, or moved
    /// in when the cell is empty) instead of returning it to candle: for a weight that other
    /// ops also read, such as BERT's word table tied to the input embedding
    /// ([`crate::EmbeddingSumOp::grads`]).
    pub fn weight_grad_to(mut self, cell: GradCell) -> Self {
        self.weight_cell = Some(cell);
        self
    }

    /// Where the forward pass leaves each row's arg-max class (the first on ties).
    pub fn argmax_cell(&self) -> Arc<Mutex<Vec<u32>>> {
        self.argmax.clone()
    }
}

/// `x` (n, k), `w` (c, k) and `b` (c) as matrix views, their shapes checked.
fn linear_operands<'a>(
    (xs, xl): (&'a CpuStorage, &Layout),
    (ws, wl): (&'a CpuStorage, &Layout),
    (bs, bl): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(MatRef<'a>, MatRef<'a>, &'a [f32])> {
    const OP: &str = "fused linear cross-entropy";
    let (n, k) = xl.shape().dims2()?;
    let (c, k2) = wl.shape().dims2()?;
    let b = super::f32_slice(bs, bl, OP, "the bias")?;
    if k != k2 || b.len() != c {
        candle_core::bail!(
            "{OP}: input ({n}, {k}), weight ({c}, {k2}) and bias ({}) do not fit",
            b.len()
        );
    }
    if c == 0 {
        candle_core::bail!("cross-entropy: logits have no classes (shape ({n}, 0))");
    }
    Ok((
        MatRef::dense(super::f32_slice(xs, xl, OP, "the input")?, n, k),
        MatRef::dense(super::f32_slice(ws, wl, OP, "the weight")?, c, k),
        b,
    ))
}

impl CustomOp3 for LinearCrossEntropyOp {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = linear_operands((s1, l1), (s2, l2), (s3, l3))?;
        let (n, c) = (x.rows, w.rows);
        check_targets(&self.targets, n, c)?;
        let mut logits = product(x, Op::N, w, Op::T, self.bf16);
        let (mut picked, mut lse, mut inv_sum) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut argmax = vec![0u32; n];
        let per = block_rows(n);
        logits
            .par_chunks_mut(per * c)
            .zip(self.targets.par_chunks(per))
            .zip(picked.par_chunks_mut(per))
            .zip(lse.par_chunks_mut(per).zip(inv_sum.par_chunks_mut(per)))
            .zip(argmax.par_chunks_mut(per))
            .for_each(|((((rows, t), p), (l, inv)), a)| {
                simd::bias_exp_argmax_rows(rows, b, t, p, l, inv, a)
            });
        let mean = mean_loss(&lse, picked.iter().copied());
        *self.argmax.lock().unwrap_or_else(PoisonError::into_inner) = argmax;
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(LinearSaved {
            exps: logits,
            inv_sum,
        });
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        // The saved exponentials' buffer becomes the logits' gradient: one backward per
        // forward.
        let taken = self
            .saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(LinearSaved { exps, inv_sum }) = taken else {
            candle_core::bail!(
                "fused linear cross-entropy: backward before forward, or a second backward \
                 (its saved exponentials become the logits' gradient)"
            );
        };
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(wc), Storage::Cpu(bc)) = (&*xs, &*ws, &*bs) else {
            candle_core::bail!("fused linear cross-entropy: inputs left the CPU");
        };
        let (xm, wm, _) = linear_operands((xc, xl), (wc, wl), (bc, bl))?;
        let (n, c, k) = (xm.rows, wm.rows, xm.cols);
        let scale = g / n.max(1) as f32;
        // dlogits = (softmax - onehot) * g / n, over the exponentials (no buffer of its own
        // to allocate and fill).
        let mut dl = exps;
        let per = block_rows(n);
        dl.par_chunks_mut(per * c)
            .zip(inv_sum.par_chunks(per))
            .for_each(|(rows, inv)| simd::scale_rows(rows, c, inv, scale));
        for (i, &t) in self.targets.iter().enumerate() {
            dl[i * c + t as usize] -= scale;
        }
        let (dx, dw) =
            super::linear::input_and_weight_grads(MatRef::dense(&dl, n, c), xm, wm, self.bf16);
        let mut db = vec![0f32; c];
        super::col_sums_par(&mut db, &dl, None);
        drop((xs, ws, bs));
        let dw = match &self.weight_cell {
            Some(cell) => {
                cell.add(dw)?;
                None
            }
            None => Some(Tensor::from_vec(dw, (c, k), w.device())?),
        };
        Ok((
            Some(Tensor::from_vec(dx, (n, k), x.device())?),
            dw,
            Some(Tensor::from_vec(db, c, b.device())?),
        ))
    }
}

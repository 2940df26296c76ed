//! A parameter's gradient gathered outside candle's graph.
//!
//! candle's backward gives every gradient a zero-filled tensor and adds each contribution to
//! it, on one thread (our binaries keep candle's own elementwise pool off). For BERT's tied
//! word table (8,000 x 256 in the suite's BERT-mini) that is a fill and two adds of 8 MB per
//! step, one from the MLM head's loss and one from the input embedding. With a [`GradCell`]
//! the first fused op's backward leaves its dense gradient in the cell, and the embedding's
//! backward adds only the rows of the batch's tokens to it, in place.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rayon::prelude::*;

use super::simd;

/// One parameter's gradient, summed in place by the backward passes of the fused ops that
/// read the parameter ([`crate::LinearCrossEntropyOp::weight_grad_to`],
/// [`crate::EmbeddingSumOp::grads`]), and taken out once after the backward. Clones share the
/// gradient. Once taken, the cell is closed: a later contribution (a backward run after its
/// gradients were collected, which nothing would read) is an error, not a lost gradient.
#[derive(Clone, Debug, Default)]
pub struct GradCell(Arc<Mutex<Slot>>);

#[derive(Debug, Default)]
struct Slot {
    grad: Option<Vec<f32>>,
    closed: bool,
}

impl GradCell {
    /// An empty cell.
    pub fn new() -> Self {
        Self::default()
    }

    fn open(&self) -> candle_core::Result<MutexGuard<'_, Slot>> {
        let slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.closed {
            candle_core::bail!(
                "a gradient delivered to a cell whose gradient was already collected (a \
                 backward pass after its gradient sink was drained)"
            );
        }
        Ok(slot)
    }

    /// Adds the dense gradient `g`: moved in when the cell is empty, summed in place (on the
    /// rayon pool) otherwise. An error when the cell holds a gradient of another length, or
    /// was taken.
    pub fn add(&self, g: Vec<f32>) -> candle_core::Result<()> {
        let mut slot = self.open()?;
        match slot.grad.as_mut() {
            None => slot.grad = Some(g),
            Some(acc) => {
                check_len(acc.len(), g.len())?;
                const CHUNK: usize = 1 << 15;
                acc.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(a, b)| simd::add_assign(a, b));
            }
        }
        Ok(())
    }

    /// Runs `f` on the gradient, of `len` values, zero-filled first when the cell is empty:
    /// for a contribution that touches a few rows (an embedding's tokens). An error when the
    /// cell holds a gradient of another length, or was taken.
    pub fn update(&self, len: usize, f: impl FnOnce(&mut [f32])) -> candle_core::Result<()> {
        let mut slot = self.open()?;
        let acc = slot.grad.get_or_insert_with(|| vec![0.0; len]);
        check_len(acc.len(), len)?;
        f(acc);
        Ok(())
    }

    /// The gradient summed so far (`None` when nothing was added), closing the cell.
    pub fn take(&self) -> Option<Vec<f32>> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.closed = true;
        slot.grad.take()
    }
}

fn check_len(held: usize, given: usize) -> candle_core::Result<()> {
    if held != given {
        candle_core::bail!(
            "a gradient of {given} values for a parameter whose gradient has {held} values"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contributions_sum_in_any_order_and_the_cell_empties_when_taken() {
        let n = 70_000; // more than one parallel chunk
        let dense: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.5).collect();
        let rows = |g: &mut [f32]| {
            g[3] += 1.0;
            g[n - 1] -= 2.0;
        };
        let mut want = dense.clone();
        rows(&mut want);

        let dense_first = GradCell::new();
        dense_first.add(dense.clone()).unwrap();
        dense_first.update(n, rows).unwrap();

        let rows_first = GradCell::new();
        let shared = rows_first.clone();
        shared.update(n, rows).unwrap();
        rows_first.add(dense.clone()).unwrap();

        for cell in [dense_first, rows_first] {
            assert_eq!(cell.take().as_deref(), Some(want.as_slice()));
            assert!(cell.take().is_none());
            // Closed: a late contribution is refused, not dropped.
            let late = cell.add(dense.clone()).unwrap_err().to_string();
            assert!(late.contains("already collected"), "{late}");
            assert!(cell.update(n, rows).is_err());
        }
        let twice = GradCell::new();
        twice.add(dense.clone()).unwrap();
        twice.add(dense.clone()).unwrap();
        let doubled: Vec<f32> = dense.iter().map(|x| x + x).collect();
        assert_eq!(twice.take(), Some(doubled));
    }

    #[test]
    fn a_gradient_of_another_length_is_refused() {
        let cell = GradCell::new();
        cell.add(vec![1.0; 4]).unwrap();
        let err = cell.add(vec![1.0; 5]).unwrap_err().to_string();
        assert!(
            err.contains("5 values") && err.contains("4 values"),
            "{err}"
        );
        assert!(cell.update(3, |_| {}).is_err());
        assert_eq!(cell.take(), Some(vec![1.0; 4]));
    }
}

//! The fast CPU path of the transformer stack: every layer's forward and backward in one
//! candle custom op on flat buffers, with `gemm`'s run-time-selected kernels for the products
//! and fused, vectorised elementwise passes (bias + GELU, residual + layer norm, masked
//! softmax, dropout from a counter-based hash). The composite-op stack in `transformer.rs`
//! stays the reference (and the GPU path); tests hold the two together.

use rayon::prelude::*;

mod bf16;
mod broadcast;
mod cross_entropy;
mod gemm;
mod layer_norm;
mod linear;
mod masked_mean;
mod pool;
pub(crate) mod simd;
mod stack;

pub(crate) use bf16::available as bf16_available;
pub(crate) use bf16::time_product as time_bf16_product;
pub(crate) use broadcast::RowBroadcastAdd;
pub(crate) use cross_entropy::{CrossEntropyOp, LinearCrossEntropyOp};
pub(crate) use gemm::linear_takes_bf16;
pub(crate) use layer_norm::LayerNormOp;
pub(crate) use linear::MatmulTBf16;
pub(crate) use masked_mean::MaskedMeanOp;
pub(crate) use pool::BufferPool;
pub(crate) use simd::Act;
pub(crate) use stack::{FusedSpec, StackOp};

/// The f32 elements of a contiguous CPU storage view, or an error naming the op and operand.
pub(crate) fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Rows per parallel block for a pass over `n` rows: four blocks per thread.
pub(crate) fn block_rows(n: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    n.div_ceil(4 * t).max(1)
}

/// `buf` split into `blocks` chunks of `chunk` elements for a parallel zip, or, when `buf` is
/// empty (an output the caller does not want), `blocks` empty slices.
pub(crate) fn row_blocks(buf: &mut [f32], chunk: usize, blocks: usize) -> Vec<&mut [f32]> {
    if buf.is_empty() {
        (0..blocks).map(|_| <&mut [f32]>::default()).collect()
    } else {
        buf.chunks_mut(chunk.max(1)).collect()
    }
}

/// Rows per block of [`col_sums_par`]: fixed, so the rounding of the sums does not depend
/// on the thread count.
pub(crate) const SUM_ROWS: usize = 64;

/// Column sums of the rows of `a` (width `sum.len()`) into `sum` and, with `b`, of `a * b`
/// into `prod`: partial sums over blocks of [`SUM_ROWS`] rows in parallel, added in block
/// order (deterministic, unlike a rayon `reduce`).
pub(crate) fn col_sums_par(sum: &mut [f32], a: &[f32], prod: Option<(&mut [f32], &[f32])>) {
    let w = sum.len();
    let chunk = SUM_ROWS * w.max(1);
    match prod {
        None => {
            let parts: Vec<Vec<f32>> = a
                .par_chunks(chunk)
                .map(|c| {
                    let mut s = vec![0f32; w];
                    simd::col_sum(&mut s, c);
                    s
                })
                .collect();
            sum.fill(0.0);
            for s in &parts {
                simd::add_assign(sum, s);
            }
        }
        Some((prod, b)) => {
            let parts: Vec<(Vec<f32>, Vec<f32>)> = a
                .par_chunks(chunk)
                .zip(b.par_chunks(chunk))
                .map(|(ac, bc)| {
                    let (mut s, mut p) = (vec![0f32; w], vec![0f32; w]);
                    simd::col_sum(&mut s, ac);
                    simd::col_sum_prod(&mut p, ac, bc);
                    (s, p)
                })
                .collect();
            sum.fill(0.0);
            prod.fill(0.0);
            for (s, p) in &parts {
                simd::add_assign(sum, s);
                simd::add_assign(prod, p);
            }
        }
    }
}

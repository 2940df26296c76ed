//! # ssl-kernels
//!
//! The hand-written CPU kernels of the toolkit (and the GPU launches of two of candle's), as
//! candle custom ops and plain functions on `f32` slices. It is the only crate of the workspace
//! with `unsafe` code (each block carries a `SAFETY` comment); every other crate forbids it.
//!
//! - [`StackOp`]: a whole transformer stack, every layer's forward and backward, as one candle
//!   custom op on flat buffers ([`FusedSpec`] says its shape, [`BufferPool`] keeps its buffers
//!   between steps). `ssl_core::nn::TransformerStack` runs it on the CPU; its composite-op
//!   stack stays the reference (and the GPU path), and tests hold the two together.
//! - [`TcnOp`]: TS2Vec's dilated convolution stack (every residual block, forward and
//!   backward) as one custom op ([`TcnSpec`] says its shape); `ssl_timeseries`' TCN encoder
//!   runs it on the CPU and keeps its composite-op path as the reference.
//! - [`Ts2VecLossOp`]: TS2Vec's hierarchical contrastive loss and its gradient in one pass,
//!   each group's similarities in one buffer (the composite builds and differentiates
//!   several tensors of every similarity matrix's size).
//! - Matrix products through `gemm`'s kernels, or bf16 ones (operands rounded to bf16, f32
//!   sums) on CPUs with AVX-512 BF16 ([`bf16_available`]), with bias and activation
//!   epilogues applied to each block while it is in cache; where AVX-512 FP16 is there and
//!   AMX is not (Intel Xeons in most VMs), the bf16 setting's products run in fp16 with
//!   power-of-two scaling and f32 sums every 64 terms instead, at up to twice the f32 rate
//!   ([`ReducedKernel`], decided once per process, says which kernel runs here); [`MatmulT`] is `x W^T` on these
//!   kernels as an op of its own, with its backward (the linear layers outside the stack).
//!   The attention's per-head products of at most 80 in every dimension (short sequences)
//!   run on AVX-512F registers, their operands read where they lie (or one transposed).
//! - One-op versions of what surrounds the stack: [`LayerNormOp`], [`CrossEntropyOp`],
//!   [`LinearCrossEntropyOp`] (a linear layer and its cross-entropy, the logits never built),
//!   [`RowBroadcastAdd`], [`MaskedMeanOp`], [`EmbeddingSumOp`] (BERT's input embedding); the
//!   optimizer's in-place [`adamw`] pass and the gradient norm's [`sum_squares`]. The loss
//!   and the embedding can leave a parameter's gradient in a [`GradCell`] instead of candle's
//!   graph, so a tied word table's two gradients are one buffer, summed in place.
//! - [`SoftmaxLastDimOp`] and [`LayerNormFusedOp`]: candle's fused GPU softmax and layer-norm
//!   kernels (with the `cuda` feature) in ops that have a backward; the GPU path of
//!   `ssl_core`'s stack.
//! - Elementwise kernels written as plain loops, compiled for AVX-512, AVX2+FMA and the
//!   baseline, and chosen at run time by CPU-feature detection: no `target-cpu=native`.
//! - [`keep_freed_memory`]: mimalloc's setting for our binaries.
//! - [`amx_matmul_bt`]: bf16 products on Intel AMX tiles where the CPU has them and they
//!   pass a check against the exactly rounded product ([`amx_usable`]; [`amx_available`]:
//!   present and granted); where [`amx_usable`] every bf16 product of the kernels runs there;
//!   tested everywhere through an emulation of the tile instructions (no AMX machine has
//!   measured it yet).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ssl_kernels::LayerNormOp;
//!
//! # fn main() -> candle_core::Result<()> {
//! let x = Tensor::new(&[[1f32, 2., 3., 4.], [2., 2., 2., 6.]], &Device::Cpu)?;
//! let w = Tensor::ones(4, x.dtype(), x.device())?;
//! let b = Tensor::zeros(4, x.dtype(), x.device())?;
//! let y = x.apply_op3(&w, &b, LayerNormOp { eps: 1e-5 })?;
//! let mean = y.mean_keepdim(1)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(mean < 1e-6);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

use rayon::prelude::*;

mod alloc;
mod amx;
mod bf16;
mod broadcast;
mod cross_entropy;
mod embedding;
mod fp16;
mod gemm;
mod gpu;
mod grad_cell;
mod layer_norm;
mod linear;
mod masked_mean;
mod pool;
mod precision;
mod simd;
mod small;
mod stack;
mod tcn;
mod ts2vec_loss;

pub use alloc::keep_freed_memory;
pub use amx::{available as amx_available, matmul_bt as amx_matmul_bt, usable as amx_usable};
pub use bf16::available as bf16_available;
pub use bf16::time_product as time_bf16_product;
pub use broadcast::RowBroadcastAdd;
pub use cross_entropy::{CrossEntropyOp, LinearCrossEntropyOp};
pub use embedding::EmbeddingSumOp;
pub use gemm::linear_takes_bf16;
pub use gpu::{LayerNormFusedOp, SoftmaxLastDimOp};
pub use grad_cell::GradCell;
pub use layer_norm::LayerNormOp;
pub use linear::MatmulT;
pub use masked_mean::MaskedMeanOp;
pub use pool::BufferPool;
pub use precision::{
    bf16_check, bf16_forward_check, cpu_name, reduced_precision_kernel, time_reduced_product,
    Bf16Check, ForwardCheck, ReducedKernel,
};
pub use simd::{adamw, Act, AdamWCoeffs};
pub use stack::{FusedSpec, NormPlacement, Offsets, ParamGradMailbox, StackOp};
pub use tcn::{TcnBlock, TcnOp, TcnSpec};
pub use ts2vec_loss::Ts2VecLossOp;

// The README's example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

/// The sum of the squares of `x`, accumulated in f64 (a gradient norm's square), on the rayon
/// pool. The result depends on `x` alone, not on the number of threads: fixed chunks, summed
/// in order.
pub fn sum_squares(x: &[f32]) -> f64 {
    const CHUNK: usize = 1 << 16;
    if x.len() <= CHUNK {
        let mut acc = 0.0;
        simd::sum_squares_f64(x, &mut acc);
        return acc;
    }
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            let mut acc = 0.0;
            simd::sum_squares_f64(c, &mut acc);
            acc
        })
        .collect();
    parts.iter().sum()
}

/// `parts` one after another in a new vector, copied on the rayon pool and written once (no
/// zeroing first): a fused op's parameters, packed each step.
pub fn concat(parts: &[&[f32]]) -> Vec<f32> {
    const CHUNK: usize = 1 << 15;
    let n = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(n);
    let mut rest = &mut out.spare_capacity_mut()[..n];
    let mut jobs = Vec::new();
    for chunk in parts.iter().flat_map(|p| p.chunks(CHUNK)) {
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(chunk.len());
        jobs.push((dst, chunk));
        rest = tail;
    }
    jobs.into_par_iter().for_each(|(dst, src)| {
        // SAFETY: `dst` and `src` have the same length (split so) and do not overlap (`dst`
        // is part of a new vector); f32 needs no drop, so writing into the uninitialised
        // part is fine.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<f32>(), src.len());
        }
    });
    // SAFETY: the jobs' destinations tile the first `n` elements (the parts' chunks, in order,
    // each as long as its destination), and each job wrote its destination whole.
    unsafe { out.set_len(n) };
    out
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn concat_is_the_parts_in_order() {
        let parts: Vec<Vec<f32>> = [0, 3, 1 << 15, (1 << 15) + 5, 0, 7]
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (k * 1_000_000 + i) as f32).collect())
            .collect();
        let views: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        assert_eq!(super::concat(&views), parts.concat());
        assert!(super::concat(&[]).is_empty());
    }

    #[test]
    fn sum_squares_matches_the_f64_sum_and_ignores_the_thread_count() {
        // Lengths around the lane width and the parallel chunk, values of mixed size.
        for n in [0i32, 1, 7, 8, 9, 1000, (1 << 16) + 3, 3 * (1 << 16) + 17] {
            let x: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 7 - 3))
                .collect();
            let exact: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let ours = super::sum_squares(&x);
            assert!(
                (ours - exact).abs() <= 1e-12 * exact.max(f64::MIN_POSITIVE),
                "n = {n}: {ours} vs {exact}"
            );
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| super::sum_squares(&x));
            assert_eq!(
                one.to_bits(),
                ours.to_bits(),
                "n = {n}: thread count changed the bits"
            );
        }
    }
}

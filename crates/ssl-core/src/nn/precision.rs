//! The precision of the transformer stack's matrix products, chosen per forward pass through
//! [`crate::Ctx`] (the trainer takes it from `TrainConfig::matmul_precision`).

use serde::{Deserialize, Serialize};

/// How the fused CPU transformer stack multiplies matrices.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 operands and accumulation (the default).
    #[default]
    F32,
    /// The stack's large products (linear layers of at least 16 M multiply-adds, per-head
    /// attention products of at least 256 k, every dimension at least 16; forward and
    /// backward), and those of [`super::ops::matmul_t`] / [`super::Linear::forward_with`]
    /// outside it (BERT's MLM head), take operands rounded to bf16
    /// (nearest even), sum in f32 and return f32: PyTorch's CPU autocast for matmuls.
    /// Parameters, gradients, optimizer state, softmax, norms and every other elementwise
    /// pass stay f32 (f32 master weights).
    /// On Intel CPUs with AVX-512 FP16 and no usable AMX (Sapphire, Emerald and Granite
    /// Rapids where a VM hides the tiles), where bf16 instructions run at half the f32 rate,
    /// the same products take fp16 instead: each row and column scaled by a power of two,
    /// rounded to fp16, summed in fp16 64 terms at a time and those sums in f32 (half the
    /// error of bf16 operands; `ssl_kernels`' `fp16.rs`), at up to twice the f32 rate.
    /// There the attention's per-head products stay f32. On the CPU used only where such a
    /// kernel exists (see [`bf16_matmul_available`]); elsewhere, and on the CPU's composite
    /// (reference) path, the products stay f32. On a GPU every product
    /// of the stack (linear layers and attention) and of [`super::ops::matmul_t`] takes bf16
    /// operands through cuBLAS with f32 sums (PyTorch's CUDA autocast for matmuls).
    Bf16,
}

/// True when this CPU has a kernel for the bf16 setting's products: AMX tiles, AVX-512 FP16
/// or AVX-512 BF16 (`ssl_kernels::reduced_precision_kernel` says which).
pub fn bf16_matmul_available() -> bool {
    ssl_kernels::reduced_precision_kernel() != ssl_kernels::ReducedKernel::F32
}

/// Median seconds of `reps` bf16 products of shape `(m, n, k)` (`m x k` by `k x n`), each
/// operand stored transposed when its flag says so, on `threads` threads; `None` on CPUs
/// without AVX-512 BF16. Benchmark support (`cargo bench -p ssl-core --bench stack -- gemm`),
/// not a stable API.
#[doc(hidden)]
pub fn bf16_product_seconds(
    shape: (usize, usize, usize),
    transposed: (bool, bool),
    threads: usize,
    reps: usize,
) -> Option<f64> {
    ssl_kernels::time_bf16_product(shape, transposed, threads, reps)
}

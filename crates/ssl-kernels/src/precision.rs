//! Whether this CPU's bf16 products are faster than its f32 ones: measured once per process.
//!
//! AVX-512 BF16 does not make bf16 products faster everywhere: on AMD Zen 4 and Zen 5 our
//! bf16 kernel is 1.3-1.5x faster than f32, while on Intel Xeons (Sapphire, Emerald and
//! Granite Rapids) whole models ran 1.3-1.5x slower in bf16. There `vdpbf16ps` retires a
//! quarter as many instructions per cycle as `vfmadd231ps` (measured on family 6 model 207,
//! one core, 24 independent accumulators: 1.35e9 against 5.5e9 per second), and each does
//! twice the multiply-adds, so bf16 peaks at half the f32 rate (our 1024^3 product: 110
//! against 285 GFLOP/s). Those Xeons have AVX-512 FP16, whose FMAs retire at the f32 rate
//! with twice the lanes, so where AMX is not usable the setting's products run in fp16
//! (`fp16.rs`) instead. The trainer asks [`bf16_check`] before using the reduced precision:
//! the three products of a linear layer's training step (forward, input and weight
//! gradients, each operand orientation), timed in both precisions, alternated, on the current
//! rayon pool. Passes without backward ask [`bf16_forward_check`], the forward product alone
//! (a kernel may speed up one orientation and not the others), which a process that only
//! embeds measures without the backward's two.

use std::sync::OnceLock;
use std::time::Instant;

use crate::gemm::{linear_product, matmul, threads, Epilogue, MatRef, Op};

/// What [`bf16_check`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Check {
    /// Seconds of the three bf16 products (sum of medians).
    pub bf16_seconds: f64,
    /// Seconds of the same products in f32.
    pub f32_seconds: f64,
    /// The first of them, the forward `x W^T`: [`bf16_forward_check`]'s measurement, what a
    /// pass without backward (embedding, evaluation) decides by.
    pub forward: ForwardCheck,
}

impl Bf16Check {
    /// True when bf16 is at least as fast as f32 (within 2%, so a tie keeps bf16's
    /// memory saving): what a training step takes.
    pub fn bf16_faster(&self) -> bool {
        at_least_as_fast(self.bf16_seconds, self.f32_seconds)
    }
}

/// True when `bf16_seconds` is at most 2% above `f32_seconds`: a tie keeps bf16's memory
/// saving.
fn at_least_as_fast(bf16_seconds: f64, f32_seconds: f64) -> bool {
    bf16_seconds <= f32_seconds * 1.02
}

/// The measurement, taken once per process (about 0.2-0.35 s); `None` on a CPU without a
/// reduced-precision kernel ([`reduced_precision_kernel`] is [`ReducedKernel::F32`]). Its
/// forward product is [`bf16_forward_check`]'s, measured once for both.
pub fn bf16_check() -> Option<&'static Bf16Check> {
    static CHECK: OnceLock<Option<Bf16Check>> = OnceLock::new();
    CHECK
        .get_or_init(|| bf16_forward_check().map(|&forward| measure(forward)))
        .as_ref()
}

/// What [`bf16_forward_check`] measured: a linear layer's forward product `x W^T` alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardCheck {
    /// Seconds of the product in bf16 (median; fp16 where AVX-512 FP16 runs the setting).
    pub bf16_seconds: f64,
    /// Seconds of the product in f32 (median).
    pub f32_seconds: f64,
}

impl ForwardCheck {
    /// True when the product is at least as fast in bf16 (within 2%): what a pass without
    /// backward (embedding, evaluation) takes.
    pub fn bf16_faster(&self) -> bool {
        at_least_as_fast(self.bf16_seconds, self.f32_seconds)
    }
}

/// The forward half of [`bf16_check`] alone, taken once per process (about 0.1 s): what a
/// process that only embeds or evaluates needs, without timing the backward's products.
/// `None` on a CPU without a reduced-precision kernel.
pub fn bf16_forward_check() -> Option<&'static ForwardCheck> {
    static CHECK: OnceLock<Option<ForwardCheck>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            (reduced_precision_kernel() != ReducedKernel::F32).then(|| {
                // The product that decides inference alone: more repetitions.
                let (bf16_seconds, f32_seconds) =
                    time_product((1024, 2048, 512), (Op::N, Op::T), 9);
                ForwardCheck {
                    bf16_seconds,
                    f32_seconds,
                }
            })
        })
        .as_ref()
}

/// Median seconds of `reps` products `op_a(A) op_b(B)` of `m x k` by `k x n` (each operand
/// stored so that `op` gives that shape) in bf16 and in f32, the two precisions alternated
/// after one warm-up each (so a VM's drift in speed hits both alike).
fn time_product(
    (m, n, k): (usize, usize, usize),
    (op_a, op_b): (Op, Op),
    reps: usize,
) -> (f64, f64) {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let b: Vec<f32> = (0..n * k)
        .map(|i| ((i % 89) as f32 - 44.0) / 64.0)
        .collect();
    let a_ref = match op_a {
        Op::N => MatRef::dense(&a, m, k),
        Op::T => MatRef::dense(&a, k, m),
    };
    let b_ref = match op_b {
        Op::N => MatRef::dense(&b, k, n),
        Op::T => MatRef::dense(&b, n, k),
    };
    let mut c = vec![0f32; m * n];
    let mut run = |bf16: bool| {
        let t0 = Instant::now();
        if (op_a, op_b) == (Op::N, Op::T) {
            // A linear layer's forward, through the stack's own entry (fp16 where usable).
            linear_product(&mut c, a_ref, b_ref, Epilogue::None, bf16);
        } else {
            matmul(
                &mut c,
                n,
                a_ref,
                op_a,
                b_ref,
                op_b,
                1.0,
                false,
                threads(),
                bf16,
            );
        }
        t0.elapsed().as_secs_f64()
    };
    run(true);
    run(false);
    let (mut tb, mut tf) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        tb.push(run(true));
        tf.push(run(false));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(tb), median(tf))
}

/// Median seconds of `reps` products `m x k` by `k x n` as the bf16 setting runs them on this
/// CPU (its kernel, [`reduced_precision_kernel`], and the kernels' size rules, so f32 where
/// they say so) and in f32, alternated: `(reduced, f32)`. `a_t` and `b_t` store that operand
/// transposed; `(false, true)` is a linear layer's forward `x W^T`, timed through its own
/// entry. For `cargo bench -p ssl-kernels --bench reduced`.
pub fn time_reduced_product(
    (m, n, k): (usize, usize, usize),
    (a_t, b_t): (bool, bool),
    reps: usize,
) -> (f64, f64) {
    let op = |t: bool| if t { Op::T } else { Op::N };
    time_product((m, n, k), (op(a_t), op(b_t)), reps)
}

fn measure(forward: ForwardCheck) -> Bf16Check {
    // A linear layer 512 -> 2048 on 1,024 tokens as a training step runs it: the forward
    // `x W^T` (`bf16_forward_check`'s), the input gradient `g W` and the weight gradient
    // `g^T x`, each orientation its own packing (AMX packs transposed operands slower than
    // contiguous ones).
    let input_grad = time_product((1024, 512, 2048), (Op::N, Op::N), 5);
    let weight_grad = time_product((2048, 512, 1024), (Op::T, Op::N), 5);
    Bf16Check {
        bf16_seconds: forward.bf16_seconds + input_grad.0 + weight_grad.0,
        f32_seconds: forward.f32_seconds + input_grad.1 + weight_grad.1,
        forward,
    }
}

/// The kernel family that runs the products the bf16 setting asks for, on this CPU: decided
/// once per process ([`reduced_precision_kernel`]), and the one place the kernels' dispatch
/// asks (so the stack, its halves, the attention and the MLM head never disagree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReducedKernel {
    /// Intel AMX tiles in bf16 (or their emulation under `SSL_AMX_EMULATE=1`): every
    /// reduced-precision product, the attention's per-head ones included.
    AmxBf16,
    /// AVX-512 FP16 where usable AMX is not: whole-batch products in fp16 with power-of-two
    /// scaling and f32 sums every 64 terms (twice the f32 rate there, where `vdpbf16ps` runs at
    /// half); the attention's heads, smaller weights and products with a narrow side stay f32.
    Avx512Fp16,
    /// AVX-512 BF16 dot products (bf16 operands, f32 sums), with the fused MLP and attention
    /// kernels for inference.
    Avx512Bf16,
    /// No reduced-precision kernel: the products stay f32.
    F32,
}

impl ReducedKernel {
    /// The name `bench/run` and the suite print: `"amx-bf16"`, `"avx512-fp16"`,
    /// `"avx512-bf16"` or `"none"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AmxBf16 => "amx-bf16",
            Self::Avx512Fp16 => "avx512-fp16",
            Self::Avx512Bf16 => "avx512-bf16",
            Self::F32 => "none",
        }
    }

    /// True for the kernels with bf16 operands (AMX tiles or AVX-512 BF16), which the bf16
    /// kernels' entry points dispatch between.
    pub(crate) fn bf16_operands(self) -> bool {
        matches!(self, Self::AmxBf16 | Self::Avx512Bf16)
    }
}

impl std::fmt::Display for ReducedKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kernel the bf16 setting's products run on here: AMX tiles where usable (or
/// emulated) on a CPU with AVX-512 BF16 (the bf16 kernels' contract; every AMX CPU has it),
/// else fp16 where AVX-512 FP16 is, else AVX-512 BF16, else none (f32).
pub fn reduced_precision_kernel() -> ReducedKernel {
    static KERNEL: OnceLock<ReducedKernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if crate::amx::backend().is_some() && crate::bf16_available() {
            ReducedKernel::AmxBf16
        } else if crate::fp16::available() {
            ReducedKernel::Avx512Fp16
        } else if crate::bf16_available() {
            ReducedKernel::Avx512Bf16
        } else {
            ReducedKernel::F32
        }
    })
}

/// The CPU's model name (`/proc/cpuinfo`'s `model name`), or "unknown CPU".
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_measures_both_precisions_once() {
        match bf16_check() {
            None => {
                assert!(!crate::bf16_available());
                assert!(bf16_forward_check().is_none());
            }
            Some(c) => {
                assert!(c.bf16_seconds > 0.0 && c.f32_seconds > 0.0, "{c:?}");
                assert!(c.forward.bf16_seconds > 0.0 && c.forward.f32_seconds > 0.0);
                // Measured once: the same reference every call.
                assert!(std::ptr::eq(c, bf16_check().unwrap()));
                // Its forward product is the forward check's own measurement.
                let f = bf16_forward_check().expect("a forward check where the full one ran");
                assert_eq!(c.forward, *f);
            }
        }
        assert!(!cpu_name().is_empty());
    }
}

//! Matrix products of the fused stack, on the `gemm` crate (AVX-512 / AVX2 kernels chosen at
//! run time).
//!
//! Matrices are row-major views `(ptr, rows, cols, leading dimension)`; a transposed operand is
//! the same memory read with its strides swapped, so no product here copies an operand (the
//! attention's small per-head products, [`head_matmul`], may transpose a copy of one).

use gemm::Parallelism;
use rayon::prelude::*;

use super::amx::Strided;
use super::precision::{reduced_precision_kernel, ReducedKernel};
use super::simd::{self, Act};

/// Products run in bf16 when asked only if every dimension is at least this large and their
/// multiply-adds reach [`BF16_MIN_WORK`] (per-head attention products, through
/// [`matmul_raw`]) or [`BF16_MIN_WORK_LINEAR`] (whole-batch products, through [`matmul`],
/// which also pay packing in parallel and a thread dispatch): smaller ones cost more than they
/// save. The rule depends on the call site and the shape only, never on the thread count, so
/// one model makes the same choice on every machine. Measured with `bench/run --precision
/// bf16`: the PatchTST model's products (896 x 192 x 64 and smaller) ran slower in bf16 than
/// in f32, BERT-mini's (2048 x 768 x 256; 128 x 128 x 64 per attention head) much faster.
/// Where the reduced precision runs in fp16 ([`ReducedKernel::Avx512Fp16`]) a linear layer's
/// forward ([`linear_product`]) asks a rule on its weight's shape alone (`fp16_takes_linear`),
/// whatever the row count, so a stack's halves take the same kernel as its whole batch; other
/// products (gradients, convolutions, `matmul_t`, the MLM head's logits) also need both sides
/// of their output wide enough to repay fp16's packing (`fp16_takes_product`).
const BF16_MIN_DIM: usize = 16;
/// See [`BF16_MIN_DIM`].
const BF16_MIN_WORK: usize = 1 << 18;
/// See [`BF16_MIN_DIM`].
const BF16_MIN_WORK_LINEAR: usize = 1 << 24;
/// Smallest weight (`n * k` elements) whose forward takes fp16 (see `fp16_takes_linear`):
/// 256 x 256, BERT-mini's smallest.
const FP16_MIN_WEIGHT: usize = 1 << 16;
/// Smallest harmonic mean of a product's rows and columns (`2 m n / (m + n)`: how many
/// multiply-adds each packed element of `A` and `B` feeds, per depth step) for which the
/// fp16 kernel takes a general product (`fp16_takes_product`): its packing converts and
/// scales every element, which a few dozen rows or columns do not repay. Measured on family
/// 6 model 207, 2 threads, fp16 / f32 time: TCN weight gradients 64 x 192 (mean 96)
/// 1.8-2.0 over 2400-12000 steps, MAE's 128 x 128 (128) 1.0-1.3; BERT's 256 x 256 (256)
/// 0.84-0.87, TCN input gradients 12000 x 192 (381) 0.70-0.90.
const FP16_MIN_REUSE: usize = 160;

/// True when a general product (`m x n` output, any depth: a layer's input or weight
/// gradient, a convolution, `matmul_t`'s forward, the MLM head's logits) takes fp16 where that
/// is the reduced precision: both sides wide enough to repay the packing
/// ([`FP16_MIN_REUSE`]; BERT-mini's 8000-word head, for one, needs 81 rows). It counts the
/// output's rows, so it is not asked by a stack's forward (whose halves must take the whole
/// batch's kernel); its halves' backward products count their own rows on any thread count.
fn fp16_takes_product(m: usize, n: usize) -> bool {
    2 * m * n >= FP16_MIN_REUSE * (m + n)
}

/// What a dense product does to each finished block of its output: in bf16 inside the
/// product, on each job's block while it is still in cache; in f32 as one parallel pass after
/// the product.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// Nothing.
    None,
    /// Adds `bias[j]` to column `j`.
    Bias(&'a [f32]),
    /// Adds `bias[j]` to column `j` and writes the activation of the sum to `act_out`, a
    /// buffer of the output's layout (the output keeps the biased sum, backward's input), or
    /// over the output itself when `act_out` is `None` (no backward to follow).
    BiasAct {
        bias: &'a [f32],
        act: Act,
        act_out: Option<OutSlice>,
    },
}

/// A raw output buffer that parallel jobs write in disjoint blocks (the products' epilogues,
/// the stack's per-head attention).
#[derive(Clone, Copy)]
pub(crate) struct OutSlice {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: only written in disjoint blocks, one per job or task (see `Epilogue::apply` and
// the attention in stack.rs).
unsafe impl Send for OutSlice {}
// SAFETY: as above.
unsafe impl Sync for OutSlice {}

impl OutSlice {
    /// The buffer `v`, which must outlive every use of the result.
    pub fn new(v: &mut [f32]) -> Self {
        OutSlice {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// `len` floats from `ptr`, possibly uninitialised (only ever written through the
    /// pointer), which must outlive every use of the result.
    pub fn from_raw(ptr: *mut f32, len: usize) -> Self {
        OutSlice { ptr, len }
    }

    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub fn ptr(self) -> *mut f32 {
        self.ptr
    }
}

impl Epilogue<'_> {
    /// Applies the epilogue to rows `[r0, r0 + rows)` and columns `[j0, j1)` of `c` (leading
    /// dimension `ldc`).
    ///
    /// # Safety
    /// The block must lie inside `c` (and inside `act_out`, of `c`'s layout) and be neither
    /// read nor written by anyone else during the call.
    pub(crate) unsafe fn apply(
        &self,
        c: *mut f32,
        ldc: usize,
        r0: usize,
        rows: usize,
        j0: usize,
        j1: usize,
    ) {
        if j1 <= j0 || rows == 0 {
            return;
        }
        // One call over the whole block when its rows are contiguous, else one per row.
        let (runs, run_rows) = if j0 == 0 && j1 == ldc {
            (1, rows)
        } else {
            (rows, 1)
        };
        let w = j1 - j0;
        for run in 0..runs {
            let off = (r0 + run) * ldc + j0;
            let len = (run_rows - 1) * ldc + w;
            // SAFETY: the caller's guarantee; the run covers whole rows of the block.
            let h = unsafe { std::slice::from_raw_parts_mut(c.add(off), len) };
            match *self {
                Epilogue::None => return,
                Epilogue::Bias(bias) => simd::add_bias(h, &bias[j0..j1]),
                Epilogue::BiasAct {
                    bias,
                    act,
                    act_out: Some(act_out),
                } => {
                    // SAFETY: as above, in `act_out`.
                    let g = unsafe { std::slice::from_raw_parts_mut(act_out.ptr().add(off), len) };
                    simd::bias_act(h, &bias[j0..j1], g, act);
                }
                Epilogue::BiasAct {
                    bias,
                    act,
                    act_out: None,
                } => simd::bias_act_in_place(h, &bias[j0..j1], act),
            }
        }
    }
}

/// `c = x W^T` (`x` (m, k), `w` (n, k), `c` (m, n) dense), then `epilogue`; when `bf16` is
/// asked: in fp16 where `fp16_takes_linear` (the CPU, the weight's shape), else in bf16 where
/// [`linear_takes_bf16`] allows and the CPU's [`ReducedKernel`] takes bf16 operands, else f32.
pub(crate) fn linear_product(c: &mut [f32], x: MatRef, w: MatRef, epilogue: Epilogue, bf16: bool) {
    let (m, n, k) = (x.rows, w.rows, x.cols);
    assert_eq!(w.cols, k, "inner dimensions differ");
    assert!(c.len() >= m * n, "output too small");
    // Checked here, so `apply` stays inside the buffers.
    match epilogue {
        Epilogue::None => {}
        Epilogue::Bias(bias) => assert_eq!(bias.len(), n, "bias length"),
        Epilogue::BiasAct { bias, act_out, .. } => {
            assert_eq!(bias.len(), n, "bias length");
            if let Some(out) = act_out {
                assert!(out.len >= m * n, "activation output too small");
            }
        }
    }
    x.check();
    w.check();
    if bf16 && fp16_takes_linear(n, k) {
        // AVX-512 FP16 without AMX: twice the f32 rate where the bf16 kernel gets half, at
        // least bf16's precision (see `fp16`). Whatever the row count: each row's result
        // depends on that row alone, so a split of the batch gives the same bits.
        // SAFETY: the views were checked to lie inside their slices, `c` holds m x n and is
        // borrowed mutably; the kernel choice checked the CPU.
        unsafe {
            super::fp16::linear(
                c.as_mut_ptr(),
                n,
                (m, n, k),
                x.data.as_ptr(),
                x.ld,
                w.data.as_ptr(),
                w.ld,
                epilogue,
            )
        };
        return;
    }
    // Not where fp16 runs: there a weight under its threshold stays f32 whatever the row
    // count (the bf16 kernel runs at half the f32 rate, and its rule counts rows).
    if bf16 && linear_takes_bf16(m, n, k) && reduced_precision_kernel().bf16_operands() {
        // SAFETY: the views were checked to lie inside their slices, `c` holds m x n and is
        // borrowed mutably; the kernels' CPU features were checked.
        unsafe {
            super::bf16::gemm_bf16(
                c.as_mut_ptr(),
                n,
                m,
                n,
                k,
                x.data.as_ptr(),
                x.ld as isize,
                1,
                w.data.as_ptr(),
                1,
                w.ld as isize,
                1.0,
                false,
                rayon::current_num_threads(),
                epilogue,
            )
        };
        return;
    }
    matmul(c, n, x, Op::N, w, Op::T, 1.0, false, threads(), false);
    if let Epilogue::None = epilogue {
        return;
    }
    let rb = super::block_rows(m);
    let out = OutSlice::new(c);
    (0..m.div_ceil(rb)).into_par_iter().for_each(|i| {
        let r0 = i * rb;
        // SAFETY: block i's rows belong to this task alone; `out` is `c`, borrowed above.
        unsafe { epilogue.apply(out.ptr(), n, r0, rb.min(m - r0), 0, n) };
    });
}

/// Whether a linear layer's forward asked for bf16 runs in fp16 here: the CPU
/// ([`ReducedKernel::Avx512Fp16`]) and a weight of at least [`FP16_MIN_WEIGHT`] elements, neither
/// side under [`BF16_MIN_DIM`]. The rule counts no rows, so a stack's halves take the same
/// kernel as its whole batch; smaller layers (PatchTST's and CLIP's 64-wide ones, TS2Vec's
/// convolutions) ran no faster in fp16 than in f32, their packing not paid back.
fn fp16_takes_linear(n: usize, k: usize) -> bool {
    n.min(k) >= BF16_MIN_DIM
        && n * k >= FP16_MIN_WEIGHT
        && reduced_precision_kernel() == ReducedKernel::Avx512Fp16
}

/// True when [`mlp_product`] may run: both of the MLP's products (`m` rows, width `k`, hidden
/// `f`, output `n`) take bf16 under [`linear_takes_bf16`], and the CPU has the AVX-512 BF16
/// kernels and neither usable AMX nor AVX-512 FP16 (there each product runs on the tiles, or
/// in fp16, instead).
pub(crate) fn mlp_takes_bf16(m: usize, k: usize, f: usize, n: usize) -> bool {
    linear_takes_bf16(m, f, k)
        && linear_takes_bf16(m, n, f)
        && reduced_precision_kernel() == ReducedKernel::Avx512Bf16
}

/// `c = act(x W1^T + b1) W2^T` with both products in bf16, each block of rows taken through
/// both while its hidden activations stay in cache (no backward follows: the hidden layer is
/// not kept). Equal bit for bit to [`linear_product`] with `Epilogue::BiasAct` and then
/// without epilogue (which then run on AVX-512 BF16: [`mlp_takes_bf16`] excludes AMX). Only
/// where [`mlp_takes_bf16`]; `w1` and `w2` dense.
pub(crate) fn mlp_product(c: &mut [f32], x: MatRef, w1: MatRef, b1: &[f32], act: Act, w2: MatRef) {
    let (m, k, f, n) = (x.rows, x.cols, w1.rows, w2.rows);
    assert!(
        mlp_takes_bf16(m, k, f, n),
        "the MLP's products do not take bf16"
    );
    assert!(w1.cols == k && w2.cols == f, "inner dimensions differ");
    assert!(w1.ld == k && w2.ld == f, "weights must be dense");
    assert_eq!(b1.len(), f, "bias length");
    assert!(c.len() >= m * n, "output too small");
    x.check();
    w1.check();
    w2.check();
    super::bf16::mlp_bf16(c, x.data, x.ld, (m, k, f, n), w1.data, b1, act, w2.data);
}

/// True when the kernels' products (`matmul`) run an `m x k` by `k x n` product in bf16 when
/// asked (and the CPU has the kernels): their size rule for whole-batch products.
pub fn linear_takes_bf16(m: usize, n: usize, k: usize) -> bool {
    m.min(n).min(k) >= BF16_MIN_DIM && m * n * k >= BF16_MIN_WORK_LINEAR
}

/// A read-only row-major matrix view: element `(i, j)` at `data[i * ld + j]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<'a> MatRef<'a> {
    /// A dense `rows x cols` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            ld: cols,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.ld + self.cols - 1;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// Operand orientation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// `(rows, cols, row stride, column stride)` of `op(a)`.
fn oriented(a: &MatRef, op: Op) -> (usize, usize, isize, isize) {
    match op {
        Op::N => (a.rows, a.cols, a.ld as isize, 1),
        Op::T => (a.cols, a.rows, 1, a.ld as isize),
    }
}

/// Row and column strides of a `rows x cols` operand stored densely as itself or, when
/// `transposed`, as its transpose.
pub(crate) fn dense_strides(rows: usize, cols: usize, transposed: bool) -> (isize, isize) {
    if transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// The thread count for one large product.
pub(crate) fn threads() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// `c = alpha * op(a) * op(b)` (or `c += ...` when `accumulate`), `c` a row-major view with
/// leading dimension `ldc`; with `bf16` (and [`linear_takes_bf16`]) the products take the
/// CPU's reduced precision ([`ReducedKernel`]: fp16 or bf16 operands, f32 sums), f32 where it
/// has none. Panics if a view is out of bounds or the shapes disagree (internal invariants of
/// the stack, never user data).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    c: &mut [f32],
    ldc: usize,
    a: MatRef,
    op_a: Op,
    b: MatRef,
    op_b: Op,
    alpha: f32,
    accumulate: bool,
    par: Parallelism,
    bf16: bool,
) {
    let ((m, n, k), (a_rs, a_cs), (b_rs, b_cs)) = product_shape(&a, op_a, &b, op_b);
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n - 1 < c.len(), "output view out of bounds");
    assert!(ldc >= n, "output leading dimension too small");
    // SAFETY: every view was checked to lie inside its slice; `c` is borrowed mutably, so it
    // cannot alias `a` or `b`.
    unsafe {
        matmul_raw(
            c.as_mut_ptr(),
            ldc,
            m,
            n,
            k,
            a.data.as_ptr(),
            a_rs,
            a_cs,
            b.data.as_ptr(),
            b_rs,
            b_cs,
            alpha,
            accumulate,
            par,
            bf16 && linear_takes_bf16(m, n, k),
        );
    }
}

/// The product `a b`'s `(m, n, k)` and each operand's (row, column) strides after its `Op`;
/// panics on a view outside its slice or inner dimensions that differ.
#[allow(clippy::type_complexity)]
fn product_shape(
    a: &MatRef,
    op_a: Op,
    b: &MatRef,
    op_b: Op,
) -> ((usize, usize, usize), (isize, isize), (isize, isize)) {
    a.check();
    b.check();
    let (m, k, a_rs, a_cs) = oriented(a, op_a);
    let (k2, n, b_rs, b_cs) = oriented(b, op_b);
    assert_eq!(k, k2, "inner dimensions differ");
    ((m, n, k), (a_rs, a_cs), (b_rs, b_cs))
}

/// `a b` (each after its `Op`) in a new row-major `m x n` vector, written once by the product:
/// no zero fill first (with `accumulate = false` every path writes each element before any
/// read of it: [`empty_product`]'s fill, `gemm` with `read_dst` off, the bf16 and AMX kernels'
/// first `k` block, the fp16 kernel's unscaling store). Products in bf16 when `bf16` and [`linear_takes_bf16`] allows.
pub(crate) fn product(a: MatRef, op_a: Op, b: MatRef, op_b: Op, bf16: bool) -> Vec<f32> {
    let ((m, n, k), (a_rs, a_cs), (b_rs, b_cs)) = product_shape(&a, op_a, &b, op_b);
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the views were checked to lie inside their slices; `c` has room for the m x n
    // output at leading dimension n and nobody else sees it; without accumulation the product
    // writes every one of its m * n elements (see above), so all are initialised.
    unsafe {
        matmul_raw(
            c.as_mut_ptr(),
            n,
            m,
            n,
            k,
            a.data.as_ptr(),
            a_rs,
            a_cs,
            b.data.as_ptr(),
            b_rs,
            b_cs,
            1.0,
            false,
            threads(),
            bf16 && linear_takes_bf16(m, n, k),
        );
        c.set_len(m * n);
    }
    c
}

/// Handles a product with no work: nothing to do when `m` or `n` is 0; when `k` is 0, `c`'s
/// `m x n` view becomes zero (or stays, when `accumulate`). Returns true when it handled the
/// product.
///
/// # Safety
/// With `k == 0` and `!accumulate`, `c`'s `m x n` view (leading dimension `ldc`) must be valid
/// and not used by anyone else during the call.
pub(crate) unsafe fn empty_product(
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k != 0 {
        return false;
    }
    if !accumulate {
        for i in 0..m {
            // SAFETY: row i of C's m x n view is valid and ours (the caller's guarantee); written
            // through the pointer, never read, so it may be uninitialised (`product`). All-zero
            // bytes are 0.0.
            unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) };
        }
    }
    true
}

/// Whether a per-head product `m x k` by `k x n` asked for in bf16 runs in bf16 (the rule
/// of [`BF16_MIN_DIM`] and a CPU whose reduced-precision kernel takes bf16 operands: never the
/// bf16 kernel where fp16 runs, at half the f32 rate there).
pub(crate) fn per_head_bf16(m: usize, n: usize, k: usize) -> bool {
    k.min(m).min(n) >= BF16_MIN_DIM
        && m * n * k >= BF16_MIN_WORK
        && reduced_precision_kernel().bf16_operands()
}

/// The unchecked product behind [`matmul`] (`bf16` as there), for the attention's per-head
/// blocks, which write disjoint parts of one buffer from several threads.
///
/// # Safety
/// Every element addressed through the pointers and strides must be valid, and `c`'s elements
/// must not be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_raw(
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    alpha: f32,
    accumulate: bool,
    par: Parallelism,
    bf16: bool,
) {
    // SAFETY: forwarded from the caller.
    if unsafe { empty_product(c, ldc, m, n, k, accumulate) } {
        return;
    }
    // The threads the reduced-precision kernels may use (gemm takes `par` itself); only
    // asked for on their paths, not on every f32 head product.
    let kernel_threads = || match par {
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(t) => t,
        _ => 1,
    };
    let (sa, sb) = (
        Strided {
            ptr: a,
            rs: a_rs,
            cs: a_cs,
        },
        Strided {
            ptr: b,
            rs: b_rs,
            cs: b_cs,
        },
    );
    if bf16
        && m.min(n).min(k) >= BF16_MIN_DIM
        && reduced_precision_kernel() == ReducedKernel::Avx512Fp16
        && fp16_takes_product(m, n)
        && super::fp16::takes((a_rs, a_cs), (b_rs, b_cs))
    {
        // SAFETY: forwarded from the caller; the kernel choice checked the CPU, `takes` the
        // strides.
        unsafe {
            super::fp16::gemm(
                c,
                ldc,
                (m, n, k),
                sa,
                sb,
                alpha,
                accumulate,
                kernel_threads(),
                Epilogue::None,
            )
        };
        return;
    }
    if bf16 && per_head_bf16(m, n, k) {
        // SAFETY: forwarded from the caller; the kernels' CPU features were checked.
        unsafe {
            super::bf16::gemm_bf16(
                c,
                ldc,
                m,
                n,
                k,
                a,
                a_rs,
                a_cs,
                b,
                b_rs,
                b_cs,
                alpha,
                accumulate,
                kernel_threads(),
                Epilogue::None,
            )
        };
        return;
    }
    let parts = depth_parts(m, n, k);
    if parts > 1 {
        // SAFETY: forwarded from the caller.
        unsafe { split_depth(c, ldc, (m, n, k), sa, sb, alpha, accumulate, par, parts) };
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { gemm_f32(c, ldc, (m, n, k), sa, sb, alpha, accumulate, par) };
    }
}

/// `c = alpha a b` (or `c += ...` when `accumulate`) on the `gemm` crate, over `par`'s
/// threads; `c` is read only when `accumulate`.
///
/// # Safety
/// As [`matmul_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    alpha: f32,
    accumulate: bool,
    par: Parallelism,
) {
    // gemm computes dst = alpha * dst + beta * lhs * rhs (dst read only when read_dst).
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// How many depth parts an f32 product runs as (1: one `gemm` call): a deep product with a
/// small output (a weight gradient over many rows: depth at least 32 times its wider output
/// side, at most [`DEPTH_SPLIT_MAX_OUT`] outputs) splits its depth into a power of two of
/// parts, each at least 8 times that side and 512 deep, at most 16. The `gemm` crate
/// parallelises over the output's blocks, which a 64 x 192 output does not have enough of: on
/// 2 threads it ran TS2Vec's 64 x 192 weight gradient over 12,000 rows slower (2.8-3.9 ms)
/// than on one (2.5), the depth in halves 1.5-1.9 ms. Shallower products (BERT's and MAE's
/// weight gradients, TS2Vec's over 256-step crops) gained nothing or lost. The count depends
/// on the shape alone, never on the threads, so a product gives the same bits on every thread
/// count.
fn depth_parts(m: usize, n: usize, k: usize) -> usize {
    let side = m.max(n);
    if k < 32 * side || m * n > DEPTH_SPLIT_MAX_OUT {
        return 1;
    }
    let most = (k / (8 * side)).min(k / 512).clamp(1, 16);
    1 << most.ilog2()
}

/// Largest output (`m * n` elements) [`depth_parts`] splits: outputs with as few blocks as
/// those measured (TS2Vec's 64 x 192), where `gemm`'s own parallelism has little to share
/// out; a larger one keeps `gemm`'s, which also spreads over more threads than the parts.
const DEPTH_SPLIT_MAX_OUT: usize = 1 << 16;

/// The f32 product as `parts` depth parts (part `p` the depth `p k / parts .. (p + 1) k /
/// parts`), each one `gemm` call on one thread (in parallel when `par` asks for threads), the
/// first into `c` (adding to it when `accumulate`), the others into buffers added to `c`
/// afterwards in their order: the same sums whatever the thread count.
///
/// # Safety
/// As [`matmul_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn split_depth(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    alpha: f32,
    accumulate: bool,
    par: Parallelism,
    parts: usize,
) {
    let mut bufs = vec![0f32; (parts - 1) * m * n];
    let out = OutSlice::from_raw(c, (m - 1) * ldc + n);
    let bufs_out = OutSlice::new(&mut bufs);
    let part = |p: usize| {
        let (k0, k1) = (p * k / parts, (p + 1) * k / parts);
        let (dst, ld, add) = if p == 0 {
            (out.ptr(), ldc, accumulate)
        } else {
            (bufs_out.ptr().wrapping_add((p - 1) * m * n), n, false)
        };
        // SAFETY: depth k0 < k lies inside both operands' views and the part's k1 - k0 >= 1
        // steps after it (the caller's guarantee); each part writes its own output (`c` for
        // the first, its buffer for the others), every element of it (read only when adding).
        unsafe {
            let (a, b) = (a.skip_columns(k0), b.skip_rows(k0));
            gemm_f32(
                dst,
                ld,
                (m, n, k1 - k0),
                a,
                b,
                alpha,
                add,
                Parallelism::None,
            );
        }
    };
    // The parts' sums into C, a block of rows per task, each row's in the parts' order.
    let bufs = &bufs;
    let rb = super::block_rows(m);
    let reduce = |blk: usize| {
        for i in blk * rb..(blk * rb + rb).min(m) {
            // SAFETY: row i of C is this task's alone (the caller's guarantee that nobody
            // else touches C, the blocks disjoint), written by the first part; the buffers
            // are only read now.
            let row = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * ldc), n) };
            for p in 1..parts {
                simd::add_assign(row, &bufs[(p - 1) * m * n + i * n..][..n]);
            }
        }
    };
    if matches!(par, Parallelism::None) {
        (0..parts).for_each(part);
        (0..m.div_ceil(rb)).for_each(reduce);
    } else {
        (0..parts).into_par_iter().for_each(part);
        (0..m.div_ceil(rb)).into_par_iter().for_each(reduce);
    }
}

/// [`matmul_raw`] for one attention head's product (`Parallelism::None`): on the
/// small-product kernel ([`super::small`]) where it takes the shape, unless the product runs
/// in bf16. Only for products whose shape does not depend on how the batch is split (one
/// sequence's), so a stack's halves still equal its whole batch bit for bit.
///
/// # Safety
/// As [`matmul_raw`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn head_matmul(
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    alpha: f32,
    accumulate: bool,
    bf16: bool,
) {
    let small = !(bf16 && per_head_bf16(m, n, k)) && super::small::takes(m, n, k, b_rs, b_cs);
    // SAFETY: forwarded from the caller; `takes` held for the small kernel.
    unsafe {
        if !small {
            let par = Parallelism::None;
            matmul_raw(
                c, ldc, m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, alpha, accumulate, par, bf16,
            );
        } else if !empty_product(c, ldc, m, n, k, accumulate) {
            super::small::matmul(
                c, ldc, m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, alpha, accumulate,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_deep_products_split_their_depth() {
        // TS2Vec's weight gradients over ACSF1-length crops (8 x 1500 and 8 x 3000 rows).
        assert_eq!(depth_parts(64, 192, 12_000), 4);
        assert_eq!(depth_parts(64, 192, 24_000), 8);
        // At most 16 parts, each at least 512 deep.
        assert_eq!(depth_parts(16, 16, 1 << 20), 16);
        assert_eq!(depth_parts(16, 16, 1500), 2);
        assert_eq!(depth_parts(16, 16, 1000), 1);
        // Shallower or wider: one call (256-step crops, BERT, the last TCN block).
        for (m, n, k) in [
            (64, 192, 4096),
            (256, 768, 2048),
            (128, 128, 2080),
            (320, 960, 12_000),
            (2048, 768, 256),
        ] {
            assert_eq!(depth_parts(m, n, k), 1, "{m} x {n} over {k}");
        }
        // Outputs with enough blocks for `gemm`'s own parallelism.
        assert_eq!(depth_parts(256, 512, 1 << 20), 1);
    }

    /// A split product equals the exact one to f32 rounding, overwriting or adding (with a
    /// scale, a padded output and a transposed operand), and gives the same bits on the pool
    /// as on one thread.
    #[test]
    fn a_split_depth_gives_the_product_whatever_the_threads() {
        // Four parts of 750 and 751 steps.
        let (m, n, k) = (5, 7, 3001);
        assert_eq!(depth_parts(m, n, k), 4);
        // A stored transposed (k x m, as a weight gradient's `dy^T`), B by rows (k x n).
        let a: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let ldc = n + 3;
        for accumulate in [false, true] {
            let mut outs = Vec::new();
            for (threads, par) in [
                (1, Parallelism::None),
                (2, Parallelism::Rayon(2)),
                (3, Parallelism::Rayon(3)),
            ] {
                let mut c = vec![0.25f32; m * ldc];
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| unsafe {
                    matmul_raw(
                        c.as_mut_ptr(),
                        ldc,
                        m,
                        n,
                        k,
                        a.as_ptr(),
                        1,
                        m as isize,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.5,
                        accumulate,
                        par,
                        false,
                    )
                });
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|p| f64::from(a[p * m + i]) * f64::from(b[p * n + j]))
                            .sum();
                        let want = 0.5 * exact + if accumulate { 0.25 } else { 0.0 };
                        let got = f64::from(c[i * ldc + j]);
                        assert!(
                            (got - want).abs() < 1e-5 * k as f64,
                            "({i}, {j}) accumulate {accumulate}: {got} vs {want}"
                        );
                    }
                    // The padding between rows is untouched.
                    assert_eq!(&c[i * ldc + n..(i + 1) * ldc], &[0.25; 3]);
                }
                outs.push(c);
            }
            assert!(
                outs.iter().all(|c| *c == outs[0]),
                "the thread count changed the bits"
            );
        }
    }

    /// A head's product equals `gemm`'s up to rounding where the small kernel takes it (80
    /// in every dimension), and is `gemm`'s bit for bit where it does not (81), with `B` by
    /// rows and by columns.
    #[test]
    fn head_products_match_gemm_on_both_sides_of_the_small_limit() {
        for t in [17, 80, 81] {
            for b_by_columns in [false, true] {
                let k = 32;
                let a: Vec<f32> = (0..t * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let b: Vec<f32> = (0..t * k).map(|i| (i as f32 * 0.11).cos()).collect();
                let (b_rs, b_cs) = if b_by_columns {
                    (1, k as isize)
                } else {
                    (t as isize, 1)
                };
                let (mut head, mut full) = (vec![0f32; t * t], vec![0f32; t * t]);
                unsafe {
                    let (pa, pb) = (a.as_ptr(), b.as_ptr());
                    let (ka, none) = (k as isize, Parallelism::None);
                    head_matmul(
                        head.as_mut_ptr(),
                        t,
                        t,
                        t,
                        k,
                        pa,
                        ka,
                        1,
                        pb,
                        b_rs,
                        b_cs,
                        0.5,
                        false,
                        false,
                    );
                    matmul_raw(
                        full.as_mut_ptr(),
                        t,
                        t,
                        t,
                        k,
                        pa,
                        ka,
                        1,
                        pb,
                        b_rs,
                        b_cs,
                        0.5,
                        false,
                        none,
                        false,
                    );
                }
                if t > super::super::small::MAX_DIM || !super::super::small::available() {
                    assert_eq!(head, full, "t {t}: gemm's own product");
                } else {
                    for (h, f) in head.iter().zip(&full) {
                        assert!((h - f).abs() <= 1e-5 * (1.0 + f.abs()), "t {t}: {h} vs {f}");
                    }
                }
            }
        }
    }

    /// The MLP with each block of rows through both products equals the two products with
    /// the activation between them, bit for bit: partial row panels and column panels, a
    /// hidden width over one k block, a row stride wider than the input, every activation,
    /// on one thread and on two.
    #[test]
    fn mlp_product_equals_the_two_products() {
        let (m, k, f, n, ldx) = (250, 256, 300, 260, 259);
        if !mlp_takes_bf16(m, k, f, n) {
            eprintln!(
                "skipped: no AVX-512 BF16 here, or bf16 products run on AMX tiles or in fp16 \
                 (no fused MLP)"
            );
            return;
        }
        let x: Vec<f32> = (0..m * ldx).map(|i| (i as f32 * 0.37).sin()).collect();
        let w1: Vec<f32> = (0..f * k).map(|i| (i as f32 * 0.61).cos() * 0.1).collect();
        let b1: Vec<f32> = (0..f).map(|j| j as f32 * 0.01 - 1.5).collect();
        let w2: Vec<f32> = (0..n * f).map(|i| (i as f32 * 0.29).sin() * 0.1).collect();
        let xm = MatRef {
            data: &x,
            rows: m,
            cols: k,
            ld: ldx,
        };
        let (w1m, w2m) = (MatRef::dense(&w1, f, k), MatRef::dense(&w2, n, f));
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for act in [Act::GeluErf, Act::GeluTanh, Act::Relu] {
                    let mut g = vec![f32::NAN; m * f];
                    let epi = Epilogue::BiasAct {
                        bias: &b1,
                        act,
                        act_out: None,
                    };
                    linear_product(&mut g, xm, w1m, epi, true);
                    let mut want = vec![f32::NAN; m * n];
                    let gm = MatRef::dense(&g, m, f);
                    linear_product(&mut want, gm, w2m, Epilogue::None, true);
                    let mut got = vec![f32::NAN; m * n];
                    mlp_product(&mut got, xm, w1m, &b1, act, w2m);
                    assert_eq!(got, want, "{act:?} on {threads} threads");
                }
            });
        }
    }

    /// Both paths of [`linear_product`] (f32, and bf16 where the CPU has it) with each
    /// epilogue against a naive f64 product: the bf16 one at a size its rule takes
    /// (200 x 300 x 300), with column chunks, so blocks of partial rows run too.
    #[test]
    fn linear_product_epilogues_match_naive() {
        let (m, n, k) = (200, 300, 300);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.61).cos() * 0.1).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 1.0).collect();
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k)
                    .map(|p| f64::from(x[i * k + p]) * f64::from(w[j * k + p]))
                    .sum::<f64>()
                    + f64::from(bias[j]);
            }
        }
        let paths: &[bool] = if super::super::bf16::available() {
            &[false, true]
        } else {
            &[false]
        };
        for &bf16 in paths {
            assert_eq!(bf16, bf16 && linear_takes_bf16(m, n, k));
            let tol = if bf16 { 2e-2 } else { 1e-4 };
            let (xm, wm) = (MatRef::dense(&x, m, k), MatRef::dense(&w, n, k));
            let mut y = vec![f32::NAN; m * n];
            linear_product(&mut y, xm, wm, Epilogue::Bias(&bias), bf16);
            let mut h = vec![f32::NAN; m * n];
            let mut g = vec![f32::NAN; m * n];
            let act_out = Some(OutSlice::new(&mut g));
            let epi = Epilogue::BiasAct {
                bias: &bias,
                act: Act::Relu,
                act_out,
            };
            linear_product(&mut h, xm, wm, epi, bf16);
            let mut inplace = vec![f32::NAN; m * n];
            let epi = Epilogue::BiasAct {
                bias: &bias,
                act: Act::Relu,
                act_out: None,
            };
            linear_product(&mut inplace, xm, wm, epi, bf16);
            for i in 0..m * n {
                assert_eq!(inplace[i], g[i], "bf16 {bf16}, in place, {i}");
                let close = |got: f32, want: f64| (f64::from(got) - want).abs() <= tol;
                assert!(
                    close(y[i], want[i]),
                    "bf16 {bf16}, bias, {i}: {} vs {}",
                    y[i],
                    want[i]
                );
                assert!(close(h[i], want[i]), "bf16 {bf16}, h, {i}");
                assert!(close(g[i], want[i].max(0.0)), "bf16 {bf16}, act, {i}");
            }
        }
    }

    #[test]
    fn matches_naive_product_in_every_orientation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos()).collect();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
        for (av, oa, bv, ob) in [
            (
                MatRef::dense(&a, m, k),
                Op::N,
                MatRef::dense(&b, k, n),
                Op::N,
            ),
            (
                MatRef::dense(&at, k, m),
                Op::T,
                MatRef::dense(&b, k, n),
                Op::N,
            ),
            (
                MatRef::dense(&a, m, k),
                Op::N,
                MatRef::dense(&bt, n, k),
                Op::T,
            ),
            (
                MatRef::dense(&at, k, m),
                Op::T,
                MatRef::dense(&bt, n, k),
                Op::T,
            ),
        ] {
            let mut c = vec![1f32; m * n];
            let product = |c: &mut [f32], alpha: f32, accumulate: bool| {
                matmul(
                    c,
                    n,
                    av,
                    oa,
                    bv,
                    ob,
                    alpha,
                    accumulate,
                    Parallelism::None,
                    false,
                );
            };
            product(&mut c, 2.0, true);
            for (x, w) in c.iter().zip(&want) {
                assert!((x - (1.0 + 2.0 * w)).abs() < 1e-5);
            }
            product(&mut c, 1.0, false);
            for (x, w) in c.iter().zip(&want) {
                assert!((x - w).abs() < 1e-5);
            }
        }
    }

    /// Where fp16 is usable, a linear layer whose weight is under its threshold stays f32
    /// when asked for bf16, also with rows enough for the bf16 kernels' rule (which would
    /// make a stack's halves and its whole batch take different kernels); one above it
    /// takes fp16 at any row count.
    #[test]
    fn fp16_linear_rule_counts_no_rows() {
        if reduced_precision_kernel() != ReducedKernel::Avx512Fp16 {
            eprintln!("skipped: no AVX-512 FP16 (or AMX takes the bf16 products) here");
            return;
        }
        let run = |m: usize, width: usize, bf16: bool| {
            let x: Vec<f32> = (0..m * width).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..width * width)
                .map(|i| (i as f32 * 0.61).cos() * 0.1)
                .collect();
            let mut y = vec![0f32; m * width];
            let (xm, wm) = (MatRef::dense(&x, m, width), MatRef::dense(&w, width, width));
            linear_product(&mut y, xm, wm, Epilogue::None, bf16);
            y
        };
        // 128 x 128: 1536 rows reach 16 M multiply-adds, 768 do not; f32 in both.
        assert!(linear_takes_bf16(1536, 128, 128) && !linear_takes_bf16(768, 128, 128));
        assert_eq!(run(1536, 128, true), run(1536, 128, false));
        // 256 x 256 takes fp16 with 20 rows as with 2000.
        assert_ne!(run(20, 256, true), run(20, 256, false));
        assert_eq!(run(2000, 256, true)[..20 * 256], run(20, 256, true)[..]);
    }

    /// Where fp16 is the reduced precision, a product with a narrow side (a convolution's
    /// 64 x 192 weight gradient over a long series) stays f32 when asked for bf16, bit for
    /// bit; one wide on both sides takes fp16.
    #[test]
    fn fp16_skips_products_with_a_narrow_side() {
        if reduced_precision_kernel() != ReducedKernel::Avx512Fp16 {
            eprintln!("skipped: no AVX-512 FP16 (or AMX takes the bf16 products) here");
            return;
        }
        let run = |m: usize, n: usize, k: usize, bf16: bool| {
            let a: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos()).collect();
            // The weight gradient's orientation: `A^T B`, both stored depth-major.
            let (am, bm) = (MatRef::dense(&a, k, m), MatRef::dense(&b, k, n));
            product(am, Op::T, bm, Op::N, bf16)
        };
        assert!(linear_takes_bf16(64, 192, 2400) && !fp16_takes_product(64, 192));
        assert_eq!(run(64, 192, 2400, true), run(64, 192, 2400, false));
        assert!(linear_takes_bf16(256, 256, 1024) && fp16_takes_product(256, 256));
        assert_ne!(run(256, 256, 1024, true), run(256, 256, 1024, false));
    }

    #[test]
    fn bf16_is_taken_only_by_large_products_and_only_when_asked() {
        if !super::super::bf16::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let run = |m: usize, k: usize, n: usize, bf16: bool| {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos()).collect();
            let mut c = vec![0f32; m * n];
            matmul(
                &mut c,
                n,
                MatRef::dense(&a, m, k),
                Op::N,
                MatRef::dense(&b, k, n),
                Op::N,
                1.0,
                false,
                threads(),
                bf16,
            );
            c
        };
        // Relative L2 distance: bf16 keeps 8 significant bits (0.2-0.4% per operand), and
        // these sums cancel, so the relative error of the result is larger (1.2% here).
        let gap = |x: &[f32], y: &[f32]| {
            let d: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let n: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (d / n).sqrt()
        };
        // 256^3 = 16 M multiply-adds: a linear product large enough for bf16.
        let (f32s, bf16s) = (run(256, 256, 256, false), run(256, 256, 256, true));
        let g = gap(&bf16s, &f32s);
        assert!(g > 1e-4 && g < 3e-2, "bf16 vs f32 gap {g:e}");
        // 64^3 stays f32 even when asked.
        assert_eq!(run(64, 64, 64, true), run(64, 64, 64, false));
    }
}

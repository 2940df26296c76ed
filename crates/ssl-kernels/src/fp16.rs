//! Reduced-precision products in IEEE half precision on AVX-512 FP16: the path the `bf16`
//! setting's whole-batch products take on Intel CPUs that have AVX-512 FP16 but no usable
//! AMX (Sapphire, Emerald and Granite Rapids in a VM that hides the tiles): a linear layer's
//! forward `x W^T`, input gradient `g W` and weight gradient `g^T x` (each operand with rows
//! or columns contiguous, [`takes`]).
//!
//! Why: on those cores `vdpbf16ps` retires at a quarter of the f32 FMA's instruction rate, so
//! bf16 products run at half the f32 rate, while `vfmadd231ph` retires at the f32 FMA's rate
//! with 32 lanes, twice the multiply-adds (measured on family 6 model 207, one core, 24
//! independent accumulators with the `A` element broadcast from memory: 5.8e9 per second,
//! against 5.5e9 for `vfmadd231ps`).
//!
//! Precision, at least that of bf16 operands with f32 sums:
//! - each row of `A` and each column of `B` is scaled by a power of two (exact, undone on the
//!   output) so that its largest magnitude lies in [8, 16), then rounded to fp16 (11
//!   significant bits against bf16's 8; nothing overflows, and an element underflows only
//!   below 2^-24 of its row's largest);
//! - the products are summed in fp16 over [`KC`] = 64 terms at a time (so a partial sum stays
//!   below 64 * 16 * 16 = 16384, under fp16's 65504), and each such sum is added to an f32
//!   total;
//! - a depth past [`KB`] = 1024 runs as blocks of at most 1024 steps, each with its own
//!   scalings (so each block's packed operands stay in cache, and a long sum's parts are
//!   scaled to their own magnitudes), the blocks' unscaled results added in f32.
//!
//! On random data (k = 256 and 1024, with outliers) the mean error relative to
//! `sum |x_k w_k|` was half that of bf16-rounded operands with exact sums (1.7e-4 against
//! 3.3e-4 at k = 256, 8.5e-5 against 1.8e-4 at k = 1024; with chunks of 32 terms 0.4x). The
//! tests hold the kernel to an exact emulation of this arithmetic, bit for bit.

#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::amx::depth_blocks;
use super::amx::Strided;
#[cfg(target_arch = "x86_64")]
use super::bf16::{lanes, transpose16, with_buf};
use super::gemm::{Epilogue, OutSlice};

/// Rows of `C` per micro-kernel call.
const MR: usize = 12;
/// Columns of `C` per micro-kernel call (two vectors of 32 fp16 lanes).
const NR: usize = 64;
/// Terms summed in fp16 before they join the f32 total.
const KC: usize = 64;
/// Bytes of packed `W` one pass over the rows keeps hot (about half of a 2 MB L2).
const B_GROUP_BYTES: usize = 1 << 20;
/// Most depth steps packed and summed as one block (a multiple of [`KC`]): a longer depth
/// runs as blocks, each with its own scalings, their unscaled results added in f32.
const KB: usize = 1024;

/// True when this CPU has AVX-512 FP16 (with AVX-512F, BW and VL), checked once.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512fp16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The power of two that brings a row whose largest magnitude is `max` into [8, 16) (1 for
/// a row of zeros or with an infinity; a NaN may or may not reach `max`, and propagates to
/// the output either way).
fn scale_exp(max: f32) -> i32 {
    if !(max > 0.0 && max.is_finite()) {
        return 0;
    }
    let e = ((max.to_bits() >> 23) & 0xff) as i32 - 127;
    (3 - e).clamp(-126, 126)
}

/// `2^e` for `e` in [-126, 127].
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Whether [`gemm`] takes these strides: `A` with contiguous rows or contiguous columns, and
/// `B` likewise (the layouts of a linear layer's three products), each other stride positive.
pub(crate) fn takes(a: (isize, isize), b: (isize, isize)) -> bool {
    let ok = |(rs, cs): (isize, isize)| (cs == 1 && rs > 0) || (rs == 1 && cs > 0);
    ok(a) && ok(b)
}

/// `c = x W^T` (`x` m x k with row stride `ldx`, `W` n x k with row stride `ldw`), then
/// `epilogue`: [`gemm`] for a linear layer's forward.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn linear(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    epilogue: Epilogue,
) {
    let a = Strided {
        ptr: x,
        rs: ldx as isize,
        cs: 1,
    };
    let b = Strided {
        ptr: w,
        rs: 1,
        cs: ldw as isize,
    };
    // SAFETY: forwarded from the caller.
    unsafe { gemm(c, ldc, (m, n, k), a, b, 1.0, false, usize::MAX, epilogue) };
}

/// `c = alpha * A B` (or `c += ...` when `accumulate`; `A` m x k, `B` k x n, `c` m x n with
/// row stride `ldc`), then `epilogue` on each block of rows while it is in cache; blocks of
/// rows spread over the rayon pool, or run on this thread when `threads` is 1. Each row of `c` depends only on its
/// row of `A`, so a split of the rows gives the same bits as the whole.
///
/// # Safety
/// [`available`] must be true and [`takes`] the strides; the views must lie inside their
/// buffers and `c`'s elements (and the epilogue's output) must not be accessed by anyone
/// else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    alpha: f32,
    accumulate: bool,
    threads: usize,
    epilogue: Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if m == 0 || n == 0 {
            return;
        }
        let np = n.div_ceil(NR) * NR;
        let parallel = threads > 1 && rayon::current_num_threads() > 1;
        // Possibly uninitialised (`gemm::product`): only written through the pointer.
        let out = OutSlice::from_raw(c, (m - 1) * ldc + n);
        // Four micro-kernel row blocks per job (each pass over a group of panels serves them
        // all), fewer where that would leave threads under eight jobs to balance.
        let rows_per_job = [4 * MR, 2 * MR]
            .into_iter()
            .find(|&r| !parallel || m.div_ceil(r) >= 8)
            .unwrap_or(MR);
        let jobs = m.div_ceil(rows_per_job);
        // Depth blocks of at most KB (one when k <= KB).
        for (k0, kd, last) in depth_blocks(k, KB) {
            let kp = kd.div_ceil(KC).max(1) * KC;
            // The block's columns of `A` and rows of `B`.
            // SAFETY: k0 < k (or k0 = 0), so column (row) k0 lies inside the view.
            let (ad, bd) = unsafe { (a.skip_columns(k0), b.skip_rows(k0)) };
            // Every block after the first adds to what the ones before wrote.
            let add = accumulate || k0 > 0;
            with_buf(&PACKED_W, |pw| {
                // SAFETY: forwarded from the caller.
                unsafe { pack_b(bd, n, kd, kp, pw, parallel) };
                let pw = &*pw;
                let job = |job: usize| {
                    let r0 = job * rows_per_job;
                    let rows = rows_per_job.min(m - r0);
                    with_buf(&PACKED_X, |px| {
                        // SAFETY: rows r0.. of `A` lie inside it (the caller's guarantee);
                        // this job alone writes rows r0..r0 + rows of `c`; the CPU was
                        // checked.
                        unsafe {
                            pack_a(ad, r0, rows, kd, kp, px);
                            block(out.ptr(), ldc, r0, rows, n, np, kp, px, pw, (alpha, add));
                            if last {
                                epilogue.apply(out.ptr(), ldc, r0, rows, 0, n);
                            }
                        }
                    });
                };
                if parallel {
                    (0..jobs).into_par_iter().for_each(job);
                } else {
                    (0..jobs).for_each(job);
                }
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (c, ldc, m, n, k, a, b, alpha, accumulate, threads, epilogue);
        unreachable!("fp16 kernels run only where `available()` is true (x86-64)")
    }
}

/// One operand in fp16: `data` its packed elements, `exp[i]` the power of two row (or
/// column) `i` was scaled by (`2^exp[i]`; the output undoes it).
#[derive(Default)]
struct Packed {
    data: Vec<u16>,
    exp: Vec<i32>,
}

impl Packed {
    /// Room for `elements` packed values (as a previous call left them: the packer writes
    /// every one the kernel reads) and `scales` exponents, 0.
    fn reset(&mut self, elements: usize, scales: usize) {
        if self.data.len() < elements {
            self.data.resize(elements, 0);
        }
        self.exp.clear();
        self.exp.resize(scales, 0);
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static PACKED_W: RefCell<Packed> = RefCell::new(Packed::default());
    static PACKED_X: RefCell<Packed> = RefCell::new(Packed::default());
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Round-to-nearest-even conversion of 16 floats to fp16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn to_fp16(v: __m512) -> __m256i {
    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

/// The largest magnitude of `k` floats from `p`.
///
/// # Safety
/// `p..p + k` must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max(p: *const f32, k: usize) -> f32 {
    let mut m = _mm512_setzero_ps();
    let mut i = 0;
    while i < k {
        // SAFETY: the masked load reads only the k elements (the caller's guarantee).
        let v = unsafe { _mm512_maskz_loadu_ps(lanes(k - i), p.add(i)) };
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
        i += 16;
    }
    _mm512_reduce_max_ps(m)
}

/// Rows `r0..r0 + rows` of `A` into fp16 blocks of [`MR`] rows, each block `[kp][MR]`
/// (k-major: a depth step's 12 elements side by side, as the micro-kernel broadcasts them;
/// zeros past k and past the rows), each row scaled into [8, 16). `A`'s rows contiguous
/// ([`pack_x`]), or its columns (then a depth step's rows are contiguous already).
///
/// # Safety
/// The rows must be readable; [`takes`] holds for `A`'s strides.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_a(a: Strided, r0: usize, rows: usize, k: usize, kp: usize, out: &mut Packed) {
    if a.cs == 1 {
        // SAFETY: row r0 and the following lie inside `A` (the caller's guarantee).
        let first = unsafe { a.ptr.offset(r0 as isize * a.rs) };
        // SAFETY: as above.
        unsafe { pack_x(first, a.rs as usize, rows, k, kp, out) };
        return;
    }
    let rp = rows.div_ceil(MR) * MR;
    out.reset(rp * kp, rp);
    // Column kk of the block: `rows` contiguous floats at `col(kk)`.
    // SAFETY: the block's rows and k columns lie inside `A`.
    let col = |kk: usize| unsafe { a.ptr.offset(r0 as isize + kk as isize * a.cs) };
    let mut scale = vec![0f32; rp];
    // SAFETY: columns 0..k of the block, `rows` floats each.
    unsafe { run_scales(col, k, rows, &mut scale, &mut out.exp) };
    // Each block's row mask and scales.
    let blocks: Vec<(u16, __m512)> = (0..rows)
        .step_by(MR)
        .map(|i0| {
            let mask = lanes((rows - i0).min(MR));
            // SAFETY: MR floats of `scale` (rp >= i0 + MR), masked to the block's rows.
            (mask, unsafe {
                _mm512_maskz_loadu_ps(mask, scale.as_ptr().add(i0))
            })
        })
        .collect();
    // Column by column, so each column's run of rows is read once for all the blocks.
    let data = out.data.as_mut_ptr();
    for kk in 0..k {
        for (b, &(mask, sv)) in blocks.iter().enumerate() {
            // SAFETY: the masked load reads block b's rows of column kk; the masked store
            // writes MR fp16 of depth step kk inside block b (rp * kp elements in all).
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, col(kk).add(b * MR));
                let h = to_fp16(_mm512_mul_ps(x, sv));
                _mm256_mask_storeu_epi16(data.add(b * MR * kp + kk * MR).cast(), FULL_ROWS, h);
            }
        }
    }
    for b in 0..blocks.len() {
        out.data[b * MR * kp + k * MR..(b + 1) * MR * kp].fill(0);
    }
}

/// The store mask of one depth step's [`MR`] fp16 in a k-major block.
#[cfg(target_arch = "x86_64")]
const FULL_ROWS: u16 = (1 << MR) - 1;

/// Transposes `blk` (16 rows of 16 scaled floats) and stores its first `count` rows (at most
/// 16), each as the fp16 lanes of `keep` at `dst(t)`: the packers' 16 x 16 register
/// transposes.
///
/// # Safety
/// Each `dst(t)`, `t < count`, must have room for the lanes of `keep`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_transposed(
    blk: &mut [__m512i; 16],
    count: usize,
    keep: u16,
    dst: impl Fn(usize) -> *mut u16,
) {
    transpose16(blk);
    for (t, v) in blk.iter().enumerate().take(count) {
        let h = to_fp16(_mm512_castsi512_ps(*v));
        // SAFETY: the caller's guarantee.
        unsafe { _mm256_mask_storeu_epi16(dst(t).cast(), keep, h) };
    }
}

/// For each of `width` positions, the scaling of its largest magnitude over `runs` runs of
/// `width` contiguous floats (run `l` at `at(l)`): `scale[i] = 2^exp[i]` (rows of an `A`
/// given by columns, columns of a `B` given by rows).
///
/// # Safety
/// Every run must be readable; `scale` and `exp` hold at least `width` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_scales(
    at: impl Fn(usize) -> *const f32,
    runs: usize,
    width: usize,
    scale: &mut [f32],
    exp: &mut [i32],
) {
    for i0 in (0..width).step_by(16) {
        let mask = lanes(width - i0);
        let mut m = _mm512_setzero_ps();
        for l in 0..runs {
            // SAFETY: the masked load reads positions i0.. of run l.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, at(l).add(i0)) };
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
        }
        let mut maxes = [0f32; 16];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(maxes.as_mut_ptr(), m) };
        for (t, &mx) in maxes.iter().enumerate().take(width - i0) {
            let e = scale_exp(mx);
            scale[i0 + t] = pow2(e);
            exp[i0 + t] = e;
        }
    }
}

/// `B` (k x n) into panels of [`NR`] columns, each `[kp][NR]` fp16, each column scaled into
/// [8, 16); padding zeros. `B`'s columns contiguous (`W^T`) or its rows. The panels are
/// independent: spread over the rayon pool when `parallel`.
///
/// # Safety
/// `B` must be readable; [`takes`] holds for its strides.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_b(b: Strided, n: usize, k: usize, kp: usize, out: &mut Packed, parallel: bool) {
    let np = n.div_ceil(NR) * NR;
    out.reset(np * kp, np);
    let panel = |(p, (data, exp)): (usize, (&mut [u16], &mut [i32]))| {
        // SAFETY: columns p * NR.. (at most NR, below n) of `B` are readable (the caller's
        // guarantee); `data` and `exp` are this panel's.
        unsafe { pack_b_panel(b, p * NR, NR.min(n - p * NR), k, data, exp) }
    };
    let (data, exp) = (&mut out.data[..np * kp], &mut out.exp[..np]);
    if parallel && np > NR {
        data.par_chunks_mut(kp * NR)
            .zip(exp.par_chunks_mut(NR))
            .enumerate()
            .for_each(panel);
    } else {
        data.chunks_mut(kp * NR)
            .zip(exp.chunks_mut(NR))
            .enumerate()
            .for_each(panel);
    }
}

/// Columns `j0..j0 + count` (`count <= NR`) of `B` (its first `k` rows) into one panel
/// `data` (`[kp][NR]` fp16, zeros past k and past `count`) and their exponents into `exp`:
/// `W`'s rows (`B`'s columns contiguous) transposed by 16 x 16 register blocks, or `B`'s
/// rows as they are.
///
/// # Safety
/// Those columns of `B` (its first `k` rows) must be readable; [`takes`] holds for its
/// strides.
///
/// # Panics
/// Unless `count <= NR`, `data` holds at least `k` depth steps of `NR` and `exp` `count`
/// exponents (the stores below rely on it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_b_panel(
    b: Strided,
    j0: usize,
    count: usize,
    k: usize,
    data: &mut [u16],
    exp: &mut [i32],
) {
    assert!(
        count <= NR && data.len() >= k * NR && exp.len() >= count,
        "fp16 panel out of bounds"
    );
    // What the stores below leave unwritten: depth past k, and columns past `count` in the
    // last panel (a partial strip of 16 is written whole, its extra lanes zero).
    if count < NR {
        data.fill(0);
    } else {
        data[k * NR..].fill(0);
    }
    let mut scale = [0f32; NR];
    if b.rs == 1 {
        // W = B^T: row j of W (column j of B) at stride b.cs.
        let ldw = b.cs as usize;
        // SAFETY: row j0 + j of W lies inside it (the caller's guarantee).
        let w = |j: usize| unsafe { b.ptr.add((j0 + j) * ldw) };
        for j in 0..count {
            // SAFETY: as above, k floats.
            (exp[j], scale[j]) = unsafe { row_scale(w(j), k) };
        }
        let mut blk = [_mm512_setzero_si512(); 16];
        for s0 in (0..count).step_by(16) {
            for k0 in (0..k).step_by(16) {
                // SAFETY: rows s0..s0 + 16 below count of W, depth k0.. masked to k.
                unsafe {
                    load_scaled(&mut blk, count - s0, lanes(k - k0), &scale[s0..], |t| {
                        w(s0 + t).add(k0)
                    })
                };
                let base = data.as_mut_ptr();
                // SAFETY: 16 fp16 at row k0 + t, column s0 lie inside the panel (s0 + 16 <=
                // NR).
                unsafe {
                    store_transposed(&mut blk, k - k0, 0xFFFF, |t| base.add((k0 + t) * NR + s0))
                };
            }
        }
        return;
    }
    // SAFETY: row kk of `B` lies inside it; columns j0.. of it are read below.
    let row = |kk: usize| unsafe { b.ptr.offset(kk as isize * b.rs).add(j0) };
    // SAFETY: rows 0..k of `B`, `count` floats each from column j0.
    unsafe { run_scales(row, k, count, &mut scale, exp) };
    for s0 in (0..count).step_by(16) {
        let mask = lanes(count - s0);
        let sv = _mm512_loadu_ps(scale[s0..s0 + 16].as_ptr());
        for kk in 0..k {
            // SAFETY: the masked load reads columns s0.. of row kk; 16 fp16 at the store lie
            // inside the panel's row kk.
            unsafe {
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row(kk).add(s0)), sv);
                _mm256_storeu_si256(data.as_mut_ptr().add(kk * NR + s0).cast(), to_fp16(v));
            }
        }
    }
}

/// A row's scaling: the exponent that brings its largest magnitude into [8, 16)
/// ([`scale_exp`]) and the factor `2^exponent`.
///
/// # Safety
/// `p..p + k` must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_scale(p: *const f32, k: usize) -> (i32, f32) {
    // SAFETY: forwarded from the caller.
    let e = scale_exp(unsafe { row_max(p, k) });
    (e, pow2(e))
}

/// `blk[t]` = the 16 floats at `row(t)` (lanes of `mask`, the rest zero) times `scale[t]`,
/// for the first `count` rows (at most 16); zero for the others: the packers' input to
/// [`store_transposed`].
///
/// # Safety
/// The `mask` lanes at `row(t)`, `t < count.min(16)`, must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_scaled(
    blk: &mut [__m512i; 16],
    count: usize,
    mask: u16,
    scale: &[f32],
    row: impl Fn(usize) -> *const f32,
) {
    for (t, v) in blk.iter_mut().enumerate() {
        *v = if t < count {
            // SAFETY: the caller's guarantee.
            let r = unsafe { _mm512_maskz_loadu_ps(mask, row(t)) };
            _mm512_castps_si512(_mm512_mul_ps(r, _mm512_set1_ps(scale[t])))
        } else {
            _mm512_setzero_si512()
        };
    }
}

/// Rows `x` (`rows` x k, stride `ldx`) into fp16 blocks of [`MR`] rows, each `[kp][MR]`
/// (k-major, zeros past k and past the rows), each row scaled into [8, 16); transposed by
/// 16 x 16 register blocks (the last four rows of each zero).
///
/// # Safety
/// The rows must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_x(x: *const f32, ldx: usize, rows: usize, k: usize, kp: usize, out: &mut Packed) {
    let rp = rows.div_ceil(MR) * MR;
    out.reset(rp * kp, rp);
    let mut scale = [0f32; MR];
    let mut blk = [_mm512_setzero_si512(); 16];
    for i0 in (0..rows).step_by(MR) {
        let n = (rows - i0).min(MR);
        for (t, s) in scale.iter_mut().enumerate().take(n) {
            // SAFETY: row i0 + t lies inside `x` (the caller's guarantee).
            (out.exp[i0 + t], *s) = unsafe { row_scale(x.add((i0 + t) * ldx), k) };
        }
        // Depth steps from `kz` on are zeros, filled below.
        let kz = k.div_ceil(16) * 16;
        let base = out.data.as_mut_ptr().wrapping_add(i0 * kp);
        for k0 in (0..kz).step_by(16) {
            // SAFETY: rows i0..i0 + n lie inside `x`, depth k0.. masked to k.
            unsafe {
                load_scaled(&mut blk, n, lanes(k - k0), &scale, |t| {
                    x.add((i0 + t) * ldx + k0)
                })
            };
            // SAFETY: depth steps k0..k0 + 16 <= kp (a multiple of 16) of the block: MR fp16
            // each at base + (k0 + j) MR, inside it.
            unsafe { store_transposed(&mut blk, 16, FULL_ROWS, |j| base.add((k0 + j) * MR)) };
        }
        out.data[i0 * kp + kz * MR..(i0 + MR) * kp].fill(0);
    }
}

/// The factors `(2^e1, 2^e2)`, `e1 + e2 = -s`, that undo the scalings `2^s` (`s` the sum of
/// a row's and a column's exponents, each in [-126, 126]; `e1` clamped to [-126, 127], `e2`
/// the rest), each within f32's normal range: the output is `tile * 2^e2 * 2^e1`, exact
/// unless the true result itself leaves that range (then rounded once).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn unscale(s: __m512i) -> (__m512, __m512) {
    let e = _mm512_sub_epi32(_mm512_setzero_si512(), s);
    let e1 = _mm512_max_epi32(
        _mm512_min_epi32(e, _mm512_set1_epi32(127)),
        _mm512_set1_epi32(-126),
    );
    let e2 = _mm512_sub_epi32(e, e1);
    let f = |x: __m512i| {
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            x,
            _mm512_set1_epi32(127),
        )))
    };
    (f(e1), f(e2))
}

/// Rows `r0..r0 + rows` of `c` from the packed rows `px` and the packed `W`: for each group
/// of panels (about [`B_GROUP_BYTES`] of `W`), each block of [`MR`] rows, each panel, the
/// micro-kernel's f32 tile, unscaled into `c`.
///
/// # Safety
/// `c` must hold those rows (stride `ldc`, n columns) and nobody else may touch them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    c: *mut f32,
    ldc: usize,
    r0: usize,
    rows: usize,
    n: usize,
    np: usize,
    kp: usize,
    px: &Packed,
    pw: &Packed,
    (alpha, accumulate): (f32, bool),
) {
    let mut tile = [0f32; MR * NR];
    let av = _mm512_set1_ps(alpha);
    let panels = np / NR;
    let group = (B_GROUP_BYTES / (NR * kp * 2)).max(1);
    for g0 in (0..panels).step_by(group) {
        for i in 0..rows.div_ceil(MR) {
            let block_rows = MR.min(rows - i * MR);
            for p in g0..(g0 + group).min(panels) {
                // SAFETY: the packed row block and panel hold kp x MR and kp x NR fp16.
                unsafe {
                    kernel(
                        px.data.as_ptr().add(i * MR * kp),
                        pw.data.as_ptr().add(p * NR * kp),
                        kp / KC,
                        tile.as_mut_ptr(),
                    )
                };
                let cols = NR.min(n - p * NR);
                for r in 0..block_rows {
                    let ea = _mm512_set1_epi32(px.exp[i * MR + r]);
                    // SAFETY: row r0 + i * MR + r of `c`, columns p * NR.. (cols of them).
                    let dst = unsafe { c.add((r0 + i * MR + r) * ldc + p * NR) };
                    for q in 0..cols.div_ceil(16) {
                        let t = &tile[r * NR + q * 16..][..16];
                        let eb = &pw.exp[p * NR + q * 16..][..16];
                        let mask = lanes(cols - q * 16);
                        // SAFETY: 16 floats and 16 exponents; the masked load and store touch
                        // the row's columns below n.
                        unsafe {
                            let eb = _mm512_loadu_si512(eb.as_ptr().cast());
                            let (f1, f2) = unscale(_mm512_add_epi32(ea, eb));
                            // The remainder first (exact unless the result leaves f32's
                            // range), then the clamped factor: one rounding at most.
                            let v = _mm512_mul_ps(_mm512_loadu_ps(t.as_ptr()), f2);
                            let mut v = _mm512_mul_ps(_mm512_mul_ps(v, f1), av);
                            if accumulate {
                                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst.add(q * 16)), v);
                            }
                            _mm512_mask_storeu_ps(dst.add(q * 16), mask, v);
                        }
                    }
                }
            }
        }
    }
}

// One k step of the micro-kernel: `B`'s two vectors of 32 columns, then for each of the 12
// rows its `A` element broadcast from memory into both accumulators. `$d` is the step's
// index from the `A` and `B` pointers; `A` is k-major, a step's 12 elements 24 bytes apart
// from the next step's (one line of `A` serves more than two steps: measured ~15% faster
// than rows of `A` at a stride, family 6 model 207).
macro_rules! fmas {
    ($d:literal; $($r:literal $a0:literal $a1:literal),*) => { concat!(
        "vmovups ", $d, "*128({pb}), %zmm0\n",
        "vmovups ", $d, "*128+64({pb}), %zmm1\n",
        $("vfmadd231ph ", $d, "*24+", $r, "*2({a}){{1to32}}, %zmm0, %zmm", $a0, "\n",
          "vfmadd231ph ", $d, "*24+", $r, "*2({a}){{1to32}}, %zmm1, %zmm", $a1, "\n",)*
    ) };
}
// Row r's accumulators are zmm(8 + 2r) (columns 0-31) and zmm(9 + 2r) (columns 32-63).
macro_rules! kstep {
    ($d:literal) => { fmas!($d; 0 8 9, 1 10 11, 2 12 13, 3 14 15, 4 16 17, 5 18 19, 6 20 21,
        7 22 23, 8 24 25, 9 26 27, 10 28 29, 11 30 31) };
}
// The fp16 accumulators widened to f32 and added into the tile (`$op` "add") or written
// over it (the first chunk); tile offsets in bytes, row stride NR floats.
macro_rules! flush {
    (add; $($acc:literal $off:literal),*) => { concat!($(
        "vcvtph2ps %ymm", $acc, ", %zmm4\n",
        "vaddps ", $off, "({ct}), %zmm4, %zmm4\n",
        "vmovups %zmm4, ", $off, "({ct})\n",
        "vextractf64x4 $1, %zmm", $acc, ", %ymm5\n",
        "vcvtph2ps %ymm5, %zmm5\n",
        "vaddps ", $off, "+64({ct}), %zmm5, %zmm5\n",
        "vmovups %zmm5, ", $off, "+64({ct})\n",
    )*) };
    (store; $($acc:literal $off:literal),*) => { concat!($(
        "vcvtph2ps %ymm", $acc, ", %zmm4\n",
        "vmovups %zmm4, ", $off, "({ct})\n",
        "vextractf64x4 $1, %zmm", $acc, ", %ymm5\n",
        "vcvtph2ps %ymm5, %zmm5\n",
        "vmovups %zmm5, ", $off, "+64({ct})\n",
    )*) };
}
macro_rules! tile {
    ($op:ident) => {
        flush!($op; 8 0, 9 128, 10 256, 11 384, 12 512, 13 640, 14 768, 15 896, 16 1024,
            17 1152, 18 1280, 19 1408, 20 1536, 21 1664, 22 1792, 23 1920, 24 2048, 25 2176,
            26 2304, 27 2432, 28 2560, 29 2688, 30 2816, 31 2944)
    };
}
macro_rules! zero {
    ($($acc:literal),*) => { concat!($("vpxord %zmm", $acc, ", %zmm", $acc, ", %zmm", $acc, "\n",)*) };
}

/// The 12 x 64 micro-kernel: `tile` (12 x 64 f32, row stride 64) = the sum over `chunks`
/// chunks of [`KC`] k steps of each chunk's fp16 sum (fp16 FMAs, one rounding each),
/// widened to f32. `a` holds `chunks * KC` steps of 12 fp16 (k-major), `pb` as many steps
/// of 64 fp16.
///
/// # Safety
/// The CPU must have AVX-512 FP16; `a`, `pb` and `tile` must hold what is described above,
/// `chunks` at least 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512fp16")]
unsafe fn kernel(a: *const u16, pb: *const u16, chunks: usize, tile: *mut f32) {
    // SAFETY: reads chunks * KC * 12 fp16 from `a`, chunks * KC * NR from `pb`, and
    // writes the 12 x 64 tile (the caller's guarantee); clobbers only the registers named.
    unsafe {
        std::arch::asm!(
            "2:",
            zero!(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
                28, 29, 30, 31),
            "mov ${steps}, {inner:e}",
            "3:",
            kstep!(0),
            kstep!(1),
            "add $48, {a}",
            "add $256, {pb}",
            "dec {inner:e}",
            "jnz 3b",
            "test {first:e}, {first:e}",
            "jz 4f",
            "xor {first:e}, {first:e}",
            tile!(store),
            "jmp 5f",
            "4:",
            tile!(add),
            "5:",
            "dec {chunks}",
            "jnz 2b",
            a = inout(reg) a => _,
            pb = inout(reg) pb => _,
            chunks = inout(reg) chunks => _,
            ct = in(reg) tile,
            inner = out(reg) _,
            first = inout(reg) 1u32 => _,
            steps = const KC / 2,
            out("zmm0") _, out("zmm1") _, out("zmm4") _, out("zmm5") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _,
            out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _,
            out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _,
            out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(att_syntax, nostack),
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `x` rounded to fp16 (nearest even; infinity past the largest finite), as f64.
    fn round_fp16(x: f64) -> f64 {
        if x == 0.0 || !x.is_finite() {
            return x;
        }
        if x.abs() >= 65520.0 {
            return f64::INFINITY.copysign(x);
        }
        let e = (((x.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023).max(-14);
        let q = 2f64.powi(e - 10);
        (x / q).round_ties_even() * q
    }

    /// The module's arithmetic, emulated, one depth block of at most KB at a time: each
    /// row's part in the block scaled and rounded to fp16, fp16 FMAs (a*b + c exact in f64,
    /// then one rounding) over chunks of KC, each chunk's sum added to an f32 total, the total
    /// unscaled as `block` does (`2^(e - e1)`, then `2^e1`). One m x n result per block.
    fn emulate_blocks(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<Vec<f32>> {
        let mut blocks = Vec::new();
        for k0 in (0..k.max(1)).step_by(KB) {
            let k1 = (k0 + KB).min(k);
            let exps = |v: &[f32], rows: usize| -> Vec<i32> {
                (0..rows)
                    .map(|i| {
                        scale_exp(
                            v[i * k + k0..i * k + k1]
                                .iter()
                                .fold(0f32, |a, b| a.max(b.abs())),
                        )
                    })
                    .collect()
            };
            let (sx, sw) = (exps(x, m), exps(w, n));
            let mut out = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut total = 0f32;
                    for c0 in (k0..k1.max(k0 + 1)).step_by(KC) {
                        let mut acc = 0f64;
                        for kk in c0..(c0 + KC).min(k1) {
                            let a = round_fp16((x[i * k + kk] * pow2(sx[i])) as f64);
                            let b = round_fp16((w[j * k + kk] * pow2(sw[j])) as f64);
                            acc = round_fp16(a * b + acc);
                        }
                        total += acc as f32;
                    }
                    let e = -(sw[j] + sx[i]);
                    let e1 = e.clamp(-126, 127);
                    out[i * n + j] = total * pow2(e - e1) * pow2(e1);
                }
            }
            blocks.push(out);
        }
        blocks
    }

    /// [`emulate_blocks`]' blocks added in order, in f32: the product `c = x W^T`.
    fn emulate(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut blocks = emulate_blocks(x, w, m, n, k).into_iter();
        let mut out = blocks.next().unwrap_or_default();
        for b in blocks {
            out.iter_mut().zip(&b).for_each(|(o, v)| *o += v);
        }
        out
    }

    fn run(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        // Padding past each row of `c` must stay untouched.
        let ldc = n + 3;
        let mut c = vec![7f32; m * ldc];
        // SAFETY: the views lie inside the vectors; the CPU was checked by the caller.
        unsafe {
            linear(
                c.as_mut_ptr(),
                ldc,
                (m, n, k),
                x.as_ptr(),
                k,
                w.as_ptr(),
                k,
                Epilogue::None,
            )
        };
        for row in c.chunks(ldc) {
            assert!(row[n..].iter().all(|&v| v == 7.0), "padding written");
        }
        c.chunks(ldc).flat_map(|r| r[..n].to_vec()).collect()
    }

    /// `len` pseudo-random values in [-scale, scale], every eleventh 40 times larger.
    pub(crate) fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * scale * if i % 11 == 0 { 40.0 } else { 1.0 }
            })
            .collect()
    }

    #[test]
    fn equals_the_emulated_arithmetic_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        // Row tails (1-25 rows against blocks of 12), column tails (panels of 64, stores of
        // 16), depth tails (chunks of 64), and rows of very different magnitudes.
        for (m, n, k) in [
            (1, 1, 1),
            (12, 64, 32),
            (13, 70, 40),
            (25, 130, 100),
            (7, 17, 65),
            (49, 16, 3),
        ] {
            let mut x = data(m * k, 1 + m as u64, 1.0);
            let mut w = data(n * k, 7 + n as u64, 0.05);
            if m > 2 {
                x[..k].iter_mut().for_each(|v| *v *= 1e-7);
                x[k..2 * k].iter_mut().for_each(|v| *v *= 3e8);
                // A row and a column near 1e-20: their scalings sum past 2^126, undone in two
                // factors (the product, ~1e-40, is subnormal in f32).
                x[2 * k..3 * k].iter_mut().for_each(|v| *v *= 1e-20);
                w[..k].iter_mut().for_each(|v| *v *= 2e-19);
            }
            let got = run(&x, &w, m, n, k);
            let want = emulate(&x, &w, m, n, k);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "({m},{n},{k}) element {i}: {g} vs {e}"
                );
            }
        }
    }

    /// Both layouts of each operand (rows or columns contiguous), scaled (by a power of two
    /// and not) and accumulated into `c`, one thread and the pool, panels in one group of
    /// `W` and in two: the emulation, bit for bit.
    #[test]
    fn every_layout_equals_the_emulated_arithmetic() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        // (5, 300, 2100): three depth blocks (the last of 52 steps), five panels each, one
        // depth block of x's second row and w's second column at 2^-20 of the rest (a scaling
        // over the whole depth would leave them fp16 subnormals); (2, 600, 1024): one block of
        // ten panels of 128 KB, two groups of them; (30, 130, 300): three row blocks by three
        // panels, the depth's last chunk partial; (200, 40, 40): jobs of four row blocks on
        // one thread, of two on two.
        for (m, n, k) in [
            (1, 1, 1),
            (13, 70, 40),
            (50, 17, 130),
            (33, 64, 64),
            (5, 300, 2100),
            (2, 600, 1024),
            (30, 130, 300),
            (200, 40, 40),
        ] {
            let mut x = data(m * k, 23 + m as u64, 1.0);
            let mut w = data(n * k, 29 + n as u64, 0.05);
            if k > KB {
                let tiny = pow2(-20);
                x[k + KB..k + 2 * KB].iter_mut().for_each(|v| *v *= tiny);
                w[k..k + KB].iter_mut().for_each(|v| *v *= tiny);
            }
            let want = emulate_blocks(&x, &w, m, n, k);
            let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            // (pointer, row stride, column stride) of A (m x k) and B = W^T (k x n).
            let a_views = [(x.as_ptr(), k as isize, 1), (xt.as_ptr(), 1, m as isize)];
            let b_views = [(w.as_ptr(), 1, k as isize), (wt.as_ptr(), n as isize, 1)];
            for (ap, ars, acs) in a_views {
                for (bp, brs, bcs) in b_views {
                    assert!(takes((ars, acs), (brs, bcs)));
                    for (threads, alpha) in [(1, 2.0f32), (2, 0.3)] {
                        let ldc = n + 2;
                        let mut c = vec![1f32; m * ldc];
                        let (a, b) = (
                            Strided {
                                ptr: ap,
                                rs: ars,
                                cs: acs,
                            },
                            Strided {
                                ptr: bp,
                                rs: brs,
                                cs: bcs,
                            },
                        );
                        // SAFETY: the views and the output cover the test's buffers.
                        unsafe {
                            gemm(
                                c.as_mut_ptr(),
                                ldc,
                                (m, n, k),
                                a,
                                b,
                                alpha,
                                true,
                                threads,
                                Epilogue::None,
                            )
                        };
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j];
                                // Each depth block's result, times alpha, added in turn.
                                let e = if j < n {
                                    want.iter().fold(1.0, |c, b| c + b[i * n + j] * alpha)
                                } else {
                                    1.0
                                };
                                assert_eq!(
                                    got.to_bits(),
                                    e.to_bits(),
                                    "({m},{n},{k}) A strides ({ars},{acs}) B ({brs},{bcs}) at ({i},{j})"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(!takes((2, 2), (1, 4)) && !takes((4, 1), (0, 1)));
    }

    /// `A B` (views that cover m x k and k x n) on this thread alone, so that this thread's
    /// packing buffers are the ones a later call reuses.
    fn one_thread(a: Strided, b: Strided, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        // SAFETY: the caller's views cover their buffers; `c` holds m x n and is ours.
        unsafe {
            gemm(
                c.as_mut_ptr(),
                n,
                (m, n, k),
                a,
                b,
                1.0,
                false,
                1,
                Epilogue::None,
            )
        };
        c
    }

    /// The packed `A` is reused between calls without zeroing: its padding (depth past k, rows
    /// past m) must be rewritten by each call. Infinities left by a larger product would turn
    /// into NaN against `B`'s zero padding if any survived; the next, smaller product must
    /// still equal the emulation, for `A` by rows and by columns.
    #[test]
    fn stale_packed_values_do_not_reach_a_smaller_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let n = 20;
        let product = |x: &[f32], m: usize, k: usize, by_columns: bool| {
            let w = data(n * k, 31, 0.05);
            let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
            let a = if by_columns {
                Strided {
                    ptr: xt.as_ptr(),
                    rs: 1,
                    cs: m as isize,
                }
            } else {
                Strided {
                    ptr: x.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                }
            };
            let b = Strided {
                ptr: w.as_ptr(),
                rs: 1,
                cs: k as isize,
            };
            (one_thread(a, b, (m, n, k)), emulate(x, &w, m, n, k))
        };
        for by_columns in [false, true] {
            let _ = product(&vec![f32::INFINITY; 13 * 100], 13, 100, by_columns);
            let x = data(5 * 40, 37, 1.0);
            let (got, want) = product(&x, 5, 40, by_columns);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    g.is_finite(),
                    "stale values reached the output (columns: {by_columns})"
                );
                assert_eq!(g.to_bits(), e.to_bits(), "columns: {by_columns}");
            }
        }
    }

    /// The packed `B` is reused between calls without zeroing too: in a full panel its depth
    /// padding (past k, up to the chunk of 64) must be rewritten by each call. Infinities left
    /// there by a longer product would meet `A`'s zero padding as NaN; the next, shorter
    /// product must still equal the emulation, for `B` given by rows and by columns.
    #[test]
    fn stale_packed_b_does_not_reach_a_shorter_product() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let (m, n) = (3, 64);
        let product = |x: &[f32], w: &[f32], k: usize, b_by_rows: bool| {
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let b = if b_by_rows {
                Strided {
                    ptr: wt.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                }
            } else {
                Strided {
                    ptr: w.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                }
            };
            let a = Strided {
                ptr: x.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            one_thread(a, b, (m, n, k))
        };
        for b_by_rows in [false, true] {
            let _ = product(
                &data(m * 200, 51, 1.0),
                &[f32::INFINITY; 64 * 200],
                200,
                b_by_rows,
            );
            let (x, w) = (data(m * 40, 53, 1.0), data(n * 40, 59, 0.05));
            let got = product(&x, &w, 40, b_by_rows);
            for (g, e) in got.iter().zip(&emulate(&x, &w, m, n, 40)) {
                assert!(
                    g.is_finite(),
                    "stale values reached the output (B by rows: {b_by_rows})"
                );
                assert_eq!(g.to_bits(), e.to_bits(), "B by rows: {b_by_rows}");
            }
        }
    }

    #[test]
    fn error_is_below_that_of_bf16_operands() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let bf16 = |x: f32| {
            let b = x.to_bits();
            f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
        };
        for (m, n, k) in [(24, 64, 256), (13, 40, 1024)] {
            let x = data(m * k, 3, 1.0);
            let w = data(n * k, 5, 0.05);
            let got = run(&x, &w, m, n, k);
            let (mut ours, mut theirs) = (0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut abs, mut b16) = (0f64, 0f64, 0f64);
                    for kk in 0..k {
                        let (a, b) = (x[i * k + kk], w[j * k + kk]);
                        exact += a as f64 * b as f64;
                        abs += (a as f64 * b as f64).abs();
                        b16 += bf16(a) as f64 * bf16(b) as f64;
                    }
                    ours += (got[i * n + j] as f64 - exact).abs() / abs;
                    theirs += (b16 - exact).abs() / abs;
                }
            }
            let cells = (m * n) as f64;
            eprintln!(
                "({m},{n},{k}): mean error / sum |x w|: {:.2e} here, {:.2e} with bf16 operands",
                ours / cells,
                theirs / cells
            );
            assert!(
                ours < 0.6 * theirs,
                "({m},{n},{k}): mean error {ours} against bf16's {theirs}"
            );
        }
    }

    #[test]
    fn infinities_and_nans_propagate_and_zero_rows_give_zeros() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let (m, n, k) = (3, 5, 40);
        let mut x = data(m * k, 11, 1.0);
        x[..k].fill(0.0);
        x[k + 3] = f32::NAN;
        x[2 * k + 1] = f32::INFINITY;
        let w = data(n * k, 13, 0.1);
        let got = run(&x, &w, m, n, k);
        assert!(got[..n].iter().all(|&v| v == 0.0), "{:?}", &got[..n]);
        assert!(
            got[n..2 * n].iter().all(|v| v.is_nan()),
            "{:?}",
            &got[n..2 * n]
        );
        assert!(
            got[2 * n..].iter().all(|v| !v.is_finite()),
            "{:?}",
            &got[2 * n..]
        );
    }

    /// Over several depth blocks the epilogue runs once, after the last (a ReLU of a partial
    /// sum would not equal this).
    #[test]
    fn the_epilogue_runs_once_after_the_last_depth_block() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let (m, n, k) = (5, 20, KB + 40);
        let x = data(m * k, 41, 1.0);
        let w = data(n * k, 43, 0.05);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 - 3.0).collect();
        let mut c = vec![0f32; m * n];
        // SAFETY: the views lie inside the vectors; the CPU was checked above.
        unsafe {
            linear(
                c.as_mut_ptr(),
                n,
                (m, n, k),
                x.as_ptr(),
                k,
                w.as_ptr(),
                k,
                Epilogue::BiasAct {
                    bias: &bias,
                    act: crate::Act::Relu,
                    act_out: None,
                },
            )
        };
        let want = emulate(&x, &w, m, n, k);
        for (i, (g, e)) in c.iter().zip(&want).enumerate() {
            let relu = (e + bias[i % n]).max(0.0);
            assert_eq!(g.to_bits(), relu.to_bits(), "element {i}");
        }
    }

    #[test]
    fn rows_split_over_jobs_equal_one_job() {
        if !available() {
            eprintln!("skipped: no AVX-512 FP16 on this CPU");
            return;
        }
        let (m, n, k) = (100, 70, 50);
        let x = data(m * k, 17, 1.0);
        let w = data(n * k, 19, 0.05);
        let whole = run(&x, &w, m, n, k);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = pool.install(|| run(&x, &w, m, n, k));
        let tail = run(&x[37 * k..], &w, m - 37, n, k);
        assert_eq!(whole, serial);
        assert_eq!(&whole[37 * n..], &tail[..]);
    }
}

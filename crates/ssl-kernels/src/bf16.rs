//! Matrix products with bf16 inputs and f32 accumulation, on AVX-512 BF16 (`vdpbf16ps`).
//!
//! This is what PyTorch's CPU autocast does to a matmul: both operands are rounded to bf16
//! (round to nearest even), every product is summed in f32, and the result is f32. Master
//! weights, gradients, activations and everything outside the products stay f32. The operands
//! are converted while they are packed, so callers pass the same f32 views as to the f32 path.
//!
//! Layout (GotoBLAS style): `k` is cut into blocks of [`KC`]; for each block `B` is packed into
//! panels of [`NR`] columns, each a sequence of k-pairs holding `NR` 32-bit words (the two bf16
//! of one column, lower half first), and `A` into panels of [`MR`] rows, each a sequence of
//! k-pairs holding `MR` words. The micro-kernel keeps an `MR x NR` tile of `C` in 24 registers
//! and issues two `vdpbf16ps` per row and k-pair. An odd `k`'s last pair is zero-padded in
//! the packed buffers; partial tiles are stored with masks, so the rows and columns a partial
//! panel lacks may hold stale words (the lanes they feed are never stored).

use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::gemm::Epilogue;

/// Rows of the micro-kernel's tile.
const MR: usize = 12;
/// Columns of the micro-kernel's tile (two 16-lane vectors).
const NR: usize = 32;
/// Depth of one k block (a multiple of 2).
const KC: usize = 256;
/// Largest row block one job packs.
const MC: usize = 144;

/// True when this CPU runs the bf16 kernels (AVX-512F, AVX-512BW and AVX-512 BF16), checked
/// once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` rounded to bf16 (nearest, ties to even), as the upper half of an f32's bits. NaN
/// stays NaN.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16
}

/// `x` rounded to bf16 and widened back to f32 (what the kernel multiplies).
#[cfg(test)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(to_bf16(x) << 16)
}

/// A strided read-only matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

// SAFETY: a View is only read, and the caller of `gemm_bf16` guarantees the memory outlives
// the call and is not written during it.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// The same matrix from row `i` on (a method, so closures capture the whole view).
    ///
    /// # Safety
    /// Row `i` must lie inside the matrix.
    unsafe fn rows_on(&self, i: usize) -> View {
        View {
            // SAFETY: forwarded from the caller.
            ptr: unsafe { self.ptr.offset(i as isize * self.rs) },
            ..*self
        }
    }

    /// The packed word of rows `(2q, 2q + 1)` at column `j` of the transposed reading, i.e.
    /// elements `(p, j)` and `(p + 1, j)` with `p = p0 + 2q`, zero past `pend`.
    #[inline(always)]
    unsafe fn pair(&self, i: usize, p: usize, pend: usize) -> u32 {
        // SAFETY: (i, p) and (i, p + 1) lie inside the matrix when below pend.
        unsafe {
            let lo = to_bf16(*self.ptr.offset(i as isize * self.rs + p as isize * self.cs));
            let hi = if p + 1 < pend {
                to_bf16(
                    *self
                        .ptr
                        .offset(i as isize * self.rs + (p + 1) as isize * self.cs),
                )
            } else {
                0
            };
            lo | (hi << 16)
        }
    }
}

/// Packs `count` (at most `stride`) lines `[l0, l0 + count)` of `v` (element `(line, p)`)
/// over depth `[p0, pend)` into `out[q * stride + line]`, choosing the vector path the
/// strides allow (an odd depth's last pair has a zero upper half). Lines `count..stride` are
/// left as they were: they feed only tile rows or columns that the kernel's masked stores
/// discard (each `vdpbf16ps` lane is independent).
fn pack_panel(
    v: View,
    l0: usize,
    count: usize,
    p0: usize,
    pend: usize,
    out: &mut [u32],
    stride: usize,
) {
    let kc2 = (pend - p0).div_ceil(2);
    debug_assert!(count <= stride && out.len() >= kc2 * stride);
    // SAFETY: lines l0..l0 + count and depth p0..pend lie inside `v`'s matrix; `out` holds
    // kc2 * stride words; the vector paths run only where `available()` (checked by the
    // caller of gemm_bf16).
    unsafe {
        if v.cs == 1 {
            for h in 0..count.div_ceil(16) {
                let c = (count - 16 * h).min(16);
                pack_k_contiguous(
                    v,
                    l0 + 16 * h,
                    c,
                    p0,
                    pend,
                    out.as_mut_ptr().add(16 * h),
                    stride,
                );
            }
        } else if v.rs == 1 {
            pack_lines_contiguous(v.ptr, v.cs, l0, count, p0, pend, out.as_mut_ptr(), stride);
        } else {
            for l in 0..count {
                for q in 0..kc2 {
                    out[q * stride + l] = v.pair(l0 + l, p0 + 2 * q, pend);
                }
            }
        }
    }
}

/// Packs lines `[l0, l0 + count)` (`count <= stride`) of the strided matrix `(ptr, rs, cs)`
/// (element `(line, p)` at `ptr + line * rs + p * cs`) over depth `[0, k)` into pair words
/// `out[q * stride + l]`: the bf16 of `(l0 + l, 2q)` in the low half, of `(l0 + l, 2q + 1)` in
/// the high half (zero past `k`), the layout `TDPBF16PS` reads its `B` tile in (AMX, with
/// `stride` 16). Any strides; the vector paths of [`gemm_bf16`]'s packing.
///
/// # Safety
/// [`available`] must be true; the `count x k` elements must be valid; `out` holds
/// `ceil(k / 2) * stride` words.
pub(crate) unsafe fn pack_pairs(
    (ptr, rs, cs): (*const f32, isize, isize),
    l0: usize,
    count: usize,
    k: usize,
    out: &mut [u32],
    stride: usize,
) {
    pack_panel(View { ptr, rs, cs }, l0, count, 0, k, out, stride);
}

/// Converts rows `[i0, i0 + rows)` of the row-major matrix `(ptr, rs)` (depth contiguous)
/// over depth `[0, k)` to bf16 pair words, row `r` at `out[r * ld..]` (word `q` = the bf16 of
/// `2q` low, `2q + 1` high, zero past `k`): the layout of AMX's `A` tile rows.
///
/// # Safety
/// [`available`] must be true; the `rows x k` elements must be valid; `out` holds
/// `(rows - 1) * ld + ceil(k / 2)` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn convert_rows(
    (ptr, rs): (*const f32, isize),
    i0: usize,
    rows: usize,
    k: usize,
    out: &mut [u32],
    ld: usize,
) {
    let kc2 = k.div_ceil(2);
    assert!(
        rows == 0 || out.len() >= (rows - 1) * ld + kc2,
        "pair buffer too small"
    );
    for r in 0..rows {
        // SAFETY: row i0 + r holds k valid elements (the caller's guarantee); loads are
        // masked to them, stores to the row's kc2 words inside `out` (asserted).
        unsafe {
            let src = ptr.offset((i0 + r) as isize * rs);
            let dst = out.as_mut_ptr().add(r * ld);
            for q0 in (0..kc2).step_by(16) {
                let left = k - 2 * q0;
                let (m0, m1) = (lanes(left), lanes(left.saturating_sub(16)));
                let x0 = _mm512_maskz_loadu_ps(m0, src.add(2 * q0));
                // `wrapping_add`: with an empty mask the address may lie past the row.
                let x1 = _mm512_maskz_loadu_ps(m1, src.wrapping_add(2 * q0 + 16));
                let w = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0));
                _mm512_mask_storeu_epi32(dst.add(q0).cast(), lanes(kc2 - q0), w);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn convert_rows(
    _a: (*const f32, isize),
    _i0: usize,
    _rows: usize,
    _k: usize,
    _out: &mut [u32],
    _ld: usize,
) {
    unreachable!("bf16 kernels run only where `available()` is true (x86-64 with AVX-512 BF16)")
}

/// Packs rows `[i0, i0 + rows)` x depth `[p0, pend)` of `a` (element `(i, p)`) into panels of
/// `MR` rows: `out[panel][q][r]`. The buffer only grows and is not cleared (see
/// [`pack_panel`] on a partial panel's stale words).
fn pack_a(a: View, i0: usize, rows: usize, p0: usize, pend: usize, out: &mut Vec<u32>) {
    let kc2 = (pend - p0).div_ceil(2);
    let panels = rows.div_ceil(MR);
    if out.len() < panels * kc2 * MR {
        out.resize(panels * kc2 * MR, 0);
    }
    for pi in 0..panels {
        let panel = &mut out[pi * kc2 * MR..(pi + 1) * kc2 * MR];
        pack_panel(a, i0 + pi * MR, MR.min(rows - pi * MR), p0, pend, panel, MR);
    }
}

/// Packs depth `[p0, pend)` x columns `[j0, j0 + NR)` (clipped to `n`) of `b` (element
/// `(p, j)`) into one panel `out[q][c]` of `ceil((pend - p0) / 2) * NR` words.
fn pack_b_panel(b: View, n: usize, j0: usize, p0: usize, pend: usize, out: &mut [u32]) {
    // Reading b transposed: element (p, j) is bt(j, p) with swapped strides.
    let bt = View {
        ptr: b.ptr,
        rs: b.cs,
        cs: b.rs,
    };
    pack_panel(bt, j0, NR.min(n - j0), p0, pend, out, NR);
}

/// Lane mask of the first `n` (at most 16) lanes (also `small`'s).
#[inline(always)]
pub(crate) fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Packs `lines` (at most 16) lines of `v` whose elements are contiguous along the depth
/// (`v.cs == 1`; line `l` starts at `v.ptr + (l0 + l) * v.rs`) into `out[q * stride + l]`:
/// each line's 32 consecutive floats become 16 pair words, and a 16 x 16 transpose turns the
/// lines' words into rows of `out`.
///
/// # Safety
/// The lines and depth range must lie inside `v`'s matrix, `out` must hold
/// `ceil((pend - p0) / 2) * stride` words with `stride >= lines`, and the CPU must have
/// AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_k_contiguous(
    v: View,
    l0: usize,
    lines: usize,
    p0: usize,
    pend: usize,
    out: *mut u32,
    stride: usize,
) {
    let kc2 = (pend - p0).div_ceil(2);
    let store = lanes(lines.min(stride));
    let mut words = [_mm512_setzero_si512(); 16];
    // SAFETY: loads are masked to the depth range, stores to the lines and pairs present.
    unsafe {
        for qb in (0..kc2).step_by(16) {
            let p = p0 + 2 * qb;
            let left = pend - p;
            let (m0, m1) = (lanes(left), lanes(left.saturating_sub(16)));
            for (l, w) in words.iter_mut().enumerate() {
                *w = if l < lines {
                    let src = v.ptr.offset((l0 + l) as isize * v.rs + p as isize);
                    let x0 = _mm512_maskz_loadu_ps(m0, src);
                    // `wrapping_add`: with an empty mask the address may lie past the buffer.
                    let x1 = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0))
                } else {
                    _mm512_setzero_si512()
                };
            }
            transpose16(&mut words);
            for (qq, w) in words.iter().enumerate().take(kc2 - qb) {
                _mm512_mask_storeu_epi32(out.add((qb + qq) * stride).cast(), store, *w);
            }
        }
    }
}

/// Packs `count` (at most `stride`) consecutive lines that are contiguous across lines (line
/// `l`'s element at depth `p` is at `ptr + (l0 + l) + p * pstride`) into `out[q * stride + l]`:
/// two depth rows at a time are converted together into 32 bf16 (the first row's 16 then the
/// second's) and one word permutation interleaves them into 16 pair words.
///
/// # Safety
/// As [`pack_k_contiguous`], and the CPU must have AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_lines_contiguous(
    ptr: *const f32,
    pstride: isize,
    l0: usize,
    count: usize,
    p0: usize,
    pend: usize,
    out: *mut u32,
    stride: usize,
) {
    let kc2 = (pend - p0).div_ceil(2);
    // Word 2j of the result takes word j (row p, line j), word 2j + 1 takes word 16 + j (row
    // p + 1, line j).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    // SAFETY: loads and stores are masked to the lines present.
    unsafe {
        for h in 0..count.div_ceil(16) {
            let mask = lanes(count - 16 * h);
            let base = ptr.add(l0 + 16 * h);
            for q in 0..kc2 {
                let p = p0 + 2 * q;
                let lo = _mm512_maskz_loadu_ps(mask, base.offset(p as isize * pstride));
                let hi = if p + 1 < pend {
                    _mm512_maskz_loadu_ps(mask, base.offset((p + 1) as isize * pstride))
                } else {
                    _mm512_setzero_ps()
                };
                let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                let w = _mm512_permutexvar_epi16(idx, both);
                _mm512_mask_storeu_epi32(out.add(q * stride + 16 * h).cast(), mask, w);
            }
        }
    }
}

/// In-place transpose of a 16 x 16 matrix of 32-bit words held as 16 rows (also `small`'s,
/// for f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    // Pairs of rows interleaved within 128-bit lanes.
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // 4 x 4 transposes within 128-bit lanes: u[4i + j], lane L holds rows 4i..4i+4 at
    // column 4L + j.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // 4 x 4 transposes of 128-bit lanes across u[j], u[4 + j], u[8 + j], u[12 + j].
    for j in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[j], u[4 + j]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
        let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + j], u[12 + j]);
        r[j] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        r[4 + j] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
        r[8 + j] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        r[12 + j] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_k_contiguous(
    _v: View,
    _l0: usize,
    _lines: usize,
    _p0: usize,
    _pend: usize,
    _out: *mut u32,
    _stride: usize,
) {
    unreachable!("bf16 kernels run only where `available()` is true (x86-64 with AVX-512 BF16)")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_lines_contiguous(
    _ptr: *const f32,
    _pstride: isize,
    _l0: usize,
    _count: usize,
    _p0: usize,
    _pend: usize,
    _out: *mut u32,
    _stride: usize,
) {
    unreachable!("bf16 kernels run only where `available()` is true (x86-64 with AVX-512 BF16)")
}

thread_local! {
    static A_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static B_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer `key`, or on a fresh one if it is in use (a rayon worker
/// waiting in one product may steal a job that runs another). Also `small`'s.
pub(crate) fn with_buf<T: Default, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut T::default()),
    })
}

thread_local! {
    static ATTENTION_BUF: RefCell<AttentionBuf> = RefCell::new(AttentionBuf::default());
}

/// One thread's buffers for [`attention_head`]: packed K^T and V, the packed row panel of Q
/// or P, and the f32 scores of one row panel.
#[derive(Default)]
struct AttentionBuf {
    kt: Vec<u32>,
    v: Vec<u32>,
    a: Vec<u32>,
    s: Vec<f32>,
}

/// One attention head with bf16 products: for each panel of [`MR`] query rows, the scores
/// `scale * Q K^T` land in a small f32 buffer, `probs(r0, scores)` turns them in place into
/// the rows `r0..` of the matrix that multiplies V (softmax, and whatever the caller saves or
/// drops), and the panel's rows of `P V` are written to `ctx`. The scores of a panel stay in
/// L1 from the first product to the second, and P is packed straight from there.
///
/// `q`, `k` and `v` are `t x dh` with row stride `ld`; `ctx` is `t x dh` with row stride
/// `ldc`. Each output element comes from the same micro-kernel over the same depth order as
/// [`gemm_bf16`]'s AVX-512 path with one k block, so for `t, dh <= KC` the result equals two
/// such `gemm_bf16` calls with a softmax between them, bit for bit (not used where the
/// products take AMX tiles).
///
/// # Safety
/// [`available`] must be true; the `t x dh` views of `q`, `k`, `v` and `ctx` must be valid,
/// and `ctx`'s must not be read or written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_head(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    ld: usize,
    t: usize,
    dh: usize,
    scale: f32,
    ctx: *mut f32,
    ldc: usize,
    mut probs: impl FnMut(usize, &mut [f32]),
) {
    if t == 0 || dh == 0 {
        return;
    }
    let ld = ld as isize;
    let (kc2_q, kc2_v) = (dh.div_ceil(2), t.div_ceil(2));
    let (t_panels, dh_panels) = (t.div_ceil(NR), dh.div_ceil(NR));
    with_buf(&ATTENTION_BUF, |buf| {
        let AttentionBuf { kt, v: vb, a, s } = buf;
        // K^T (dh x t: element (p, j) is K[j][p]) and V (t x dh), packed once per head.
        for (buf, words) in [
            (&mut *kt, t_panels * kc2_q * NR),
            (&mut *vb, dh_panels * kc2_v * NR),
        ] {
            if buf.len() < words {
                buf.resize(words, 0);
            }
        }
        let kv = View {
            ptr: k,
            rs: 1,
            cs: ld,
        };
        for (pj, panel) in kt.chunks_mut(kc2_q * NR).take(t_panels).enumerate() {
            pack_b_panel(kv, t, pj * NR, 0, dh, panel);
        }
        let vv = View {
            ptr: v,
            rs: ld,
            cs: 1,
        };
        for (pj, panel) in vb.chunks_mut(kc2_v * NR).take(dh_panels).enumerate() {
            pack_b_panel(vv, dh, pj * NR, 0, t, panel);
        }
        if s.len() < MR * t {
            s.resize(MR * t, 0.0);
        }
        let qv = View {
            ptr: q,
            rs: ld,
            cs: 1,
        };
        for r0 in (0..t).step_by(MR) {
            let rows = MR.min(t - r0);
            let scores = &mut s[..rows * t];
            pack_a(qv, r0, rows, 0, dh, a);
            for pj in 0..t_panels {
                // SAFETY: the tile (0.., pj * NR..) of rows x cols lies inside `scores`; the
                // packed panels hold kc2_q pairs; the CPU features are the caller's
                // guarantee.
                unsafe {
                    kernel(
                        kc2_q,
                        a.as_ptr(),
                        kt.as_ptr().add(pj * kc2_q * NR),
                        scores.as_mut_ptr().add(pj * NR),
                        t,
                        rows,
                        NR.min(t - pj * NR),
                        scale,
                        true,
                    );
                }
            }
            probs(r0, scores);
            let pv = View {
                ptr: scores.as_ptr(),
                rs: t as isize,
                cs: 1,
            };
            pack_a(pv, 0, rows, 0, t, a);
            for pj in 0..dh_panels {
                // SAFETY: rows r0.. x columns pj * NR.. of ctx lie inside its view (the
                // caller's guarantee); the packed panels hold kc2_v pairs.
                unsafe {
                    kernel(
                        kc2_v,
                        a.as_ptr(),
                        vb.as_ptr().add(pj * kc2_v * NR),
                        ctx.add(r0 * ldc + pj * NR),
                        ldc,
                        rows,
                        NR.min(dh - pj * NR),
                        1.0,
                        true,
                    );
                }
            }
        }
    })
}

/// The output pointer, shared by jobs that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: jobs write disjoint tiles of C (see `gemm_bf16`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` elements on (a method, so closures capture the whole wrapper).
    ///
    /// # Safety
    /// The offset must stay inside the output.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

/// All of B packed: for each k block of [`KC`], its `n_panels` panels of [`NR`] columns.
struct PackedB<'a> {
    words: &'a [u32],
    n: usize,
    k: usize,
    n_panels: usize,
}

/// Depth range `[p0, pend)` of k block `kb` of a depth `k`.
fn k_block(kb: usize, k: usize) -> (usize, usize) {
    (kb * KC, (kb * KC + KC).min(k))
}

impl PackedB<'_> {
    /// Depth range `[p0, pend)` of k block `kb`.
    fn block(&self, kb: usize) -> (usize, usize) {
        k_block(kb, self.k)
    }

    fn k_blocks(&self) -> usize {
        self.k.div_ceil(KC)
    }

    /// Panel `pj` of k block `kb`: `ceil(depth / 2) * NR` words.
    fn panel(&self, kb: usize, pj: usize) -> &[u32] {
        let (p0, pend) = self.block(kb);
        let kc2 = (pend - p0).div_ceil(2);
        // Block kb starts at word kb * KC / 2 * n_panels * NR (KC is even).
        let start = kb * (KC / 2) * self.n_panels * NR + pj * kc2 * NR;
        &self.words[start..start + kc2 * NR]
    }
}

/// Packs all of `b` (`k x n`) into `buf` (which only grows and is not cleared: see
/// `pack_b_panel` on stale words), in one parallel pass over (k block, panel) when
/// `parallel`.
fn pack_b_all(b: View, n: usize, k: usize, parallel: bool, buf: &mut Vec<u32>) -> PackedB<'_> {
    let n_panels = n.div_ceil(NR);
    let k_blocks = k.div_ceil(KC);
    let total: usize = (0..k_blocks)
        .map(|kb| {
            let (p0, pend) = k_block(kb, k);
            (pend - p0).div_ceil(2) * n_panels * NR
        })
        .sum();
    if buf.len() < total {
        buf.resize(total, 0);
    }
    // (depth range, first column, panel) of every panel.
    type Job<'b> = ((usize, usize), usize, &'b mut [u32]);
    let mut panels: Vec<Job> = Vec::with_capacity(k_blocks * n_panels);
    let mut rest: &mut [u32] = &mut buf[..total];
    for kb in 0..k_blocks {
        let depth = k_block(kb, k);
        let panel_words = (depth.1 - depth.0).div_ceil(2) * NR;
        let (this, tail) = rest.split_at_mut(panel_words * n_panels);
        rest = tail;
        for (pj, panel) in this.chunks_mut(panel_words).enumerate() {
            panels.push((depth, pj * NR, panel));
        }
    }
    let fill = |((p0, pend), j0, panel): Job| pack_b_panel(b, n, j0, p0, pend, panel);
    if parallel {
        panels.into_par_iter().for_each(fill);
    } else {
        panels.into_iter().for_each(fill);
    }
    PackedB {
        words: &buf[..total],
        n,
        k,
        n_panels,
    }
}

/// `c = alpha * a b` (or `c += ...` when `accumulate`) for the first `rows` rows of `a` and
/// the column panels `[pan0, pan1)` of the packed `b`, `c` pointing at the block's first row
/// (leading dimension `ldc`); `abuf` is the packing buffer of A.
///
/// # Safety
/// [`available`] must be true; `a`'s rows and `c`'s `rows x` panel columns must be valid,
/// and that block of `c` must belong to the caller alone.
#[allow(clippy::too_many_arguments)]
unsafe fn product_rows(
    b: &PackedB,
    a: View,
    rows: usize,
    (pan0, pan1): (usize, usize),
    c: OutPtr,
    ldc: usize,
    alpha: f32,
    accumulate: bool,
    abuf: &mut Vec<u32>,
) {
    for kb in 0..b.k_blocks() {
        let (p0, pend) = b.block(kb);
        let kc2 = (pend - p0).div_ceil(2);
        let first = kb == 0 && !accumulate;
        pack_a(a, 0, rows, p0, pend, abuf);
        for pj in pan0..pan1 {
            let j0 = pj * NR;
            let cols = NR.min(b.n - j0);
            let pb = b.panel(kb, pj);
            for pi in 0..rows.div_ceil(MR) {
                let pa = &abuf[pi * kc2 * MR..(pi + 1) * kc2 * MR];
                let r0 = pi * MR;
                // SAFETY: the tile (r0.., j0..) of size MR.min(rows - r0) x cols lies inside
                // the caller's block of C; the kernel's features are the caller's guarantee.
                unsafe {
                    kernel(
                        kc2,
                        pa.as_ptr(),
                        pb.as_ptr(),
                        c.at(r0 * ldc + j0),
                        ldc,
                        MR.min(rows - r0),
                        cols,
                        alpha,
                        first,
                    );
                }
            }
        }
    }
}

/// How a product's `m` rows are cut into jobs on `threads` threads: blocks of at most [`MC`]
/// rows (a multiple of [`MR`]), their count rounded up to a multiple of the threads so they
/// finish together. Returns (rows per block, blocks).
fn job_rows(m: usize, threads: usize) -> (usize, usize) {
    let blocks = m.div_ceil(MC).div_ceil(threads) * threads;
    let mc = m.div_ceil(blocks).div_ceil(MR) * MR;
    (mc, m.div_ceil(mc))
}

/// `c = alpha * op(a) op(b)` (or `c += ...` when `accumulate`) with bf16-rounded operands and
/// f32 accumulation, then `epilogue` on each finished block of C. `a` is `m x k` with element `(i, p)` at `a + i * a_rs + p * a_cs`, `b` is
/// `k x n` likewise, `c` is row-major with leading dimension `ldc`. `threads > 1` spreads the
/// work over rayon's pool.
///
/// # Safety
/// [`available`] must be true; every addressed element must be valid; `c`'s `m x n` view must
/// not be read or written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
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
    threads: usize,
    epilogue: Epilogue,
) {
    // SAFETY: forwarded from the caller.
    if unsafe { super::gemm::empty_product(c, ldc, m, n, k, accumulate) } {
        // SAFETY: as above (an empty depth leaves C zero or as it was).
        unsafe { epilogue.apply(c, ldc, 0, m, 0, n) };
        return;
    }
    if let Some(backend) = super::amx::backend() {
        // The same product on AMX tiles: B (k x n) read as B^T (n x k) with swapped strides.
        let a = super::amx::Strided {
            ptr: a,
            rs: a_rs,
            cs: a_cs,
        };
        let bt = super::amx::Strided {
            ptr: b,
            rs: b_cs,
            cs: b_rs,
        };
        // SAFETY: forwarded from the caller; `Tiles` only where `available`.
        unsafe {
            super::amx::gemm(
                backend,
                c,
                ldc,
                (m, n, k),
                a,
                bt,
                alpha,
                accumulate,
                epilogue,
                threads > 1,
            )
        };
        return;
    }
    let av = View {
        ptr: a,
        rs: a_rs,
        cs: a_cs,
    };
    let bv = View {
        ptr: b,
        rs: b_rs,
        cs: b_cs,
    };
    let out = OutPtr(c);
    let threads = threads.max(1);
    // Row blocks enough to feed every thread; when there are too few rows, column chunks too.
    let (mc, m_blocks) = job_rows(m, threads);
    let n_panels = n.div_ceil(NR);
    let n_chunks = if threads > 1 {
        (2 * threads).div_ceil(m_blocks).clamp(1, n_panels)
    } else {
        1
    };
    let panels_per_chunk = n_panels.div_ceil(n_chunks);
    let n_chunks = n_panels.div_ceil(panels_per_chunk);
    let parallel = threads > 1;
    with_buf(&B_BUF, |bbuf| {
        // All of B is packed first, so the products below need one parallel pass, not two
        // per k block.
        let packed_b = pack_b_all(bv, n, k, parallel, bbuf);
        // One job: rows [i0, i0 + rows) x a chunk of column panels, over every k block.
        let job = |jb: usize| {
            let (mb, nc) = (jb / n_chunks, jb % n_chunks);
            let i0 = mb * mc;
            let rows = mc.min(m - i0);
            let pan0 = nc * panels_per_chunk;
            let pan1 = (pan0 + panels_per_chunk).min(n_panels);
            // SAFETY: row i0 lies inside A.
            let a_rows = unsafe { av.rows_on(i0) };
            with_buf(&A_BUF, |abuf| {
                // SAFETY: rows [i0, i0 + rows) x the chunk's panels belong to this job alone;
                // the rest is the caller's guarantee.
                unsafe {
                    product_rows(
                        &packed_b,
                        a_rows,
                        rows,
                        (pan0, pan1),
                        OutPtr(out.at(i0 * ldc)),
                        ldc,
                        alpha,
                        accumulate,
                        abuf,
                    )
                };
            });
            // The job's block is finished and still in cache.
            // SAFETY: rows [i0, i0 + rows) x columns [j0, j1) belong to this job alone.
            unsafe {
                epilogue.apply(out.at(0), ldc, i0, rows, pan0 * NR, (pan1 * NR).min(n));
            }
        };
        let jobs = m_blocks * n_chunks;
        if parallel && jobs > 1 {
            (0..jobs).into_par_iter().for_each(job);
        } else {
            (0..jobs).for_each(job);
        }
    });
}

thread_local! {
    /// One job's intermediate rows between two products ([`with_scratch`]).
    static ROWS_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The MLP without backward, `c = act(x W1^T + b1) W2^T` (`x` `m x k` row-major with leading
/// dimension `ldx`, `W1` `f x k`, `W2` `n x f`, both row-major and dense; `c` `m x n` dense),
/// with both products in bf16 (f32 sums). Each job takes a block of rows through both
/// products: its `rows x f` hidden block stays in this thread's buffer (in L2) from the first
/// product, through the activation, into the second, instead of going out to memory and
/// back. Every element is computed as by the two [`gemm_bf16`] calls (on AVX-512 BF16, not
/// AMX) with the activation between them, bit for bit. Panics without AVX-512 BF16
/// ([`available`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mlp_bf16(
    c: &mut [f32],
    x: &[f32],
    ldx: usize,
    (m, k, f, n): (usize, usize, usize, usize),
    w1: &[f32],
    b1: &[f32],
    act: super::simd::Act,
    w2: &[f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    let (mc, _) = job_rows(m, rayon::current_num_threads().max(1));
    with_packed_weights(&[(w1, f, k), (w2, n, f)], |pw| {
        c[..m * n]
            .par_chunks_mut(mc * n)
            .enumerate()
            .for_each(|(mb, out_rows)| {
                with_scratch(out_rows.len() / n * f, |h| {
                    pw.product(0, &x[mb * mc * ldx..], ldx, h);
                    super::simd::bias_act_in_place(h, b1, act);
                    pw.product(1, h, f, out_rows);
                })
            })
    });
}

thread_local! {
    /// Packed weights of [`with_packed_weights`].
    static WEIGHTS_BUF: RefCell<Vec<Vec<u32>>> = const { RefCell::new(Vec::new()) };
}

/// Weights packed once as the B of `x W^T`, for products over many blocks of rows (see
/// [`with_packed_weights`]).
pub(crate) struct PackedWeights<'a> {
    list: Vec<PackedB<'a>>,
}

impl PackedWeights<'_> {
    /// `c = a W^T` with weight `i` (`n x k`), on this thread: `c` is `rows x n` dense and `a`
    /// `rows x k` with row stride `lda`; bf16 operands, f32 sums, computed as by
    /// [`gemm_bf16`].
    pub(crate) fn product(&self, i: usize, a: &[f32], lda: usize, c: &mut [f32]) {
        let b = &self.list[i];
        if b.n == 0 || c.is_empty() {
            return;
        }
        let rows = c.len() / b.n;
        assert!(
            c.len() == rows * b.n && lda >= b.k && a.len() >= (rows - 1) * lda + b.k,
            "product shapes"
        );
        let av = View {
            ptr: a.as_ptr(),
            rs: lda as isize,
            cs: 1,
        };
        with_buf(&A_BUF, |abuf| {
            // SAFETY: `a` holds rows rows of k at stride lda and `c` rows x n (checked); `c`
            // is borrowed mutably; `with_packed_weights` checked the CPU.
            unsafe {
                product_rows(
                    b,
                    av,
                    rows,
                    (0, b.n_panels),
                    OutPtr(c.as_mut_ptr()),
                    b.n,
                    1.0,
                    false,
                    abuf,
                )
            }
        });
    }
}

/// Packs each `(W, n, k)` (`W` row-major `n x k`) for `x W^T`, spreading the packing over
/// rayon's pool, and runs `f` with them. Panics without AVX-512 BF16 ([`available`]).
pub(crate) fn with_packed_weights<R>(
    weights: &[(&[f32], usize, usize)],
    f: impl FnOnce(&PackedWeights) -> R,
) -> R {
    assert!(available(), "bf16 products need AVX-512 BF16");
    with_buf(&WEIGHTS_BUF, |bufs| {
        if bufs.len() < weights.len() {
            bufs.resize_with(weights.len(), Vec::new);
        }
        let list = weights
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(w, n, k), buf)| {
                assert!(
                    w.len() >= n * k,
                    "weight of {} elements for {n} x {k}",
                    w.len()
                );
                let wt = View {
                    ptr: w.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                };
                pack_b_all(wt, n, k, rayon::current_num_threads() > 1, buf)
            })
            .collect();
        f(&PackedWeights { list })
    })
}

/// Runs `f` on this thread's scratch buffer of at least `len` floats (unspecified contents),
/// or on a fresh one if it is in use.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buf(&ROWS_BUF, |v| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// One `MR x NR` tile: `c = alpha * a b` when `first`, else `c += alpha * a b`, writing only
/// the top-left `rows x cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc2: usize,
    pa: *const u32,
    pb: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    first: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: pa holds kc2 * MR words, pb kc2 * NR words.
    unsafe {
        for q in 0..kc2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(q * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(q * NR + 16).cast()));
            let arow = pa.add(q * MR);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let w: __m512bh = std::mem::transmute(_mm512_set1_epi32(*arow.add(r) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], w, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], w, b1);
            }
        }
        let va = _mm512_set1_ps(alpha);
        let m0: __mmask16 = if cols >= 16 {
            0xFFFF
        } else {
            ((1u32 << cols) - 1) as u16
        };
        let m1: __mmask16 = if cols >= 32 {
            0xFFFF
        } else if cols > 16 {
            ((1u32 << (cols - 16)) - 1) as u16
        } else {
            0
        };
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let row = c.add(r * ldc);
            for (h, mask) in [(0usize, m0), (1, m1)] {
                if mask == 0 {
                    continue;
                }
                let p = row.add(16 * h);
                let v = if first {
                    _mm512_mul_ps(acc_r[h], va)
                } else {
                    _mm512_fmadd_ps(acc_r[h], va, _mm512_maskz_loadu_ps(mask, p))
                };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _kc2: usize,
    _pa: *const u32,
    _pb: *const u32,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _alpha: f32,
    _first: bool,
) {
    unreachable!("bf16 kernels run only where `available()` is true (x86-64 with AVX-512 BF16)")
}

/// Median seconds of `reps` bf16 products `m x k` by `k x n` on constant operands, either
/// operand stored transposed when asked, on `threads` threads; `None` without AVX-512 BF16.
/// For `cargo bench -p ssl-core --bench stack -- gemm`.
pub fn time_product(
    (m, n, k): (usize, usize, usize),
    (a_t, b_t): (bool, bool),
    threads: usize,
    reps: usize,
) -> Option<f64> {
    if !available() {
        return None;
    }
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let (a_rs, a_cs) = super::gemm::dense_strides(m, k, a_t);
    let (b_rs, b_cs) = super::gemm::dense_strides(k, n, b_t);
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            // SAFETY: the views lie inside the vectors; the CPU features were checked.
            unsafe {
                gemm_bf16(
                    c.as_mut_ptr(),
                    n,
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    a_rs,
                    a_cs,
                    b.as_ptr(),
                    b_rs,
                    b_cs,
                    1.0,
                    false,
                    threads,
                    Epilogue::None,
                )
            };
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The exact product of the bf16-rounded operands (A m x k, B k x n, row-major), in f64.
    pub(crate) fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| round_bf16(a[i * k + p]) as f64 * round_bf16(b[p * n + j]) as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa, 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn matches_the_rounded_product_in_every_orientation_and_shape() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Odd k, partial tiles in both directions (n = 50: a full and a partial second half
        // of a 32-column tile), several k blocks, one and two threads, strided views.
        for &(m, k, n, threads) in &[
            (1, 1, 1, 1),
            (13, 7, 33, 1),
            (29, 301, 70, 2),
            (150, 515, 45, 2),
            (20, 37, 50, 2),
            (5, 0, 3, 1),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos()).collect();
            let want = reference(&a, &b, m, k, n);
            let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
            // Every other element: neither stride is 1 (the scalar packing path).
            let spread = |v: &[f32]| -> Vec<f32> { v.iter().flat_map(|&x| [x, -7.0]).collect() };
            let (a2, b2) = (spread(&a), spread(&b));
            // (pointer, row stride, column stride) of A (m x k) and B (k x n).
            let a_views = [
                (a.as_ptr(), k as isize, 1isize),
                (at.as_ptr(), 1, m as isize),
                (a2.as_ptr(), 2 * k as isize, 2),
            ];
            let b_views = [
                (b.as_ptr(), n as isize, 1isize),
                (bt.as_ptr(), 1, k as isize),
                (b2.as_ptr(), 2 * n as isize, 2),
            ];
            for &(ap, ars, acs) in &a_views {
                for &(bp, brs, bcs) in &b_views {
                    let ldc = n + 3;
                    let mut c = vec![1f32; m * ldc];
                    let product = |c: &mut [f32], alpha: f32, accumulate: bool| {
                        // SAFETY: the views and the output cover exactly the test's buffers.
                        unsafe {
                            gemm_bf16(
                                c.as_mut_ptr(),
                                ldc,
                                m,
                                n,
                                k,
                                ap,
                                ars,
                                acs,
                                bp,
                                brs,
                                bcs,
                                alpha,
                                accumulate,
                                threads,
                                Epilogue::None,
                            )
                        }
                    };
                    product(&mut c, 2.0, true);
                    for i in 0..m {
                        for j in 0..n {
                            let w = 1.0 + 2.0 * want[i * n + j];
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "({m},{k},{n}) at ({i},{j}): {got} vs {w}"
                            );
                        }
                        for j in n..ldc {
                            assert_eq!(c[i * ldc + j], 1.0, "wrote past the view");
                        }
                    }
                    product(&mut c, 1.0, false);
                    for i in 0..m {
                        for j in 0..n {
                            let w = want[i * n + j];
                            let got = c[i * ldc + j] as f64;
                            assert!((got - w).abs() <= 1e-4 * (1.0 + w.abs()));
                        }
                    }
                }
            }
        }
    }
}

//! f32 products of the attention's per-head sizes (every dimension at most [`MAX_DIM`]) on
//! AVX-512 registers, `A` and `B` read where they lie (`gemm::head_matmul` chooses it).
//!
//! `gemm` packs its operands and dispatches on every call, which at MAE's encoder heads
//! (17 x 17 x 64) leaves it at ~35 GFLOP/s; here each block of up to 12 rows of `C` keeps
//! its sums in registers over the whole depth (`R` rows by `V` vectors of 16 columns, the
//! last one masked, `R x V` at most 24), `A`'s elements are broadcast from wherever they are
//! (any strides, so `P^T` and `dS^T` are read in place) and `B`'s rows are loaded where they
//! are. The one copy: a `B` given by columns (its rows strided, `b_rs` 1: `K^T`, `V^T`) is
//! first transposed into this thread's buffer by 16 x 16 register blocks.

#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;

/// The largest dimension the kernel takes; larger products go to `gemm`, which packs `B`
/// and so avoids the cache-set conflicts of long strided rows (BERT's 128-token heads).
pub(crate) const MAX_DIM: usize = 80;

/// Whether this CPU runs the kernel (AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether an `m x k` by `k x n` product with `B` at strides (`b_rs`, `b_cs`) runs here:
/// every dimension at most [`MAX_DIM`], `B`'s rows contiguous, or its columns contiguous at
/// a positive row stride, and the CPU.
pub(crate) fn takes(m: usize, n: usize, k: usize, b_rs: isize, b_cs: isize) -> bool {
    m.max(n).max(k) <= MAX_DIM && (b_cs == 1 || (b_rs == 1 && b_cs > 0)) && available()
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// This thread's copy of a transposed `B`.
    static B_T: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `c = alpha * a b` (or `c += alpha * a b` with `accumulate`): `c` `m x n` with row stride
/// `ldc`, `a`'s element (i, p) at `a[i a_rs + p a_cs]`, `b`'s at `b[p b_rs + j b_cs]`.
///
/// # Safety
/// [`takes`] must hold; every element addressed must be valid, and `c`'s elements must not
/// be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
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
) {
    #[cfg(target_arch = "x86_64")]
    {
        if b_cs == 1 {
            // SAFETY: forwarded from the caller; `takes` checked the CPU.
            unsafe { x86::product(c, ldc, m, n, k, a, a_rs, a_cs, b, b_rs, alpha, accumulate) };
            return;
        }
        let run = |bt: &mut Vec<f32>| {
            bt.resize(k * n, 0.0);
            // SAFETY: here `b_rs` is 1 and `b_cs` positive: `B`'s column j is the `k`
            // contiguous values at `b + j b_cs`, so `B^T` is an `n x k` matrix of row stride
            // `b_cs`, transposed into `bt` (`k x n`, dense); then as above.
            unsafe {
                x86::transpose(bt.as_mut_ptr(), b, n, k, b_cs as usize);
                x86::product(
                    c,
                    ldc,
                    m,
                    n,
                    k,
                    a,
                    a_rs,
                    a_cs,
                    bt.as_ptr(),
                    n as isize,
                    alpha,
                    accumulate,
                );
            }
        };
        super::bf16::with_buf(&B_T, run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (
            c, ldc, m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, alpha, accumulate,
        );
        unreachable!("small::takes is false off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::bf16::{lanes, transpose16};

    /// `R` rows of `c` by `V` vectors of 16 columns (the last one's lanes `mask`), summed
    /// over the whole depth in registers, then scaled (and added to `c`) on the way out.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize, const V: usize>(
        k: usize,
        a: *const f32,
        a_rs: isize,
        a_cs: isize,
        b: *const f32,
        b_rs: isize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        accumulate: bool,
        mask: u16,
    ) {
        // SAFETY (whole body): the caller's addresses are valid for these rows, columns and
        // depths; the last vector's lanes beyond the product are masked off.
        unsafe {
            let mut s = [[_mm512_setzero_ps(); V]; R];
            for p in 0..k {
                let bp = b.offset(p as isize * b_rs);
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    let m = if v + 1 == V { mask } else { u16::MAX };
                    *x = _mm512_maskz_loadu_ps(m, bp.add(16 * v));
                }
                let ap = a.offset(p as isize * a_cs);
                for (r, row) in s.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.offset(r as isize * a_rs));
                    for (acc, bx) in row.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(av, *bx, *acc);
                    }
                }
            }
            let al = _mm512_set1_ps(alpha);
            for (r, row) in s.iter().enumerate() {
                let cp = c.add(r * ldc);
                for (v, acc) in row.iter().enumerate() {
                    let m = if v + 1 == V { mask } else { u16::MAX };
                    let mut x = _mm512_mul_ps(*acc, al);
                    if accumulate {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, cp.add(16 * v)));
                    }
                    _mm512_mask_storeu_ps(cp.add(16 * v), m, x);
                }
            }
        }
    }

    /// [`block`] with `V` (1..=4) and `R` (1..=12) chosen at run time.
    macro_rules! blocks {
        ($v:expr, $r:expr, ($($arg:expr),*)) => {
            match $v {
                1 => rows!(1, $r, $($arg),*),
                2 => rows!(2, $r, $($arg),*),
                3 => rows!(3, $r, $($arg),*),
                _ => rows!(4, $r, $($arg),*),
            }
        };
    }

    /// [`block`] with `R` chosen at run time (1..=12).
    macro_rules! rows {
        ($v:literal, $r:expr, $($arg:expr),*) => {
            match $r {
                1 => block::<1, $v>($($arg),*),
                2 => block::<2, $v>($($arg),*),
                3 => block::<3, $v>($($arg),*),
                4 => block::<4, $v>($($arg),*),
                5 => block::<5, $v>($($arg),*),
                6 => block::<6, $v>($($arg),*),
                7 => block::<7, $v>($($arg),*),
                8 => block::<8, $v>($($arg),*),
                9 => block::<9, $v>($($arg),*),
                10 => block::<10, $v>($($arg),*),
                11 => block::<11, $v>($($arg),*),
                _ => block::<12, $v>($($arg),*),
            }
        };
    }

    /// [`super::matmul`] with `B`'s rows contiguous (row stride `b_rs`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
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
        alpha: f32,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            // Columns by up to four vectors; rows by as many as keep the sums in 24 of
            // the 32 registers.
            let w = (n - j).min(64);
            let v = w.div_ceil(16);
            let mask = lanes(w - 16 * (v - 1));
            let most = [0, 12, 12, 8, 6][v];
            let mut i = 0;
            while i < m {
                let r = (m - i).min(most);
                // SAFETY: rows i..i + r and columns j..j + w of the product, inside what
                // the caller vouched for.
                unsafe {
                    let (ai, bj, ci) = (a.offset(i as isize * a_rs), b.add(j), c.add(i * ldc + j));
                    blocks!(
                        v,
                        r,
                        (k, ai, a_rs, a_cs, bj, b_rs, ci, ldc, alpha, accumulate, mask)
                    );
                }
                i += r;
            }
            j += w;
        }
    }

    /// `dst` (`cols x rows`, dense) = the transpose of `src` (`rows x cols`, row stride
    /// `ld`), by 16 x 16 blocks in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(
        dst: *mut f32,
        src: *const f32,
        rows: usize,
        cols: usize,
        ld: usize,
    ) {
        let mut i = 0;
        while i < rows {
            let ri = (rows - i).min(16);
            let mut j = 0;
            while j < cols {
                let cj = (cols - j).min(16);
                let mut r = [_mm512_setzero_si512(); 16];
                for (x, reg) in r.iter_mut().enumerate().take(ri) {
                    // SAFETY: row i + x, columns j..j + cj of `src` (the rest masked off).
                    let row =
                        unsafe { _mm512_maskz_loadu_ps(lanes(cj), src.add((i + x) * ld + j)) };
                    *reg = _mm512_castps_si512(row);
                }
                transpose16(&mut r);
                for (y, reg) in r.iter().enumerate().take(cj) {
                    let col = _mm512_castsi512_ps(*reg);
                    // SAFETY: row j + y, columns i..i + ri of `dst` (`rows` wide).
                    unsafe { _mm512_mask_storeu_ps(dst.add((j + y) * rows + i), lanes(ri), col) };
                }
                j += 16;
            }
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 product of `a` (element (i, p) at `i a_rs + p a_cs`) and `b` (`p b_rs + j b_cs`).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        b_rs: usize,
        b_cs: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64)
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, salt: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
    }

    /// Attention-like shapes (and a full 16 x 16 block, and tails on both sides of it), `A`
    /// read both ways, `B` by rows and by columns, written and accumulated, against the
    /// product in f64; the padding beside `C`'s rows is untouched.
    #[test]
    fn matches_the_f64_product_in_every_shape_and_stride() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (17, 17, 64),
            (17, 64, 17),
            (65, 65, 32),
            (65, 32, 65),
            (13, 80, 7),
            (80, 33, 80),
            (28, 28, 16),
            (5, 49, 3),
            (16, 16, 16),
            (20, 35, 33),
        ];
        let mut checked = 0;
        for &(m, n, k) in &shapes {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    for accumulate in [false, true] {
                        let a = values(m * k + 3, 0.1);
                        let b = values(k * n * 2 + 5, 0.7);
                        let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
                        // B by rows at stride 2n, or by columns at stride 2k.
                        let (b_rs, b_cs) = if b_t { (1, 2 * k) } else { (2 * n, 1) };
                        assert!(takes(m, n, k, b_rs as isize, b_cs as isize));
                        let ldc = n + 3;
                        let c0 = values(m * ldc, 1.3);
                        let mut c = c0.clone();
                        let alpha = 0.75;
                        unsafe {
                            matmul(
                                c.as_mut_ptr(),
                                ldc,
                                m,
                                n,
                                k,
                                a.as_ptr(),
                                a_rs as isize,
                                a_cs as isize,
                                b.as_ptr(),
                                b_rs as isize,
                                b_cs as isize,
                                alpha,
                                accumulate,
                            )
                        };
                        let want = reference(m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs);
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j] as f64;
                                if j >= n {
                                    assert_eq!(
                                        c[i * ldc + j],
                                        c0[i * ldc + j],
                                        "padding at ({i}, {j})"
                                    );
                                    continue;
                                }
                                let base = if accumulate {
                                    c0[i * ldc + j] as f64
                                } else {
                                    0.0
                                };
                                let w = base + alpha as f64 * want[i * n + j];
                                let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
                                assert!(
                                    (got - w).abs() < tol,
                                    "({m}, {n}, {k}) a_t {a_t} b_t {b_t} acc {accumulate} at ({i}, {j}): {got} vs {w}"
                                );
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, shapes.len() * 8);
    }

    /// Row blocks of every height (`m` from 1 to 30, so every tail of every `R`) by every
    /// column tail (widths 1-17) and across the vector counts, with `A` read at a row stride
    /// wider than its depth; `C` starts as NaN, so a kernel that read it without
    /// `accumulate` fails.
    #[test]
    fn every_row_count_and_width() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        for m in 1..=30 {
            for n in [1, 15, 16, 17, 31, 33, 48, 63, 64, 65, 79] {
                let k = 9;
                let a = values(m * k, 0.2);
                let b = values(k * n, 0.4);
                let mut c = vec![f32::NAN; m * n];
                unsafe {
                    matmul(
                        c.as_mut_ptr(),
                        n,
                        m,
                        n,
                        k,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        1.0,
                        false,
                    )
                };
                let want = reference(m, n, k, &a, k, 1, &b, n, 1);
                for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        ((*g as f64) - w).abs() < 1e-5,
                        "m {m} n {n} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn takes_only_small_products_with_a_contiguous_side_of_b() {
        let on = available();
        assert_eq!(takes(17, 17, 64, 1, 576), on);
        assert_eq!(takes(80, 80, 80, 80, 1), on);
        assert!(!takes(81, 17, 17, 17, 1));
        assert!(!takes(17, 17, 128, 17, 1));
        assert!(!takes(17, 17, 17, 2, 3));
        assert!(!takes(17, 17, 17, 1, -17), "a negative column stride");
    }
}

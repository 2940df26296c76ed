//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later): `C = alpha * A B^T`
//! (plus `C` when accumulating) for `A` (m x k) and `B` (n x k), both row-major with `k`
//! contiguous (a linear layer's `x W^T`), operands rounded to bf16 (nearest, ties to even),
//! sums in f32 (`TDPBF16PS`).
//!
//! Not yet used by the stack: no machine of this project with AMX has run it, so it is not
//! measured. What runs everywhere is the same code with the tile instructions replaced by
//! their definition ([`Backend::Emulated`]): operand packing (rows of `A` as they are, `B` in
//! the pairs-interleaved layout `TDPBF16PS` reads), tiling, edges and the epilogue are tested
//! on any CPU against the exactly rounded product; on a CPU with AMX (and a kernel granting
//! the tile-data permission) the tests also run the tile instructions themselves.
//!
//! Layout. `A` is packed as `mp x kp` bf16 (rows and depth padded with zeros to multiples of
//! 32), so a tile of 16 rows x 32 depth values is a strided load of 64 bytes per row. `B` is
//! packed per block of 16 of its rows (output columns): `kp / 2` lines of 32 values, line `q`
//! holding `B[j][2q], B[j][2q + 1]` for `j` = 0..16, which is `TDPBF16PS`'s "VNNI" layout. Each
//! job computes a 32 x 32 block of `C` in four accumulator tiles (`tmm0`..`tmm3`) from two tiles
//! of `A` (`tmm4`, `tmm5`) and two of `B` (`tmm6`, `tmm7`) per 32-deep step.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bf16::to_bf16;

/// Rows (and columns) of `C` one job computes: two tiles of 16.
const BLOCK: usize = 32;
/// Depth of one tile step: 32 bf16 values, 64 bytes per tile row.
const KSTEP: usize = 32;
/// Rows of a tile.
const TILE_ROWS: usize = 16;

/// How the tile product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The AMX instructions (only where [`available`] is true).
    Tiles,
    /// The same steps in scalar code, `TDPBF16PS` by its definition (any CPU; for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Emulated,
}

/// True when this CPU has AMX-TILE and AMX-BF16 and Linux granted this process the tile-data
/// state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, requested once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
            // SAFETY: `request_tile_data` is a plain arch_prctl system call.
            amx_bf16 && amx_tile && unsafe { request_tile_data() }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Asks Linux for the AMX tile-data state (without it the first tile instruction faults).
///
/// # Safety
/// Linux on x86-64 only.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the caller runs on Linux x86-64; the call reads no memory.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

/// `x` rounded up to a multiple of `m`.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `A` (m x k, row stride `lda`) as `mp x kp` bf16, zero-padded.
fn pack_a(a: &[f32], m: usize, k: usize, lda: usize, mp: usize, kp: usize) -> Vec<u16> {
    let mut out = vec![0u16; mp * kp];
    out.par_chunks_mut(kp)
        .take(m)
        .enumerate()
        .for_each(|(i, row)| {
            for (o, &x) in row.iter_mut().zip(&a[i * lda..i * lda + k]) {
                *o = to_bf16(x) as u16;
            }
        });
    out
}

/// `B` (n x k, row stride `ldb`) in blocks of 16 rows, each `kp / 2` lines of 16 pairs.
fn pack_b(b: &[f32], n: usize, k: usize, ldb: usize, np: usize, kp: usize) -> Vec<u16> {
    let block = kp * TILE_ROWS;
    let mut out = vec![0u16; np * kp];
    out.par_chunks_mut(block).enumerate().for_each(|(jb, blk)| {
        for j in 0..TILE_ROWS {
            let row = jb * TILE_ROWS + j;
            if row >= n {
                break;
            }
            for (p, &x) in b[row * ldb..row * ldb + k].iter().enumerate() {
                blk[(p / 2) * 2 * TILE_ROWS + 2 * j + p % 2] = to_bf16(x) as u16;
            }
        }
    });
    out
}

/// One 32 x 32 block of `A B^T` into `acc` (row-major, 32 wide): rows `i0..i0 + 32` of the
/// packed `A`, 16-row blocks `jb0` and `jb0 + 1` of the packed `B`.
fn block_product(
    backend: Backend,
    a: &[u16],
    b: &[u16],
    kp: usize,
    i0: usize,
    jb0: usize,
    acc: &mut [f32; BLOCK * BLOCK],
) {
    let bstride = kp * TILE_ROWS;
    match backend {
        Backend::Emulated => {
            acc.fill(0.0);
            for (ti, tj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                for k0 in (0..kp).step_by(KSTEP) {
                    let at = &a[(i0 + ti * TILE_ROWS) * kp + k0..];
                    let bt = &b[(jb0 + tj) * bstride + (k0 / 2) * 2 * TILE_ROWS..];
                    tdpbf16ps(acc, ti, tj, at, kp, bt);
                }
            }
        }
        Backend::Tiles => {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Tiles` is only chosen where `available()` holds (AMX present, tile
            // data granted) and the tile configuration was loaded on this thread by
            // `with_tiles`; every load reads 16 rows of 64 bytes inside `a` (rows i0..i0+32
            // of mp >= i0 + 32, depth k0..k0+32 of kp) or inside `b` (lines k0/2..k0/2+16 of
            // blocks jb0, jb0 + 1 < np / 16); the stores write 16 rows of 64 bytes of `acc`.
            unsafe {
                tiles::block(a, b, kp, i0, jb0, acc)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AMX tiles exist on x86-64 only");
        }
    }
}

/// `TDPBF16PS` by its definition on tile `(ti, tj)` of the 32 x 32 accumulator: for each of
/// the 16 x 16 outputs, the sum over 16 pairs of `A[m][2q] B[q][2n] + A[m][2q+1] B[q][2n+1]`,
/// in f32.
fn tdpbf16ps(acc: &mut [f32], ti: usize, tj: usize, a: &[u16], lda: usize, b: &[u16]) {
    let w = |x: u16| f32::from_bits(u32::from(x) << 16);
    for m in 0..TILE_ROWS {
        for n in 0..TILE_ROWS {
            let mut s = acc[(ti * TILE_ROWS + m) * BLOCK + tj * TILE_ROWS + n];
            for q in 0..KSTEP / 2 {
                let line = &b[q * 2 * TILE_ROWS..];
                s += w(a[m * lda + 2 * q]) * w(line[2 * n]);
                s += w(a[m * lda + 2 * q + 1]) * w(line[2 * n + 1]);
            }
            acc[(ti * TILE_ROWS + m) * BLOCK + tj * TILE_ROWS + n] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    use super::{BLOCK, KSTEP, TILE_ROWS};

    /// The tile configuration (palette 1): eight tiles of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    pub(super) struct Config([u8; 64]);

    pub(super) const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
            c[48 + t] = TILE_ROWS as u8; // rows
            t += 1;
        }
        Config(c)
    };

    /// Loads the configuration on this thread.
    ///
    /// # Safety
    /// AMX must be available and granted (`super::available()`).
    pub(super) unsafe fn configure() {
        // SAFETY: the caller checked AMX; CONFIG is 64 aligned bytes.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
    }

    /// Releases this thread's tile state.
    ///
    /// # Safety
    /// As [`configure`].
    pub(super) unsafe fn release() {
        // SAFETY: as `configure`.
        unsafe { asm!("tilerelease", options(nostack)) };
    }

    /// See `super::block_product`.
    ///
    /// # Safety
    /// As `super::block_product`'s `Tiles` arm states.
    pub(super) unsafe fn block(
        a: &[u16],
        b: &[u16],
        kp: usize,
        i0: usize,
        jb0: usize,
        acc: &mut [f32; BLOCK * BLOCK],
    ) {
        let (astride, bstride) = (2 * kp, 64usize);
        let bblock = kp * TILE_ROWS;
        // SAFETY: see the caller; pointers stay inside the slices for every step.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
            for k0 in (0..kp).step_by(KSTEP) {
                let a0 = a.as_ptr().add(i0 * kp + k0);
                let a1 = a0.add(TILE_ROWS * kp);
                let b0 = b.as_ptr().add(jb0 * bblock + (k0 / 2) * 2 * TILE_ROWS);
                let b1 = b0.add(bblock);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sa = in(reg) astride,
                    sb = in(reg) bstride,
                    options(nostack, readonly)
                );
            }
            let c = acc.as_mut_ptr();
            let sc = 4 * BLOCK;
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(TILE_ROWS),
                c2 = in(reg) c.add(TILE_ROWS * BLOCK),
                c3 = in(reg) c.add(TILE_ROWS * BLOCK + TILE_ROWS),
                sc = in(reg) sc,
                options(nostack)
            );
        }
    }
}

/// Runs `f` with the tile configuration loaded on this thread (and released after) for
/// `Tiles`; as it is for `Emulated`.
fn with_tiles<R>(backend: Backend, f: impl FnOnce() -> R) -> R {
    match backend {
        Backend::Emulated => f(),
        Backend::Tiles => {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: `Tiles` is chosen only where `available()` holds.
                unsafe { tiles::configure() };
                let r = f();
                // SAFETY: as above.
                unsafe { tiles::release() };
                r
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AMX tiles exist on x86-64 only")
        }
    }
}

/// `C = alpha * A B^T` (plus `C` when `accumulate`) on AMX tiles: `A` (m x k, row stride
/// `lda`), `B` (n x k, row stride `ldb`), `C` (m x n, row stride `ldc`); operands rounded to
/// bf16 (nearest, ties to even), sums in f32; blocks of 32 rows in parallel. Returns `false`,
/// leaving `C` as it was, where [`available`] is false.
///
/// # Panics
/// When a matrix does not fit its slice or a leading dimension is below its width.
pub fn matmul_bt(
    c: &mut [f32],
    ldc: usize,
    a: (&[f32], usize),
    b: (&[f32], usize),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) -> bool {
    if !available() {
        return false;
    }
    product(Backend::Tiles, c, ldc, a, b, (m, n, k), alpha, accumulate);
    true
}

/// [`matmul_bt`] on `backend`.
#[allow(clippy::too_many_arguments)]
fn product(
    backend: Backend,
    c: &mut [f32],
    ldc: usize,
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    assert!(
        backend == Backend::Emulated || available(),
        "AMX tiles asked for on a CPU without them"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && ldb >= k && ldc >= n,
        "leading dimensions too small"
    );
    assert!((m - 1) * lda + k <= a.len(), "A out of bounds");
    assert!((n - 1) * ldb + k <= b.len(), "B out of bounds");
    assert!((m - 1) * ldc + n <= c.len(), "C out of bounds");
    let (mp, np, kp) = (
        round_up(m, BLOCK),
        round_up(n, BLOCK),
        round_up(k.max(1), KSTEP),
    );
    let pa = pack_a(a, m, k, lda, mp, kp);
    let pb = pack_b(b, n, k, ldb, np, kp);
    // Only the matrix's own rows: a longer `c` (a view into a larger buffer) must neither
    // give row blocks past `m` nor be written beyond it.
    c[..(m - 1) * ldc + n]
        .par_chunks_mut(BLOCK * ldc)
        .enumerate()
        .for_each(|(ib, rows)| {
            with_tiles(backend, || {
                let mut acc = [0f32; BLOCK * BLOCK];
                for jb in 0..np / BLOCK {
                    block_product(backend, &pa, &pb, kp, ib * BLOCK, 2 * jb, &mut acc);
                    let (j0, width) = (jb * BLOCK, BLOCK.min(n - jb * BLOCK));
                    for (r, out) in rows.chunks_mut(ldc).take(m - ib * BLOCK).enumerate() {
                        let src = &acc[r * BLOCK..r * BLOCK + width];
                        for (d, &s) in out[j0..j0 + width].iter_mut().zip(src) {
                            *d = if accumulate {
                                *d + alpha * s
                            } else {
                                alpha * s
                            };
                        }
                    }
                }
            })
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact product of the bf16-rounded operands, in f64 (`B` given as n x k).
    fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect();
        crate::bf16::tests::reference(a, &bt, m, k, n)
    }

    fn check(backend: Backend) {
        // Partial blocks in every direction, a depth that is not a multiple of 32 (or of 2),
        // one row and one column, several jobs.
        for &(m, n, k) in &[
            (1, 1, 1),
            (17, 33, 31),
            (40, 70, 65),
            (64, 32, 96),
            (3, 5, 0),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.61).cos()).collect();
            let want = reference(&a, &b, m, n, k);
            let ldc = n + 2;
            for (alpha, accumulate) in [(1.0f32, false), (0.5, true)] {
                let mut c = vec![1f32; m * ldc];
                product(
                    backend,
                    &mut c,
                    ldc,
                    (&a, k),
                    (&b, k),
                    (m, n, k),
                    alpha,
                    accumulate,
                );
                for i in 0..m {
                    for j in 0..n {
                        let base = if accumulate { 1.0 } else { 0.0 };
                        let w = base + f64::from(alpha) * want[i * n + j];
                        let got = f64::from(c[i * ldc + j]);
                        // f32 sums of k exact products of bf16 values.
                        let tol = 1e-5 * (k as f64 + 1.0) * (1.0 + w.abs());
                        assert!(
                            (got - w).abs() < tol,
                            "{backend:?} ({m}, {n}, {k}) at ({i}, {j}): {got} vs {w}"
                        );
                    }
                    // The padding columns of C are untouched.
                    assert_eq!(&c[i * ldc + n..i * ldc + ldc], &[1.0, 1.0]);
                }
            }
        }
    }

    #[test]
    fn the_tile_layout_gives_the_rounded_product() {
        check(Backend::Emulated);
    }

    #[test]
    fn a_longer_output_slice_is_left_alone_past_the_matrix() {
        // m = 1 row in a 40-element buffer: one row block, nothing written past (0, n).
        let (a, b) = ([2.0f32, 1.0], [3.0f32, 1.0, 0.5, 4.0]);
        let mut c = vec![7f32; 40];
        product(
            Backend::Emulated,
            &mut c,
            2,
            (&a, 2),
            (&b, 2),
            (1, 2, 2),
            1.0,
            false,
        );
        assert_eq!(&c[..2], &[7.0, 5.0]);
        assert!(c[2..].iter().all(|&x| x == 7.0));
    }

    #[test]
    fn the_amx_tiles_give_the_rounded_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX (or the kernel refused the tile data)");
            return;
        }
        check(Backend::Tiles);
    }

    #[test]
    fn the_b_layout_is_pairs_interleaved() {
        // B = 2 x 3 (n x k): block 0, line q holds (B[j][2q], B[j][2q+1]) for j = 0..16.
        let b = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let p = pack_b(&b, 2, 3, 3, 32, 32);
        let w = |i: usize| f32::from_bits(u32::from(p[i]) << 16);
        assert_eq!([w(0), w(1), w(2), w(3)], [1.0, 2.0, 4.0, 5.0]);
        assert_eq!([w(32), w(33), w(34), w(35)], [3.0, 0.0, 6.0, 0.0]);
        assert!(p[4..32].iter().all(|&x| x == 0));
    }
}

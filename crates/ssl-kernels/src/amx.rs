//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later): `C = alpha * A B^T`
//! (plus `C` when accumulating) for `A` (m x k) and `B` (n x k), both row-major with `k`
//! contiguous (a linear layer's `x W^T`), operands rounded to bf16 (nearest, ties to even),
//! sums in f32 (`TDPBF16PS`).
//!
//! Where [`usable`] holds, every bf16 product of the kernels (`bf16::gemm_bf16`: the stack's
//! linear layers and per-head attention, the MLM head) runs here through [`gemm`], which takes
//! any strides; the trainer's bf16 check then times the tiles against f32. No machine of this
//! project with AMX has run it yet, so [`usable`] first runs one product on the tiles and
//! compares it with the exactly rounded one, and keeps the AVX-512 BF16 kernel if they
//! disagree. What runs everywhere is the same code with the tile instructions replaced by
//! their definition ([`Backend::Emulated`]): operand packing (rows of `A` as they are, `B` in
//! the pairs-interleaved layout `TDPBF16PS` reads), tiling, edges, strides and the epilogue
//! are tested on any CPU against the exactly rounded product and against the AVX-512 BF16
//! kernel; on a CPU with AMX (and a kernel granting the tile-data permission) the tests also
//! run the tile instructions themselves. The emulation follows the SDM's pseudocode (two f32
//! sums per output and instruction, DAZ and FTZ); the Intrinsics Guide writes one running
//! sum instead, so every comparison with the tiles allows for rounding.
//!
//! Layout. `A` is packed as `mp x kp` bf16 (rows and depth padded with zeros to multiples of
//! 32), so a tile of 16 rows x 32 depth values is a strided load of 64 bytes per row. `B` is
//! packed per block of 16 of its rows (output columns): `kp / 2` lines of 32 values, line `q`
//! holding `B[j][2q], B[j][2q + 1]` for `j` = 0..16, which is `TDPBF16PS`'s "VNNI" layout. Each
//! job computes a stripe of 32 rows of `C`, block by block of 32 columns, each block in four
//! accumulator tiles (`tmm0`..`tmm3`) from two tiles of `A` (`tmm4`, `tmm5`) and two of `B`
//! (`tmm6`, `tmm7`) per 32-deep step. A depth past [`KB`] = 1024 runs as blocks of at most
//! 1024, each packed and multiplied in turn, their results added to `C` in f32.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bf16::to_bf16;

/// Rows (and columns) of `C` one job computes: two tiles of 16.
const BLOCK: usize = 32;
/// Depth of one tile step: 32 bf16 values, 64 bytes per tile row.
const KSTEP: usize = 32;
/// Rows of a tile.
const TILE_ROWS: usize = 16;
/// Most depth steps packed and summed as one block (a multiple of [`KSTEP`]): a longer depth
/// runs as blocks whose results are added in f32, so a job's 32 packed rows (64 KB) and each
/// 32-column block of `B` stay in cache instead of streaming from memory for every block of
/// the output. Not yet measured on AMX hardware; the fp16 kernel's blocks of the same depth
/// (with its packing spread over the threads) made a 320 x 960 weight gradient over 12,000
/// steps 1.3-1.6x faster on a Xeon without AMX.
const KB: usize = 1024;

/// How the tile product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// The AMX instructions (only where [`available`] is true).
    Tiles,
    /// The same steps in scalar code, `TDPBF16PS` by its definition (any CPU; for tests).
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
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            // SAFETY: `request_tile_data` is a plain arch_prctl system call.
            let ret = unsafe { request_tile_data() };
            if ret != 0 {
                // EINVAL: a kernel before 5.16; EOPNOTSUPP: no tile data in XCR0 (a
                // hypervisor hiding it) or no XFD; ENOSPC: a signal stack too small for it.
                let why = std::io::Error::from_raw_os_error((-ret) as i32);
                eprintln!(
                    "AMX present, but Linux refused this process the tile data (arch_prctl: {why}): bf16 products run without AMX (on the fp16 or AVX-512 BF16 kernel)"
                );
            }
            ret == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// True when [`available`] holds and a product on the tiles agrees with the exactly rounded
/// one (checked once per process): where it does, every bf16 product of the kernels takes the
/// tiles. Says on stderr when the tiles are present but disagree (they are then not used).
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        if !available() {
            return false;
        }
        let worst = self_check(Backend::Tiles);
        let ok = worst < 1e-4;
        if !ok {
            eprintln!(
                "AMX tiles present, but their product differs from the exactly rounded one by {worst:e} (relative): bf16 products run without AMX (on the fp16 or AVX-512 BF16 kernel)"
            );
        }
        ok
    })
}

/// Where the kernels' bf16 products run on the tile layout: `Tiles` where [`usable`] holds;
/// `Emulated` (the tile instruction by its definition, slow) where the environment variable
/// `SSL_AMX_EMULATE=1` asks for it on a CPU with AVX-512 BF16, so the dispatch of the stack,
/// the attention and the MLM head to the tiles can be tested on any such CPU (`.ci/run` runs
/// `tests/bf16.rs` so); `None` otherwise. Decided once per process.
pub(crate) fn backend() -> Option<Backend> {
    static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        if usable() {
            Some(Backend::Tiles)
        } else if std::env::var_os("SSL_AMX_EMULATE").is_some_and(|v| v == "1")
            && super::bf16::available()
        {
            eprintln!("SSL_AMX_EMULATE=1: bf16 products on the AMX tile layout, emulated");
            Some(Backend::Emulated)
        } else {
            None
        }
    })
}

/// The largest difference, relative to the largest exact entry, between `backend`'s product
/// and the exactly rounded one (f64 sums of the bf16-rounded operands), on a product with
/// partial blocks, two depth steps and both operand layouts a linear layer's backward uses.
fn self_check(backend: Backend) -> f64 {
    let (m, n, k) = (45, 37, 70);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos()).collect();
    let r = |x: f32| f64::from(f32::from_bits(to_bf16(x) << 16));
    let mut c = vec![0f32; m * n];
    // A row-major (m x k), B row-major k x n: B^T is read with swapped strides.
    let bt = Strided {
        ptr: b.as_ptr(),
        rs: 1,
        cs: n as isize,
    };
    // SAFETY: the views lie inside `a` and `b`; `c` holds m x n and is ours.
    unsafe {
        gemm(
            backend,
            c.as_mut_ptr(),
            n,
            (m, n, k),
            Strided::rows(&a, k),
            bt,
            1.0,
            false,
            super::gemm::Epilogue::None,
            // No rayon here: `usable` may be first asked from inside a parallel job.
            false,
        )
    };
    let want: Vec<f64> = (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            (0..k).map(|p| r(a[i * k + p]) * r(b[p * n + j])).sum()
        })
        .collect();
    worst_relative(&c, &want)
}

/// The largest `|got - want|` relative to the largest `|want|`; infinite where any `got` is
/// NaN (a garbled tile, say), which `f64::max` alone would pass over.
fn worst_relative(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |s, w| s.max(w.abs()));
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (f64::from(g) - w).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(d / scale.max(f64::MIN_POSITIVE));
    }
    worst
}

/// Asks Linux for the AMX tile-data state (without it the first tile instruction faults):
/// 0 where granted, else the negated error number.
///
/// # Safety
/// Linux on x86-64 only.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn request_tile_data() -> isize {
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
    ret
}

/// `x` rounded up to a multiple of `m`.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// A read-only strided matrix: element `(i, p)` at `ptr + i * rs + p * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    /// Element `(0, 0)`.
    pub ptr: *const f32,
    /// Step between rows.
    pub rs: isize,
    /// Step between columns.
    pub cs: isize,
}
// SAFETY: only ever read (by the row jobs of `gemm` here and of `fp16::gemm`, and by the
// panel jobs of fp16's packing), never written through.
unsafe impl Send for Strided {}
// SAFETY: as above.
unsafe impl Sync for Strided {}

/// The depth blocks of at most `kb` steps a depth of `k` runs as: `(k0, len, last)` each (one
/// empty block when `k` is 0), for the kernels that block the depth ([`KB`] here, and
/// `fp16`'s).
pub(crate) fn depth_blocks(k: usize, kb: usize) -> impl Iterator<Item = (usize, usize, bool)> {
    let blocks = k.div_ceil(kb).max(1);
    (0..blocks).map(move |d| (d * kb, k.saturating_sub(d * kb).min(kb), d + 1 == blocks))
}

impl Strided {
    /// The view without its first `i` rows.
    ///
    /// # Safety
    /// Row `i` must lie inside the view's allocation (`i` below its rows, or 0).
    pub(crate) unsafe fn skip_rows(self, i: usize) -> Self {
        Strided {
            // SAFETY: the caller's guarantee.
            ptr: unsafe { self.ptr.offset(i as isize * self.rs) },
            ..self
        }
    }

    /// The view without its first `p` columns.
    ///
    /// # Safety
    /// Column `p` must lie inside the view's allocation (`p` below its columns, or 0).
    pub(crate) unsafe fn skip_columns(self, p: usize) -> Self {
        Strided {
            // SAFETY: the caller's guarantee.
            ptr: unsafe { self.ptr.offset(p as isize * self.cs) },
            ..self
        }
    }

    /// A row-major slice with leading dimension `ld`.
    fn rows(v: &[f32], ld: usize) -> Self {
        Strided {
            ptr: v.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// Element `(i, p)` rounded to bf16.
    ///
    /// # Safety
    /// The element must be valid.
    #[inline(always)]
    unsafe fn bf16_at(&self, i: usize, p: usize) -> u16 {
        // SAFETY: forwarded from the caller.
        let x = unsafe { *self.ptr.offset(i as isize * self.rs + p as isize * self.cs) };
        to_bf16(x) as u16
    }
}

/// The output, written by jobs in disjoint row blocks.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: jobs write disjoint rows (see `gemm`).
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the whole wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `A` (m x k) as `mp x kp` bf16 (`kp / 2` pair words per row), zero-padded: AVX-512 BF16
/// conversion where the CPU has it (AMX CPUs do), straight for depth-contiguous rows, through
/// [`super::bf16::pack_pairs`] and a transpose for other strides; else scalar.
///
/// `vector` (which needs AVX-512 BF16) picks the vector paths; [`gemm`] passes
/// [`super::bf16::available`].
///
/// # Safety
/// `a`'s `m x k` elements must be valid.
unsafe fn pack_a(
    vector: bool,
    a: Strided,
    m: usize,
    k: usize,
    mp: usize,
    kp: usize,
    parallel: bool,
) -> Aligned {
    let (kp2, kc2) = (kp / 2, k.div_ceil(2));
    let pack = |(g, chunk): (usize, &mut [u32])| {
        let (i0, rows) = (g * TILE_ROWS, TILE_ROWS.min(m - g * TILE_ROWS));
        // SAFETY (all arms): rows i0..i0 + rows x depth 0..k lie in the view (the caller's
        // guarantee); `chunk` holds 16 rows of kp2 >= kc2 words; the vector paths run only
        // where the CPU has AVX-512 BF16.
        if vector && a.cs == 1 {
            unsafe { super::bf16::convert_rows((a.ptr, a.rs), i0, rows, k, chunk, kp2) };
        } else if vector {
            let mut pairs = vec![0u32; kc2 * TILE_ROWS];
            unsafe {
                super::bf16::pack_pairs((a.ptr, a.rs, a.cs), i0, rows, k, &mut pairs, TILE_ROWS)
            };
            for (q, line) in pairs.chunks(TILE_ROWS).enumerate() {
                for (l, &w) in line[..rows].iter().enumerate() {
                    chunk[l * kp2 + q] = w;
                }
            }
        } else {
            for l in 0..rows {
                for p in 0..k {
                    let x = unsafe { a.bf16_at(i0 + l, p) };
                    chunk[l * kp2 + p / 2] |= u32::from(x) << (16 * (p % 2));
                }
            }
        }
    };
    packed(mp * kp2, kp2, m.div_ceil(TILE_ROWS), parallel, pack)
}

/// Packed operand words starting on a 64-byte boundary, so that every 64-byte row a tile
/// loads is one cache line (rows of `A` are `2 kp` bytes apart, `kp` a multiple of 32, and
/// `B`'s lines 64 bytes): a row across two lines costs the load twice.
struct Aligned {
    buf: Vec<u32>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` zero words, the first on a 64-byte boundary.
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u32; len + 15];
        // At most 15 words for a `u32` pointer (`align_offset` may answer "impossible" only
        // where alignment is not observable, as under Miri: then unaligned, still in bounds).
        let off = buf.as_ptr().align_offset(64).min(15);
        Aligned { buf, off, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A zeroed buffer of `len` words with `pack(g, chunk)` run on each of its first `groups`
/// chunks of 16 lines of `kp2` words, on rayon's pool when `parallel`.
fn packed(
    len: usize,
    kp2: usize,
    groups: usize,
    parallel: bool,
    pack: impl Fn((usize, &mut [u32])) + Send + Sync,
) -> Aligned {
    let mut out = Aligned::zeroed(len);
    let chunks = TILE_ROWS * kp2;
    if parallel {
        out.par_chunks_mut(chunks)
            .take(groups)
            .enumerate()
            .for_each(pack);
    } else {
        out.chunks_mut(chunks)
            .take(groups)
            .enumerate()
            .for_each(pack);
    }
    out
}

/// `B^T` (n x k: row `j` is output column `j`) in blocks of 16 rows, each `kp / 2` lines of 16
/// pair words (`TDPBF16PS`'s layout): [`super::bf16::pack_pairs`] where the CPU has AVX-512
/// BF16 (`vector`), else scalar.
///
/// # Safety
/// `bt`'s `n x k` elements must be valid.
unsafe fn pack_b(
    vector: bool,
    bt: Strided,
    n: usize,
    k: usize,
    np: usize,
    kp: usize,
    parallel: bool,
) -> Aligned {
    let kp2 = kp / 2;
    let pack = |(jb, blk): (usize, &mut [u32])| {
        let (j0, count) = (jb * TILE_ROWS, TILE_ROWS.min(n - jb * TILE_ROWS));
        if vector {
            // SAFETY: lines j0..j0 + count x depth 0..k lie in the view (the caller's
            // guarantee); `blk` holds kp2 >= ceil(k / 2) lines of 16 words; AVX-512 BF16.
            unsafe {
                super::bf16::pack_pairs((bt.ptr, bt.rs, bt.cs), j0, count, k, blk, TILE_ROWS)
            };
        } else {
            for j in 0..count {
                for p in 0..k {
                    // SAFETY: (j0 + j, p) lies in the n x k view (the caller's guarantee).
                    let x = unsafe { bt.bf16_at(j0 + j, p) };
                    blk[(p / 2) * TILE_ROWS + j] |= u32::from(x) << (16 * (p % 2));
                }
            }
        }
    };
    packed(np * kp2, kp2, n.div_ceil(TILE_ROWS), parallel, pack)
}

/// The bf16 halves of pair words, in memory order (low half first on x86-64).
fn halves(words: &[u32]) -> &[u16] {
    // SAFETY: u16 has no invalid values and a weaker alignment than u32; the length covers
    // exactly the words' bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u16>(), words.len() * 2) }
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

/// `TDPBF16PS` by its definition (the pseudocode of Intel's SDM, vol. 2) on tile `(ti, tj)`
/// of the 32 x 32 accumulator: for each of the 16 x 16 outputs, two f32 sums from zero over
/// the 16 pairs, one of the even products `A[m][2q] B[q][2n]` and one of the odd, each term
/// added with one rounding to nearest even; then the two sums added, and that added to the
/// accumulator. Denormal inputs count as zero and denormal results become zero (DAZ and FTZ,
/// whatever MXCSR says). A product of two bf16 values (8 significant bits each) is exact in
/// f32, so each multiply-add rounds once, as the instruction's fused one does, unless the
/// product leaves f32's range.
fn tdpbf16ps(acc: &mut [f32], ti: usize, tj: usize, a: &[u16], lda: usize, b: &[u16]) {
    let w = |x: u16| f32::from_bits(u32::from(daz_bf16(x)) << 16);
    for m in 0..TILE_ROWS {
        let (mut even, mut odd) = ([0f32; TILE_ROWS], [0f32; TILE_ROWS]);
        for q in 0..KSTEP / 2 {
            let (ae, ao) = (w(a[m * lda + 2 * q]), w(a[m * lda + 2 * q + 1]));
            let line = &b[q * 2 * TILE_ROWS..(q + 1) * 2 * TILE_ROWS];
            for (n, pair) in line.chunks_exact(2).enumerate() {
                even[n] = ftz(even[n] + ae * w(pair[0]));
                odd[n] = ftz(odd[n] + ao * w(pair[1]));
            }
        }
        let row = &mut acc[(ti * TILE_ROWS + m) * BLOCK + tj * TILE_ROWS..][..TILE_ROWS];
        for ((c, e), o) in row.iter_mut().zip(even).zip(odd) {
            *c = ftz(ftz(*c) + ftz(e + o));
        }
    }
}

/// A bf16 value, or a zero of its sign where it is denormal (an input under DAZ).
fn daz_bf16(x: u16) -> u16 {
    if x & 0x7F80 == 0 {
        x & 0x8000
    } else {
        x
    }
}

/// `x`, or a zero of its sign where it is denormal (FTZ on results, DAZ on the f32 input).
fn ftz(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7F80_0000 == 0 {
        f32::from_bits(bits & 0x8000_0000)
    } else {
        x
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
        // The store offsets and step sizes written into the `asm!` below assume these.
        const _: () = assert!(BLOCK == 32 && TILE_ROWS == 16 && KSTEP == 32);
        let (astride, bstride) = (2 * kp, 64usize);
        let bblock = kp * TILE_ROWS;
        // One `asm!` block from the zeroing to the stores, the tile registers named as
        // clobbers: the accumulators stay in tmm0..tmm3 across the depth loop with no
        // compiler-generated code between the instructions.
        // SAFETY: see the caller; at depth step k0 the loads read 16 rows of 64 bytes at a
        // stride of 2 kp bytes from `a0`/`a1` (A's rows i0..i0 + 32, depth k0..k0 + 32, of
        // mp x kp) and 16 lines of 64 bytes from `b0`/`b1` (lines k0/2..k0/2 + 16 of blocks
        // jb0 and jb0 + 1 < np / 16); the stores write the 32 x 32 f32 of `acc` (rows of 128
        // bytes).
        unsafe {
            let a0 = a.as_ptr().add(i0 * kp);
            let b0 = b.as_ptr().add(jb0 * bblock);
            let c = acc.as_mut_ptr();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                // The next 32 depth values: 64 bytes along A's rows, 16 lines of 64 bytes
                // of each B block.
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {steps}",
                "jnz 2b",
                "3:",
                // The four 16 x 16 tiles of the 32 x 32 block: 64 bytes right, 16 rows of
                // 128 bytes down.
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c} + {sc}*1 + 2048], tmm2",
                "tilestored [{c} + {sc}*1 + 2112], tmm3",
                a0 = inout(reg) a0 => _,
                a1 = inout(reg) a0.add(TILE_ROWS * kp) => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b0.add(bblock) => _,
                steps = inout(reg) kp / KSTEP => _,
                sa = in(reg) astride,
                sb = in(reg) bstride,
                c = in(reg) c,
                sc = in(reg) 4 * BLOCK,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
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
/// leaving `C` as it was, where [`usable`] is false (no tiles, or tiles that failed the
/// check against the exactly rounded product).
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
    if !usable() {
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
    // SAFETY: the views were checked to lie inside their slices; `c` is borrowed mutably.
    unsafe {
        gemm(
            backend,
            c.as_mut_ptr(),
            ldc,
            (m, n, k),
            Strided::rows(a, lda),
            Strided::rows(b, ldb),
            alpha,
            accumulate,
            super::gemm::Epilogue::None,
            true,
        )
    }
}

/// `C = alpha * A B` (plus `C` when `accumulate`) with `A` (m x k) and `bt` = `B^T` (n x k) any
/// strided views, `C` row-major with leading dimension `ldc`, then `epilogue` on each finished
/// block of 32 rows: `bf16::gemm_bf16`'s contract, on `backend`; the packing and the blocks of
/// rows spread over rayon's pool when `parallel`.
///
/// # Safety
/// Every addressed element of `a` and `bt` must be valid; `C`'s `m x n` view must be valid and
/// neither read nor written by anyone else during the call (the elements between its rows
/// are not touched); `Tiles` only where [`available`] holds.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    backend: Backend,
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    bt: Strided,
    alpha: f32,
    accumulate: bool,
    epilogue: super::gemm::Epilogue,
    parallel: bool,
) {
    assert!(
        backend == Backend::Emulated || available(),
        "AMX tiles asked for on a CPU without them"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (mp, np) = (round_up(m, BLOCK), round_up(n, BLOCK));
    let vector = super::bf16::available();
    let out = Out(c);
    // Depth blocks of at most KB (one when k <= KB), so that a job's packed rows and each
    // block of `B` stay in cache over a long depth.
    for (k0, kd, last) in depth_blocks(k, KB) {
        let kp = round_up(kd.max(1), KSTEP);
        // The block's columns of `A` and of `B^T`.
        // SAFETY: k0 < k (or k0 = 0), so column k0 lies inside both views.
        let (ad, bd) = unsafe { (a.skip_columns(k0), bt.skip_columns(k0)) };
        // Every block after the first adds to what the ones before wrote.
        let add = accumulate || k0 > 0;
        // SAFETY: the views' elements are valid (the caller's guarantee); the vector paths
        // only with AVX-512 BF16.
        let (pa, pb) = unsafe {
            (
                pack_a(vector, ad, m, kd, mp, kp, parallel),
                pack_b(vector, bd, n, kd, np, kp, parallel),
            )
        };
        let (pa, pb) = (halves(&pa), halves(&pb));
        let job = |ib: usize| {
            let (i0, rows) = (ib * BLOCK, BLOCK.min(m - ib * BLOCK));
            with_tiles(backend, || {
                // On a 64-byte boundary: each of the tile stores' rows one cache line.
                #[repr(C, align(64))]
                struct Acc([f32; BLOCK * BLOCK]);
                let Acc(acc) = &mut Acc([0f32; BLOCK * BLOCK]);
                for jb in 0..np / BLOCK {
                    block_product(backend, pa, pb, kp, i0, 2 * jb, acc);
                    let (j0, width) = (jb * BLOCK, BLOCK.min(n - jb * BLOCK));
                    for r in 0..rows {
                        let dst = out.ptr().wrapping_add((i0 + r) * ldc + j0);
                        let src = &acc[r * BLOCK..r * BLOCK + width];
                        for (j, &s) in src.iter().enumerate() {
                            // SAFETY: row i0 + r < m, column j0 + j < n of C: this job's
                            // rows, valid and ours (the caller's guarantee); read only when
                            // adding, so without it C may be uninitialised (`product`).
                            unsafe {
                                let d = dst.add(j);
                                d.write(if add { d.read() + alpha * s } else { alpha * s });
                            }
                        }
                    }
                }
            });
            if last {
                // The block of rows is finished and still in cache.
                // SAFETY: rows i0..i0 + rows x columns 0..n belong to this job alone.
                unsafe { epilogue.apply(out.ptr(), ldc, i0, rows, 0, n) };
            }
        };
        if parallel {
            (0..mp / BLOCK).into_par_iter().for_each(job);
        } else {
            (0..mp / BLOCK).for_each(job);
        }
    }
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
            // Three depth blocks, the last partial.
            (33, 40, 2 * KB + 70),
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

    /// `A` (m x k) and `B` (k x n), each also as stored (as is or transposed), with the
    /// strides `gemm_bf16` gets: `[a_rs, a_cs, b_rs, b_cs]`.
    struct Operands {
        a: Vec<f32>,
        b: Vec<f32>,
        a_store: Vec<f32>,
        b_store: Vec<f32>,
        strides: [isize; 4],
    }

    impl Operands {
        /// The views `gemm` takes: `A` and `B^T` (`B`'s strides swapped).
        fn views(&self) -> (Strided, Strided) {
            let [a_rs, a_cs, b_rs, b_cs] = self.strides;
            let a = Strided {
                ptr: self.a_store.as_ptr(),
                rs: a_rs,
                cs: a_cs,
            };
            let bt = Strided {
                ptr: self.b_store.as_ptr(),
                rs: b_cs,
                cs: b_rs,
            };
            (a, bt)
        }
    }

    /// [`Operands`] of the given shape, `A` stored transposed when `a_t`, `B` when `b_t`.
    fn operands((m, n, k): (usize, usize, usize), a_t: bool, b_t: bool) -> Operands {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.29).sin() * 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.53).cos()).collect();
        // Stored layouts: A^T is k x m, B^T is n x k.
        let a_store: Vec<f32> = if a_t {
            (0..k * m).map(|x| a[(x % m) * k + x / m]).collect()
        } else {
            a.clone()
        };
        let b_store: Vec<f32> = if b_t {
            (0..n * k).map(|x| b[(x % k) * n + x / k]).collect()
        } else {
            b.clone()
        };
        let (a_rs, a_cs) = crate::gemm::dense_strides(m, k, a_t);
        let (b_rs, b_cs) = crate::gemm::dense_strides(k, n, b_t);
        Operands {
            a,
            b,
            a_store,
            b_store,
            strides: [a_rs, a_cs, b_rs, b_cs],
        }
    }

    #[test]
    fn any_strides_and_the_epilogue_give_the_rounded_product() {
        // One depth block, and two (the epilogue, a bias and a ReLU, once after the last).
        for (m, n, k) in [(37, 50, 45), (37, 50, KB + 45)] {
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 2.0).collect();
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let ops = operands((m, n, k), a_t, b_t);
                let (av, btv) = ops.views();
                let Operands { a, b, .. } = ops;
                let want = crate::bf16::tests::reference(&a, &b, m, k, n);
                let ldc = n + 3;
                for (alpha, accumulate) in [(1.0f32, false), (0.5, true)] {
                    let mut c = vec![1f32; m * ldc];
                    // SAFETY: the views lie inside the stored operands; `c` holds m x ldc.
                    unsafe {
                        gemm(
                            Backend::Emulated,
                            c.as_mut_ptr(),
                            ldc,
                            (m, n, k),
                            av,
                            btv,
                            alpha,
                            accumulate,
                            crate::gemm::Epilogue::BiasAct {
                                bias: &bias,
                                act: crate::Act::Relu,
                                act_out: None,
                            },
                            true,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let base = if accumulate { 1.0 } else { 0.0 };
                            let w =
                                (base + f64::from(alpha) * want[i * n + j] + f64::from(bias[j]))
                                    .max(0.0);
                            let got = f64::from(c[i * ldc + j]);
                            assert!(
                                (got - w).abs() < 1e-5 * (k as f64) * (1.0 + w.abs()),
                                "a_t {a_t} b_t {b_t} at ({i}, {j}): {got} vs {w}"
                            );
                        }
                        assert_eq!(&c[i * ldc + n..i * ldc + ldc], &[1.0; 3]);
                    }
                }
            }
        }
    }

    /// What the kernels' bf16 entry point computes on AVX-512 BF16, the tile layout computes
    /// too, for the orientations a linear layer's forward and backward use (the same rounded
    /// operands; f32 sums in another order).
    #[test]
    fn the_tile_path_agrees_with_the_avx512_bf16_kernel() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let (m, n, k) = (70, 48, 96);
        for (a_t, b_t) in [(false, true), (false, false), (true, false)] {
            let ops = operands((m, n, k), a_t, b_t);
            let (av, btv) = ops.views();
            let Operands {
                a_store,
                b_store,
                strides: [a_rs, a_cs, b_rs, b_cs],
                ..
            } = ops;
            let mut tiles = vec![0f32; m * n];
            let mut avx = vec![0f32; m * n];
            // SAFETY: as above; the CPU has AVX-512 BF16 (checked).
            unsafe {
                gemm(
                    Backend::Emulated,
                    tiles.as_mut_ptr(),
                    n,
                    (m, n, k),
                    av,
                    btv,
                    1.0,
                    false,
                    crate::gemm::Epilogue::None,
                    false,
                );
                if backend().is_none() {
                    crate::bf16::gemm_bf16(
                        avx.as_mut_ptr(),
                        n,
                        m,
                        n,
                        k,
                        a_store.as_ptr(),
                        a_rs,
                        a_cs,
                        b_store.as_ptr(),
                        b_rs,
                        b_cs,
                        1.0,
                        false,
                        2,
                        crate::gemm::Epilogue::None,
                    );
                } else {
                    eprintln!("gemm_bf16 itself runs on the tile layout here");
                    avx.copy_from_slice(&tiles);
                }
            }
            let scale = avx.iter().fold(0f32, |s, x| s.max(x.abs()));
            for (x, y) in tiles.iter().zip(&avx) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "a_t {a_t} b_t {b_t}: {x} vs {y}"
                );
            }
        }
    }

    /// The vector packing (AVX-512 BF16) gives the scalar packing's words exactly, for
    /// depth-contiguous, line-contiguous and general strides, odd depths and partial blocks.
    #[test]
    fn vector_and_scalar_packing_agree() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let (rows, k) = (37, 45);
        let data: Vec<f32> = (0..3 * rows * k)
            .map(|i| (i as f32 * 0.71).sin() * 5.0)
            .collect();
        let (mp, kp) = (round_up(rows, BLOCK), round_up(k, KSTEP));
        for (rs, cs) in [(k as isize, 1), (1, rows as isize), (3 * k as isize, 2)] {
            let v = Strided {
                ptr: data.as_ptr(),
                rs,
                cs,
            };
            for parallel in [false, true] {
                // SAFETY: every view addresses at most index 3 * k * (rows - 1) + 2 * (k - 1)
                // < data.len(); the vector paths run on AVX-512 BF16 (checked).
                let (a_vec, a_sc, b_vec, b_sc) = unsafe {
                    (
                        pack_a(true, v, rows, k, mp, kp, parallel),
                        pack_a(false, v, rows, k, mp, kp, parallel),
                        pack_b(true, v, rows, k, mp, kp, parallel),
                        pack_b(false, v, rows, k, mp, kp, parallel),
                    )
                };
                assert!(a_vec[..] == a_sc[..], "A, strides ({rs}, {cs})");
                assert!(b_vec[..] == b_sc[..], "B, strides ({rs}, {cs})");
                for p in [&a_vec, &a_sc, &b_vec, &b_sc] {
                    assert_eq!(p.as_ptr().align_offset(64), 0, "a packed operand unaligned");
                }
                assert!(a_sc.iter().any(|&w| w != 0));
            }
        }
    }

    #[test]
    fn a_nan_fails_the_self_check() {
        assert_eq!(worst_relative(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert_eq!(worst_relative(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(worst_relative(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(worst_relative(&[1.0, f32::NAN], &[1.0, 2.0]), f64::INFINITY);
    }

    #[test]
    fn the_self_check_passes_on_the_tile_layout() {
        assert!(self_check(Backend::Emulated) < 1e-6);
        // On a CPU without AMX nothing takes the tiles.
        if !available() {
            assert!(!usable());
        }
    }

    #[test]
    fn the_amx_tiles_give_the_rounded_product() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX (or the kernel refused the tile data)");
            return;
        }
        check(Backend::Tiles);
    }

    /// The emulated instruction keeps the SDM's two sums per output (even and odd pairs,
    /// each from zero), treats denormal inputs as zero and flushes denormal results.
    #[test]
    fn the_emulated_instruction_follows_the_sdm() {
        let h = |x: f32| (x.to_bits() >> 16) as u16;
        let (mut a, mut b) = (
            vec![0u16; TILE_ROWS * KSTEP],
            vec![0u16; KSTEP / 2 * 2 * TILE_ROWS],
        );
        let line = |q: usize, n: usize, odd: usize| q * 2 * TILE_ROWS + 2 * n + odd;
        // Row 0, column 0: even products 2^24 and -2^24, odd product 1. One running sum
        // would lose the 1 (2^24 + 1 rounds to 2^24); the two sums keep it.
        a[0] = h(4096.0);
        a[1] = h(1.0);
        a[2] = h(4096.0);
        b[line(0, 0, 0)] = h(4096.0);
        b[line(0, 0, 1)] = h(1.0);
        b[line(1, 0, 0)] = h(-4096.0);
        // Row 1, column 0: a denormal bf16 (2^-133) times 4096 counts as zero.
        a[KSTEP] = 1;
        // Row 2, column 1: 2^-70 * 2^-60 = 2^-130, denormal in f32: flushed.
        a[2 * KSTEP] = h(2f32.powi(-70));
        b[line(0, 1, 0)] = h(2f32.powi(-60));
        // The sums start from zero and join the accumulator after: 1 + 1. (Starting the
        // even sum from the accumulator would lose both: 1 + 2^24 rounds to 2^24.)
        let mut acc = [0f32; BLOCK * BLOCK];
        acc[0] = 1.0;
        // A denormal accumulator counts as zero.
        acc[BLOCK + 1] = 2f32.powi(-130);
        tdpbf16ps(&mut acc, 0, 0, &a, KSTEP, &b);
        assert_eq!(acc[0], 2.0);
        assert_eq!(acc[BLOCK + 1], 0.0);
        assert_eq!(acc[BLOCK], 0.0);
        assert_eq!(acc[2 * BLOCK + 1], 0.0);
        // Row 0, column 1: 4096 * 2^-60, a normal result, kept.
        assert_eq!(acc[1], 2f32.powi(-48));
    }

    #[test]
    fn the_b_layout_is_pairs_interleaved() {
        // B = 2 x 3 (n x k): block 0, line q holds (B[j][2q], B[j][2q+1]) for j = 0..16.
        let b = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        // SAFETY: the 2 x 3 view lies inside `b`.
        let words = unsafe { pack_b(false, Strided::rows(&b, 3), 2, 3, 32, 32, false) };
        let p = halves(&words);
        let w = |i: usize| f32::from_bits(u32::from(p[i]) << 16);
        assert_eq!([w(0), w(1), w(2), w(3)], [1.0, 2.0, 4.0, 5.0]);
        assert_eq!([w(32), w(33), w(34), w(35)], [3.0, 0.0, 6.0, 0.0]);
        assert!(p[4..32].iter().all(|&x| x == 0));
    }
}

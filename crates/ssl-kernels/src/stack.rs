//! The whole transformer stack as one candle custom op: forward and backward written by hand
//! on flat buffers (see DESIGN.md, "Making it fast").
//!
//! Inputs: `x` (B, T, D), every layer's parameters concatenated in one flat vector (layout in
//! [`Offsets`]), and the key-padding mask (B, T) as 1/0 floats. Output: (L, B, T, D), the
//! outputs of the last layer (L = 1) or of every layer (L = depth); with
//! [`StackOp::last_rows`], (1, rows, D), the last layer at those rows.
//!
//! The op is stateful: its forward saves the activations its backward needs inside the op,
//! which candle keeps alive in the graph of the output tensor; they are freed with that graph.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::gemm::{
    head_matmul, linear_product, linear_takes_bf16, matmul, mlp_product, mlp_takes_bf16, threads,
    Epilogue, MatRef, Op, OutSlice,
};
use super::pool::BufferPool;
use super::precision::{reduced_precision_kernel, ReducedKernel};
use super::simd::{self, Act};
use super::{block_rows, col_sums_par, row_blocks};

/// Where the layer norms sit.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// Norm before attention and MLP, residual around them (ViT, MAE, CLIP).
    #[default]
    Pre,
    /// Norm after each residual addition (BERT).
    Post,
}

/// The stack's shape and options, as the kernels need them.
#[derive(Debug, Clone)]
pub struct FusedSpec {
    /// Number of layers.
    pub depth: usize,
    /// Model width D.
    pub dim: usize,
    /// Hidden width of the feed-forward block.
    pub mlp: usize,
    /// Attention heads (must divide `dim`).
    pub heads: usize,
    /// Pre- or post-norm.
    pub norm: NormPlacement,
    /// Feed-forward activation.
    pub act: Act,
    /// Dropout probability on the attention output and the feed-forward output.
    pub dropout: f32,
    /// Dropout probability on the attention probabilities.
    pub attn_dropout: f32,
    /// Layer-norm epsilon.
    pub eps: f32,
    /// Causal attention (each position attends to itself and earlier ones).
    pub causal: bool,
    /// Every product in bf16 (f32 accumulation); the caller checked the CPU.
    pub bf16: bool,
}

/// Offsets of one layer's parameters inside its block of the flat vector. Query, key and
/// value weights are adjacent, so they form one (3D, D) matrix and one product.
#[derive(Debug, Clone, Copy)]
pub struct Offsets {
    /// Query, key and value weights, (3D, D).
    pub wqkv: usize,
    /// Query, key and value biases, (3D).
    pub bqkv: usize,
    /// Attention output weight, (D, D).
    pub wo: usize,
    /// Attention output bias, (D).
    pub bo: usize,
    /// Weight of the norm around attention, (D).
    pub ln1w: usize,
    /// Bias of the norm around attention, (D).
    pub ln1b: usize,
    /// First feed-forward weight, (F, D).
    pub w1: usize,
    /// First feed-forward bias, (F).
    pub b1: usize,
    /// Second feed-forward weight, (D, F).
    pub w2: usize,
    /// Second feed-forward bias, (D).
    pub b2: usize,
    /// Weight of the norm around the MLP, (D).
    pub ln2w: usize,
    /// Bias of the norm around the MLP, (D).
    pub ln2b: usize,
    /// Length of one layer's block.
    pub len: usize,
}

impl FusedSpec {
    /// The layout of one layer's block: `[Wq Wk Wv | bq bk bv | Wo | bo | ln1 w | ln1 b |
    /// W1 | b1 | W2 | b2 | ln2 w | ln2 b]` (ln1 is the norm around attention, ln2 the one
    /// around the MLP; weights are (out, in)).
    pub fn offsets(&self) -> Offsets {
        let (d, m) = (self.dim, self.mlp);
        let wqkv = 0;
        let bqkv = wqkv + 3 * d * d;
        let wo = bqkv + 3 * d;
        let bo = wo + d * d;
        let ln1w = bo + d;
        let ln1b = ln1w + d;
        let w1 = ln1b + d;
        let b1 = w1 + m * d;
        let w2 = b1 + m;
        let b2 = w2 + d * m;
        let ln2w = b2 + d;
        let ln2b = ln2w + d;
        Offsets {
            wqkv,
            bqkv,
            wo,
            bo,
            ln1w,
            ln1b,
            w1,
            b1,
            w2,
            b2,
            ln2w,
            ln2b,
            len: ln2b + d,
        }
    }
}

/// What one layer's backward needs.
struct LayerSaved {
    /// Pre-norm: the normalised attention input; post-norm: none (it is the layer input).
    a_in: Option<Vec<f32>>,
    qkv: Vec<f32>,
    p: Vec<f32>,
    /// Attention probabilities after dropout (only with attention dropout).
    pd: Option<Vec<f32>>,
    ctx: Vec<f32>,
    /// Input of the first MLP product (pre: ln2 output; post: ln1 output).
    m_in: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// Biased pre-activation and activation of the MLP.
    h: Vec<f32>,
    g: Vec<f32>,
}

/// What one part's backward needs (the batch runs as one or two parts: [`StackOp::parts`]).
struct Saved {
    /// The part's first sequence in the batch (dropout masks are indexed over the batch).
    seq0: usize,
    /// Its sequences.
    b: usize,
    t: usize,
    /// The rows (indices into the part's) its last layer computed, if not all
    /// ([`StackOp::last_rows`]).
    rows: Option<Vec<usize>>,
    /// The stack's input and every layer's output.
    outs: Vec<Vec<f32>>,
    layers: Vec<LayerSaved>,
    pool: BufferPool,
}

impl LayerSaved {
    /// Returns every buffer to `pool`.
    fn recycle(self, pool: &BufferPool) {
        pool.put_all(
            [
                self.qkv, self.p, self.ctx, self.m_in, self.xhat1, self.rstd1, self.xhat2,
                self.rstd2, self.h, self.g,
            ]
            .into_iter()
            .chain(self.a_in)
            .chain(self.pd)
            .filter(|v| v.capacity() > 0),
        );
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        self.pool.put_all(self.outs.drain(..));
        for l in self.layers.drain(..) {
            l.recycle(&self.pool);
        }
    }
}

/// Where a [`StackOp`]'s backward leaves the packed parameters' gradient when it is not to go
/// through candle's graph (see [`StackOp::param_grad_to`]).
pub type ParamGradMailbox = Arc<Mutex<Option<Tensor>>>;

/// The fused stack op (one per forward pass), applied as
/// `x.apply_op3(&params, &mask, op)`: `x` (B, T, D) f32; `params` every layer's block of
/// [`FusedSpec::offsets`] one after the other (`depth * offsets().len` f32 values); `mask`
/// (B, T) f32, 1 = attend, 0 = padding. The output is (1, B, T, D), the last layer's output,
/// or with `all_layers` (depth, B, T, D), every layer's, or with [`StackOp::last_rows`] (1,
/// rows, D). CPU only.
///
/// The op is stateful: its forward keeps the activations its own backward reads (when `keep`),
/// so a forward is followed by at most one backward, of that forward.
pub struct StackOp {
    spec: FusedSpec,
    all_layers: bool,
    train: bool,
    /// Keep what backward needs; false when no backward will follow (`Ctx::backward`).
    keep: bool,
    seed: u64,
    pool: BufferPool,
    saved: Mutex<Option<Vec<Saved>>>,
    /// Most parts the batch is split into (2; 1 in tests comparing against the whole batch).
    max_parts: usize,
    /// The rows the last layer computes (see [`StackOp::last_rows`]).
    rows: Option<Vec<usize>>,
    mailbox: Option<ParamGradMailbox>,
}

/// Runs `a` and `b`, each on a pool of its own holding half of the current pool's threads
/// (so each half's parallel loops and products split over its own threads only), or one
/// after the other on one thread. The two pools are built once per thread count.
fn run_halves<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    type Halves = Arc<[rayon::ThreadPool; 2]>;
    // Per thread count of the calling pool.
    static POOLS: Mutex<Vec<(usize, Option<Halves>)>> = Mutex::new(Vec::new());
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return (a(), b());
    }
    let pools = {
        let mut built = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
        match built.iter().find(|(n, _)| *n == threads) {
            Some((_, pools)) => pools.clone(),
            None => {
                let build = |i: usize, n: usize| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(n)
                        .thread_name(move |j| format!("ssl-half{i}-{j}"))
                        .build()
                        .ok()
                };
                let pools = build(0, threads.div_ceil(2))
                    .zip(build(1, threads / 2))
                    .map(|(p0, p1)| Arc::new([p0, p1]));
                built.push((threads, pools.clone()));
                pools
            }
        }
    };
    match pools {
        Some(p) => rayon::join(|| p[0].install(a), || p[1].install(b)),
        // Where a pool cannot be built: both halves here, in turn.
        None => (a(), b()),
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::f32_slice(s, l, "fused transformer stack", what)
}

fn tensor_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

fn layer_norm_par(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let d = w.len();
    let rows = rstd.len();
    let rb = block_rows(rows);
    y.par_chunks_mut(rb * d)
        .zip(row_blocks(xhat, rb * d, rows.div_ceil(rb)))
        .zip(rstd.par_chunks_mut(rb))
        .enumerate()
        .for_each(|(i, ((yc, hc), rc))| {
            let x0 = i * rb * d;
            simd::layer_norm(&x[x0..x0 + yc.len()], w, b, eps, yc, hc, rc);
        });
}

fn layer_norm_backward_par(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let d = w.len();
    let rb = block_rows(rstd.len());
    dx.par_chunks_mut(rb * d).enumerate().for_each(|(i, dxc)| {
        let x0 = i * rb * d;
        let r0 = i * rb;
        let rows = dxc.len() / d;
        simd::layer_norm_backward(
            &dy[x0..x0 + dxc.len()],
            &xhat[x0..x0 + dxc.len()],
            &rstd[r0..r0 + rows],
            w,
            dxc,
            accumulate,
        );
    });
}

/// Inverted dropout in place, element `i` of `x` indexed `base + i` in the mask; with `rows`
/// (`x` then holds those rows, of width `d`, of a larger matrix), each row at its index in
/// that matrix, so the rows take the masks the whole matrix would give them.
fn dropout_par(x: &mut [f32], seed: u32, p: f32, base: usize, rows: Option<(&[usize], usize)>) {
    let thr = simd::drop_threshold(p);
    let scale = 1.0 / (1.0 - p);
    if let Some((rows, d)) = rows {
        x.par_chunks_mut(d)
            .zip(rows.par_iter())
            .for_each(|(c, &r)| {
                simd::dropout(c, seed, (base + r * d) as u32, thr, scale);
            });
        return;
    }
    let chunk = 1 << 14;
    x.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| {
        simd::dropout(c, seed, (base + i * chunk) as u32, thr, scale);
    });
}

/// The first `width` columns of rows `rows` of `x` (row stride `ld`), in that order, dense
/// in a buffer of `pool`.
fn gather_rows(pool: &BufferPool, x: &[f32], ld: usize, width: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = pool.take(rows.len() * width);
    out.par_chunks_mut(width.max(1))
        .zip(rows.par_iter())
        .for_each(|(o, &r)| o.copy_from_slice(&x[r * ld..r * ld + width]));
    out
}

/// The inverse of [`gather_rows`]: row `j` of `src` (dense, `width` columns) into the first
/// `width` columns of row `rows[j]` of `dst` (row stride `ld`).
fn scatter_rows(dst: &mut [f32], ld: usize, src: &[f32], width: usize, rows: &[usize]) {
    for (j, &r) in rows.iter().enumerate() {
        dst[r * ld..r * ld + width].copy_from_slice(&src[j * width..(j + 1) * width]);
    }
}

/// The dropout index of the attention probabilities' row `pos` of head `hi` (of `h`) of the
/// batch's sequence `seq` (length `t`): (B, H, T, T) order, which every path of the forward
/// and the backward use.
fn prob_row_index(seq: usize, h: usize, hi: usize, t: usize, pos: usize) -> u32 {
    (((seq * h + hi) * t + pos) * t) as u32
}

/// The runs of chosen rows in each sequence of `t` rows: `(sequence, first index into the
/// chosen rows, count)`, sequences without one left out; `rows` sorted, or `None` for every
/// row of `b` sequences.
fn seq_groups(b: usize, t: usize, rows: Option<&[usize]>) -> Vec<(usize, usize, usize)> {
    let Some(rows) = rows else {
        return (0..b).map(|bi| (bi, bi * t, t)).collect();
    };
    let mut groups: Vec<(usize, usize, usize)> = Vec::new();
    for (j, &r) in rows.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.0 == r / t => g.2 += 1,
            _ => groups.push((r / t, j, 1)),
        }
    }
    groups
}

/// `a + b` elementwise in a new vector, written once (no zeroing first), on the rayon pool.
fn sum_of(a: &[f32], b: &[f32]) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let n = a.len().min(b.len());
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                o.write(x + y);
            }
        });
    // SAFETY: the loop above wrote each of the first `n` elements (the chunks of `n`
    // elements of `out`, `a` and `b` pair up one to one).
    unsafe { out.set_len(n) };
    out
}

/// `acc += x` elementwise, in parallel blocks.
fn add_assign_par(acc: &mut [f32], x: &[f32]) {
    let chunk = 1 << 14;
    acc.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(a, b)| simd::add_assign(a, b));
}

/// `y = x W^T` for `x` (rows, in) and `W` (out, in), then `epilogue` (the output
/// projections' bias comes later, in [`residual_epilogue`]).
fn product(
    pool: &BufferPool,
    x: &[f32],
    rows: usize,
    w: &[f32],
    out_dim: usize,
    epilogue: Epilogue,
    bf16: bool,
) -> Vec<f32> {
    let in_dim = w.len() / out_dim.max(1);
    let mut y = pool.take(rows * out_dim);
    linear_product(
        &mut y,
        MatRef::dense(x, rows, in_dim),
        MatRef::dense(w, out_dim, in_dim),
        epilogue,
        bf16,
    );
    y
}

/// A layer norm's parameters and outputs for [`residual_epilogue`].
struct NormOut<'a> {
    w: &'a [f32],
    b: &'a [f32],
    eps: f32,
    y: &'a mut [f32],
    xhat: &'a mut [f32],
    rstd: &'a mut [f32],
}

/// The epilogue of an output projection, one parallel pass over row blocks of `a` (rows of
/// width `bias.len()`): `a = dropout(a + bias) + resid` in place (dropout at `drop = (seed,
/// p)`, element-indexed from `base` as [`dropout_par`] (with `at_rows`, `a` holds those rows of a
/// larger matrix, each masked as its row there), so backward regenerates the same mask), then, with
/// `norm`, the layer norm of each row into `norm.y`, `norm.xhat` (unless empty), `norm.rstd`. Replaces a bias
/// pass, a dropout pass, a serial residual sum and a layer-norm pass.
fn residual_epilogue(
    a: &mut [f32],
    bias: &[f32],
    drop: Option<(u32, f32)>,
    base: usize,
    at_rows: Option<&[usize]>,
    resid: &[f32],
    norm: Option<NormOut>,
) {
    let d = bias.len();
    let rows = a.len() / d.max(1);
    let rb = block_rows(rows);
    let drop = drop.map(|(seed, p)| (seed, simd::drop_threshold(p), 1.0 / (1.0 - p)));
    let block = |i: usize, ac: &mut [f32]| {
        simd::add_bias(ac, bias);
        if let Some((seed, thr, scale)) = drop {
            match at_rows {
                None => simd::dropout(ac, seed, (base + i * rb * d) as u32, thr, scale),
                Some(at_rows) => {
                    for (k, row) in ac.chunks_mut(d).enumerate() {
                        let at = base + at_rows[i * rb + k] * d;
                        simd::dropout(row, seed, at as u32, thr, scale);
                    }
                }
            }
        }
        simd::add_assign(ac, &resid[i * rb * d..i * rb * d + ac.len()]);
    };
    match norm {
        None => a
            .par_chunks_mut(rb * d)
            .enumerate()
            .for_each(|(i, ac)| block(i, ac)),
        Some(nm) => a
            .par_chunks_mut(rb * d)
            .zip(nm.y.par_chunks_mut(rb * d))
            .zip(row_blocks(nm.xhat, rb * d, rows.div_ceil(rb)))
            .zip(nm.rstd.par_chunks_mut(rb))
            .enumerate()
            .for_each(|(i, (((ac, yc), hc), rc))| {
                block(i, ac);
                simd::layer_norm(ac, nm.w, nm.b, nm.eps, yc, hc, rc);
            }),
    }
}

/// Backward of a biased [`product`]: writes `dW = dy^T x` and `db = colsum(dy)` into `gw`,
/// `gb` and returns `dx = dy W`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    pool: &BufferPool,
    dy: &[f32],
    x: &[f32],
    rows: usize,
    w: &[f32],
    out_dim: usize,
    gw: &mut [f32],
    gb: &mut [f32],
    want_dx: bool,
    bf16: bool,
) -> Vec<f32> {
    let in_dim = w.len() / out_dim.max(1);
    matmul(
        gw,
        in_dim,
        MatRef::dense(dy, rows, out_dim),
        Op::T,
        MatRef::dense(x, rows, in_dim),
        Op::N,
        1.0,
        false,
        threads(),
        bf16,
    );
    col_sums_par(gb, dy, None);
    if !want_dx {
        return Vec::new();
    }
    let mut dx = pool.take(rows * in_dim);
    matmul(
        &mut dx,
        in_dim,
        MatRef::dense(dy, rows, out_dim),
        Op::N,
        MatRef::dense(w, out_dim, in_dim),
        Op::N,
        1.0,
        false,
        threads(),
        bf16,
    );
    dx
}

impl StackOp {
    /// A new op; `seed` drives dropout (unused when not training or without dropout);
    /// `keep`: save the activations backward needs (without it, backward is an error).
    pub fn new(
        spec: FusedSpec,
        all_layers: bool,
        train: bool,
        keep: bool,
        seed: u64,
        pool: BufferPool,
    ) -> Self {
        StackOp {
            spec,
            all_layers,
            train,
            keep,
            seed,
            pool,
            saved: Mutex::new(None),
            max_parts: 2,
            rows: None,
            mailbox: None,
        }
    }

    /// Makes the backward leave the parameters' gradient in `mailbox` (added to what is
    /// there) and return none for them to candle. For a caller that passes the parameters
    /// detached and hands their gradient to each variable itself: candle would otherwise
    /// zero-fill and add it at the packed tensor and again at every piece it was packed from.
    /// The backward still runs only when `x` tracks a gradient.
    pub fn param_grad_to(mut self, mailbox: ParamGradMailbox) -> Self {
        self.mailbox = Some(mailbox);
        self
    }

    /// Makes the last layer compute its output only at `rows` (indices into the batch's B x T
    /// rows, strictly increasing), for a loss that reads only those (MLM's masked
    /// positions): keys and values still come from every row, everything after them runs on
    /// these rows alone, so the last layer costs about a third of a full one at 15% of the
    /// rows. The output is then (1, rows, D): those rows of the full output (in f32 the
    /// same values up to rounding; the dropout masks are the full layer's).
    /// Only for the last layer's output (not `all_layers`) and non-causal attention (the
    /// forward fails otherwise).
    pub fn last_rows(mut self, rows: Vec<usize>) -> Self {
        self.rows = Some(rows);
        self
    }

    fn drops(&self) -> bool {
        self.train && self.spec.dropout > 0.0
    }

    fn attn_drops(&self) -> bool {
        self.train && self.spec.attn_dropout > 0.0
    }

    /// The dropout seed of `site` (0: attention output, 1: MLP output, 2: attention
    /// probabilities) in layer `layer`.
    fn site_seed(&self, layer: usize, site: usize) -> u32 {
        let mut z = self
            .seed
            .wrapping_add(((layer * 3 + site) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }

    /// Whether a layer runs as one job per sequence ([`Self::forward_layer_blocked`]): without
    /// backward or dropout, when every product of the layer takes bf16 and there is a
    /// sequence for every thread.
    fn layer_blocked(&self, b: usize, t: usize) -> bool {
        let (n, d, m) = (b * t, self.spec.dim, self.spec.mlp);
        !self.keep
            && !self.drops()
            && !self.attn_drops()
            && self.fused_attention(t)
            && linear_takes_bf16(n, 3 * d, d)
            && linear_takes_bf16(n, d, d)
            && mlp_takes_bf16(n, d, m, d)
            && b >= rayon::current_num_threads()
    }

    /// Whether the attention of sequences of `t` runs as one bf16 kernel per head
    /// ([`super::bf16::attention_head`]): when both its products would run in bf16 on the
    /// AVX-512 BF16 kernel (with AMX each head's two products run on the tiles instead).
    fn fused_attention(&self, t: usize) -> bool {
        self.spec.bf16
            && reduced_precision_kernel() == ReducedKernel::Avx512Bf16
            && super::gemm::per_head_bf16(t, t, self.spec.dim / self.spec.heads)
    }

    /// Whether the attention's per-head products take bf16 (when the stack's are): not on
    /// CPUs whose reduced-precision products run in fp16 ([`ReducedKernel::Avx512Fp16`]), where
    /// the bf16 kernel runs at half the f32 rate and the fp16 one takes whole-batch products
    /// only: a head's operands cost as much to pack as its products save. Measured on family
    /// 6 model 207, one thread, width 256 and 4 heads: a fused fp16 head (the bf16 kernel's
    /// structure on the fp16 packers) took 2.88-3.04 ms per 16 x 128 tokens against 2.79-2.80
    /// in f32; with 8 heads (its depth of 32 padded to 64) it was slower at 128 tokens and
    /// level at 256 and 512; with 4 heads it gained 10-20% only from 256 tokens on
    /// (`bench/2026-12-07-xeon-attention.md`).
    fn head_bf16(&self) -> bool {
        self.spec.bf16 && reduced_precision_kernel().bf16_operands()
    }

    /// Scaled dot-product attention for every (batch, head): fills `p` and `ctx` (N, D)
    /// from `qkv` (N, 3D), `pd` too under attention dropout. `fused` (allowed where
    /// [`Self::fused_attention`] says so, never with `rows`): one bf16 kernel per head, which
    /// needs no `p` (it may be empty, when no backward follows); else two products per head
    /// with the softmax between them over `p`. With `rows` (sorted indices into the part's
    /// rows; not causal) only those queries: `p` and `pd` hold each sequence's run of k
    /// chosen rows as (H, k, T) (without `rows`, (B, H, T, T): every row chosen) and `ctx`
    /// (rows, D); each row's probabilities take the dropout mask of the whole layer.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        fused: bool,
        layer: usize,
        seq0: usize,
        b: usize,
        t: usize,
        qkv: &[f32],
        key_bias: &[f32],
        rows: Option<&[usize]>,
        p: &mut [f32],
        pd: Option<&mut [f32]>,
        ctx: &mut [f32],
    ) {
        let (d, h) = (self.spec.dim, self.spec.heads);
        let dh = d / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let ld = 3 * d;
        let causal = self.spec.causal;
        let p_ptr = OutSlice::new(p);
        let pd_ptr = pd.map(OutSlice::new);
        let ctx_ptr = OutSlice::new(ctx);
        let seed = self.site_seed(layer, 2);
        let (thr, dscale) = (
            simd::drop_threshold(self.spec.attn_dropout),
            1.0 / (1.0 - self.spec.attn_dropout),
        );
        if fused {
            let keep_p = !p.is_empty();
            (0..b * h).into_par_iter().for_each(|bh| {
                let (bi, hi) = (bh / h, bh % h);
                let base = bi * t * ld + hi * dh;
                let kb = &key_bias[bi * t..(bi + 1) * t];
                // SAFETY: task `bh` alone touches block `bh` of `p`/`pd` and the (rows of
                // batch `bi`, columns of head `hi`) block of `ctx`; reads stay inside `qkv`;
                // `fused_attention` checked the CPU.
                unsafe {
                    super::bf16::attention_head(
                        qkv.as_ptr().add(base),
                        qkv.as_ptr().add(base + d),
                        qkv.as_ptr().add(base + 2 * d),
                        ld,
                        t,
                        dh,
                        scale,
                        ctx_ptr.ptr().add(bi * t * d + hi * dh),
                        d,
                        |r0, scores| {
                            let at = bh * t * t + r0 * t;
                            simd::softmax_rows(scores, kb, causal, r0);
                            if keep_p {
                                std::slice::from_raw_parts_mut(p_ptr.ptr().add(at), scores.len())
                                    .copy_from_slice(scores);
                            }
                            if let Some(pd_ptr) = pd_ptr {
                                let idx = prob_row_index(seq0 + bi, h, hi, t, r0);
                                simd::dropout(scores, seed, idx, thr, dscale);
                                std::slice::from_raw_parts_mut(pd_ptr.ptr().add(at), scores.len())
                                    .copy_from_slice(scores);
                            }
                        },
                    );
                }
            });
            return;
        }
        let groups = seq_groups(b, t, rows);
        // The chosen queries: gathered (row stride d), or read in place (stride 3d).
        let gathered = rows.map(|rows| gather_rows(&self.pool, qkv, ld, d, rows));
        let (q, q_ld) = gathered.as_deref().map_or((qkv, ld), |g| (g, d));
        (0..groups.len() * h).into_par_iter().for_each(|gh| {
            let ((bi, j0, k), hi) = (groups[gh / h], gh % h);
            let kv = bi * t * ld + hi * dh;
            let at = j0 * h * t + hi * k * t;
            // SAFETY: task `gh` alone touches its (k, T) block of `p`/`pd` and the (its rows,
            // head `hi`'s columns) block of `ctx`; reads stay inside `q` and `qkv`.
            unsafe {
                let pb = std::slice::from_raw_parts_mut(p_ptr.ptr().add(at), k * t);
                head_matmul(
                    pb.as_mut_ptr(),
                    t,
                    k,
                    t,
                    dh,
                    q.as_ptr().add(j0 * q_ld + hi * dh),
                    q_ld as isize,
                    1,
                    qkv.as_ptr().add(kv + d),
                    1,
                    ld as isize,
                    scale,
                    false,
                    self.head_bf16(),
                );
                simd::softmax_rows(pb, &key_bias[bi * t..(bi + 1) * t], causal, 0);
                let probs: &[f32] = match pd_ptr {
                    Some(pd_ptr) => {
                        let pdb = std::slice::from_raw_parts_mut(pd_ptr.ptr().add(at), k * t);
                        pdb.copy_from_slice(pb);
                        for (i, row) in pdb.chunks_mut(t).enumerate() {
                            let pos = rows.map_or(i, |r| r[j0 + i] % t);
                            let idx = prob_row_index(seq0 + bi, h, hi, t, pos);
                            simd::dropout(row, seed, idx, thr, dscale);
                        }
                        pdb
                    }
                    None => pb,
                };
                head_matmul(
                    ctx_ptr.ptr().add(j0 * d + hi * dh),
                    d,
                    k,
                    dh,
                    t,
                    probs.as_ptr(),
                    t as isize,
                    1,
                    qkv.as_ptr().add(kv + 2 * d),
                    ld as isize,
                    1,
                    1.0,
                    false,
                    self.head_bf16(),
                );
            }
        });
        self.pool.put_all(gathered);
    }

    /// Backward of [`Self::attention`] (with the same `rows`): `dqkv` (N, 3D) from `dctx`
    /// (its rows, D), the queries' gradient zero outside `rows`.
    fn attention_backward(
        &self,
        layer: usize,
        s: &Saved,
        ls: &LayerSaved,
        rows: Option<&[usize]>,
        dctx: &[f32],
    ) -> Vec<f32> {
        let t = s.t;
        let (d, h) = (self.spec.dim, self.spec.heads);
        let dh = d / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let ld = 3 * d;
        let qkv = &ls.qkv;
        let groups = seq_groups(s.b, t, rows);
        let gathered = rows.map(|rows| gather_rows(&self.pool, qkv, ld, d, rows));
        let (q, q_ld) = gathered.as_deref().map_or((qkv.as_slice(), ld), |g| (g, d));
        // With every row chosen each block of dqkv is written; else sequences without a
        // chosen row keep zero key and value gradients, and the queries' go to `dq` first.
        let mut dqkv = match rows {
            Some(_) => self.pool.zeros(s.b * t * ld),
            None => self.pool.take(s.b * t * ld),
        };
        let mut dq = vec![0f32; rows.map_or(0, <[usize]>::len) * d];
        let dqkv_ptr = OutSlice::new(&mut dqkv);
        let (dq_ptr, dq_ld) = match rows {
            Some(_) => (OutSlice::new(&mut dq), d),
            None => (dqkv_ptr, ld),
        };
        let seed = self.site_seed(layer, 2);
        let (thr, dscale) = (
            simd::drop_threshold(self.spec.attn_dropout),
            1.0 / (1.0 - self.spec.attn_dropout),
        );
        (0..groups.len() * h).into_par_iter().for_each(|gh| {
            let ((bi, j0, k), hi) = (groups[gh / h], gh % h);
            let kv = bi * t * ld + hi * dh;
            let at = j0 * h * t + hi * k * t;
            let p = &ls.p[at..at + k * t];
            let probs = match &ls.pd {
                Some(pd) => &pd[at..at + k * t],
                None => p,
            };
            let mut ds = vec![0f32; k * t];
            // SAFETY: task `gh` alone writes the (sequence `bi`'s rows, head `hi`'s columns)
            // blocks of dk and dv and the (its rows, head `hi`) block of the queries'
            // gradient; reads stay inside their buffers.
            unsafe {
                // dP = dctx V^T
                head_matmul(
                    ds.as_mut_ptr(),
                    t,
                    k,
                    t,
                    dh,
                    dctx.as_ptr().add(j0 * d + hi * dh),
                    d as isize,
                    1,
                    qkv.as_ptr().add(kv + 2 * d),
                    1,
                    ld as isize,
                    1.0,
                    false,
                    self.head_bf16(),
                );
                // dV = P^T dctx
                head_matmul(
                    dqkv_ptr.ptr().add(kv + 2 * d),
                    ld,
                    t,
                    dh,
                    k,
                    probs.as_ptr(),
                    1,
                    t as isize,
                    dctx.as_ptr().add(j0 * d + hi * dh),
                    d as isize,
                    1,
                    1.0,
                    false,
                    self.head_bf16(),
                );
                if ls.pd.is_some() {
                    for (i, row) in ds.chunks_mut(t).enumerate() {
                        let pos = rows.map_or(i, |r| r[j0 + i] % t);
                        let idx = prob_row_index(s.seq0 + bi, h, hi, t, pos);
                        simd::dropout(row, seed, idx, thr, dscale);
                    }
                }
                simd::softmax_backward_rows(&mut ds, p, t);
                // dQ = scale dS K
                head_matmul(
                    dq_ptr.ptr().add(j0 * dq_ld + hi * dh),
                    dq_ld,
                    k,
                    dh,
                    t,
                    ds.as_ptr(),
                    t as isize,
                    1,
                    qkv.as_ptr().add(kv + d),
                    ld as isize,
                    1,
                    scale,
                    false,
                    self.head_bf16(),
                );
                // dK = scale dS^T Q
                head_matmul(
                    dqkv_ptr.ptr().add(kv + d),
                    ld,
                    t,
                    dh,
                    k,
                    ds.as_ptr(),
                    1,
                    t as isize,
                    q.as_ptr().add(j0 * q_ld + hi * dh),
                    q_ld as isize,
                    1,
                    scale,
                    false,
                    self.head_bf16(),
                );
            }
        });
        if let Some(rows) = rows {
            scatter_rows(&mut dqkv, ld, &dq, d, rows);
        }
        self.pool.put_all(gathered);
        dqkv
    }

    /// Layer `layer` over sequences `seq0..seq0 + b` (`xin` their rows): its output and what
    /// its backward needs. With `rows` (sorted row indices into `xin`, non-causal), the
    /// output only at those rows: keys and values come from every row, everything after
    /// them (queries' attention, output projection, residual, norms, MLP) runs on those
    /// rows alone, and the output has `rows.len()` rows.
    #[allow(clippy::too_many_arguments)]
    fn forward_layer(
        &self,
        layer: usize,
        seq0: usize,
        b: usize,
        t: usize,
        xin: &[f32],
        params: &[f32],
        key_bias: &[f32],
        rows: Option<&[usize]>,
    ) -> (Vec<f32>, LayerSaved) {
        let sp = &self.spec;
        let (d, m, n) = (sp.dim, sp.mlp, b * t);
        // Rows after attention.
        let nr = rows.map_or(n, <[usize]>::len);
        let o = sp.offsets();
        let w = &params[layer * o.len..(layer + 1) * o.len];
        let pre = sp.norm == NormPlacement::Pre;
        let pool = &self.pool;
        // Normalised inputs only for backward; empty buffers are not written. The norm
        // around attention sees every row before it (pre) or the rows after it (post).
        let n1 = if pre { n } else { nr };
        let mut xhat1 = pool.take(if self.keep { n1 * d } else { 0 });
        let mut rstd1 = pool.take(n1);
        let mut xhat2 = pool.take(if self.keep { nr * d } else { 0 });
        let mut rstd2 = pool.take(nr);
        let a_in = pre.then(|| {
            let mut y = pool.take(n * d);
            layer_norm_par(
                xin,
                &w[o.ln1w..o.ln1w + d],
                &w[o.ln1b..o.ln1b + d],
                sp.eps,
                &mut y,
                &mut xhat1,
                &mut rstd1,
            );
            y
        });
        let att_in = a_in.as_deref().unwrap_or(xin);
        let qkv = product(
            pool,
            att_in,
            n,
            &w[o.wqkv..o.bqkv],
            3 * d,
            Epilogue::Bias(&w[o.bqkv..o.wo]),
            sp.bf16,
        );
        let heads = sp.heads;
        let fused = rows.is_none() && self.fused_attention(t);
        // Probabilities: (B, H, T, T), or with `rows` each sequence's run of k rows as
        // (H, k, T).
        let p_len = match rows {
            Some(r) => r.len() * heads * t,
            None => b * heads * t * t,
        };
        let mut p = pool.take(if self.keep || !fused { p_len } else { 0 });
        let mut pd = self.attn_drops().then(|| pool.take(p_len));
        let mut ctx = pool.take(nr * d);
        self.attention(
            fused,
            layer,
            seq0,
            b,
            t,
            &qkv,
            key_bias,
            rows,
            &mut p,
            pd.as_deref_mut(),
            &mut ctx,
        );
        // Output projection, then one pass: bias, dropout, residual and the next norm
        // (pre: ln2 of x1, the MLP's input; post: ln1, whose output is both x1 and the MLP's
        // input).
        let mut ao = product(pool, &ctx, nr, &w[o.wo..o.bo], d, Epilogue::None, sp.bf16);
        let drop0 = self.drops().then(|| (self.site_seed(layer, 0), sp.dropout));
        let mut m_in = pool.take(nr * d);
        // The residual's rows of the input.
        let picked = rows.map(|rows| gather_rows(pool, xin, d, d, rows));
        let resid = picked.as_deref().unwrap_or(xin);
        let (lnw, lnb, xhat, rstd) = if pre {
            (o.ln2w, o.ln2b, &mut xhat2, &mut rstd2)
        } else {
            (o.ln1w, o.ln1b, &mut xhat1, &mut rstd1)
        };
        residual_epilogue(
            &mut ao,
            &w[o.bo..o.ln1w],
            drop0,
            seq0 * t * d,
            rows,
            resid,
            Some(NormOut {
                w: &w[lnw..lnw + d],
                b: &w[lnb..lnb + d],
                eps: sp.eps,
                y: &mut m_in,
                xhat,
                rstd,
            }),
        );
        if let Some(v) = picked {
            pool.put(v);
        }
        // x1, the residual stream into the MLP block: pre-norm the sum itself, post-norm its
        // norm (m_in).
        let x1 = if pre {
            Some(ao)
        } else {
            pool.put(ao);
            None
        };
        // h = m_in W1^T + b1 and g = act(h), the activation applied to each block of the
        // product while it is in cache; without backward, g overwrites h, and in bf16 each
        // block of rows goes through both products with its h in cache (neither is kept).
        let (h, g, mut mo) = if !self.keep && sp.bf16 && mlp_takes_bf16(nr, d, m, d) {
            let mut mo = pool.take(nr * d);
            mlp_product(
                &mut mo,
                MatRef::dense(&m_in, nr, d),
                MatRef::dense(&w[o.w1..o.b1], m, d),
                &w[o.b1..o.w2],
                sp.act,
                MatRef::dense(&w[o.w2..o.b2], d, m),
            );
            (Vec::new(), Vec::new(), mo)
        } else {
            let mut g = pool.take(if self.keep { nr * m } else { 0 });
            let act_out = self.keep.then(|| OutSlice::new(&mut g));
            let mut h = product(
                pool,
                &m_in,
                nr,
                &w[o.w1..o.b1],
                m,
                Epilogue::BiasAct {
                    bias: &w[o.b1..o.w2],
                    act: sp.act,
                    act_out,
                },
                sp.bf16,
            );
            if !self.keep {
                std::mem::swap(&mut h, &mut g);
            }
            let mo = product(pool, &g, nr, &w[o.w2..o.b2], d, Epilogue::None, sp.bf16);
            (h, g, mo)
        };
        let drop1 = self.drops().then(|| (self.site_seed(layer, 1), sp.dropout));
        let out = match x1 {
            // Pre-norm: out = x1 + dropout(mo + b2).
            Some(x1) => {
                let base = seq0 * t * d;
                residual_epilogue(&mut mo, &w[o.b2..o.ln2w], drop1, base, rows, &x1, None);
                pool.put(x1);
                mo
            }
            // Post-norm: out = ln2(m_in + dropout(mo + b2)).
            None => {
                let mut out = pool.take(nr * d);
                residual_epilogue(
                    &mut mo,
                    &w[o.b2..o.ln2w],
                    drop1,
                    seq0 * t * d,
                    rows,
                    &m_in,
                    Some(NormOut {
                        w: &w[o.ln2w..o.ln2w + d],
                        b: &w[o.ln2b..o.ln2b + d],
                        eps: sp.eps,
                        y: &mut out,
                        xhat: &mut xhat2,
                        rstd: &mut rstd2,
                    }),
                );
                pool.put(mo);
                out
            }
        };
        (
            out,
            LayerSaved {
                a_in,
                qkv,
                p,
                pd,
                ctx,
                m_in,
                xhat1,
                rstd1,
                xhat2,
                rstd2,
                h,
                g,
            },
        )
    }

    /// Layer `layer` without backward, one job per sequence (where [`Self::layer_blocked`]):
    /// the four weight matrices are packed once, then each sequence goes through the whole
    /// layer (QKV, every head, output projection, residual and norm, the MLP, residual and
    /// norm) with its intermediate rows in this thread's scratch buffer, instead of each step
    /// running over the whole batch and sending it to memory. Every row is computed by the same
    /// kernels in the same order as [`Self::forward_layer`], so the output is the same bit for
    /// bit (`tests/bf16.rs`).
    fn forward_layer_blocked(
        &self,
        layer: usize,
        b: usize,
        t: usize,
        xin: &[f32],
        params: &[f32],
        key_bias: &[f32],
    ) -> Vec<f32> {
        let sp = &self.spec;
        let (d, m, heads) = (sp.dim, sp.mlp, sp.heads);
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let o = sp.offsets();
        let w = &params[layer * o.len..(layer + 1) * o.len];
        let pre = sp.norm == NormPlacement::Pre;
        let mut out = self.pool.take(b * t * d);
        let weights = [
            (&w[o.wqkv..o.bqkv], 3 * d, d),
            (&w[o.wo..o.bo], d, d),
            (&w[o.w1..o.b1], m, d),
            (&w[o.w2..o.b2], d, m),
        ];
        let (ln1, ln2) = (
            (&w[o.ln1w..o.ln1w + d], &w[o.ln1b..o.ln1b + d]),
            (&w[o.ln2w..o.ln2w + d], &w[o.ln2b..o.ln2b + d]),
        );
        // Row-wise layer norm of `x` into `y` (no normalised copy kept).
        let norm = |x: &[f32], (nw, nb): (&[f32], &[f32]), y: &mut [f32], rstd: &mut [f32]| {
            simd::layer_norm(x, nw, nb, sp.eps, y, &mut [], rstd);
        };
        super::bf16::with_packed_weights(&weights, |pw| {
            out.par_chunks_mut(t * d)
                .enumerate()
                .for_each(|(bi, out_rows)| {
                    let x = &xin[bi * t * d..(bi + 1) * t * d];
                    let kb = &key_bias[bi * t..(bi + 1) * t];
                    // Scratch: the projections, later the hidden layer; the context, later the
                    // MLP's output; the attention output (then x1); the norm's output (a_in,
                    // then the MLP's input); the rows' 1 / std.
                    let wide = (3 * d).max(m);
                    super::bf16::with_scratch(t * (wide + 3 * d + 1), |scratch| {
                        let (wide_buf, rest) = scratch.split_at_mut(t * wide);
                        let (ctx, rest) = rest.split_at_mut(t * d);
                        let (ao, rest) = rest.split_at_mut(t * d);
                        let (normed, rstd) = rest.split_at_mut(t * d);
                        let att_in: &[f32] = if pre {
                            norm(x, ln1, normed, rstd);
                            normed
                        } else {
                            x
                        };
                        let qkv = &mut wide_buf[..t * 3 * d];
                        pw.product(0, att_in, d, qkv);
                        simd::add_bias(qkv, &w[o.bqkv..o.wo]);
                        for hi in 0..heads {
                            let q = qkv[hi * dh..].as_ptr();
                            // SAFETY: head hi's (t, dh) views of q, k, v (row stride 3d) lie in
                            // `qkv`, its columns of `ctx` (row stride d) in `ctx`, which this job
                            // alone writes; `layer_blocked` checked the CPU.
                            unsafe {
                                super::bf16::attention_head(
                                    q,
                                    q.add(d),
                                    q.add(2 * d),
                                    3 * d,
                                    t,
                                    dh,
                                    scale,
                                    ctx[hi * dh..].as_mut_ptr(),
                                    d,
                                    |r0, scores| simd::softmax_rows(scores, kb, sp.causal, r0),
                                );
                            }
                        }
                        pw.product(1, ctx, d, ao);
                        // x1 = x + ao + bo; the MLP's input is its norm (post: ln1, which is
                        // also the residual stream; pre: ln2).
                        simd::add_bias(ao, &w[o.bo..o.ln1w]);
                        simd::add_assign(ao, x);
                        norm(ao, if pre { ln2 } else { ln1 }, normed, rstd);
                        let h = &mut wide_buf[..t * m];
                        pw.product(2, normed, d, h);
                        simd::bias_act_in_place(h, &w[o.b1..o.w2], sp.act);
                        let mo = ctx;
                        pw.product(3, h, m, mo);
                        simd::add_bias(mo, &w[o.b2..o.ln2w]);
                        if pre {
                            // out = x1 + mo + b2.
                            simd::add_assign(mo, ao);
                            out_rows.copy_from_slice(mo);
                        } else {
                            // out = ln2(m_in + mo + b2).
                            simd::add_assign(mo, normed);
                            norm(mo, ln2, out_rows, rstd);
                        }
                    });
                });
        });
        out
    }

    /// How many parts the batch runs as: two halves (each on half the threads, see
    /// [`run_halves`]) wherever there are two sequences and layers and the products run in
    /// f32 or, asked for bf16, in fp16 ([`ReducedKernel::Avx512Fp16`]), except, without backward,
    /// on one thread (where halves gain nothing). Not on the bf16 kernels: there the size
    /// rule that picks bf16 or f32 for each product counts the whole batch's rows (and
    /// [`Self::layer_blocked`] runs one job per sequence). In fp16 the forward's choice
    /// counts no rows (so inference in halves equals the whole batch); the backward's counts
    /// the half's, the same on one thread as on two (training always halves). Each half goes through every
    /// layer, forward and backward, with no hand-off between the threads at each of a
    /// layer's dozen steps. The halves give the same outputs and input gradients, bit for
    /// bit, as the whole batch would (every row takes the same kernels); the parameters'
    /// gradients are the two halves' sums added. With backward the batch is halved on one
    /// thread too, so a run gives the same bits on one thread as on two. The split is
    /// static: a core much slower than the other (a busy neighbour) holds its half back.
    fn parts(&self, b: usize) -> usize {
        let halve = b >= 2
            && self.spec.depth > 0
            && (!self.spec.bf16 || reduced_precision_kernel() == ReducedKernel::Avx512Fp16)
            && (self.keep || rayon::current_num_threads() >= 2);
        if halve {
            self.max_parts.min(2)
        } else {
            1
        }
    }

    /// Every layer's forward over sequences `seq0..seq0 + b` (`x` and `key_bias` their
    /// rows). The returned part's `outs` hold the input's copy (with backward) and then every
    /// layer's output, or, without backward or `all_layers`, only the last output.
    #[allow(clippy::too_many_arguments)]
    fn forward_part(
        &self,
        seq0: usize,
        b: usize,
        t: usize,
        x: &[f32],
        params: &[f32],
        key_bias: &[f32],
        rows: Option<Vec<usize>>,
    ) -> Saved {
        let depth = self.spec.depth;
        let mut outs: Vec<Vec<f32>> = Vec::with_capacity(depth + 1);
        if self.keep {
            outs.push(self.pool.copy_of(x));
        }
        let mut layers = Vec::with_capacity(depth);
        for l in 0..depth {
            let input: &[f32] = outs.last().map_or(x, Vec::as_slice);
            let last_rows = rows.as_deref().filter(|_| l + 1 == depth);
            let out = if last_rows.is_none() && self.layer_blocked(b, t) {
                self.forward_layer_blocked(l, b, t, input, params, key_bias)
            } else {
                let (out, saved) =
                    self.forward_layer(l, seq0, b, t, input, params, key_bias, last_rows);
                if self.keep {
                    layers.push(saved);
                } else {
                    saved.recycle(&self.pool);
                }
                out
            };
            if !self.keep && !self.all_layers {
                if let Some(prev) = outs.pop() {
                    self.pool.put(prev);
                }
            }
            outs.push(out);
        }
        Saved {
            seq0,
            b,
            t,
            rows,
            outs,
            layers,
            pool: self.pool.clone(),
        }
    }

    /// Backward through every layer of one part: writes its parameters' gradients into
    /// `grads` (every slot, whatever was there) and returns the gradient of its input. `own(l)` is the gradient arriving at
    /// layer `l`'s output from outside the stack, if any.
    fn backward_part<'g>(
        &self,
        s: &Saved,
        own: impl Fn(usize) -> Option<&'g [f32]>,
        params: &[f32],
        grads: &mut [f32],
    ) -> Vec<f32> {
        let n = s.b * s.t * self.spec.dim;
        let mut carry: Option<Vec<f32>> = None;
        for l in (0..self.spec.depth).rev() {
            let dout = match (carry.take(), own(l)) {
                (Some(mut c), Some(g)) => {
                    simd::add_assign(&mut c, g);
                    c
                }
                (Some(c), None) => c,
                (None, Some(g)) => self.pool.copy_of(g),
                (None, None) => self.pool.zeros(n),
            };
            carry = Some(self.backward_layer(l, s, params, grads, dout));
        }
        carry.unwrap_or_else(|| self.pool.zeros(n))
    }

    /// Backward through layer `layer`: writes its parameter gradients into `grads` (the
    /// layer's block) and returns the gradient of its input. `dout` has the rows of the
    /// layer's output: with the part's `rows` (the last layer), only those.
    fn backward_layer(
        &self,
        layer: usize,
        s: &Saved,
        params: &[f32],
        grads: &mut [f32],
        dout: Vec<f32>,
    ) -> Vec<f32> {
        let sp = &self.spec;
        let (d, m, n) = (sp.dim, sp.mlp, s.b * s.t);
        let rows = s.rows.as_deref().filter(|_| layer + 1 == sp.depth);
        // Rows after attention.
        let nr = rows.map_or(n, <[usize]>::len);
        let o = sp.offsets();
        let w = &params[layer * o.len..(layer + 1) * o.len];
        let gl = &mut grads[layer * o.len..(layer + 1) * o.len];
        let ls = &s.layers[layer];
        let pre = sp.norm == NormPlacement::Pre;
        let pool = &self.pool;
        // Gradient of x1 (the residual stream between attention and MLP).
        let mut dx1 = if pre {
            dout
        } else {
            {
                let (lw, lb) = gl[o.ln2w..o.ln2b + d].split_at_mut(d);
                col_sums_par(lb, &dout, Some((lw, &ls.xhat2)));
            }
            let mut dy2 = pool.take(nr * d);
            layer_norm_backward_par(
                &dout,
                &ls.xhat2,
                &ls.rstd2,
                &w[o.ln2w..o.ln2w + d],
                &mut dy2,
                false,
            );
            pool.put(dout);
            dy2
        };
        // The MLP output's gradient: dx1 itself, or a masked copy under dropout.
        let dmo_masked = self.drops().then(|| {
            let mut v = pool.copy_of(&dx1);
            dropout_par(
                &mut v,
                self.site_seed(layer, 1),
                sp.dropout,
                s.seq0 * s.t * d,
                rows.map(|r| (r, d)),
            );
            v
        });
        let mut dg = {
            let dmo: &[f32] = dmo_masked.as_deref().unwrap_or(&dx1);
            let (gw, gb) = gl[o.w2..o.ln2w].split_at_mut(d * m);
            linear_backward(
                pool,
                dmo,
                &ls.g,
                nr,
                &w[o.w2..o.b2],
                d,
                gw,
                gb,
                true,
                sp.bf16,
            )
        };
        if let Some(v) = dmo_masked {
            pool.put(v);
        }
        let rb = block_rows(nr);
        let act = sp.act;
        // The forward's outputs `g` stand in for `erf` in the exact GELU's derivative.
        debug_assert_eq!(ls.g.len(), ls.h.len(), "GELU outputs and inputs");
        dg.par_chunks_mut(rb * m)
            .zip(ls.h.par_chunks(rb * m).zip(ls.g.par_chunks(rb * m)))
            .for_each(|(dc, (hc, gc))| simd::act_backward(dc, hc, Some(gc), act));
        let dmin = {
            let (gw, gb) = gl[o.w1..o.w2].split_at_mut(m * d);
            linear_backward(
                pool,
                &dg,
                &ls.m_in,
                nr,
                &w[o.w1..o.b1],
                m,
                gw,
                gb,
                true,
                sp.bf16,
            )
        };
        pool.put(dg);
        if pre {
            {
                let (lw, lb) = gl[o.ln2w..o.ln2b + d].split_at_mut(d);
                col_sums_par(lb, &dmin, Some((lw, &ls.xhat2)));
            }
            layer_norm_backward_par(
                &dmin,
                &ls.xhat2,
                &ls.rstd2,
                &w[o.ln2w..o.ln2w + d],
                &mut dx1,
                true,
            );
        } else {
            add_assign_par(&mut dx1, &dmin);
            {
                let (lw, lb) = gl[o.ln1w..o.ln1b + d].split_at_mut(d);
                col_sums_par(lb, &dx1, Some((lw, &ls.xhat1)));
            }
            let mut dy1 = pool.take(nr * d);
            layer_norm_backward_par(
                &dx1,
                &ls.xhat1,
                &ls.rstd1,
                &w[o.ln1w..o.ln1w + d],
                &mut dy1,
                false,
            );
            pool.put(std::mem::replace(&mut dx1, dy1));
        }
        pool.put(dmin);
        // dx1 is now the gradient of (layer input + attention output).
        let dao_masked = self.drops().then(|| {
            let mut v = pool.copy_of(&dx1);
            dropout_par(
                &mut v,
                self.site_seed(layer, 0),
                sp.dropout,
                s.seq0 * s.t * d,
                rows.map(|r| (r, d)),
            );
            v
        });
        let dctx = {
            let dao: &[f32] = dao_masked.as_deref().unwrap_or(&dx1);
            let (gw, gb) = gl[o.wo..o.ln1w].split_at_mut(d * d);
            linear_backward(
                pool,
                dao,
                &ls.ctx,
                nr,
                &w[o.wo..o.bo],
                d,
                gw,
                gb,
                true,
                sp.bf16,
            )
        };
        if let Some(v) = dao_masked {
            pool.put(v);
        }
        let dqkv = self.attention_backward(layer, s, ls, rows, &dctx);
        // From here on every row: dx1 (the residual's gradient) scattered to its rows.
        if let Some(rows) = rows {
            let mut full = pool.zeros(n * d);
            scatter_rows(&mut full, d, &dx1, d, rows);
            pool.put(std::mem::replace(&mut dx1, full));
        }
        pool.put(dctx);
        let att_in: &[f32] = ls.a_in.as_deref().unwrap_or(&s.outs[layer]);
        let da_in = {
            let (gw, gb) = gl[o.wqkv..o.wo].split_at_mut(3 * d * d);
            linear_backward(
                pool,
                &dqkv,
                att_in,
                n,
                &w[o.wqkv..o.bqkv],
                3 * d,
                gw,
                gb,
                true,
                sp.bf16,
            )
        };
        if pre {
            {
                let (lw, lb) = gl[o.ln1w..o.ln1b + d].split_at_mut(d);
                col_sums_par(lb, &da_in, Some((lw, &ls.xhat1)));
            }
            layer_norm_backward_par(
                &da_in,
                &ls.xhat1,
                &ls.rstd1,
                &w[o.ln1w..o.ln1w + d],
                &mut dx1,
                true,
            );
        } else {
            add_assign_par(&mut dx1, &da_in);
        }
        pool.put(dqkv);
        pool.put(da_in);
        dx1
    }
}

impl CustomOp3 for StackOp {
    fn name(&self) -> &'static str {
        "fused-transformer-stack"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "input")?;
        let params = contiguous(s2, l2, "parameters")?;
        let mask = contiguous(s3, l3, "padding mask")?;
        let (b, t, d) = l1.shape().dims3()?;
        let sp = &self.spec;
        if d != sp.dim || params.len() != sp.depth * sp.offsets().len || mask.len() != b * t {
            candle_core::bail!("fused transformer stack: inputs do not match the configuration");
        }
        if let Some(rows) = &self.rows {
            if self.all_layers || sp.causal || sp.depth == 0 {
                candle_core::bail!(
                    "fused transformer stack: last-layer rows need the last layer's output only, \
                     non-causal attention and a layer"
                );
            }
            if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| r >= b * t) {
                candle_core::bail!(
                    "fused transformer stack: last-layer rows must be increasing and below {}",
                    b * t
                );
            }
        }
        let key_bias: Vec<f32> = mask.iter().map(|m| (1.0 - m) * -1e9).collect();
        let mut parts = if self.parts(b) == 2 {
            // The first half on the first pool, which has the extra thread of an odd count.
            let h = b.div_ceil(2);
            let (kb, row) = (&key_bias, t * d);
            // Each half's rows, as indices into its own.
            let (r0, r1) = self
                .rows
                .as_ref()
                .map(|rows| {
                    let at = rows.partition_point(|&r| r < h * t);
                    let second = rows[at..].iter().map(|&r| r - h * t).collect();
                    (rows[..at].to_vec(), second)
                })
                .unzip();
            let (p0, p1) = run_halves(
                || self.forward_part(0, h, t, &x[..h * row], params, &kb[..h * t], r0),
                || self.forward_part(h, b - h, t, &x[h * row..], params, &kb[h * t..], r1),
            );
            vec![p0, p1]
        } else {
            vec![self.forward_part(0, b, t, x, params, &key_bias, self.rows.clone())]
        };
        let n = b * t * d;
        let (count, result) = if self.all_layers {
            // Layer l's output sits at outs[l + 1] with backward (after the input), else
            // at outs[l].
            let first = usize::from(self.keep);
            let mut r = Vec::with_capacity(sp.depth * n);
            for l in 0..sp.depth {
                for part in &parts {
                    r.extend_from_slice(&part.outs[first + l]);
                }
            }
            (sp.depth, r)
        } else if let [part] = parts.as_mut_slice() {
            // The last output goes to candle as it is (backward never reads it); with no
            // layers (and no backward): the input.
            let last = part.outs.pop().unwrap_or_else(|| self.pool.copy_of(x));
            self.pool.forget(last.len());
            (1, last)
        } else {
            let mut r = Vec::with_capacity(n);
            for part in &mut parts {
                if let Some(o) = part.outs.pop() {
                    r.extend_from_slice(&o);
                    self.pool.put(o);
                }
            }
            (1, r)
        };
        if self.keep {
            *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(parts);
        }
        if let Some(rows) = &self.rows {
            return Ok((CpuStorage::F32(result), Shape::from((1, rows.len(), d))));
        }
        Ok((CpuStorage::F32(result), Shape::from((count, b, t, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _mask: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(parts) = guard.as_ref() else {
            if !self.keep {
                candle_core::bail!(
                    "fused transformer stack: backward through a forward pass that kept no \
                     activations (its Ctx had `backward: false`, e.g. Ctx::inference)"
                );
            }
            candle_core::bail!("fused transformer stack: backward before forward");
        };
        let sp = &self.spec;
        let row = parts.first().map_or(0, |p| p.t * sp.dim);
        let n: usize = parts.iter().map(|p| p.b * row).sum();
        // Each part's first row and rows in the last layer's output.
        let mut out_rows = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            let count = p.rows.as_ref().map_or(p.b * p.t, Vec::len);
            out_rows.push((at, count));
            at += count;
        }
        let gres = tensor_vec(grad_res)?;
        let (pstore, playout) = params.storage_and_layout();
        let pvec = match &*pstore {
            Storage::Cpu(c) => contiguous(c, playout, "parameters")?,
            _ => candle_core::bail!("fused transformer stack: parameters left the CPU"),
        };
        // The gradient from outside at layer l's output, part i's rows.
        let d = sp.dim;
        let own = |l: usize, i: usize| -> Option<&[f32]> {
            let at = if self.all_layers {
                l * n
            } else if l + 1 == sp.depth {
                0
            } else {
                return None;
            };
            let (r0, count) = out_rows[i];
            Some(&gres[at + r0 * d..at + (r0 + count) * d])
        };
        // Every layer's backward writes each of its parameters' gradients whole (products and
        // column sums overwrite), so the halves' buffers come from the pool unzeroed and their
        // sum is written straight into the gradient candle gets: no memset, one pass.
        let (dx, grads) = match parts.as_slice() {
            [p0, p1] => {
                let ((dx0, g0), (dx1, g1)) = run_halves(
                    || {
                        let mut g0 = self.pool.take(pvec.len());
                        let dx = self.backward_part(p0, |l| own(l, 0), pvec, &mut g0);
                        (dx, g0)
                    },
                    || {
                        let mut g1 = self.pool.take(pvec.len());
                        let dx = self.backward_part(p1, |l| own(l, 1), pvec, &mut g1);
                        (dx, g1)
                    },
                );
                let grads = sum_of(&g0, &g1);
                self.pool.put(g0);
                self.pool.put(g1);
                let mut dx = Vec::with_capacity(n);
                dx.extend_from_slice(&dx0);
                dx.extend_from_slice(&dx1);
                self.pool.put(dx0);
                self.pool.put(dx1);
                (dx, grads)
            }
            _ => {
                let mut grads = vec![0f32; pvec.len()];
                let dx = match parts.first() {
                    Some(p) => self.backward_part(p, |l| own(l, 0), pvec, &mut grads),
                    None => self.pool.zeros(n),
                };
                // It leaves the pool for good, as a candle tensor.
                self.pool.forget(dx.len());
                (dx, grads)
            }
        };
        drop(pstore);
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dp = Tensor::from_vec(grads, params.shape(), params.device())?;
        if let Some(mailbox) = &self.mailbox {
            let mut slot = mailbox.lock().unwrap_or_else(PoisonError::into_inner);
            *slot = Some(match slot.take() {
                Some(before) => (before + dp)?,
                None => dp,
            });
            return Ok((Some(dx), None, None));
        }
        Ok((Some(dx), Some(dp), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dim: usize, heads: usize, causal: bool, attn_dropout: f32) -> FusedSpec {
        FusedSpec {
            depth: 1,
            dim,
            mlp: 4 * dim,
            heads,
            norm: NormPlacement::Post,
            act: Act::GeluErf,
            dropout: 0.0,
            attn_dropout,
            eps: 1e-12,
            causal,
            bf16: true,
        }
    }

    /// The fused per-head kernel against the two per-head products with the softmax between
    /// them: bit for bit while the keys fit one k block of the products (t <= 256), within
    /// f32 rounding beyond; with partial tiles, padding, the causal mask and dropout; and it
    /// needs no probability buffer without backward.
    #[test]
    fn fused_attention_equals_the_two_products() {
        let kernel = reduced_precision_kernel();
        if kernel != ReducedKernel::Avx512Bf16 {
            eprintln!("skipped: the fused attention runs on the AVX-512 BF16 kernel, not {kernel}");
            return;
        }
        for &(b, t, dim, heads, causal, drop) in &[
            (2, 128, 128, 2, false, 0.0),
            (2, 75, 192, 2, true, 0.0),
            (1, 90, 128, 2, false, 0.2),
            (1, 300, 64, 1, true, 0.1),
        ] {
            let op = StackOp::new(
                spec(dim, heads, causal, drop),
                false,
                drop > 0.0,
                true,
                9,
                BufferPool::default(),
            );
            assert!(
                op.fused_attention(t),
                "the shape ({t}, {dim}/{heads}) must take the fused path"
            );
            let n = b * t;
            let qkv: Vec<f32> = (0..n * 3 * dim)
                .map(|i| (i as f32 * 0.731).sin() * 2.0)
                .collect();
            // The last 7 keys of the first sequence are padding.
            let key_bias: Vec<f32> = (0..n)
                .map(|i| if i < t && i >= t - 7 { -1e9 } else { 0.0 })
                .collect();
            let pp = b * heads * t * t;
            let run = |fused: bool| {
                let (mut p, mut ctx) = (vec![0f32; pp], vec![0f32; n * dim]);
                let mut pd = (drop > 0.0).then(|| vec![0f32; pp]);
                op.attention(
                    fused,
                    0,
                    0,
                    b,
                    t,
                    &qkv,
                    &key_bias,
                    None,
                    &mut p,
                    pd.as_deref_mut(),
                    &mut ctx,
                );
                (p, pd, ctx)
            };
            let (p0, pd0, ctx0) = run(false);
            let (p1, pd1, ctx1) = run(true);
            assert_eq!(p0, p1, "probabilities, t = {t}");
            assert_eq!(pd0, pd1, "dropped probabilities, t = {t}");
            if t <= 256 {
                assert_eq!(ctx0, ctx1, "context, t = {t}");
            } else {
                for (x, y) in ctx0.iter().zip(&ctx1) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                        "context, t = {t}: {x} vs {y}"
                    );
                }
            }
            // Without backward: no probability buffer, the same context.
            let mut ctx2 = vec![0f32; n * dim];
            let mut pd2 = (drop > 0.0).then(|| vec![0f32; pp]);
            op.attention(
                true,
                0,
                0,
                b,
                t,
                &qkv,
                &key_bias,
                None,
                &mut [],
                pd2.as_deref_mut(),
                &mut ctx2,
            );
            assert_eq!(ctx1, ctx2);
        }
    }

    /// Inputs of the op tests: a two-layer f32 stack of width 32 (4 heads), its parameters,
    /// `b` sequences of `t` rows, and a mask whose sequence `padded` ends in 3 padding
    /// positions.
    struct Case {
        sp: FusedSpec,
        b: usize,
        t: usize,
        params: Vec<f32>,
        x: Vec<f32>,
        mask: Vec<f32>,
    }

    impl Case {
        fn new(b: usize, t: usize, norm: NormPlacement, drop: (f32, f32), padded: usize) -> Self {
            let sp = FusedSpec {
                depth: 2,
                dim: 32,
                mlp: 96,
                heads: 4,
                norm,
                act: Act::GeluErf,
                dropout: drop.0,
                attn_dropout: drop.1,
                eps: 1e-5,
                causal: false,
                bf16: false,
            };
            let len = sp.depth * sp.offsets().len;
            let pad = padded * t + t - 3..(padded + 1) * t;
            Case {
                params: (0..len).map(|i| (i as f32 * 0.37).sin() * 0.2).collect(),
                x: (0..b * t * sp.dim)
                    .map(|i| (i as f32 * 0.11).cos())
                    .collect(),
                mask: (0..b * t)
                    .map(|i| if pad.contains(&i) { 0.0 } else { 1.0 })
                    .collect(),
                sp,
                b,
                t,
            }
        }

        /// Applies `op`, `read`s the output, and returns what was read and (where `op` keeps
        /// what backward needs, else empty) the gradients of the input and the parameters
        /// for the loss `sum(read(output) * w)` (`w` from a fixed formula).
        fn run(
            &self,
            op: StackOp,
            read: impl Fn(Tensor) -> Tensor,
        ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            use candle_core::{Device, Var};
            let dev = Device::Cpu;
            let (b, t, d) = (self.b, self.t, self.sp.dim);
            let xv = Var::from_vec(self.x.clone(), (b, t, d), &dev).unwrap();
            let pv = Var::from_vec(self.params.clone(), self.params.len(), &dev).unwrap();
            let mt = Tensor::from_vec(self.mask.clone(), (b, t), &dev).unwrap();
            let keep = op.keep;
            let out = read(xv.as_tensor().apply_op3(pv.as_tensor(), &mt, op).unwrap());
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if !keep {
                return (v(&out), Vec::new(), Vec::new());
            }
            let w: Vec<f32> = (0..out.elem_count())
                .map(|i| (i as f32 * 0.53).sin())
                .collect();
            let w = Tensor::from_vec(w, out.shape(), &dev).unwrap();
            let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (
                v(&out),
                v(g.get(xv.as_tensor()).unwrap()),
                v(g.get(pv.as_tensor()).unwrap()),
            )
        }
    }

    /// `a` and `b` equal within `tol` times the largest magnitude of `a`.
    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= tol * scale, "{what} {i}: {p} vs {q}");
        }
    }

    /// The batch in two halves against the whole batch: the same outputs and input
    /// gradient bit for bit, parameter gradients within f32 rounding (each half's sum, then
    /// the two added); with dropout (masks indexed over the whole batch), padding, an odd
    /// batch, both norm placements, every layer's output or the last, on one and two
    /// threads; and the halves give the same parameter gradients, bit for bit, on one thread
    /// as on two (so a run does not depend on the thread count).
    #[test]
    fn halves_equal_the_whole_batch() {
        for &(b, norm, drop, all_layers, threads) in &[
            (3, NormPlacement::Post, 0.1, false, 2),
            (4, NormPlacement::Pre, 0.0, true, 2),
            (5, NormPlacement::Pre, 0.2, false, 1),
            (2, NormPlacement::Post, 0.0, true, 1),
        ] {
            let c = Case::new(b, 9, norm, (drop, drop), 0);
            let run = |parts: usize, threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                // A pool holding last step's buffers, poisoned: the halves' parameter
                // gradients come from it unzeroed, so every slot must be written.
                let buffers = BufferPool::default();
                let n = c.sp.depth * c.sp.offsets().len;
                let stale = [buffers.take(n), buffers.take(n)];
                for mut v in stale {
                    v.fill(f32::NAN);
                    buffers.put(v);
                }
                pool.install(|| {
                    let mut op = StackOp::new(c.sp.clone(), all_layers, true, true, 5, buffers);
                    op.max_parts = parts;
                    assert_eq!(op.parts(b), parts);
                    c.run(op, |out| out)
                })
            };
            let (o1, dx1, dp1) = run(1, threads);
            let (o2, dx2, dp2) = run(2, threads);
            let other = run(2, 3 - threads);
            assert!(
                other == (o2.clone(), dx2.clone(), dp2.clone()),
                "halves on {} threads differ from {threads}",
                3 - threads
            );
            let case = format!("b {b}, {norm:?}, dropout {drop}, {threads} threads");
            assert_eq!(o1, o2, "outputs, {case}");
            assert_eq!(dx1, dx2, "input gradients, {case}");
            assert_close(&dp1, &dp2, 1e-5, &format!("parameter gradient, {case}"));
            assert!(
                dp1.iter().any(|v| *v != 0.0),
                "no parameter gradient, {case}"
            );
        }
    }

    /// A case of width 256 (MLP 512): every linear layer wide enough for fp16.
    fn wide_case(b: usize, t: usize, norm: NormPlacement) -> Case {
        let mut c = Case::new(b, t, norm, (0.0, 0.0), 1);
        c.sp.dim = 256;
        c.sp.mlp = 512;
        c.params = (0..c.sp.depth * c.sp.offsets().len)
            .map(|i| (i as f32 * 0.37).sin() * 0.05)
            .collect();
        c.x = (0..b * t * 256).map(|i| (i as f32 * 0.11).cos()).collect();
        c
    }

    /// `c` through a stack in the given precision (with backward when `train`) on a pool of
    /// `threads`, checking it runs as `parts` parts: outputs and gradients.
    fn run_on(
        c: &Case,
        bf16: bool,
        train: bool,
        threads: usize,
        parts: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut sp = c.sp.clone();
        sp.bf16 = bf16;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let op = StackOp::new(sp, false, train, train, 5, BufferPool::default());
            assert_eq!(op.parts(c.b), parts);
            c.run(op, |out| out)
        })
    }

    /// Inference with the bf16 setting where its linear products run in fp16
    /// ([`ReducedKernel::Avx512Fp16`]): in halves on two threads, equal bit for bit to the whole
    /// batch on one (the fp16 choice does not count rows), and within bf16's tolerance of the
    /// f32 stack.
    #[test]
    fn fp16_inference_halves_equal_the_whole_batch_and_track_f32() {
        if reduced_precision_kernel() != ReducedKernel::Avx512Fp16 {
            eprintln!("skipped: no AVX-512 FP16 (or AMX takes the bf16 products) here");
            return;
        }
        for norm in [NormPlacement::Post, NormPlacement::Pre] {
            // Wide enough that every linear layer's forward takes fp16 (weights of 256 x 256
            // and more).
            let c = wide_case(4, 20, norm);
            let run = |bf16, threads, parts| run_on(&c, bf16, false, threads, parts).0;
            let halves = run(true, 2, 2);
            let whole = run(true, 1, 1);
            assert_eq!(halves, whole, "{norm:?}: halves against the whole batch");
            let f32_out = run(false, 2, 2);
            assert_close(
                &f32_out,
                &halves,
                2e-2,
                &format!("{norm:?}: fp16 against f32"),
            );
            assert_ne!(f32_out, halves, "{norm:?}: the fp16 path did not run");
        }
    }

    /// Training with the bf16 setting where its products run in fp16: in halves on one
    /// thread and on two, the same outputs and gradients bit for bit, within bf16's
    /// tolerance of f32. Sized so that the backward's products take the reduced precision
    /// (a half's 256 rows by 256 wide).
    #[test]
    fn fp16_training_is_the_same_on_one_thread_as_on_two_and_tracks_f32() {
        if reduced_precision_kernel() != ReducedKernel::Avx512Fp16 {
            eprintln!("skipped: no AVX-512 FP16 (or AMX takes the bf16 products) here");
            return;
        }
        let c = wide_case(4, 128, NormPlacement::Post);
        assert!(crate::linear_takes_bf16(2 * 128, 256, 256));
        let run = |bf16, threads| run_on(&c, bf16, true, threads, 2);
        let two = run(true, 2);
        assert!(
            two == run(true, 1),
            "fp16 training differs between one and two threads"
        );
        let f32s = run(false, 2);
        assert_close(&f32s.0, &two.0, 2e-2, "outputs, fp16 against f32");
        assert_close(&f32s.1, &two.1, 3e-2, "input gradients, fp16 against f32");
        assert_close(
            &f32s.2,
            &two.2,
            3e-2,
            "parameter gradients, fp16 against f32",
        );
        assert_ne!(f32s.2, two.2, "the fp16 path did not run");
    }

    /// The last layer at chosen rows against the full layer's output at those rows: the
    /// same outputs, and the same input and parameter gradients for a loss that reads only
    /// those rows (within f32 rounding: the parameter gradients sum fewer rows), with both
    /// norm placements, dropout (whose masks the rows keep), padding, a sequence and a half
    /// with no chosen row, no row at all, whole batch and halves, with and without backward;
    /// and the forward refuses rows out of order or out of the batch.
    #[test]
    fn last_rows_equal_the_full_layer_at_those_rows() {
        let (b, t) = (3, 9);
        for &(norm, drop, parts, ref rows) in &[
            (NormPlacement::Post, (0.0, 0.0), 2, vec![1, 4, 8, 20, 26]),
            (NormPlacement::Pre, (0.1, 0.2), 2, vec![0, 3, 13, 18]),
            (NormPlacement::Post, (0.2, 0.3), 1, vec![2, 5]),
            (NormPlacement::Post, (0.1, 0.0), 2, vec![3, 10, 11, 25]),
            (NormPlacement::Pre, (0.0, 0.0), 2, vec![2, 5]),
            (NormPlacement::Post, (0.1, 0.1), 2, vec![2, 5]),
            (NormPlacement::Post, (0.0, 0.0), 2, vec![]),
        ] {
            let c = Case::new(b, t, norm, drop, 1);
            let d = c.sp.dim;
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let idx = Tensor::from_vec(idx, rows.len(), &candle_core::Device::Cpu).unwrap();
            let gather = |out: Tensor| {
                out.reshape((b * t, d))
                    .unwrap()
                    .index_select(&idx, 0)
                    .unwrap()
            };
            let op = |train: bool| {
                let mut op =
                    StackOp::new(c.sp.clone(), false, train, train, 11, BufferPool::default());
                op.max_parts = parts;
                op
            };
            let full = c.run(op(true), gather);
            let sparse = c.run(op(true).last_rows(rows.clone()), |out| out);
            let case = format!("{norm:?}, dropout {drop:?}, rows {rows:?}");
            assert_close(&full.0, &sparse.0, 2e-5, &format!("output, {case}"));
            assert_close(&full.1, &sparse.1, 2e-5, &format!("input gradient, {case}"));
            assert_close(
                &full.2,
                &sparse.2,
                2e-5,
                &format!("parameter gradient, {case}"),
            );
            assert_eq!(
                full.1.iter().any(|v| *v != 0.0),
                !rows.is_empty(),
                "input gradient, {case}"
            );
            // Without backward (evaluation mode, no dropout): the same rows.
            let want = c.run(op(false), gather).0;
            let got = c.run(op(false).last_rows(rows.clone()), |out| out).0;
            assert_close(
                &want,
                &got,
                2e-5,
                &format!("output without backward, {case}"),
            );
        }
        let c = Case::new(b, t, NormPlacement::Post, (0.0, 0.0), 0);
        for bad in [vec![4, 2], vec![3, 3], vec![b * t]] {
            let op = StackOp::new(c.sp.clone(), false, false, false, 0, BufferPool::default());
            let xt = Tensor::from_vec(c.x.clone(), (b, t, c.sp.dim), &candle_core::Device::Cpu);
            let pt = Tensor::new(c.params.as_slice(), &candle_core::Device::Cpu).unwrap();
            let mt = Tensor::from_vec(c.mask.clone(), (b, t), &candle_core::Device::Cpu).unwrap();
            let res = xt.unwrap().apply_op3(&pt, &mt, op.last_rows(bad.clone()));
            assert!(res.is_err(), "rows {bad:?} were taken");
        }
    }
}

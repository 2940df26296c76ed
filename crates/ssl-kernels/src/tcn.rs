//! TS2Vec's dilated convolution stack (Yue et al. 2022) as one candle custom op: every residual
//! block's forward and backward written by hand on flat buffers, like [`crate::StackOp`].
//!
//! Block `i` (dilation `2^i`, kernel `K`, widths `c_in -> c_out`) computes
//! `out = conv2(gelu(conv1(gelu(h)))) + residual`, where each convolution keeps the length
//! ("same" padding: `(K - 1) d / 2` zeros on each side, or `(K - 1) d` on the left when causal),
//! and `residual = h`, or a 1x1 convolution of `h` where the widths differ or the block is the
//! last one. Every convolution is one product: its input gathered into rows of the taps that
//! read anything (im2col; a tap whose offset is at least the length reads padding only and is
//! skipped), times the weight's taps packed as one `(c_out, taps * c_in)` matrix.
//!
//! Inputs: `h` (B, T, hidden), the input projection's output, and every block's parameters
//! concatenated in one flat vector (layout in [`TcnSpec::block`]). Output: (B, T, output).
//! The op is stateful: its forward keeps what its backward reads (when `keep`).

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{linear_product, matmul, product, threads, Epilogue, MatRef, Op, OutSlice};
use super::pool::BufferPool;
use super::simd::{self, Act};
use super::{block_rows, col_sums_par};

/// The convolution stack's shape and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcnSpec {
    /// Width of the hidden blocks (and of the op's input).
    pub hidden: usize,
    /// Width of the last block's output.
    pub output: usize,
    /// Number of hidden blocks; one output block follows (`depth + 1` blocks in all).
    pub depth: usize,
    /// Convolution kernel size (odd).
    pub kernel: usize,
    /// Causal convolutions (left padding only).
    pub causal: bool,
    /// Large products in bf16 with f32 sums (the caller checked the CPU).
    pub bf16: bool,
}

/// Where one block's parameters sit inside its part of the flat vector, and its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcnBlock {
    /// Input width.
    pub c_in: usize,
    /// Output width.
    pub c_out: usize,
    /// Dilation of both convolutions.
    pub dilation: usize,
    /// First convolution's weight, `(c_out, c_in, kernel)` (PyTorch's Conv1d layout).
    pub conv1_w: usize,
    /// First convolution's bias, `(c_out)`.
    pub conv1_b: usize,
    /// Second convolution's weight, `(c_out, c_out, kernel)`.
    pub conv2_w: usize,
    /// Second convolution's bias, `(c_out)`.
    pub conv2_b: usize,
    /// The 1x1 projection of the residual, weight `(c_out, c_in)` and bias `(c_out)`
    /// offsets, where the block has one.
    pub projector: Option<(usize, usize)>,
    /// Length of the block's part.
    pub len: usize,
}

impl TcnSpec {
    /// Block `i` (`0..=depth`): `[conv1 w | conv1 b | conv2 w | conv2 b | projector w |
    /// projector b]`, the projector only on the last block or where the widths differ.
    pub fn block(&self, i: usize) -> TcnBlock {
        let last = i == self.depth;
        let c_in = self.hidden;
        let c_out = if last { self.output } else { self.hidden };
        let k = self.kernel;
        let conv1_w = 0;
        let conv1_b = conv1_w + c_out * c_in * k;
        let conv2_w = conv1_b + c_out;
        let conv2_b = conv2_w + c_out * c_out * k;
        let end = conv2_b + c_out;
        let (projector, len) = if last || c_in != c_out {
            (Some((end, end + c_out * c_in)), end + c_out * c_in + c_out)
        } else {
            (None, end)
        };
        TcnBlock {
            c_in,
            c_out,
            dilation: 1usize << i.min(30),
            conv1_w,
            conv1_b,
            conv2_w,
            conv2_b,
            projector,
            len,
        }
    }

    /// Length of the flat parameter vector (every block's part, in order).
    pub fn param_len(&self) -> usize {
        (0..=self.depth).map(|i| self.block(i).len).sum()
    }

    /// The read offsets `j d - left` of the taps `j` that read at least one position of a
    /// series of length `t` (the others read padding only), with their tap indices.
    fn taps(&self, dilation: usize, t: usize) -> Vec<(usize, isize)> {
        let reach = (self.kernel - 1) * dilation;
        let left = if self.causal { reach } else { reach / 2 };
        (0..self.kernel)
            .map(|j| (j, (j * dilation) as isize - left as isize))
            .filter(|&(_, off)| off.unsigned_abs() < t)
            .collect()
    }
}

/// What one block's backward needs.
struct BlockSaved {
    /// The first convolution's biased output (GELU's input) and its GELU.
    y1: Vec<f32>,
    g1: Vec<f32>,
}

struct Saved {
    b: usize,
    t: usize,
    /// Every block's input.
    inputs: Vec<Vec<f32>>,
    blocks: Vec<BlockSaved>,
    pool: BufferPool,
}

impl Drop for Saved {
    fn drop(&mut self) {
        self.pool.put_all(self.inputs.drain(..));
        for s in self.blocks.drain(..) {
            self.pool.put_all([s.y1, s.g1]);
        }
    }
}

/// The fused convolution stack (one per forward pass), applied as `h.apply_op2(&params, op)`:
/// `h` (B, T, hidden) f32, `params` the blocks' parts of [`TcnSpec::block`] one after the
/// other ([`TcnSpec::param_len`] f32 values). The output is (B, T, output). CPU only.
///
/// The op is stateful: its forward keeps the activations its own backward reads (when `keep`),
/// so a forward is followed by at most one backward, of that forward.
pub struct TcnOp {
    spec: TcnSpec,
    keep: bool,
    pool: BufferPool,
    saved: Mutex<Option<Saved>>,
}

impl TcnOp {
    /// The op for `spec`; `keep`: a backward will follow (keep its activations); `pool`:
    /// buffers shared with earlier and later passes of the same encoder.
    pub fn new(spec: TcnSpec, keep: bool, pool: BufferPool) -> Self {
        TcnOp {
            spec,
            keep,
            pool,
            saved: Mutex::new(None),
        }
    }
}

/// `out = gelu(x)`, rows in parallel.
fn gelu_into(out: &mut [f32], x: &[f32], width: usize) {
    let rb = block_rows(x.len() / width.max(1)) * width;
    let zeros = vec![0f32; width];
    out.par_chunks_mut(rb.max(1))
        .zip(x.par_chunks(rb.max(1)))
        .for_each(|(o, i)| {
            o.copy_from_slice(i);
            simd::bias_act_in_place(o, &zeros, Act::GeluErf);
        });
}

/// `dg *= gelu'(x)`, rows in parallel.
fn gelu_backward(dg: &mut [f32], x: &[f32], width: usize) {
    let rb = block_rows(x.len() / width.max(1)) * width;
    dg.par_chunks_mut(rb.max(1))
        .zip(x.par_chunks(rb.max(1)))
        .for_each(|(d, i)| simd::act_backward(d, i, None, Act::GeluErf));
}

/// Gathers the rows the taps read: row `(s, p)` of `col` (width `taps * c`) holds, for each
/// tap `k`, row `p + off_k` of series `s` of `x` (B*T rows of width `c`), or zeros outside.
fn im2col(col: &mut [f32], x: &[f32], taps: &[(usize, isize)], t: usize, c: usize) {
    let w = taps.len() * c;
    col.par_chunks_mut(w * 64)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (r, row) in rows.chunks_exact_mut(w).enumerate() {
                let g = blk * 64 + r;
                let (s, p) = (g / t, g % t);
                for (k, &(_, off)) in taps.iter().enumerate() {
                    let dst = &mut row[k * c..(k + 1) * c];
                    let q = p as isize + off;
                    if q >= 0 && (q as usize) < t {
                        let src = (s * t + q as usize) * c;
                        dst.copy_from_slice(&x[src..src + c]);
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: `dx` (B*T rows of width `c`) = the sum over taps of the parts
/// of `dcol` that read each row.
fn col2im(dx: &mut [f32], dcol: &[f32], taps: &[(usize, isize)], t: usize, c: usize) {
    let w = taps.len() * c;
    dx.par_chunks_mut(c * 64)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (r, row) in rows.chunks_exact_mut(c).enumerate() {
                let g = blk * 64 + r;
                let (s, q) = (g / t, g % t);
                row.fill(0.0);
                for (k, &(_, off)) in taps.iter().enumerate() {
                    let p = q as isize - off;
                    if p >= 0 && (p as usize) < t {
                        let src = (s * t + p as usize) * w + k * c;
                        simd::add_assign(row, &dcol[src..src + c]);
                    }
                }
            }
        });
}

/// The taps of a `(c_out, c_in, kernel)` weight packed as one `(c_out, taps * c_in)` matrix:
/// element `(o, k c_in + i)` is `w[o, i, j_k]`.
fn pack_taps(w: &[f32], taps: &[(usize, isize)], c_in: usize, kernel: usize) -> Vec<f32> {
    let c_out = w.len() / (c_in * kernel);
    let mut out = vec![0f32; c_out * taps.len() * c_in];
    for (o, row) in out.chunks_exact_mut(taps.len() * c_in).enumerate() {
        for (k, &(j, _)) in taps.iter().enumerate() {
            for i in 0..c_in {
                row[k * c_in + i] = w[(o * c_in + i) * kernel + j];
            }
        }
    }
    out
}

/// The adjoint of [`pack_taps`]: adds a packed gradient to the weight's gradient.
fn unpack_taps(dw: &mut [f32], packed: &[f32], taps: &[(usize, isize)], c_in: usize, k: usize) {
    for (o, row) in packed.chunks_exact(taps.len() * c_in).enumerate() {
        for (t, &(j, _)) in taps.iter().enumerate() {
            for i in 0..c_in {
                dw[(o * c_in + i) * k + j] += row[t * c_in + i];
            }
        }
    }
}

impl TcnOp {
    /// One block's forward: returns its output, and what its backward needs.
    fn forward_block(
        &self,
        i: usize,
        params: &[f32],
        h: &[f32],
        (b, t): (usize, usize),
    ) -> (Vec<f32>, BlockSaved) {
        let sp = &self.spec;
        let blk = sp.block(i);
        let (m, c_in, c_out) = (b * t, blk.c_in, blk.c_out);
        let taps = sp.taps(blk.dilation, t);
        let pool = &self.pool;
        // conv1 on gelu(h), its GELU in the product's epilogue.
        let mut g0 = pool.take(m * c_in);
        gelu_into(&mut g0, h, c_in);
        let mut col = pool.take(m * taps.len() * c_in);
        im2col(&mut col, &g0, &taps, t, c_in);
        pool.put(g0);
        let w1 = pack_taps(&params[blk.conv1_w..blk.conv1_b], &taps, c_in, sp.kernel);
        let (mut y1, mut g1) = (pool.take(m * c_out), pool.take(m * c_out));
        linear_product(
            &mut y1,
            MatRef::dense(&col, m, taps.len() * c_in),
            MatRef::dense(&w1, c_out, taps.len() * c_in),
            Epilogue::BiasAct {
                bias: &params[blk.conv1_b..blk.conv2_w],
                act: Act::GeluErf,
                act_out: Some(OutSlice::new(&mut g1)),
            },
            sp.bf16,
        );
        pool.put(col);
        // The residual (or its projection), then conv2 added to it, then both biases.
        let mut out = pool.take(m * c_out);
        let mut bias = params[blk.conv2_b..blk.conv2_b + c_out].to_vec();
        match blk.projector {
            Some((pw, pb)) => {
                linear_product(
                    &mut out,
                    MatRef::dense(h, m, c_in),
                    MatRef::dense(&params[pw..pb], c_out, c_in),
                    Epilogue::None,
                    sp.bf16,
                );
                simd::add_assign(&mut bias, &params[pb..pb + c_out]);
            }
            None => out.copy_from_slice(h),
        }
        let taps2 = sp.taps(blk.dilation, t);
        let mut col = pool.take(m * taps2.len() * c_out);
        im2col(&mut col, &g1, &taps2, t, c_out);
        let w2 = pack_taps(&params[blk.conv2_w..blk.conv2_b], &taps2, c_out, sp.kernel);
        matmul(
            &mut out,
            c_out,
            MatRef::dense(&col, m, taps2.len() * c_out),
            Op::N,
            MatRef::dense(&w2, c_out, taps2.len() * c_out),
            Op::T,
            1.0,
            true,
            threads(),
            sp.bf16,
        );
        pool.put(col);
        let rb = block_rows(m) * c_out;
        out.par_chunks_mut(rb.max(1))
            .for_each(|o| simd::add_bias(o, &bias));
        (out, BlockSaved { y1, g1 })
    }

    /// One block's backward: `dout` (B*T, c_out) in, the block input's gradient out; the
    /// parameters' gradients go to `grads` (the block's part).
    #[allow(clippy::too_many_arguments)]
    fn backward_block(
        &self,
        i: usize,
        params: &[f32],
        grads: &mut [f32],
        h: &[f32],
        saved: &BlockSaved,
        dout: &[f32],
        (b, t): (usize, usize),
    ) -> Vec<f32> {
        let sp = &self.spec;
        let blk = sp.block(i);
        let (m, c_in, c_out) = (b * t, blk.c_in, blk.c_out);
        let pool = &self.pool;
        let par = threads();
        // The residual branch.
        let mut dh = pool.take(m * c_in);
        match blk.projector {
            Some((pw, pb)) => {
                col_sums_par(&mut grads[pb..pb + c_out], dout, None);
                matmul(
                    &mut grads[pw..pb],
                    c_in,
                    MatRef::dense(dout, m, c_out),
                    Op::T,
                    MatRef::dense(h, m, c_in),
                    Op::N,
                    1.0,
                    false,
                    par,
                    sp.bf16,
                );
                matmul(
                    &mut dh,
                    c_in,
                    MatRef::dense(dout, m, c_out),
                    Op::N,
                    MatRef::dense(&params[pw..pb], c_out, c_in),
                    Op::N,
                    1.0,
                    false,
                    par,
                    sp.bf16,
                );
            }
            None => dh.copy_from_slice(dout),
        }
        // conv2.
        col_sums_par(&mut grads[blk.conv2_b..blk.conv2_b + c_out], dout, None);
        let dy1 = self.conv_backward(
            &params[blk.conv2_w..blk.conv2_b],
            &mut grads[blk.conv2_w..blk.conv2_b],
            &saved.g1,
            dout,
            (b, t, c_out, c_out, blk.dilation),
        );
        let mut dy1 = dy1;
        gelu_backward(&mut dy1, &saved.y1, c_out);
        // conv1, on gelu(h).
        col_sums_par(&mut grads[blk.conv1_b..blk.conv2_w], &dy1, None);
        let mut g0 = pool.take(m * c_in);
        gelu_into(&mut g0, h, c_in);
        let mut dg0 = self.conv_backward(
            &params[blk.conv1_w..blk.conv1_b],
            &mut grads[blk.conv1_w..blk.conv1_b],
            &g0,
            &dy1,
            (b, t, c_in, c_out, blk.dilation),
        );
        pool.put(g0);
        pool.put(dy1);
        gelu_backward(&mut dg0, h, c_in);
        let rb = block_rows(m) * c_in;
        dh.par_chunks_mut(rb.max(1))
            .zip(dg0.par_chunks(rb.max(1)))
            .for_each(|(a, g)| simd::add_assign(a, g));
        pool.put(dg0);
        dh
    }

    /// The backward of one convolution (bias excluded) with input `x` (B*T, c_in) and output
    /// gradient `dy` (B*T, c_out): adds the weight's gradient to `dw`, returns `x`'s gradient.
    fn conv_backward(
        &self,
        w: &[f32],
        dw: &mut [f32],
        x: &[f32],
        dy: &[f32],
        (b, t, c_in, c_out, dilation): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        let sp = &self.spec;
        let m = b * t;
        let taps = sp.taps(dilation, t);
        let width = taps.len() * c_in;
        let pool = &self.pool;
        let par = threads();
        let mut col = pool.take(m * width);
        im2col(&mut col, x, &taps, t, c_in);
        let dpacked = product(
            MatRef::dense(dy, m, c_out),
            Op::T,
            MatRef::dense(&col, m, width),
            Op::N,
            sp.bf16,
        );
        unpack_taps(dw, &dpacked, &taps, c_in, sp.kernel);
        let packed = pack_taps(w, &taps, c_in, sp.kernel);
        // The gathered input's gradient reuses the gather's buffer.
        matmul(
            &mut col,
            width,
            MatRef::dense(dy, m, c_out),
            Op::N,
            MatRef::dense(&packed, c_out, width),
            Op::N,
            1.0,
            false,
            par,
            sp.bf16,
        );
        let mut dx = pool.take(m * c_in);
        col2im(&mut dx, &col, &taps, t, c_in);
        pool.put(col);
        dx
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::f32_slice(s, l, "fused TCN", what)
}

impl CustomOp2 for TcnOp {
    fn name(&self) -> &'static str {
        "fused-tcn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = contiguous(s1, l1, "input")?;
        let params = contiguous(s2, l2, "parameters")?;
        let (b, t, c) = l1.shape().dims3()?;
        let sp = &self.spec;
        if c != sp.hidden || params.len() != sp.param_len() {
            candle_core::bail!(
                "fused TCN: input width {c} and {} parameters, the configuration needs {} and {}",
                params.len(),
                sp.hidden,
                sp.param_len()
            );
        }
        if sp.kernel.is_multiple_of(2) || sp.hidden == 0 || sp.output == 0 {
            candle_core::bail!("fused TCN: the kernel must be odd and the widths at least 1");
        }
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(sp.depth + 2);
        let mut blocks = Vec::with_capacity(sp.depth + 1);
        inputs.push(self.pool.copy_of(h));
        let mut start = 0;
        for i in 0..=sp.depth {
            let len = sp.block(i).len;
            let p = &params[start..start + len];
            start += len;
            let input = inputs.last().map(Vec::as_slice).unwrap_or(h);
            let (out, saved) = self.forward_block(i, p, input, (b, t));
            inputs.push(out);
            if self.keep {
                blocks.push(saved);
            } else {
                self.pool.put_all([saved.y1, saved.g1]);
                // Only the latest input is read again.
                let n = inputs.len();
                let old = std::mem::take(&mut inputs[n - 2]);
                self.pool.put(old);
            }
        }
        // The last output goes to candle (backward never reads it).
        let out = inputs.pop().unwrap_or_default();
        self.pool.forget(out.len());
        if self.keep {
            *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(Saved {
                b,
                t,
                inputs,
                blocks,
                pool: self.pool.clone(),
            });
        } else {
            self.pool
                .put_all(inputs.into_iter().filter(|v| v.capacity() > 0));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, sp.output))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut guard = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = guard.take() else {
            if !self.keep {
                candle_core::bail!(
                    "fused TCN: backward through a forward pass that kept no activations (its \
                     Ctx had `backward: false`, e.g. Ctx::inference)"
                );
            }
            candle_core::bail!("fused TCN: backward before forward (or a second backward)");
        };
        let sp = &self.spec;
        let gres = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (pstore, playout) = params.storage_and_layout();
        let pvec = match &*pstore {
            Storage::Cpu(c) => contiguous(c, playout, "parameters")?,
            _ => candle_core::bail!("fused TCN: parameters left the CPU"),
        };
        let mut grads = vec![0f32; pvec.len()];
        let starts: Vec<usize> = (0..=sp.depth)
            .scan(0, |acc, i| {
                let s0 = *acc;
                *acc += sp.block(i).len;
                Some(s0)
            })
            .collect();
        let mut dout = gres;
        for i in (0..=sp.depth).rev() {
            let len = sp.block(i).len;
            let r = starts[i]..starts[i] + len;
            let dh = self.backward_block(
                i,
                &pvec[r.clone()],
                &mut grads[r],
                &s.inputs[i],
                &s.blocks[i],
                &dout,
                (s.b, s.t),
            );
            dout = dh;
        }
        drop(pstore);
        drop(s);
        self.pool.forget(dout.len());
        let dh = Tensor::from_vec(dout, h.shape(), h.device())?;
        let dp = Tensor::from_vec(grads, params.shape(), params.device())?;
        Ok((Some(dh), Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Exact GELU in f64.
    fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
    }

    /// erf by its Taylor series (rounding grows with |x|: about 1e-9 at 5, far less at the
    /// tests' values), +-1 beyond 5.
    fn erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    /// The stack written directly from its definition, in f64: `h` (B*T, hidden).
    fn reference(spec: &TcnSpec, params: &[f64], h: &[f64], b: usize, t: usize) -> Vec<f64> {
        let conv = |x: &[f64], w: &[f64], bias: &[f64], c_in: usize, d: usize| -> Vec<f64> {
            let c_out = bias.len();
            let k = spec.kernel;
            let reach = (k - 1) * d;
            let left = if spec.causal { reach } else { reach / 2 } as isize;
            let mut y = vec![0f64; b * t * c_out];
            for s in 0..b {
                for p in 0..t {
                    for o in 0..c_out {
                        let mut acc = bias[o];
                        for j in 0..k {
                            let q = p as isize + (j * d) as isize - left;
                            if q < 0 || q >= t as isize {
                                continue;
                            }
                            for i in 0..c_in {
                                acc +=
                                    w[(o * c_in + i) * k + j] * x[(s * t + q as usize) * c_in + i];
                            }
                        }
                        y[(s * t + p) * c_out + o] = acc;
                    }
                }
            }
            y
        };
        let mut h = h.to_vec();
        let mut start = 0;
        for i in 0..=spec.depth {
            let blk = spec.block(i);
            let p = &params[start..start + blk.len];
            start += blk.len;
            let g0: Vec<f64> = h.iter().map(|&v| gelu(v)).collect();
            let y1 = conv(
                &g0,
                &p[blk.conv1_w..blk.conv1_b],
                &p[blk.conv1_b..blk.conv2_w],
                blk.c_in,
                blk.dilation,
            );
            let g1: Vec<f64> = y1.iter().map(|&v| gelu(v)).collect();
            let y2 = conv(
                &g1,
                &p[blk.conv2_w..blk.conv2_b],
                &p[blk.conv2_b..blk.conv2_b + blk.c_out],
                blk.c_out,
                blk.dilation,
            );
            let res = match blk.projector {
                Some((pw, pb)) => {
                    let mut r = vec![0f64; b * t * blk.c_out];
                    for row in 0..b * t {
                        for o in 0..blk.c_out {
                            let mut acc = p[pb + o];
                            for c in 0..blk.c_in {
                                acc += p[pw + o * blk.c_in + c] * h[row * blk.c_in + c];
                            }
                            r[row * blk.c_out + o] = acc;
                        }
                    }
                    r
                }
                None => h.clone(),
            };
            h = y2.iter().zip(&res).map(|(a, r)| a + r).collect();
        }
        h
    }

    fn values(n: usize, seed: f64, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 + 1.0) * seed).sin() * scale)
            .collect()
    }

    /// The op's output and the gradients of `sum(w * out)` for `h` and the parameters
    /// against the definition in f64, whose gradients are central differences; with dilations
    /// past the length (taps skipped), causal and not, kernel 3 and 5.
    #[test]
    fn matches_the_definition_and_its_finite_differences() {
        let (b, t) = (2, 5);
        for (causal, kernel) in [(false, 3), (true, 3), (false, 5)] {
            let spec = TcnSpec {
                hidden: 3,
                output: 4,
                depth: 3,
                kernel,
                causal,
                bf16: false,
            };
            let np = spec.param_len();
            let p64 = values(np, 0.37, 0.4);
            let h64 = values(b * t * 3, 0.91, 1.0);
            let w64 = values(b * t * 4, 0.53, 1.0);
            let objective = |p: &[f64], h: &[f64]| -> f64 {
                reference(&spec, p, h, b, t)
                    .iter()
                    .zip(&w64)
                    .map(|(a, w)| a * w)
                    .sum()
            };
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let dev = Device::Cpu;
            let hv = Var::from_vec(f32s(&h64), (b, t, 3), &dev).unwrap();
            let pv = Var::from_vec(f32s(&p64), np, &dev).unwrap();
            let op = TcnOp::new(spec.clone(), true, BufferPool::default());
            let out = hv.as_tensor().apply_op2(pv.as_tensor(), op).unwrap();
            let want = reference(&spec, &p64, &h64, b, t);
            let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "output {g} vs {w}"
                );
            }
            let wt = Tensor::from_vec(f32s(&w64), (b, t, 4), &dev).unwrap();
            let grads = (out * wt).unwrap().sum_all().unwrap().backward().unwrap();
            let dp = grads.get(pv.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let dh = grads
                .get(hv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let eps = 1e-6;
            let check = |got: &[f32], base: &[f64], is_param: bool| {
                for (k, g) in got.iter().enumerate() {
                    let (mut up, mut down) = (base.to_vec(), base.to_vec());
                    up[k] += eps;
                    down[k] -= eps;
                    let fd = if is_param {
                        (objective(&up, &h64) - objective(&down, &h64)) / (2.0 * eps)
                    } else {
                        (objective(&p64, &up) - objective(&p64, &down)) / (2.0 * eps)
                    };
                    assert!(
                        (*g as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()),
                        "causal {causal} kernel {kernel}: gradient {k} ({}) {g} vs {fd}",
                        if is_param { "parameter" } else { "input" }
                    );
                }
            };
            check(&dp, &p64, true);
            check(&dh, &h64, false);
        }
    }

    /// With `bf16` (fp16 or bf16 products with f32 sums, where the CPU has either) the op's
    /// output and gradients stay within 1% of f32's (relative L2 norm) and differ from them,
    /// on a series long enough for the last block's products to take the reduced precision.
    #[test]
    fn reduced_precision_tracks_f32() {
        if crate::reduced_precision_kernel() == crate::ReducedKernel::F32 {
            eprintln!("skipped: no reduced-precision kernel on this CPU");
            return;
        }
        let (b, t) = (2, 800);
        let run = |bf16: bool| {
            let spec = TcnSpec {
                hidden: 64,
                output: 320,
                depth: 1,
                kernel: 3,
                causal: false,
                bf16,
            };
            let np = spec.param_len();
            let dev = Device::Cpu;
            let noise = crate::fp16::tests::data;
            let p = noise(np, 1, 0.05);
            let h = noise(b * t * 64, 2, 1.0);
            let w = Tensor::from_vec(noise(b * t * 320, 3, 1.0), (b, t, 320), &dev).unwrap();
            let hv = Var::from_vec(h, (b, t, 64), &dev).unwrap();
            let pv = Var::from_vec(p, np, &dev).unwrap();
            let op = TcnOp::new(spec, true, BufferPool::default());
            let out = hv.as_tensor().apply_op2(pv.as_tensor(), op).unwrap();
            let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            [
                flat(&out),
                flat(grads.get(hv.as_tensor()).unwrap()),
                flat(grads.get(pv.as_tensor()).unwrap()),
            ]
        };
        let (reduced, full) = (run(true), run(false));
        for (name, (r, f)) in ["output", "input gradient", "parameter gradient"]
            .iter()
            .zip(reduced.iter().zip(&full))
        {
            let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
            let diff = norm(&mut r.iter().zip(f).map(|(a, b)| f64::from(a - b)));
            let rel = diff / norm(&mut f.iter().map(|&x| f64::from(x)));
            assert!(rel < 1e-2, "{name}: relative error {rel}");
            assert!(
                rel > 1e-7,
                "{name}: equal to f32 ({rel}): the reduced precision did not run"
            );
        }
    }

    /// [`col2im`] is the adjoint of [`im2col`]: `<im2col(x), y> = <x, col2im(y)>`.
    #[test]
    fn gather_and_scatter_are_adjoint() {
        let spec = TcnSpec {
            hidden: 2,
            output: 2,
            depth: 0,
            kernel: 3,
            causal: false,
            bf16: false,
        };
        let (b, t, c) = (3, 70, 2);
        for d in [1, 4, 64] {
            let taps = spec.taps(d, t);
            let x: Vec<f32> = values(b * t * c, 0.7, 1.0)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let y: Vec<f32> = values(b * t * c * taps.len(), 0.3, 1.0)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let mut col = vec![0f32; y.len()];
            im2col(&mut col, &x, &taps, t, c);
            let mut back = vec![0f32; x.len()];
            col2im(&mut back, &y, &taps, t, c);
            let lhs: f64 = col.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3 * (1.0 + lhs.abs()),
                "{lhs} vs {rhs}"
            );
        }
        // Dilation 64 on 70 steps: all three taps read something; 128: only the centre.
        assert_eq!(spec.taps(64, 70).len(), 3);
        assert_eq!(spec.taps(128, 70), vec![(1, 0)]);
    }
}

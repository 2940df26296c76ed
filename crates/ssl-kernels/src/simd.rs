//! Elementwise kernels of the fused stack, written as plain loops that the compiler
//! vectorises, compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run time by
//! CPU-feature detection: no `target-cpu=native` needed.
//!
//! Every kernel works on rows of a row-major matrix; callers split rows across threads.

use std::sync::OnceLock;

/// The instruction-set level the kernels run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX-512F (x86-64-v4).
    V4,
    /// AVX2 + FMA (x86-64-v3).
    V3,
    /// Whatever the target's baseline is.
    Base,
}

/// The detected level (cached).
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Level::V4;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Level::V3;
            }
        }
        Level::Base
    })
}

/// Defines a kernel whose body is compiled for each [`Level`] and dispatched at run time.
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($a: $t),*) {
                    inner($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($a: $t),*) {
                    inner($($a),*)
                }
                match level() {
                    // SAFETY: the CPU was detected to support these features.
                    Level::V4 => return unsafe { v4($($a),*) },
                    // SAFETY: as above.
                    Level::V3 => return unsafe { v3($($a),*) },
                    Level::Base => {}
                }
            }
            inner($($a),*)
        }
    };
}

/// `exp(x)` to about 2 ulp, branch-free so loops vectorise; exactly 0 below -87.3, saturating
/// at `exp(88)` above 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2^n without a float-to-int conversion (which would not vectorise): adding 2^23 puts
    // the integer n + 127 (in [1, 254] after the clamp) in the low mantissa bits, and the
    // shift moves them into the exponent field.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// The error function to about 3e-7 absolute (and relative, near 0): `x P(x^2) / Q(x^2)`
/// with `x` clamped to [-4, 4] (beyond which erf is 1 in f32), P of degree 5 and Q of degree 5
/// in `x^2` (P's constant term is 2 / sqrt(pi), erf's slope at 0). The coefficients are our own fit (iteratively reweighted least squares towards
/// the minimax error on [0, 4], against 50-digit erf from mpmath): 16 vector operations and
/// one division, branch-free and odd by construction, where the previous series +
/// Abramowitz-Stegun form took about twice that and an `exp`.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let z = x * x;
    let p = 1.974_841e-6_f32.mul_add(z, 2.880_468_4e-4);
    let p = p.mul_add(z, 4.003_771e-3);
    let p = p.mul_add(z, 5.346_786_6e-2);
    let p = p.mul_add(z, 1.962_514_7e-1);
    let p = p.mul_add(z, std::f32::consts::FRAC_2_SQRT_PI);
    let q = 3.748_127e-5_f32.mul_add(z, 1.216_395_4e-3);
    let q = q.mul_add(z, 1.544_466_9e-2);
    let q = q.mul_add(z, 1.164_775_1e-1);
    let q = q.mul_add(z, 5.072_545e-1);
    let q = q.mul_add(z, 1.0);
    x * p / q
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `tanh(u)` through [`exp`], branch-free.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let e = exp(-2.0 * u.abs());
    let t = (1.0 - e) / (1.0 + e);
    if u < 0.0 {
        -t
    } else {
        t
    }
}

/// The cubic coefficient of GELU's tanh approximation.
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// The argument of tanh in GELU's tanh approximation, `sqrt(2 / pi) (x + 0.044715 x^3)`.
#[inline(always)]
fn gelu_tanh_arg(x: f32) -> f32 {
    SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x)
}

/// Exact GELU, `x Phi(x)`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * INV_SQRT_2))
}

/// GELU, tanh approximation.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(gelu_tanh_arg(x)))
}

/// The feed-forward activation, as the fused kernels see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Exact GELU.
    GeluErf,
    /// GELU, tanh approximation.
    GeluTanh,
    /// ReLU.
    Relu,
}

simd_kernel! {
    /// `g[i] = act(h[i] + bias[i % bias.len()])`, storing the biased pre-activation back in `h`.
    pub(crate) fn bias_act(h: &mut [f32], bias: &[f32], g: &mut [f32], act: Act) {
        let m = bias.len();
        for (hr, gr) in h.chunks_exact_mut(m).zip(g.chunks_exact_mut(m)) {
            for (hv, bv) in hr.iter_mut().zip(bias) {
                *hv += bv;
            }
            // One loop per activation, so each vectorises without a branch inside.
            match act {
                Act::GeluErf => {
                    for (gv, &x) in gr.iter_mut().zip(hr.iter()) {
                        *gv = gelu_erf(x);
                    }
                }
                Act::GeluTanh => {
                    for (gv, &x) in gr.iter_mut().zip(hr.iter()) {
                        *gv = gelu_tanh(x);
                    }
                }
                Act::Relu => {
                    for (gv, &x) in gr.iter_mut().zip(hr.iter()) {
                        *gv = x.max(0.0);
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// `h[i] = act(h[i] + bias[i % bias.len()])` in place (no backward to follow, so the
    /// pre-activation is not kept).
    pub(crate) fn bias_act_in_place(h: &mut [f32], bias: &[f32], act: Act) {
        let m = bias.len();
        for hr in h.chunks_exact_mut(m) {
            match act {
                Act::GeluErf => {
                    for (v, b) in hr.iter_mut().zip(bias) {
                        *v = gelu_erf(*v + b);
                    }
                }
                Act::GeluTanh => {
                    for (v, b) in hr.iter_mut().zip(bias) {
                        *v = gelu_tanh(*v + b);
                    }
                }
                Act::Relu => {
                    for (v, b) in hr.iter_mut().zip(bias) {
                        *v = (*v + b).max(0.0);
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// `dh[i] = dg[i] * act'(h[i])`, in place in `dg`. With exact GELU and its outputs `g`
    /// (`g[i] = gelu(h[i])`, as the forward wrote them), the normal CDF in the derivative
    /// `Phi(x) + x phi(x)` is read off them as `g / x` instead of evaluating `erf` again
    /// (near 0, where that ratio loses its digits, `0.5 + x phi(0)`, exact to O(x^3)).
    pub(crate) fn act_backward(dg: &mut [f32], h: &[f32], g: Option<&[f32]>, act: Act) {
        match (act, g) {
            (Act::GeluErf, Some(g)) => {
                for ((d, &x), &y) in dg.iter_mut().zip(h).zip(g) {
                    let cdf = if x.abs() > 1e-3 {
                        y / x
                    } else {
                        x.mul_add(INV_SQRT_2PI, 0.5)
                    };
                    *d *= cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x);
                }
            }
            (Act::GeluErf, None) => {
                for (d, &x) in dg.iter_mut().zip(h) {
                    *d *= 0.5 * (1.0 + erf(x * INV_SQRT_2))
                        + x * INV_SQRT_2PI * exp(-0.5 * x * x);
                }
            }
            (Act::GeluTanh, _) => {
                for (d, &x) in dg.iter_mut().zip(h) {
                    let t = tanh(gelu_tanh_arg(x));
                    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * x * x);
                    *d *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
                }
            }
            (Act::Relu, _) => {
                for (d, &x) in dg.iter_mut().zip(h) {
                    *d = if x > 0.0 { *d } else { 0.0 };
                }
            }
        }
    }
}

simd_kernel! {
    /// Adds `bias` to every row of `y`.
    pub(crate) fn add_bias(y: &mut [f32], bias: &[f32]) {
        for row in y.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

simd_kernel! {
    /// `acc += x`, elementwise.
    pub(crate) fn add_assign(acc: &mut [f32], x: &[f32]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    }
}

simd_kernel! {
    /// `out += sum_s weights[s] * rows[s]` over the rows of `rows` (width `out.len()`),
    /// skipping rows whose weight is 0 (one fused multiply-add per element).
    pub(crate) fn weighted_row_sum(out: &mut [f32], rows: &[f32], weights: &[f32]) {
        for (row, &w) in rows.chunks_exact(out.len().max(1)).zip(weights) {
            if w != 0.0 {
                for (acc, &v) in out.iter_mut().zip(row) {
                    *acc = w.mul_add(v, *acc);
                }
            }
        }
    }
}

simd_kernel! {
    /// Column sums of the rows of `x` (width `out.len()`), written to `out`.
    pub(crate) fn col_sum(out: &mut [f32], x: &[f32]) {
        out.fill(0.0);
        for row in x.chunks_exact(out.len()) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
    }
}

simd_kernel! {
    /// Column sums of `a * b` (rows of width `out.len()`), written to `out`.
    pub(crate) fn col_sum_prod(out: &mut [f32], a: &[f32], b: &[f32]) {
        out.fill(0.0);
        let w = out.len();
        for (ra, rb) in a.chunks_exact(w).zip(b.chunks_exact(w)) {
            for ((o, x), y) in out.iter_mut().zip(ra).zip(rb) {
                *o = x.mul_add(*y, *o);
            }
        }
    }
}

simd_kernel! {
    /// Layer norm of each row of `x` (width `w.len()`): writes `y = xhat * w + b`, `xhat`
    /// (unless `xhat` is empty: a pass with no backward to follow) and
    /// `rstd = 1 / sqrt(var + eps)` per row (variance with divisor D, as PyTorch).
    pub(crate) fn layer_norm(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        y: &mut [f32],
        xhat: &mut [f32],
        rstd: &mut [f32],
    ) {
        let d = w.len();
        let inv_d = 1.0 / d as f32;
        let keep = !xhat.is_empty();
        for (r, ((xr, yr), rs)) in x
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(rstd.iter_mut())
            .enumerate()
        {
            let mean = sum_lanes(xr) * inv_d;
            let var = sq_dev_lanes(xr, mean);
            let r_inv = 1.0 / (var * inv_d + eps).sqrt();
            *rs = r_inv;
            if keep {
                let hr = &mut xhat[r * d..(r + 1) * d];
                for (((xv, yv), hv), (wv, bv)) in xr
                    .iter()
                    .zip(yr.iter_mut())
                    .zip(hr.iter_mut())
                    .zip(w.iter().zip(b))
                {
                    let h = (xv - mean) * r_inv;
                    *hv = h;
                    *yv = h.mul_add(*wv, *bv);
                }
            } else {
                for ((xv, yv), (wv, bv)) in xr.iter().zip(yr.iter_mut()).zip(w.iter().zip(b)) {
                    *yv = ((xv - mean) * r_inv).mul_add(*wv, *bv);
                }
            }
        }
    }
}

simd_kernel! {
    /// Layer-norm backward for each row: given `dy`, the saved `xhat`, `rstd` and the weight
    /// `w`, writes (or adds, when `accumulate`) `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`
    /// with `g = dy * w`. The weight and bias gradients are column sums, computed apart.
    pub(crate) fn layer_norm_backward(
        dy: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        w: &[f32],
        dx: &mut [f32],
        accumulate: bool,
    ) {
        let d = w.len();
        let inv_d = 1.0 / d as f32;
        for (((dyr, hr), &r), dxr) in dy
            .chunks_exact(d)
            .zip(xhat.chunks_exact(d))
            .zip(rstd)
            .zip(dx.chunks_exact_mut(d))
        {
            let (sg, sgh) = weighted_sums_lanes(dyr, w, hr);
            let mg = sg * inv_d;
            let mgh = sgh * inv_d;
            for (((o, g), h), wv) in dxr.iter_mut().zip(dyr).zip(hr).zip(w) {
                let v = r * (g * wv - mg - h * mgh);
                if accumulate {
                    *o += v;
                } else {
                    *o = v;
                }
            }
        }
    }
}

/// Lanes of the reductions below: independent partial results the compiler keeps in one
/// vector register (a single float accumulator would serialise the loop, since float addition
/// is not reassociated).
const LANES: usize = 16;

/// Sum of the lanes, pairwise (halves added until one is left): four dependent vector adds
/// instead of fifteen scalar ones.
#[inline(always)]
fn fold_sum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] += a[i + w];
        }
    }
    a[0]
}

/// Maximum of the lanes, pairwise as [`fold_sum`].
#[inline(always)]
fn fold_max(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] = a[i].max(a[i + w]);
        }
    }
    a[0]
}

/// Maximum of `row` (`-inf` when empty), vectorisable.
#[inline(always)]
pub(crate) fn max_lanes(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a = a.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    fold_max(acc).max(tail)
}

/// Sum of `row`, vectorisable (lane-wise partial sums).
#[inline(always)]
pub(crate) fn sum_lanes(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += v;
        }
    }
    fold_sum(acc) + chunks.remainder().iter().sum::<f32>()
}

/// `sum((v - mean)^2)` over `row`, vectorisable.
#[inline(always)]
fn sq_dev_lanes(row: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            let c = v - mean;
            *a = c.mul_add(c, *a);
        }
    }
    let tail = chunks.remainder().iter().fold(0.0f32, |a, &v| {
        let c = v - mean;
        c.mul_add(c, a)
    });
    fold_sum(acc) + tail
}

/// `sum(a * b)`, vectorisable.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s = u.mul_add(v, *s);
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(0.0f32, |s, (&u, &v)| u.mul_add(v, s));
    fold_sum(acc) + tail
}

/// `(sum(g * w), sum(g * w * h))` over one row, vectorisable (the layer-norm backward's two
/// row sums).
#[inline(always)]
fn weighted_sums_lanes(g: &[f32], w: &[f32], h: &[f32]) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let (mut cg, mut cw, mut ch) = (
        g.chunks_exact(LANES),
        w.chunks_exact(LANES),
        h.chunks_exact(LANES),
    );
    for ((x, y), z) in (&mut cg).zip(&mut cw).zip(&mut ch) {
        for i in 0..LANES {
            let gw = x[i] * y[i];
            s1[i] += gw;
            s2[i] = gw.mul_add(z[i], s2[i]);
        }
    }
    let (mut t1, mut t2) = (0.0f32, 0.0f32);
    for ((x, y), z) in cg
        .remainder()
        .iter()
        .zip(cw.remainder())
        .zip(ch.remainder())
    {
        let gw = x * y;
        t1 += gw;
        t2 = gw.mul_add(*z, t2);
    }
    (fold_sum(s1) + t1, fold_sum(s2) + t2)
}

/// The index of the first element of `row` equal to `m` (0 when none is): blocks of [`LANES`]
/// compared whole (vectorisable), the scalar search only inside the block that holds it.
#[inline(always)]
fn first_index_of(row: &[f32], m: f32) -> usize {
    let mut chunks = row.chunks_exact(LANES);
    let mut base = 0;
    for ch in &mut chunks {
        if ch.iter().fold(false, |hit, &v| hit | (v == m)) {
            return base + ch.iter().position(|&v| v == m).unwrap_or(0);
        }
        base += LANES;
    }
    chunks
        .remainder()
        .iter()
        .position(|&v| v == m)
        .map_or(0, |i| base + i)
}

/// `sum(exp(row - shift))`, vectorisable.
#[inline(always)]
fn exp_sum(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += exp(v - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    fold_sum(acc) + tail
}

/// `row <- exp(row - shift)`, returning the new row's sum; vectorisable.
#[inline(always)]
fn exp_in_place_sum(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        tail += *v;
    }
    fold_sum(acc) + tail
}

simd_kernel! {
    /// Log-sum-exp of each row of `x` (width `c`) into `lse` (cross-entropy forward).
    pub(crate) fn lse_rows(x: &[f32], c: usize, lse: &mut [f32]) {
        for (row, o) in x.chunks_exact(c).zip(lse.iter_mut()) {
            let m = max_lanes(row);
            *o = exp_sum(row, m).ln() + m;
        }
    }
}

simd_kernel! {
    /// For each row of `x` (width `bias.len()`): adds `bias` in place, notes the row's
    /// logit of its target (`targets`, each below the width) in `picked` and the index of its
    /// maximum `m` (the first, on ties; 0 for a row without a number) in `argmax`, then
    /// replaces the row by `exp(x - m)` and writes its log-sum-exp to `lse` and `1 / sum` to
    /// `inv_sum`: the softmax's numerators, which the backward scales instead of taking the
    /// exponentials again.
    pub(crate) fn bias_exp_argmax_rows(
        x: &mut [f32],
        bias: &[f32],
        targets: &[u32],
        picked: &mut [f32],
        lse: &mut [f32],
        inv_sum: &mut [f32],
        argmax: &mut [u32],
    ) {
        let c = bias.len();
        let rows = x
            .chunks_exact_mut(c)
            .zip(targets)
            .zip(picked.iter_mut())
            .zip(lse.iter_mut().zip(inv_sum.iter_mut()))
            .zip(argmax.iter_mut());
        for ((((row, &t), p), (l, inv)), a) in rows {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            let m = max_lanes(row);
            *a = first_index_of(row, m) as u32;
            *p = row.get(t as usize).copied().unwrap_or(f32::NAN);
            let s = exp_in_place_sum(row, m);
            *l = s.ln() + m;
            *inv = 1.0 / s;
        }
    }
}

simd_kernel! {
    /// Each row of `x` (width `c`) multiplied in place by its `factor` times `scale`.
    pub(crate) fn scale_rows(x: &mut [f32], c: usize, factor: &[f32], scale: f32) {
        for (row, &f) in x.chunks_exact_mut(c).zip(factor) {
            let k = f * scale;
            for v in row.iter_mut() {
                *v *= k;
            }
        }
    }
}

simd_kernel! {
    /// Each row of `x` (width `c`) becomes `exp(x - lse) * scale` in place: the scaled
    /// softmax (cross-entropy backward).
    pub(crate) fn scaled_softmax_rows(x: &mut [f32], c: usize, lse: &[f32], scale: f32) {
        for (row, &l) in x.chunks_exact_mut(c).zip(lse) {
            for v in row.iter_mut() {
                *v = exp(*v - l) * scale;
            }
        }
    }
}

simd_kernel! {
    /// Softmax of each row of `s` (width `t`) in place, after adding `key_bias` (per key) and,
    /// when `causal`, masking keys after the row's query position `row0 + i`.
    pub(crate) fn softmax_rows(s: &mut [f32], key_bias: &[f32], causal: bool, row0: usize) {
        let t = key_bias.len();
        for (i, row) in s.chunks_exact_mut(t).enumerate() {
            for (v, kb) in row.iter_mut().zip(key_bias) {
                *v += kb;
            }
            if causal {
                // Keys after the query's position.
                for v in row.iter_mut().skip(row0 + i + 1) {
                    *v += -1e9;
                }
            }
            let max = max_lanes(row);
            let inv = 1.0 / exp_in_place_sum(row, max);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_kernel! {
    /// Softmax backward per row, in place: `dp <- p * (dp - sum(dp * p))`.
    pub(crate) fn softmax_backward_rows(dp: &mut [f32], p: &[f32], t: usize) {
        for (dr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
            let dot = dot_lanes(dr, pr);
            for (d, q) in dr.iter_mut().zip(pr) {
                *d = q * (*d - dot);
            }
        }
    }
}

/// The per-step coefficients of an AdamW update (see [`adamw`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWCoeffs {
    /// First-moment decay `beta1`.
    pub b1: f32,
    /// `1 - beta1`.
    pub one_minus_b1: f32,
    /// Second-moment decay `beta2`.
    pub b2: f32,
    /// `1 - beta2`.
    pub one_minus_b2: f32,
    /// Bias corrections `1 / (1 - beta^t)`: of the first moment,
    pub scale_m: f32,
    /// and of the second.
    pub scale_v: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// The learning rate.
    pub lr: f32,
    /// Added to the square root of the second moment.
    pub eps: f32,
    /// Every gradient element is multiplied by it first (1: the gradient as it is): the
    /// division by the loss weight and the clipping factor, folded into the update's one pass.
    pub grad_scale: f32,
}

simd_kernel! {
    /// One AdamW step in place, in one pass: moments, bias correction, decoupled decay.
    pub fn adamw(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamWCoeffs) {
        for (((p, mv), vv), &gv) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let gv = gv * c.grad_scale;
            let m1 = c.b1 * *mv + c.one_minus_b1 * gv;
            let v1 = c.b2 * *vv + c.one_minus_b2 * (gv * gv);
            *mv = m1;
            *vv = v1;
            let update = (m1 * c.scale_m) / ((v1 * c.scale_v).sqrt() + c.eps);
            *p = *p * c.decay - update * c.lr;
        }
    }
}

simd_kernel! {
    /// Adds the sum of the squares of `x`, in f64, to `acc` (lane-wise partial sums, so it
    /// vectorises: the order of the sum is fixed by `x`'s length alone). 32 lanes: four
    /// independent AVX-512 accumulators, so the adds do not wait on each other (with 8, one
    /// register, the pass ran at the add's latency, under half the memory's pace).
    pub(crate) fn sum_squares_f64(x: &[f32], acc: &mut f64) {
        const W: usize = 32;
        let mut lanes = [0f64; W];
        let mut chunks = x.chunks_exact(W);
        for ch in &mut chunks {
            for (a, &v) in lanes.iter_mut().zip(ch) {
                let v = f64::from(v);
                *a += v * v;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        *acc += lanes.iter().sum::<f64>() + tail;
    }
}

/// murmur3's 32-bit finaliser: a cheap, well-mixed hash of `seed` and an element index.
#[inline(always)]
fn mix(seed: u32, i: u32) -> u32 {
    let mut h = seed ^ i.wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The hash threshold below which an element is dropped with probability `p`.
pub(crate) fn drop_threshold(p: f32) -> u32 {
    (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32
}

simd_kernel! {
    /// Inverted dropout in place: element `offset + i` is zeroed when its hash under `seed`
    /// falls below `threshold`, and scaled by `scale = 1 / (1 - p)` otherwise. The mask is a
    /// pure function of `(seed, index)`, so backward regenerates it instead of storing it.
    pub(crate) fn dropout(x: &mut [f32], seed: u32, offset: u32, threshold: u32, scale: f32) {
        for (i, v) in x.iter_mut().enumerate() {
            let keep = mix(seed, offset.wrapping_add(i as u32)) >= threshold;
            *v = if keep { *v * scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact GELU's derivative read off the forward's outputs equals the one that
    /// evaluates `erf` again, across the range, near 0 (the Taylor branch and its edge) and
    /// in the tails.
    #[test]
    fn gelu_derivative_from_the_outputs_equals_the_one_from_erf() {
        let mut xs: Vec<f32> = (-3000..=3000).map(|i| i as f32 * 0.004).collect();
        xs.extend([
            0.0, 1e-6, -1e-6, 9.99e-4, 1.001e-3, -1.001e-3, 20.0, -20.0, -40.0,
        ]);
        let g: Vec<f32> = xs.iter().map(|&x| gelu_erf(x)).collect();
        let ones = vec![1f32; xs.len()];
        let (mut from_erf, mut from_g) = (ones.clone(), ones);
        act_backward(&mut from_erf, &xs, None, Act::GeluErf);
        act_backward(&mut from_g, &xs, Some(&g), Act::GeluErf);
        for ((&x, &a), &b) in xs.iter().zip(&from_erf).zip(&from_g) {
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + a.abs()),
                "x = {x}: {a} vs {b}"
            );
        }
    }

    /// The block-wise search finds the first occurrence wherever it is (first block, a later
    /// block, the tail, twice in one block) and 0 when there is none.
    #[test]
    fn first_index_of_finds_the_first_occurrence() {
        let n = 5 * LANES + 7;
        for at in [0, 3, LANES, 2 * LANES + 5, 5 * LANES, n - 1] {
            let mut row = vec![1.0f32; n];
            row[at] = 9.0;
            if at + 2 < n {
                row[at + 2] = 9.0;
            }
            assert_eq!(first_index_of(&row, 9.0), at);
        }
        assert_eq!(first_index_of(&[1.0, 2.0], 5.0), 0);
        assert_eq!(first_index_of(&[], 5.0), 0);
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in -2000..=2000 {
            let x = i as f32 * 0.043;
            let e = f64::from(exp(x));
            let r = f64::from(x).exp();
            worst_exp = worst_exp.max(((e - r) / r).abs());
            // |x| <= 3: where the series reference below is exact in f64.
            let x = i as f32 * 0.0015;
            let e = f64::from(erf(x));
            // erf via its relation to the complementary error function of the Gaussian CDF.
            let r = reference_erf(f64::from(x));
            worst_erf = worst_erf.max((e - r).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 3e-7, "erf absolute error {worst_erf}");
        // Relative accuracy near 0, and the clamped tails.
        for x in [1e-6f32, 3e-4, 0.01, -0.02] {
            let r = reference_erf(f64::from(x));
            let rel = ((f64::from(erf(x)) - r) / r).abs();
            assert!(rel < 5e-7, "erf({x}) relative error {rel}");
        }
        for x in [4.5f32, 7.0, 100.0, f32::INFINITY] {
            assert!(
                (erf(x) - 1.0).abs() < 3e-7 && (erf(-x) + 1.0).abs() < 3e-7,
                "{x}"
            );
        }
        assert_eq!(exp(-1e9), 0.0);
        assert!(exp(100.0).is_finite());
    }

    /// erf by its Maclaurin series (exact to ~1e-12 in f64 for |x| <= 3).
    fn reference_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn lane_reductions_match_f64_sums_with_tails() {
        for n in [0usize, 5, 16, 37, 256] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 0.25).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).cos()).collect();
            let c: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13).sin() * 2.0).collect();
            let f = |v: &f32| f64::from(*v);
            let close = |got: f32, want: f64| {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "n = {n}: {got} against {want}"
                )
            };
            close(sum_lanes(&a), a.iter().map(f).sum());
            let mean = 0.3f32;
            close(
                sq_dev_lanes(&a, mean),
                a.iter().map(|v| (f(v) - 0.3).powi(2)).sum(),
            );
            close(
                dot_lanes(&a, &b),
                a.iter().zip(&b).map(|(x, y)| f(x) * f(y)).sum(),
            );
            let (s1, s2) = weighted_sums_lanes(&a, &b, &c);
            close(s1, a.iter().zip(&b).map(|(x, y)| f(x) * f(y)).sum());
            close(
                s2,
                a.iter()
                    .zip(&b)
                    .zip(&c)
                    .map(|((x, y), z)| f(x) * f(y) * f(z))
                    .sum(),
            );
        }
    }

    #[test]
    fn dropout_rate_and_determinism() {
        let p = 0.3;
        let mut x = vec![1.0f32; 100_000];
        dropout(&mut x, 7, 0, drop_threshold(p), 1.0 / (1.0 - p));
        let zeros = x.iter().filter(|v| **v == 0.0).count() as f32 / 1e5;
        assert!((zeros - p).abs() < 0.01, "{zeros}");
        let mut y = vec![1.0f32; 1000];
        dropout(&mut y, 7, 0, drop_threshold(p), 1.0 / (1.0 - p));
        assert_eq!(&x[..1000], &y[..]);
        let mut z = vec![1.0f32; 1000];
        dropout(&mut z, 8, 0, drop_threshold(p), 1.0 / (1.0 - p));
        assert_ne!(y, z);
    }
}

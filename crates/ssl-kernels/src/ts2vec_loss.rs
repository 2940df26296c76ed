//! TS2Vec's hierarchical contrastive loss (Yue et al. 2022) as one candle custom op: the
//! loss and, in the same pass, its gradient with respect to both views' representations.
//!
//! Inputs: `z1`, `z2` (B, T, D), the two views' representations of the crops' overlap, and
//! `valid` (B, T) 0/1. At every level of a pyramid (level 0 the inputs, each next one max-pooled
//! by 2 over time, invalid steps never winning and a pair with none valid staying invalid
//! and zero) two terms are computed:
//!
//! - **instance** (weight `alpha`): at each timestamp the `2B` rows of both views; every valid
//!   row must pick its other view (same series) among the `2B - 1` others that are valid;
//! - **temporal** (weight `1 - alpha`, from level `temporal_unit` on): in each series the `2T`
//!   rows of both views; every valid row must pick the same timestamp of the other view.
//!
//! Each term is the mean of `-log softmax` of the partner's similarity (dot product) over its
//! anchors (valid rows with a valid partner), the diagonal and invalid candidates left out.
//! Levels go on while more than one step is left; a last level of one step gets the instance
//! term alone. The loss is the sum of the weighted terms over the number of levels. This is
//! `ssl_timeseries::ts2vec::hierarchical_contrastive_loss`, whose composite-op version stays
//! the reference (tests hold the two together).
//!
//! The composite version materialises every similarity matrix several times over (the
//! similarities, the masking bias, the log-softmax, the one-hot pick, and each of their
//! gradients) and adds gradients of whole tensors through candle's graph; here each group's
//! similarities live in one buffer per thread, the anchors' `softmax - onehot` replaces them in
//! place, and one more product gives the group's gradient.

use std::borrow::Cow;
use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use gemm::Parallelism;

use super::gemm::{matmul, MatRef, Op};

/// The op: a scalar loss; when `backward` is set, the forward also computes the gradients its
/// `bwd` hands back.
pub struct Ts2VecLossOp {
    alpha: f64,
    temporal_unit: usize,
    backward: bool,
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl Ts2VecLossOp {
    /// The loss with instance weight `alpha` (the temporal term gets `1 - alpha`) and temporal
    /// terms from level `temporal_unit` on; `backward`: a backward pass will follow (the
    /// forward then keeps the gradients).
    pub fn new(alpha: f64, temporal_unit: usize, backward: bool) -> Self {
        Ts2VecLossOp {
            alpha,
            temporal_unit,
            backward,
            grads: Mutex::new(None),
        }
    }
}

/// One level of the pyramid: both views (B, t, D) and the validity (B, t), borrowed from the
/// op's inputs at level 0; for a pooled level, which of each pair won (per element, `true`:
/// the second), for the backward.
struct Level<'a> {
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    v: Cow<'a, [f32]>,
    t: usize,
    second_a: Vec<bool>,
    second_b: Vec<bool>,
}

/// Max-pools `z` (B, t, D) by 2 over time as the composite does: `max(z + (v - 1) 1e4)` over
/// each pair, times the pair's validity `max(v)`; the odd last step is dropped. Returns the
/// pooled values and, per output element, whether the second of its pair won (ties: the
/// first, which alone gets the gradient; candle's `max` backward, in the composite, gives it
/// to both, a difference only for exactly equal values).
fn max_pool2(z: &[f32], v: &[f32], bsz: usize, t: usize, d: usize) -> (Vec<f32>, Vec<bool>) {
    let t2 = t / 2;
    let mut out = vec![0f32; bsz * t2 * d];
    let mut second = vec![false; bsz * t2 * d];
    for b in 0..bsz {
        for s in 0..t2 {
            let (i0, i1) = (b * t + 2 * s, b * t + 2 * s + 1);
            let (s0, s1) = ((v[i0] - 1.0) * 1e4, (v[i1] - 1.0) * 1e4);
            let vp = v[i0].max(v[i1]);
            let (r0, r1) = (&z[i0 * d..(i0 + 1) * d], &z[i1 * d..(i1 + 1) * d]);
            let o = (b * t2 + s) * d;
            for k in 0..d {
                let (x0, x1) = (r0[k] + s0, r1[k] + s1);
                let win = x1 > x0;
                second[o + k] = win;
                out[o + k] = if win { x1 } else { x0 } * vp;
            }
        }
    }
    (out, second)
}

/// Routes the gradient `g` of a pooled level (B, t2, D) back to the level below it (B, t, D),
/// added into `dst`: each element's gradient, times its pair's validity `vp` (B, t2), goes to
/// the pair's winner (`second`: the second step won).
fn unpool_add(dst: &mut [f32], g: &[f32], second: &[bool], vp: &[f32], t: usize, d: usize) {
    let t2 = t / 2;
    for (bs, &p) in vp.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let (b, s) = (bs / t2.max(1), bs % t2.max(1));
        let o = bs * d;
        for k in 0..d {
            let src = b * t + 2 * s + usize::from(second[o + k]);
            dst[src * d + k] += g[o + k] * p;
        }
    }
}

/// The contrast of one group: rows `z` (R, D) with candidate flags `cand` (R); the anchors are
/// the valid rows whose `partner` is valid. Returns the sum over anchors of `lse - sim[i, p]`
/// (f64) and, with `scale`, the gradient `scale * (S + S^T) z` where `S` holds each anchor's
/// `softmax - onehot(partner)` row.
fn contrast_group(
    z: &[f32],
    r: usize,
    d: usize,
    cand: &[bool],
    partner: impl Fn(usize) -> usize,
    scale: Option<f32>,
) -> (f64, Option<Vec<f32>>) {
    let mut sim = vec![0f32; r * r];
    let zm = MatRef::dense(z, r, d);
    matmul(
        &mut sim,
        r,
        zm,
        Op::N,
        zm,
        Op::T,
        1.0,
        false,
        Parallelism::None,
        false,
    );
    let mut total = 0f64;
    for i in 0..r {
        let row = &mut sim[i * r..(i + 1) * r];
        let p = partner(i);
        if !(cand[i] && cand[p]) {
            row.fill(0.0);
            continue;
        }
        let picked = row[p];
        let mut mx = f32::NEG_INFINITY;
        for (j, &s) in row.iter().enumerate() {
            if j != i && cand[j] && s > mx {
                mx = s;
            }
        }
        let mut sum = 0f64;
        for (j, s) in row.iter_mut().enumerate() {
            if j != i && cand[j] {
                let e = (*s - mx).exp();
                sum += f64::from(e);
                *s = e;
            } else {
                *s = 0.0;
            }
        }
        // -log softmax at the partner, in log space: its exponential may underflow (the
        // partner is a candidate, so `sum` >= exp(0) = 1 at the row's maximum).
        total += f64::from(mx) + sum.ln() - f64::from(picked);
        if scale.is_some() {
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|s| *s *= inv);
            row[p] -= 1.0;
        }
    }
    let Some(scale) = scale else {
        return (total, None);
    };
    // S + S^T, then (S + S^T) z.
    for i in 0..r {
        for j in i + 1..r {
            let s = sim[i * r + j] + sim[j * r + i];
            sim[i * r + j] = s;
            sim[j * r + i] = s;
        }
        sim[i * r + i] *= 2.0;
    }
    let mut dz = vec![0f32; r * d];
    matmul(
        &mut dz,
        d,
        MatRef::dense(&sim, r, r),
        Op::N,
        zm,
        Op::N,
        scale,
        false,
        Parallelism::None,
        false,
    );
    (total, Some(dz))
}

/// Anchors of a level's instance and temporal terms: every valid step is an anchor in both
/// views (its partner is the same step of the same series in the other view).
fn anchors(v: &[f32]) -> f64 {
    2.0 * v.iter().filter(|&&x| x > 0.5).count() as f64
}

/// One term of a level (weight `w` over the whole loss; `count` anchors in all): `groups`
/// groups of `r` rows, each gathered by `gather` (rows and candidate flags) and contrasted in
/// parallel, with `partner` pairing the rows; returns the term's loss and, with `grads`, adds
/// each group's gradient through `scatter`.
#[allow(clippy::too_many_arguments)]
fn term(
    d: usize,
    w: f64,
    count: f64,
    grads: Option<&mut Grads>,
    (groups, r): (usize, usize),
    gather: impl Fn(usize) -> (Vec<f32>, Vec<bool>) + Sync,
    partner: impl Fn(usize) -> usize + Sync + Copy,
    scatter: impl Fn(usize, &[f32], &mut Grads),
) -> f64 {
    if count == 0.0 {
        return 0.0;
    }
    let scale = grads.is_some().then_some((w / count) as f32);
    let parts: Vec<(f64, Option<Vec<f32>>)> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let (z, cand) = gather(g);
            contrast_group(&z, r, d, &cand, partner, scale)
        })
        .collect();
    let mut total = 0f64;
    let mut grads = grads;
    for (g, (loss, dz)) in parts.into_iter().enumerate() {
        total += loss;
        if let (Some(gr), Some(dz)) = (grads.as_deref_mut(), dz) {
            scatter(g, &dz, gr);
        }
    }
    w * total / count
}

/// The instance term of `lvl`: at each timestamp, the `2B` rows of both views.
fn instance_term(lvl: &Level, bsz: usize, d: usize, w: f64, grads: Option<&mut Grads>) -> f64 {
    if bsz < 2 {
        return 0.0;
    }
    let (t, r) = (lvl.t, 2 * bsz);
    // Row `i` of timestamp `s`: view 1 of series `i` for `i < B`, else view 2 of `i - B`.
    let at = |i: usize, s: usize| ((i % bsz) * t + s) * d;
    let gather = |s: usize| {
        let mut z = vec![0f32; r * d];
        for (i, row) in z.chunks_mut(d).enumerate() {
            let src = if i < bsz { &lvl.a } else { &lvl.b };
            row.copy_from_slice(&src[at(i, s)..at(i, s) + d]);
        }
        let cand = (0..r).map(|i| lvl.v[(i % bsz) * t + s] > 0.5).collect();
        (z, cand)
    };
    let scatter = |s: usize, dz: &[f32], (ga, gb): &mut Grads| {
        for (i, row) in dz.chunks(d).enumerate() {
            let dst = if i < bsz { &mut *ga } else { &mut *gb };
            add_assign(&mut dst[at(i, s)..at(i, s) + d], row);
        }
    };
    let partner = move |i: usize| (i + bsz) % r;
    let count = anchors(&lvl.v);
    term(d, w, count, grads, (t, r), gather, partner, scatter)
}

/// The temporal term of `lvl`: in each series, the `2T` rows of both views.
fn temporal_term(lvl: &Level, bsz: usize, d: usize, w: f64, grads: Option<&mut Grads>) -> f64 {
    let t = lvl.t;
    if t < 2 {
        return 0.0;
    }
    let n = t * d;
    let gather = |b: usize| {
        let mut z = Vec::with_capacity(2 * n);
        z.extend_from_slice(&lvl.a[b * n..(b + 1) * n]);
        z.extend_from_slice(&lvl.b[b * n..(b + 1) * n]);
        let vb = &lvl.v[b * t..(b + 1) * t];
        (z, vb.iter().chain(vb).map(|&x| x > 0.5).collect())
    };
    let scatter = |b: usize, dz: &[f32], (ga, gb): &mut Grads| {
        add_assign(&mut ga[b * n..(b + 1) * n], &dz[..n]);
        add_assign(&mut gb[b * n..(b + 1) * n], &dz[n..]);
    };
    let partner = move |i: usize| (i + t) % (2 * t);
    let count = anchors(&lvl.v);
    term(d, w, count, grads, (bsz, 2 * t), gather, partner, scatter)
}

/// The gradients of one level's two views.
type Grads = (Vec<f32>, Vec<f32>);

fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// The loss of `z1`, `z2` (B, T, D) with validity (B, T), and with `want_grads` its gradients
/// with respect to `z1` and `z2`.
pub(crate) fn loss_and_grads(
    z1: &[f32],
    z2: &[f32],
    valid: &[f32],
    (bsz, t, d): (usize, usize, usize),
    alpha: f64,
    temporal_unit: usize,
    want_grads: bool,
) -> (f64, Option<Grads>) {
    if t == 0 || bsz == 0 {
        let zero = want_grads.then(|| (vec![0f32; z1.len()], vec![0f32; z2.len()]));
        return (0.0, zero);
    }
    let mut levels = vec![Level {
        a: Cow::Borrowed(z1),
        b: Cow::Borrowed(z2),
        v: Cow::Borrowed(valid),
        t,
        second_a: Vec::new(),
        second_b: Vec::new(),
    }];
    while let Some(top) = levels.last().filter(|l| l.t > 1) {
        let (a, second_a) = max_pool2(&top.a, &top.v, bsz, top.t, d);
        let (b, second_b) = max_pool2(&top.b, &top.v, bsz, top.t, d);
        let t2 = top.t / 2;
        let mut v = vec![0f32; bsz * t2];
        for bi in 0..bsz {
            for s in 0..t2 {
                let i = bi * top.t + 2 * s;
                v[bi * t2 + s] = top.v[i].max(top.v[i + 1]);
            }
        }
        levels.push(Level {
            a: Cow::Owned(a),
            b: Cow::Owned(b),
            v: Cow::Owned(v),
            t: t2,
            second_a,
            second_b,
        });
    }
    // Levels with more than one step, plus the last one when it has exactly one.
    let depth = levels.len() as f64;
    let mut grads: Vec<Grads> = if want_grads {
        levels
            .iter()
            .map(|l| (vec![0f32; l.a.len()], vec![0f32; l.b.len()]))
            .collect()
    } else {
        Vec::new()
    };
    let mut loss = 0f64;
    for (k, lvl) in levels.iter().enumerate() {
        if alpha != 0.0 {
            let w = alpha / depth;
            loss += instance_term(lvl, bsz, d, w, grads.get_mut(k));
        }
        if lvl.t > 1 && k >= temporal_unit && alpha != 1.0 {
            let w = (1.0 - alpha) / depth;
            loss += temporal_term(lvl, bsz, d, w, grads.get_mut(k));
        }
    }
    if !want_grads {
        return (loss, None);
    }
    // Back down the pyramid: each level's gradient to the winners of the level below.
    for k in (1..levels.len()).rev() {
        let (lower, upper) = grads.split_at_mut(k);
        let ((ga, gb), (ua, ub)) = (&mut lower[k - 1], &upper[0]);
        let (lo, up) = (&levels[k - 1], &levels[k]);
        unpool_add(ga, ua, &up.second_a, &up.v, lo.t, d);
        unpool_add(gb, ub, &up.second_b, &up.v, lo.t, d);
    }
    let (g1, g2) = grads.swap_remove(0);
    (loss, Some((g1, g2)))
}

impl CustomOp3 for Ts2VecLossOp {
    fn name(&self) -> &'static str {
        "ts2vec-hierarchical-loss"
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
        const OP: &str = "ts2vec loss";
        let z1 = super::f32_slice(s1, l1, OP, "z1")?;
        let z2 = super::f32_slice(s2, l2, OP, "z2")?;
        let valid = super::f32_slice(s3, l3, OP, "the validity")?;
        let dims = l1.shape().dims3()?;
        let (b, t, _) = dims;
        if l2.shape().dims3()? != dims || l3.shape().dims2()? != (b, t) {
            candle_core::bail!(
                "{OP}: z1 {:?}, z2 {:?} and validity {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (loss, grads) = loss_and_grads(
            z1,
            z2,
            valid,
            dims,
            self.alpha,
            self.temporal_unit,
            self.backward,
        );
        *self.grads.lock().unwrap_or_else(PoisonError::into_inner) = grads;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        z1: &Tensor,
        z2: &Tensor,
        _valid: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let Some((mut g1, mut g2)) = self
            .grads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            candle_core::bail!(
                "ts2vec loss: backward without gradients (the op was built with backward = false, or ran backward twice)"
            );
        };
        if g != 1.0 {
            g1.iter_mut().chain(g2.iter_mut()).for_each(|x| *x *= g);
        }
        Ok((
            Some(Tensor::from_vec(g1, z1.shape(), z1.device())?),
            Some(Tensor::from_vec(g2, z2.shape(), z2.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss by its definition, in f64, straight from the inputs (no pyramid shared).
    fn reference(
        z1: &[f64],
        z2: &[f64],
        v: &[f64],
        (bsz, t, d): (usize, usize, usize),
        alpha: f64,
        unit: usize,
    ) -> f64 {
        // One term: groups of rows with candidate flags and a partner map.
        fn term(groups: &[(Vec<Vec<f64>>, Vec<bool>)], partner: impl Fn(usize) -> usize) -> f64 {
            let (mut total, mut count) = (0.0, 0.0);
            for (rows, cand) in groups {
                let r = rows.len();
                for i in 0..r {
                    let p = partner(i);
                    if !(cand[i] && cand[p]) {
                        continue;
                    }
                    let dot = |j: usize| rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
                    let logits: Vec<f64> = (0..r).filter(|&j| j != i && cand[j]).map(dot).collect();
                    let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
                    total += lse - dot(p);
                    count += 1.0;
                }
            }
            if count == 0.0 {
                0.0
            } else {
                total / count
            }
        }
        let (mut a, mut b, mut v, mut t) = (z1.to_vec(), z2.to_vec(), v.to_vec(), t);
        let (mut loss, mut depth, mut level) = (0.0, 0.0, 0);
        loop {
            let row =
                |z: &[f64], bi: usize, s: usize| z[(bi * t + s) * d..(bi * t + s + 1) * d].to_vec();
            if alpha != 0.0 && bsz >= 2 {
                let groups: Vec<_> = (0..t)
                    .map(|s| {
                        let rows = (0..bsz)
                            .map(|i| row(&a, i, s))
                            .chain((0..bsz).map(|i| row(&b, i, s)));
                        let cand = (0..2 * bsz).map(|i| v[(i % bsz) * t + s] > 0.5).collect();
                        (rows.collect(), cand)
                    })
                    .collect();
                loss += alpha * term(&groups, |i| (i + bsz) % (2 * bsz));
            }
            if t > 1 && level >= unit && alpha != 1.0 {
                let groups: Vec<_> = (0..bsz)
                    .map(|bi| {
                        let rows = (0..t)
                            .map(|s| row(&a, bi, s))
                            .chain((0..t).map(|s| row(&b, bi, s)));
                        let cand = (0..2 * t).map(|i| v[bi * t + i % t] > 0.5).collect();
                        (rows.collect(), cand)
                    })
                    .collect();
                loss += (1.0 - alpha) * term(&groups, |i| (i + t) % (2 * t));
            }
            depth += 1.0;
            if t <= 1 {
                break;
            }
            let t2 = t / 2;
            let pool = |z: &[f64]| {
                let mut o = vec![0.0; bsz * t2 * d];
                for bi in 0..bsz {
                    for s in 0..t2 {
                        let (i0, i1) = (bi * t + 2 * s, bi * t + 2 * s + 1);
                        let vp = v[i0].max(v[i1]);
                        for k in 0..d {
                            let x0 = z[i0 * d + k] + (v[i0] - 1.0) * 1e4;
                            let x1 = z[i1 * d + k] + (v[i1] - 1.0) * 1e4;
                            o[(bi * t2 + s) * d + k] = x0.max(x1) * vp;
                        }
                    }
                }
                o
            };
            let (na, nb) = (pool(&a), pool(&b));
            let nv: Vec<f64> = (0..bsz * t2)
                .map(|i| {
                    let (bi, s) = (i / t2, i % t2);
                    v[bi * t + 2 * s].max(v[bi * t + 2 * s + 1])
                })
                .collect();
            (a, b, v, t) = (na, nb, nv, t2);
            level += 1;
        }
        loss / depth
    }

    fn data(bsz: usize, t: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let z1: Vec<f64> = (0..bsz * t * d).map(|_| next()).collect();
        let z2: Vec<f64> = (0..bsz * t * d).map(|_| next()).collect();
        // A gap of two steps in series 0 and a lone invalid step in the last series.
        let mut v = vec![1.0; bsz * t];
        if t > 4 {
            v[2] = 0.0;
            v[3] = 0.0;
            v[(bsz - 1) * t + t - 1] = 0.0;
        }
        (z1, z2, v)
    }

    fn f32s(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn the_loss_and_its_gradient_match_the_definition() {
        for &(bsz, t, d, alpha, unit) in &[
            (3, 11, 4, 0.5, 0),
            (2, 8, 3, 0.5, 1),
            (4, 5, 5, 1.0, 0),
            (3, 6, 4, 0.0, 0),
            (1, 7, 3, 0.5, 0),
        ] {
            let dims = (bsz, t, d);
            let (z1, z2, v) = data(bsz, t, d, (bsz * 100 + t) as u64);
            let want = reference(&z1, &z2, &v, dims, alpha, unit);
            let (got, grads) =
                loss_and_grads(&f32s(&z1), &f32s(&z2), &f32s(&v), dims, alpha, unit, true);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{dims:?}: {got} vs {want}"
            );
            let (g1, g2) = grads.unwrap();
            // Central differences of the f64 definition.
            let h = 1e-5;
            for (which, g) in [(0, &g1), (1, &g2)] {
                for (i, &an) in g.iter().enumerate() {
                    let (mut p, mut m) = ((z1.clone(), z2.clone()), (z1.clone(), z2.clone()));
                    if which == 0 {
                        p.0[i] += h;
                        m.0[i] -= h;
                    } else {
                        p.1[i] += h;
                        m.1[i] -= h;
                    }
                    let fd = (reference(&p.0, &p.1, &v, dims, alpha, unit)
                        - reference(&m.0, &m.1, &v, dims, alpha, unit))
                        / (2.0 * h);
                    let an = f64::from(an);
                    assert!(
                        (an - fd).abs() < 1e-4 + 1e-3 * fd.abs(),
                        "{dims:?} alpha {alpha} unit {unit}: d{}[{i}] = {an}, finite difference {fd}",
                        which + 1
                    );
                }
            }
        }
    }

    #[test]
    fn large_similarities_stay_finite() {
        // Representations of a trained encoder are not normalised: similarities far apart
        // make the partner's exponential underflow, which a ratio of exponentials cannot take.
        let dims = (3, 9, 6);
        let (z1, z2, v) = data(3, 9, 6, 5);
        let (z1, z2): (Vec<f64>, Vec<f64>) = (
            z1.iter().map(|x| 40.0 * x).collect(),
            z2.iter().map(|x| 40.0 * x).collect(),
        );
        let want = reference(&z1, &z2, &v, dims, 0.5, 0);
        let (got, grads) = loss_and_grads(&f32s(&z1), &f32s(&z2), &f32s(&v), dims, 0.5, 0, true);
        assert!(want.is_finite() && want > 100.0, "{want}");
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
        let (g1, g2) = grads.unwrap();
        assert!(g1.iter().chain(&g2).all(|g| g.is_finite()));
    }

    #[test]
    fn the_op_hands_back_the_scaled_gradient() {
        let dev = candle_core::Device::Cpu;
        let (bsz, t, d) = (2, 6, 3);
        let (z1, z2, v) = data(bsz, t, d, 7);
        let z1 = candle_core::Var::from_vec(f32s(&z1), (bsz, t, d), &dev).unwrap();
        let z2 = candle_core::Var::from_vec(f32s(&z2), (bsz, t, d), &dev).unwrap();
        let v = Tensor::from_vec(f32s(&v), (bsz, t), &dev).unwrap();
        let loss = z1
            .as_tensor()
            .apply_op3(z2.as_tensor(), &v, Ts2VecLossOp::new(0.5, 0, true))
            .unwrap();
        let grads = (loss.clone() * 3.0).unwrap().backward().unwrap();
        let (want, g) = loss_and_grads(
            &z1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &z2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (bsz, t, d),
            0.5,
            0,
            true,
        );
        assert!((f64::from(loss.to_scalar::<f32>().unwrap()) - want).abs() < 1e-6);
        let got = grads
            .get(&z1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in got.iter().zip(&g.unwrap().0) {
            assert!((a - 3.0 * b).abs() < 1e-6);
        }
        // Without backward the op keeps nothing, and says so if asked.
        let op = Ts2VecLossOp::new(0.5, 0, false);
        let l = z1.as_tensor().apply_op3(z2.as_tensor(), &v, op).unwrap();
        let err = l.backward().unwrap_err().to_string();
        assert!(err.contains("backward without gradients"), "{err}");
    }
}

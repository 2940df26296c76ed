//! TS2Vec's contrastive pretext task (Yue et al. 2022): two overlapping random crops of each
//! series, timestamp masking of the encoder input, and the hierarchical contrastive loss:
//! at every scale (max-pooling the overlap by 2 until one step is left) an instance-wise term
//! (the same timestamp of the other view against the other series) and a temporal term (the
//! same timestamp of the other view against other timestamps of the same series).
//!
//! On the CPU in f32 (one process) the loss and its gradient run as one op
//! (`ssl_kernels::Ts2VecLossOp`); the composite candle ops below stay the reference, used on
//! other devices, in f64, across ranks, or with `SSL_STACK_KERNEL=reference`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::log_softmax_last_dim;
use ssl_core::nn::StackKernel;
use ssl_core::seq::SeqBatch;
use ssl_core::{
    gather_rows, Collective, CoreError, Ctx, Encoder, ParamStore, PretextTask, Result,
    SharedCollective, SslRng, TaskOutput,
};
use ssl_kernels::Ts2VecLossOp;

/// Settings of [`Ts2VecTask`] (defaults as the reference).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ts2VecConfig {
    /// Weight of the instance term; the temporal term gets 1 - alpha.
    pub alpha: f64,
    /// Scales below this depth get no temporal term.
    pub temporal_unit: usize,
    /// Probability of masking each timestamp of a view (TS2Vec: binomial 0.5).
    pub mask_prob: f64,
    /// Gaussian jitter added to the views (0: off, as the reference).
    pub jitter_std: f32,
    /// Std of a per-(series, channel) scale factor around 1 on the views (0: off).
    pub scale_std: f32,
}

impl Default for Ts2VecConfig {
    fn default() -> Self {
        Ts2VecConfig {
            alpha: 0.5,
            temporal_unit: 0,
            mask_prob: 0.5,
            jitter_std: 0.0,
            scale_std: 0.0,
        }
    }
}

/// -log p(partner) for rows of `sim` (G, R, R) with the diagonal excluded, invalid candidates
/// (`cand` G x R, 0/1) excluded; partner of row r is `partner(r)`. Returns the weighted mean over
/// anchors whose partner and itself are valid, and the weight.
fn contrast(
    sim: &Tensor,
    cand: &Tensor,
    partner: impl Fn(usize) -> usize,
) -> Result<(Tensor, f64)> {
    let (g, r, _) = sim.dims3()?;
    let dev = sim.device();
    let cand_v = cand.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut bias = vec![0f32; g * r * r];
    let mut pick = vec![0f32; g * r * r];
    let mut count = 0.0;
    for gi in 0..g {
        for i in 0..r {
            for j in 0..r {
                if i == j || cand_v[gi * r + j] < 0.5 {
                    bias[(gi * r + i) * r + j] = -1e9;
                }
            }
            let p = partner(i);
            if cand_v[gi * r + i] > 0.5 && cand_v[gi * r + p] > 0.5 {
                pick[(gi * r + i) * r + p] = 1.0;
                count += 1.0;
            }
        }
    }
    if count == 0.0 {
        return Ok((Tensor::zeros((), sim.dtype(), dev)?, 0.0));
    }
    let bias = Tensor::from_vec(bias, (g, r, r), dev)?.to_dtype(sim.dtype())?;
    let pick = Tensor::from_vec(pick, (g, r, r), dev)?.to_dtype(sim.dtype())?;
    let logp = log_softmax_last_dim(&(sim + bias)?)?;
    let loss = (logp.mul(&pick)?.sum_all()?.neg()? / count)?;
    Ok((loss, count))
}

/// Instance-wise term on z1, z2 (B, T, D) with validity (B, T): at each timestamp, each series'
/// view must pick its other view among the 2B - 1 others.
pub fn instance_contrastive_loss(z1: &Tensor, z2: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let b = z1.dim(0)?;
    if b < 2 {
        return Ok(Tensor::zeros((), z1.dtype(), z1.device())?);
    }
    let z = Tensor::cat(&[z1, z2], 0)?.transpose(0, 1)?.contiguous()?; // (T, 2B, D)
    let sim = z.matmul(&z.transpose(1, 2)?)?;
    let cand = Tensor::cat(&[valid, valid], 0)?.t()?.contiguous()?; // (T, 2B)
    Ok(contrast(&sim, &cand, |i| (i + b) % (2 * b))?.0)
}

/// Temporal term on z1, z2 (B, T, D): at each timestamp, a view must pick the same timestamp
/// of the other view among the 2T - 1 other timestamps of the same series.
pub fn temporal_contrastive_loss(z1: &Tensor, z2: &Tensor, valid: &Tensor) -> Result<Tensor> {
    Ok(temporal_parts(z1, z2, valid)?.0)
}

/// The temporal term's mean over anchors and the number of anchors.
fn temporal_parts(z1: &Tensor, z2: &Tensor, valid: &Tensor) -> Result<(Tensor, f64)> {
    let t = z1.dim(1)?;
    if t < 2 {
        return Ok((Tensor::zeros((), z1.dtype(), z1.device())?, 0.0));
    }
    let z = Tensor::cat(&[z1, z2], 1)?; // (B, 2T, D)
    let sim = z.matmul(&z.transpose(1, 2)?.contiguous()?)?;
    let cand = Tensor::cat(&[valid, valid], 1)?;
    contrast(&sim, &cand, |i| (i + t) % (2 * t))
}

/// The instance term over every rank's series: each rank's views are gathered, so the negatives
/// at a timestamp are the other series of all ranks. Gradients reach this rank's part only.
fn instance_across(
    z1: &Tensor,
    z2: &Tensor,
    valid: &Tensor,
    ranks: Option<&dyn Collective>,
) -> Result<Tensor> {
    match ranks.filter(|r| r.world_size() > 1) {
        None => instance_contrastive_loss(z1, z2, valid),
        Some(r) => instance_contrastive_loss(
            &gather_rows(r, z1)?,
            &gather_rows(r, z2)?,
            &gather_rows(r, valid)?,
        ),
    }
}

/// The temporal term as one process computes it on every rank's series together: the mean
/// over all ranks' anchors, with this rank's sum keeping its graph and the others' constants.
fn temporal_across(
    z1: &Tensor,
    z2: &Tensor,
    valid: &Tensor,
    ranks: Option<&dyn Collective>,
) -> Result<Tensor> {
    let (mean, count) = temporal_parts(z1, z2, valid)?;
    let Some(r) = ranks.filter(|r| r.world_size() > 1) else {
        return Ok(mean);
    };
    let local_sum = (mean * count)?;
    let local_value = local_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let all = r.all_gather(&[local_value as f32, count as f32])?;
    let total: f64 = all.chunks(2).map(|p| p[1] as f64).sum();
    if total == 0.0 {
        return Ok(Tensor::zeros((), z1.dtype(), z1.device())?);
    }
    let others: f64 = all
        .chunks(2)
        .enumerate()
        .filter(|(k, _)| *k != r.rank())
        .map(|(_, p)| p[0] as f64)
        .sum();
    Ok(((local_sum + others)? / total)?)
}

fn max_pool2(z: &Tensor, valid: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, d) = z.dims3()?;
    let t2 = t / 2;
    let m = valid.unsqueeze(D::Minus1)?;
    // Unobserved steps never win the max; a pair with none observed stays unobserved (0).
    let z = z.broadcast_add(&((m - 1.0)? * 1e4)?)?;
    let zp = z.narrow(1, 0, 2 * t2)?.reshape((b, t2, 2, d))?.max(2)?;
    let vp = valid.narrow(1, 0, 2 * t2)?.reshape((b, t2, 2))?.max(2)?;
    Ok((zp.broadcast_mul(&vp.unsqueeze(D::Minus1)?)?, vp))
}

/// TS2Vec's hierarchical contrastive loss of z1, z2 (B, T, D), validity (B, T) 0/1.
pub fn hierarchical_contrastive_loss(
    z1: &Tensor,
    z2: &Tensor,
    valid: &Tensor,
    alpha: f64,
    temporal_unit: usize,
) -> Result<Tensor> {
    hierarchical_contrastive_loss_across(z1, z2, valid, alpha, temporal_unit, None)
}

/// [`hierarchical_contrastive_loss`] of a data-parallel run: every rank passes its own series
/// (same B and T on every rank) and gets the loss of all ranks' series together, the instance
/// terms' negatives spanning every rank. The gradient w.r.t. this rank's z1, z2 is the
/// one-process gradient w.r.t. those rows; summed over ranks it is the gradient of the
/// combined batch. `None` or one rank: the single-process loss.
pub fn hierarchical_contrastive_loss_across(
    z1: &Tensor,
    z2: &Tensor,
    valid: &Tensor,
    alpha: f64,
    temporal_unit: usize,
    ranks: Option<&dyn Collective>,
) -> Result<Tensor> {
    let kernel = StackKernel::from_env()?;
    let backward = z1.track_op() || z2.track_op();
    hierarchical_loss(
        z1,
        z2,
        valid,
        (alpha, temporal_unit),
        ranks,
        kernel,
        backward,
    )
}

/// [`hierarchical_contrastive_loss_across`] with the implementation chosen by `kernel`: the
/// fused op for f32 on the CPU in one process unless `Reference` (its gradient computed only
/// when `backward`: a backward pass will follow), else the composite ops.
fn hierarchical_loss(
    z1: &Tensor,
    z2: &Tensor,
    valid: &Tensor,
    (alpha, temporal_unit): (f64, usize),
    ranks: Option<&dyn Collective>,
    kernel: StackKernel,
    backward: bool,
) -> Result<Tensor> {
    let single = ranks.is_none_or(|r| r.world_size() <= 1);
    if single
        && matches!(z1.device(), Device::Cpu)
        && z1.dtype() == DType::F32
        && z2.dtype() == DType::F32
        && kernel != StackKernel::Reference
    {
        // One op for the loss and its gradient (`ssl_kernels::Ts2VecLossOp`); the composite
        // below stays the reference (other devices and dtypes, ranks, SSL_STACK_KERNEL).
        let op = Ts2VecLossOp::new(alpha, temporal_unit, backward);
        let v = valid.to_dtype(DType::F32)?.contiguous()?;
        return Ok(z1.contiguous()?.apply_op3(&z2.contiguous()?, &v, op)?);
    }
    let valid = valid.to_dtype(z1.dtype())?;
    let (mut z1, mut z2, mut v) = (z1.clone(), z2.clone(), valid);
    let mut loss = Tensor::zeros((), z1.dtype(), z1.device())?;
    let mut depth = 0usize;
    while z1.dim(1)? > 1 {
        if alpha != 0.0 {
            loss = (loss + (instance_across(&z1, &z2, &v, ranks)? * alpha)?)?;
        }
        if depth >= temporal_unit && alpha != 1.0 {
            loss = (loss + (temporal_across(&z1, &z2, &v, ranks)? * (1.0 - alpha))?)?;
        }
        depth += 1;
        let (a, va) = max_pool2(&z1, &v)?;
        let (b, _) = max_pool2(&z2, &v)?;
        z1 = a;
        z2 = b;
        v = va;
    }
    if z1.dim(1)? == 1 {
        if alpha != 0.0 {
            loss = (loss + (instance_across(&z1, &z2, &v, ranks)? * alpha)?)?;
        }
        depth += 1;
    }
    Ok((loss / depth.max(1) as f64)?)
}

/// The two crops of TS2Vec for a series of `t` steps: `(overlap_len, (start1, end1), (start2,
/// end2))` with view 1 = [start1, end1) ending at the overlap's end and view 2 = [start2, end2)
/// starting at the overlap's start; the overlap is the last `overlap_len` steps of view 1 and
/// the first of view 2. `min_len` is the smallest overlap (2^(temporal_unit + 1)).
pub fn overlapping_crops(
    t: usize,
    min_len: usize,
    rng: &mut SslRng,
) -> (usize, (usize, usize), (usize, usize)) {
    let min_len = min_len.min(t).max(1);
    let crop_l = min_len + rng.below(t - min_len + 1);
    let left = rng.below(t - crop_l + 1);
    let right = left + crop_l;
    let eleft = rng.below(left + 1);
    let eright = right + rng.below(t - right + 1);
    (crop_l, (eleft, right), (left, eright))
}

/// TS2Vec on any encoder with one token per timestep.
pub struct Ts2VecTask<E> {
    encoder: E,
    cfg: Ts2VecConfig,
    store: ParamStore,
    ranks: Option<SharedCollective>,
    loss_kernel: StackKernel,
}

impl<E: Encoder<Input = SeqBatch>> Ts2VecTask<E> {
    /// Wraps `encoder` (whose parameters are in `store`). The encoder must give one token per
    /// input timestep; `forward` checks it.
    pub fn new(encoder: E, cfg: Ts2VecConfig, store: &ParamStore) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.alpha) || !(0.0..1.0).contains(&cfg.mask_prob) {
            return Err(CoreError::Config(format!(
                "ts2vec alpha must be in [0, 1] and mask_prob in [0, 1), got {} and {}",
                cfg.alpha, cfg.mask_prob
            )));
        }
        Ok(Ts2VecTask {
            encoder,
            cfg,
            store: store.clone(),
            ranks: None,
            loss_kernel: StackKernel::from_env()?,
        })
    }

    /// Chooses the loss's implementation: `Auto` and `Fused` run `ssl_kernels::Ts2VecLossOp`
    /// for f32 on the CPU in one process, `Reference` the composite candle ops; the default
    /// comes from `SSL_STACK_KERNEL`, else `Auto`.
    pub fn set_loss_kernel(&mut self, kernel: StackKernel) {
        self.loss_kernel = kernel;
    }

    /// Data-parallel training: every step pads the batch to the longest series of any rank,
    /// uses rank 0's crop layout, and gathers every rank's views for the instance terms, so
    /// their negatives span all ranks (the temporal terms stay per series); the loss is that of
    /// one process on the combined batch. Every rank needs the same batch size.
    pub fn gather_across(&mut self, ranks: SharedCollective) {
        self.ranks = Some(ranks);
    }

    fn world(&self) -> usize {
        self.ranks.as_ref().map_or(1, |r| r.world_size())
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// One view: steps [start, end) of every series, shifted per series by `offsets`, with
    /// jitter/scaling; the encoder input's validity also drops masked timestamps.
    fn view(
        &self,
        host: &HostBatch<'_>,
        span: (usize, usize),
        offsets: &[isize],
        rng: &mut SslRng,
        device: &Device,
    ) -> Result<(SeqBatch, Vec<f32>)> {
        let HostBatch { x, valid, dims } = *host;
        let (b, t, c) = dims;
        let len = span.1 - span.0;
        let mut vx = vec![0f32; b * len * c];
        let mut vv = vec![0f32; b * len];
        for i in 0..b {
            let scales: Vec<f32> = (0..c)
                .map(|_| {
                    1.0 + self.cfg.scale_std
                        * if self.cfg.scale_std > 0.0 {
                            rng.normal()
                        } else {
                            0.0
                        }
                })
                .collect();
            for s in 0..len {
                let src = span.0 as isize + s as isize + offsets[i];
                if src < 0 || src >= t as isize {
                    continue;
                }
                let src = src as usize;
                if valid[i * t + src] < 0.5 {
                    continue;
                }
                vv[i * len + s] = 1.0;
                for ch in 0..c {
                    let noise = if self.cfg.jitter_std > 0.0 {
                        self.cfg.jitter_std * rng.normal()
                    } else {
                        0.0
                    };
                    vx[(i * len + s) * c + ch] = x[(i * t + src) * c + ch] * scales[ch] + noise;
                }
            }
        }
        // Timestamp masking: the encoder sees masked steps as unobserved.
        let keep: Vec<f32> = vv
            .iter()
            .map(|&v| {
                if v > 0.5 && !rng.bernoulli(self.cfg.mask_prob) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok((
            SeqBatch {
                x: Tensor::from_vec(vx, (b, len, c), device)?,
                valid: Tensor::from_vec(keep, (b, len), device)?,
            },
            vv,
        ))
    }
}

impl<E: Encoder<Input = SeqBatch>> PretextTask for Ts2VecTask<E> {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let (b, t0, c) = batch.x.dims3()?;
        let device = batch.x.device().clone();
        let mut x = batch
            .x
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut valid = batch
            .valid
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ranks: Option<&dyn Collective> = self
            .ranks
            .as_ref()
            .filter(|r| r.world_size() > 1)
            .map(|r| r.as_ref() as &dyn Collective);
        // Across ranks: pad to the longest batch of any rank (padding is unobserved).
        let t = match ranks {
            None => t0,
            Some(r) => r
                .all_gather(&[t0 as f32])?
                .into_iter()
                .fold(t0, |m, v| m.max(v as usize)),
        };
        if t > t0 {
            let (mut xp, mut vp) = (vec![0f32; b * t * c], vec![0f32; b * t]);
            for i in 0..b {
                xp[i * t * c..(i * t + t0) * c].copy_from_slice(&x[i * t0 * c..(i + 1) * t0 * c]);
                vp[i * t..i * t + t0].copy_from_slice(&valid[i * t0..(i + 1) * t0]);
            }
            (x, valid) = (xp, vp);
        }
        let min_len = 1usize << (self.cfg.temporal_unit + 1).min(30);
        let mut layout = overlapping_crops(t, min_len, ctx.rng);
        if let Some(r) = ranks {
            // Every rank crops the same window (rank 0's draw), as one process would.
            let (l, a, b2) = layout;
            let all = r.all_gather(&[l, a.0, a.1, b2.0, b2.1].map(|v| v as f32))?;
            let u = |k: usize| all[k] as usize;
            layout = (u(0), (u(1), u(2)), (u(3), u(4)));
        }
        let (crop_l, v1, v2) = layout;
        // A random shift per series, as the reference (views may run past the ends: padding).
        let offsets: Vec<isize> = (0..b)
            .map(|_| {
                let lo = -(v1.0 as isize);
                let hi = t as isize - v2.1 as isize;
                lo + ctx.rng.below((hi - lo + 1) as usize) as isize
            })
            .collect();
        let host = HostBatch {
            x: &x,
            valid: &valid,
            dims: (b, t, c),
        };
        let (in1, obs1) = self.view(&host, v1, &offsets, ctx.rng, &device)?;
        let (in2, _) = self.view(&host, v2, &offsets, ctx.rng, &device)?;
        let out1 = self.encoder.encode(&in1, ctx)?.tokens;
        let out2 = self.encoder.encode(&in2, ctx)?.tokens;
        let (l1, l2) = (v1.1 - v1.0, v2.1 - v2.0);
        if out1.dim(1)? != l1 || out2.dim(1)? != l2 {
            return Err(CoreError::Config(
                "the TS2Vec task needs an encoder with one token per timestep (tcn, gru, lstm, transformer), not patches".into(),
            ));
        }
        let z1 = out1.narrow(1, l1 - crop_l, crop_l)?;
        let z2 = out2.narrow(1, 0, crop_l)?;
        // Overlap validity: the observed steps of the overlap (identical in both views).
        let ov: Vec<f32> = (0..b)
            .flat_map(|i| obs1[i * l1 + l1 - crop_l..(i + 1) * l1].to_vec())
            .collect();
        let ov = Tensor::from_vec(ov, (b, crop_l), &device)?;
        let loss = hierarchical_loss(
            &z1,
            &z2,
            &ov,
            (self.cfg.alpha, self.cfg.temporal_unit),
            ranks,
            self.loss_kernel,
            ctx.backward && (z1.track_op() || z2.track_op()),
        )?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: b as f64,
            metrics: vec![
                ("ts2vec_loss".into(), value),
                ("crop_len".into(), crop_l as f64),
            ],
        })
    }

    /// Across ranks the loss is that of the combined batch, so its gradient is scaled by the
    /// number of ranks: the trainer's sum over ranks divided by the summed weight is then the
    /// one-process gradient of the combined batch.
    fn forward_backward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<(TaskOutput, GradStore)> {
        // The gradients are the graph's (the world factor scales the loss): fused ops may
        // deliver theirs aside.
        ctx.sinking(|ctx| {
            let out = self.forward(batch, ctx)?;
            ssl_core::loss::backward_across(out, self.world())
        })
    }

    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The reference formulation (drop the diagonal, log-softmax, partner index), in f64.
    fn reference_instance(z1: &[Vec<Vec<f64>>], z2: &[Vec<Vec<f64>>]) -> f64 {
        let b = z1.len();
        let t = z1[0].len();
        let mut total = 0.0;
        for s in 0..t {
            let z: Vec<&Vec<f64>> = z1.iter().chain(z2.iter()).map(|r| &r[s]).collect();
            for i in 0..2 * b {
                let p = (i + b) % (2 * b);
                let logits: Vec<f64> = (0..2 * b)
                    .filter(|&j| j != i)
                    .map(|j| z[i].iter().zip(z[j]).map(|(a, c)| a * c).sum())
                    .collect();
                let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
                let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
                let lp: f64 = z[i].iter().zip(z[p]).map(|(a, c)| a * c).sum();
                total += lse - lp;
            }
        }
        total / (2 * b * t) as f64
    }

    #[test]
    fn instance_term_matches_the_reference_and_padding_is_excluded() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(4);
        let (b, t, d) = (3, 4, 5);
        let v1: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
        let v2: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
        let z1 = Tensor::from_vec(v1.clone(), (b, t, d), &dev).unwrap();
        let z2 = Tensor::from_vec(v2.clone(), (b, t, d), &dev).unwrap();
        let ones = Tensor::ones((b, t), DType::F32, &dev).unwrap();
        let got = instance_contrastive_loss(&z1, &z2, &ones)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let nest = |v: &[f32]| -> Vec<Vec<Vec<f64>>> {
            (0..b)
                .map(|i| {
                    (0..t)
                        .map(|s| (0..d).map(|k| v[(i * t + s) * d + k] as f64).collect())
                        .collect()
                })
                .collect()
        };
        let want = reference_instance(&nest(&v1), &nest(&v2));
        assert!((got as f64 - want).abs() < 1e-4, "{got} vs {want}");
        // Padding a fourth series changes nothing when it is marked unobserved.
        let pad = Tensor::full(7f32, (1, t, d), &dev).unwrap();
        let z1p = Tensor::cat(&[&z1, &pad], 0).unwrap();
        let z2p = Tensor::cat(&[&z2, &pad], 0).unwrap();
        let vp = Tensor::cat(
            &[&ones, &Tensor::zeros((1, t), DType::F32, &dev).unwrap()],
            0,
        )
        .unwrap();
        let got_p = instance_contrastive_loss(&z1p, &z2p, &vp)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - got_p).abs() < 1e-5, "{got} vs {got_p}");
    }

    #[test]
    fn temporal_term_is_low_for_aligned_views_and_hierarchy_is_finite() {
        let dev = Device::Cpu;
        let (b, t, d) = (2, 8, 8);
        // Orthogonal one-hot timestamps, scaled: the partner is unmistakable.
        let v: Vec<f32> = (0..b * t * d)
            .map(|k| if (k / d) % t == k % d { 5.0 } else { 0.0 })
            .collect();
        let z = Tensor::from_vec(v, (b, t, d), &dev).unwrap();
        let ones = Tensor::ones((b, t), DType::F32, &dev).unwrap();
        let aligned = temporal_contrastive_loss(&z, &z, &ones)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let shifted = temporal_contrastive_loss(&z, &z.roll(1, 1).unwrap(), &ones)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(aligned < 0.01 && shifted > 10.0, "{aligned} {shifted}");
        let h = hierarchical_contrastive_loss(&z, &z, &ones, 0.5, 0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(h.is_finite());
    }

    /// The fused op (f32) against the composite loss in f64 (itself checked against the
    /// reference above): the loss and both views' gradients, with gaps, an odd length, both
    /// weights and a temporal unit.
    #[test]
    fn the_fused_loss_matches_the_composite_in_f64() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(9);
        for &(b, t, d, alpha, unit) in &[(3, 13, 6, 0.5, 0), (4, 9, 5, 0.5, 1), (2, 6, 4, 1.0, 0)] {
            let v1: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
            let v2: Vec<f32> = (0..b * t * d).map(|_| rng.normal()).collect();
            let mut valid = vec![1f32; b * t];
            valid[1] = 0.0;
            valid[2] = 0.0;
            valid[b * t - 1] = 0.0;
            let valid = Tensor::from_vec(valid, (b, t), &dev).unwrap();
            let grads_of = |dtype: DType, fused: bool| -> (f64, Vec<f64>, Vec<f64>) {
                let var = |v: &[f32]| {
                    let t = Tensor::from_vec(v.to_vec(), (b, t, d), &dev).unwrap();
                    candle_core::Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                };
                let (z1, z2) = (var(&v1), var(&v2));
                let loss = if fused {
                    let op = Ts2VecLossOp::new(alpha, unit, true);
                    z1.as_tensor()
                        .apply_op3(z2.as_tensor(), &valid, op)
                        .unwrap()
                } else {
                    let v = valid.to_dtype(dtype).unwrap();
                    hierarchical_contrastive_loss(&z1, &z2, &v, alpha, unit).unwrap()
                };
                let g = loss.backward().unwrap();
                let flat = |x: &candle_core::Var| -> Vec<f64> {
                    let t = g.get(x).unwrap().to_dtype(DType::F64).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
                };
                let l = loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                (l, flat(&z1), flat(&z2))
            };
            let (want, w1, w2) = grads_of(DType::F64, false);
            let (got, g1, g2) = grads_of(DType::F32, true);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
            let scale = w1.iter().chain(&w2).fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in g1.iter().chain(&g2).zip(w1.iter().chain(&w2)) {
                assert!(
                    (g - w).abs() < 1e-5 * scale.max(1e-3),
                    "{g} vs {w} (b {b}, t {t})"
                );
            }
            // Steps that are invalid in every view of a pair get no gradient.
            assert!(g1[d..3 * d].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn crops_overlap_as_specified_over_seeds() {
        for seed in 0..500 {
            let mut rng = SslRng::new(seed);
            let t = 5 + (seed as usize % 40);
            let (l, (a0, a1), (b0, b1)) = overlapping_crops(t, 2, &mut rng);
            assert!(l >= 2 && l <= t);
            assert!(a0 <= b0 && a1 <= b1 && a1 <= t);
            assert_eq!(a1 - b0, l, "the overlap is [b0, a1)");
        }
    }
}

/// A batch on the host: values `(b, t, c)` row-major and per-step validity `(b, t)`.
#[derive(Clone, Copy)]
struct HostBatch<'a> {
    x: &'a [f32],
    valid: &'a [f32],
    dims: (usize, usize, usize),
}

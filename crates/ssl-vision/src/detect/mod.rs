//! Defect detection trained on normal images only.
//!
//! Two scorers, selectable and combinable:
//! - [`ScorerKind::Reconstruction`]: the MAE's reconstruction error with complementary masks
//!   ([`recon`]), averaged over independent mask partitions, optionally smoothed over the
//!   patch grid, then standardised per patch position against normal images
//!   ([`PositionNorm`]);
//! - [`ScorerKind::PatchCore`]: distance of each patch embedding to the nearest entry of a
//!   memory bank of normal patch embeddings, subsampled by greedy coreset ([`patchcore`]);
//! - [`ScorerKind::RawPixels`]: a baseline, the same on raw normalised patch pixels.
//!
//! An image's score per scorer is the mean of its top `top_fraction` patch scores. Scores of
//! several scorers are combined as the mean of their z-scores against held-out normal images,
//! on which the threshold is calibrated too ([`calibrate`]).

pub mod calibrate;
pub mod coreset;
pub mod heatmap;
pub mod labelled;
pub mod patchcore;
pub mod pipeline;
pub mod recon;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::SslRng;

use crate::augment::normalize_batch;
use crate::source::ImageSet;
use crate::{MaeTask, Result, VisionError};
use calibrate::{calibrate_threshold, mean_std, ThresholdMethod};
use patchcore::{patch_embeddings, MemoryBank};

/// A patch scorer.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ScorerKind {
    /// MAE reconstruction error with complementary masks.
    Reconstruction,
    /// Nearest-neighbour distance to a memory bank of normal patch embeddings.
    PatchCore,
    /// Baseline: the same nearest-neighbour scoring on raw (normalised) patch pixels.
    RawPixels,
}

impl ScorerKind {
    /// Short name (`reconstruction`, `patch_core`).
    pub fn name(self) -> &'static str {
        match self {
            ScorerKind::Reconstruction => "reconstruction",
            ScorerKind::PatchCore => "patch_core",
            ScorerKind::RawPixels => "raw_pixels",
        }
    }

    /// True for the scorers that use a memory bank.
    pub fn uses_bank(self) -> bool {
        matches!(self, ScorerKind::PatchCore | ScorerKind::RawPixels)
    }
}

/// How reconstruction errors are normalised per patch position, from the errors of the
/// normal fitting images at that position (aligned imagery such as solar cells or PCBs has
/// structures, e.g. busbars or edges, that are always hard to predict).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionNorm {
    /// Raw errors.
    None,
    /// Error divided by the mean normal error at the position.
    Mean,
    /// `(error - mean) / std` of the normal errors at the position.
    Zscore,
}

/// Settings of a [`Detector`] (`[detect]` in the CLI).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Scorers to use; several are combined by the mean of their z-scores. Default
    /// reconstruction + PatchCore: by a rule fixed in advance (best mean rank of image AUROC
    /// over five one-class sets not used to develop the detector, Fashion-MNIST and emoji;
    /// `crates/ssl-vision/README.md`) the combination ranked 3.2 to 4.8 by PatchCore layer,
    /// PatchCore alone 5.2 to 7.0, reconstruction alone 6.0, the raw-pixel baseline 9.0 of 10.
    pub scorers: Vec<ScorerKind>,
    /// Complementary masks of the reconstruction scorer (every patch hidden once).
    pub recon_masks: usize,
    /// Independent complementary-mask partitions whose errors are averaged (each patch is
    /// predicted `recon_repeats` times from different contexts).
    pub recon_repeats: usize,
    /// Neighbourhood (odd) averaged over the patch grid of reconstruction errors (1: off).
    pub recon_neighbourhood: usize,
    /// Per-position normalisation of reconstruction errors against normal images.
    pub recon_position_norm: PositionNorm,
    /// Encoder layer of the patch embeddings (0: the final normed output; `ssl detect fit`
    /// defaults to [`pipeline::default_patch_layer`] of the checkpoint's depth).
    pub patch_layer: usize,
    /// Neighbourhood (odd) averaged over the patch grid before PatchCore (1: off).
    pub neighbourhood: usize,
    /// Fraction of the normal patches kept in the memory bank by greedy coreset.
    pub coreset_ratio: f64,
    /// Upper bound on the memory-bank size.
    pub coreset_max: usize,
    /// Random-projection width of the coreset search (0: full width).
    pub coreset_proj_dim: usize,
    /// Patch features sampled (seeded, uniformly over the fitting images' patches) as the
    /// coreset's candidates, at most (and at most [`BANK_POOL_BYTES`] of them): what bounds
    /// fitting's memory whatever the number of normal images.
    pub bank_pool: usize,
    /// Fraction of the highest patch scores averaged into the image score (at least 1 patch).
    pub top_fraction: f64,
    /// How the threshold is set on held-out normal scores.
    pub threshold: ThresholdMethod,
    /// Fraction of the normal images held out for calibration.
    pub calibration_fraction: f64,
    /// Fewest calibration images accepted.
    pub min_calibration: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Seed of the split, the masks and the coreset.
    pub seed: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            scorers: vec![ScorerKind::Reconstruction, ScorerKind::PatchCore],
            recon_masks: 2,
            recon_repeats: 1,
            recon_neighbourhood: 1,
            recon_position_norm: PositionNorm::Mean,
            patch_layer: 0,
            neighbourhood: 3,
            coreset_ratio: 0.1,
            coreset_max: 20_000,
            coreset_proj_dim: 64,
            bank_pool: 200_000,
            top_fraction: 0.02,
            threshold: ThresholdMethod::default(),
            calibration_fraction: 0.2,
            min_calibration: 10,
            batch_size: 32,
            seed: 0,
        }
    }
}

/// Normal-score statistics of one scorer (from the calibration images).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerStats {
    /// The scorer.
    pub kind: ScorerKind,
    /// Mean image score.
    pub image_mean: f64,
    /// Standard deviation of image scores.
    pub image_std: f64,
    /// Mean patch score.
    pub patch_mean: f64,
    /// Standard deviation of patch scores.
    pub patch_std: f64,
}

/// Scores of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScore {
    /// The combined score (z-score against normal images, averaged over scorers).
    pub score: f64,
    /// True when `score` exceeds the threshold.
    pub flag: bool,
    /// The raw image score of each scorer, in the order of the configuration.
    pub per_scorer: Vec<f64>,
    /// Combined patch z-scores over the patch grid (row-major), for the heat-map.
    pub patch_map: Vec<f32>,
}

/// What [`Detector::save`] writes besides the bank.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DetectorState {
    cfg: DetectorConfig,
    stats: Vec<ScorerStats>,
    threshold: f64,
    recon_position_mean: Vec<f32>,
    #[serde(default)]
    recon_position_std: Vec<f32>,
    n_fit: usize,
    n_calibration: usize,
}

/// JSON state file of a saved detector.
pub const DETECTOR_FILE: &str = "detector.json";
/// Memory-bank file of a saved detector.
pub const BANK_FILE: &str = "memory_bank.safetensors";

/// A fitted detector: statistics of normal images, a memory bank, a threshold.
#[derive(Debug, Clone)]
pub struct Detector {
    state: DetectorState,
    banks: Vec<(ScorerKind, MemoryBank)>,
}

/// Patch features `(B x L) x D` of normalised `pixels` for a bank-based scorer.
fn bank_features(
    task: &MaeTask,
    pixels: &Tensor,
    kind: ScorerKind,
    cfg: &DetectorConfig,
) -> Result<(Vec<f32>, usize)> {
    match kind {
        ScorerKind::RawPixels => {
            let vit = task.encoder().config();
            let (gh, gw) = vit.grid()?;
            let p = crate::patch::patchify(pixels, vit.patch_size)?;
            let (b, _, d) = p.dims3()?;
            let v = p.flatten_all()?.to_vec1::<f32>()?;
            Ok((patchcore::aggregate(&v, b, gh, gw, d, cfg.neighbourhood), d))
        }
        _ => patch_embeddings(task.encoder(), pixels, cfg.patch_layer, cfg.neighbourhood),
    }
}

/// The complementary-mask partitions of the reconstruction scorer (none for the others).
fn recon_partitions(
    kind: ScorerKind,
    l: usize,
    cfg: &DetectorConfig,
) -> Result<Vec<Vec<Vec<u32>>>> {
    if kind != ScorerKind::Reconstruction {
        return Ok(Vec::new());
    }
    (0..cfg.recon_repeats.max(1) as u64)
        .map(|r| recon::complementary_groups(l, cfg.recon_masks, cfg.seed.wrapping_add(r)))
        .collect()
}

/// Raw patch scores `(B x L)` of one scorer on one batch of normalised `pixels`.
fn raw_batch_scores(
    task: &MaeTask,
    pixels: &Tensor,
    kind: ScorerKind,
    cfg: &DetectorConfig,
    bank: Option<&MemoryBank>,
    partitions: &[Vec<Vec<u32>>],
    device: &Device,
) -> Result<Vec<f32>> {
    let vit = task.encoder().config();
    let l = vit.num_patches()?;
    let (gh, gw) = vit.grid()?;
    match kind {
        ScorerKind::Reconstruction => {
            let mut acc: Vec<f32> = Vec::new();
            for groups in partitions {
                let e = recon::reconstruction_errors(task, pixels, groups)?;
                if acc.is_empty() {
                    acc = e;
                } else {
                    acc.iter_mut().zip(&e).for_each(|(a, v)| *a += v);
                }
            }
            let r = partitions.len() as f32;
            acc.iter_mut().for_each(|a| *a /= r);
            let b = acc.len() / l.max(1);
            Ok(patchcore::aggregate(
                &acc,
                b,
                gh,
                gw,
                1,
                cfg.recon_neighbourhood,
            ))
        }
        ScorerKind::PatchCore | ScorerKind::RawPixels => {
            let bank = bank.ok_or_else(|| {
                VisionError::InvalidInput(format!("scorer {} needs a memory bank", kind.name()))
            })?;
            let (f, _) = bank_features(task, pixels, kind, cfg)?;
            bank.nearest_distances(&f, device)
        }
    }
}

/// Per-position sums of reconstruction errors, accumulated batch by batch.
#[derive(Debug, Clone)]
struct PositionMoments {
    s1: Vec<f64>,
    s2: Vec<f64>,
    n: usize,
}

impl PositionMoments {
    fn new(l: usize) -> Self {
        PositionMoments {
            s1: vec![0.0; l],
            s2: vec![0.0; l],
            n: 0,
        }
    }

    /// Adds `(B x l)` errors.
    fn add(&mut self, errs: &[f32]) {
        let l = self.s1.len().max(1);
        for row in errs.chunks(l) {
            for (i, e) in row.iter().enumerate() {
                self.s1[i] += f64::from(*e);
                self.s2[i] += f64::from(*e) * f64::from(*e);
            }
            self.n += 1;
        }
    }

    /// Mean and standard deviation per position, each floored at a small fraction of the
    /// global value so that a position where every normal error vanishes (a flat border)
    /// cannot divide by zero.
    fn finish(&self) -> (Vec<f32>, Vec<f32>) {
        let l = self.s1.len();
        let n = self.n.max(1) as f64;
        let mean: Vec<f64> = self.s1.iter().map(|s| s / n).collect();
        let std: Vec<f64> = self
            .s2
            .iter()
            .zip(&mean)
            .map(|(s, m)| (s / n - m * m).max(0.0).sqrt())
            .collect();
        let floor = |v: &[f64]| {
            let g = v.iter().sum::<f64>() / l.max(1) as f64;
            v.iter()
                .map(|x| x.max(1e-3 * g).max(1e-12) as f32)
                .collect::<Vec<f32>>()
        };
        (floor(&mean), floor(&std))
    }
}

/// A seeded uniform sample (reservoir, Algorithm R) of at most `cap` feature rows of a
/// stream: the memory bank's candidates, bounded whatever the number of normal images. While
/// the stream holds no more than `cap` rows it keeps all of them, in order.
#[derive(Debug)]
struct Reservoir {
    rows: Vec<f32>,
    dim: usize,
    cap: usize,
    seen: usize,
    rng: SslRng,
}

impl Reservoir {
    fn new(cap: usize, seed: u64) -> Self {
        Reservoir {
            rows: Vec::new(),
            dim: 0,
            cap: cap.max(1),
            seen: 0,
            rng: SslRng::derived(seed, "memory-bank-reservoir"),
        }
    }

    fn add(&mut self, feats: &[f32], dim: usize) {
        self.dim = dim;
        for row in feats.chunks(dim.max(1)) {
            let kept = self.rows.len() / dim.max(1);
            if kept < self.cap {
                self.rows.extend_from_slice(row);
            } else {
                let j = self.rng.below(self.seen + 1);
                if j < self.cap {
                    self.rows[j * dim..(j + 1) * dim].copy_from_slice(row);
                }
            }
            self.seen += 1;
        }
    }
}

/// Per-position mean and standard deviation of `(N x l)` errors ([`PositionMoments`]).
#[cfg(test)]
fn position_stats(errs: &[f32], l: usize) -> (Vec<f32>, Vec<f32>) {
    let mut m = PositionMoments::new(l);
    m.add(errs);
    m.finish()
}

/// Mean of the top `fraction` of `scores` (at least one).
pub fn top_mean(scores: &[f32], fraction: f64) -> f64 {
    let mut v: Vec<f32> = scores.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let k = ((fraction * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.iter().take(k).map(|x| f64::from(*x)).sum::<f64>() / k as f64
}

/// A set of images given batch by batch: called with a visitor, it calls the visitor with
/// each batch of the set in order (e.g. a stream read from Parquet), and may be called again
/// for another pass.
pub type ImageBatches<'a> = dyn FnMut(&mut dyn FnMut(&ImageSet) -> Result<()>) -> Result<()> + 'a;

/// Memory-bank candidates kept at most, in bytes, whatever `detect.bank_pool` says.
pub const BANK_POOL_BYTES: usize = 256 << 20;

/// Visits `set` in batches of `bs` images.
fn visit_batches(
    set: &ImageSet,
    bs: usize,
    visit: &mut dyn FnMut(&ImageSet) -> Result<()>,
) -> Result<()> {
    for start in (0..set.len()).step_by(bs.max(1)) {
        let idx: Vec<usize> = (start..(start + bs.max(1)).min(set.len())).collect();
        visit(&set.select(&idx))?;
    }
    Ok(())
}

impl Detector {
    /// Checks the detector settings and the calibration size for `n` normal images; returns
    /// the number of calibration images, `round(calibration_fraction x n)`.
    pub fn calibration_count(cfg: &DetectorConfig, n: usize) -> Result<usize> {
        if cfg.scorers.is_empty() {
            return Err(VisionError::Config(
                "detect.scorers is empty: name reconstruction and/or patch_core".into(),
            ));
        }
        if !(cfg.calibration_fraction > 0.0 && cfg.calibration_fraction < 1.0) {
            return Err(VisionError::Config(format!(
                "detect.calibration_fraction = {} must be in (0, 1)",
                cfg.calibration_fraction
            )));
        }
        let n_cal = (cfg.calibration_fraction * n as f64).round() as usize;
        if n_cal < cfg.min_calibration.max(2) {
            return Err(VisionError::CalibrationTooSmall {
                needed: cfg.min_calibration.max(2),
                got: n_cal,
                hint: format!(
                    "{n} normal images x calibration_fraction {} = {n_cal}; give more normal images or raise detect.calibration_fraction",
                    cfg.calibration_fraction
                ),
            });
        }
        if n - n_cal == 0 {
            return Err(VisionError::InvalidInput(
                "no normal images left to fit on".into(),
            ));
        }
        Ok(n_cal)
    }

    /// Fits on normal images held in memory: splits off `calibration_fraction` for
    /// calibration (a seeded shuffle), then [`Detector::fit_streamed`]. Errors when the
    /// calibration set is too small.
    pub fn fit(
        task: &MaeTask,
        normal: &ImageSet,
        cfg: &DetectorConfig,
        device: &Device,
    ) -> Result<Self> {
        let n = normal.len();
        let n_cal = Self::calibration_count(cfg, n)?;
        let mut order: Vec<usize> = (0..n).collect();
        SslRng::derived(cfg.seed, "detector-split").shuffle(&mut order);
        let cal = normal.select(&order[..n_cal]);
        let fit = normal.select(&order[n_cal..]);
        let bs = cfg.batch_size;
        Self::fit_streamed(
            task,
            cfg,
            device,
            (fit.len(), &mut |v| visit_batches(&fit, bs, v)),
            (cal.len(), &mut |v| visit_batches(&cal, bs, v)),
        )
    }

    /// Fits on normal images given batch by batch, in two passes: over the `fit` images
    /// (their expected count first, for progress), a seeded uniform sample of at most
    /// `detect.bank_pool` patch features per memory bank (and [`BANK_POOL_BYTES`]), reduced by
    /// greedy coreset to the bank, and the per-position reconstruction statistics; then over
    /// the `cal` images, each scorer's normal statistics and the threshold (which keeps one
    /// score per calibration image and scorer). Memory is bounded by the pool, a batch and
    /// the calibration scores, not by the number of images.
    pub fn fit_streamed(
        task: &MaeTask,
        cfg: &DetectorConfig,
        device: &Device,
        fit: (usize, &mut ImageBatches<'_>),
        cal: (usize, &mut ImageBatches<'_>),
    ) -> Result<Self> {
        let l = task.encoder().config().num_patches()?;
        let mut bank_kinds: Vec<ScorerKind> = Vec::new();
        for &k in cfg.scorers.iter().filter(|k| k.uses_bank()) {
            if !bank_kinds.contains(&k) {
                bank_kinds.push(k);
            }
        }
        let mut pools: Vec<Reservoir> = bank_kinds
            .iter()
            .map(|_| Reservoir::new(cfg.bank_pool, cfg.seed))
            .collect();
        let recon_stats = cfg.scorers.contains(&ScorerKind::Reconstruction)
            && cfg.recon_position_norm != PositionNorm::None;
        let recon_parts = recon_partitions(ScorerKind::Reconstruction, l, cfg)?;
        let mut moments = PositionMoments::new(l);
        let progress =
            ssl_core::monitor::Progress::task("detect fit: normal images", fit.0 as u64, "images");
        let mut n_fit = 0;
        (fit.1)(&mut |set: &ImageSet| {
            let batch = set.batch(0, set.len(), device)?;
            let pixels = normalize_batch(&batch.pixels, task.augment())?;
            for (kind, pool) in bank_kinds.iter().zip(pools.iter_mut()) {
                let (f, d) = bank_features(task, &pixels, *kind, cfg)?;
                if pool.dim == 0 {
                    pool.cap = pool.cap.min((BANK_POOL_BYTES / (d * 4).max(1)).max(1));
                }
                pool.add(&f, d);
            }
            if recon_stats {
                let errs = raw_batch_scores(
                    task,
                    &pixels,
                    ScorerKind::Reconstruction,
                    cfg,
                    None,
                    &recon_parts,
                    device,
                )?;
                moments.add(&errs);
            }
            n_fit += set.len();
            progress.inc(set.len() as u64);
            Ok(())
        })?;
        progress.finish();
        if n_fit == 0 {
            return Err(VisionError::InvalidInput(
                "no normal images left to fit on".into(),
            ));
        }
        let mut banks = Vec::new();
        for (kind, pool) in bank_kinds.iter().zip(pools) {
            let dim = pool.dim;
            let target = ((cfg.coreset_ratio * pool.seen as f64).ceil() as usize)
                .clamp(1, cfg.coreset_max.max(1));
            let picked =
                coreset::greedy_coreset(&pool.rows, dim, target, cfg.coreset_proj_dim, cfg.seed);
            let mut kept = Vec::with_capacity(picked.len() * dim);
            for i in picked {
                kept.extend_from_slice(&pool.rows[i * dim..(i + 1) * dim]);
            }
            banks.push((
                *kind,
                MemoryBank {
                    features: kept,
                    dim,
                },
            ));
        }
        let (recon_position_mean, recon_position_std) = if recon_stats {
            moments.finish()
        } else {
            (Vec::new(), Vec::new())
        };
        let mut det = Detector {
            state: DetectorState {
                cfg: cfg.clone(),
                stats: Vec::new(),
                threshold: f64::NAN,
                recon_position_mean,
                recon_position_std,
                n_fit,
                n_calibration: 0,
            },
            banks,
        };
        // Calibration: per-scorer normal statistics, then the threshold on combined scores.
        let parts: Vec<Vec<Vec<Vec<u32>>>> = cfg
            .scorers
            .iter()
            .map(|&k| recon_partitions(k, l, cfg))
            .collect::<Result<_>>()?;
        let s = cfg.scorers.len();
        let mut image_scores: Vec<Vec<f64>> = vec![Vec::new(); s];
        let mut patch_sums = vec![(0f64, 0f64, 0usize); s];
        let progress = ssl_core::monitor::Progress::task(
            "detect fit: calibration images",
            cal.0 as u64,
            "images",
        );
        (cal.1)(&mut |set: &ImageSet| {
            let batch = set.batch(0, set.len(), device)?;
            let pixels = normalize_batch(&batch.pixels, task.augment())?;
            for (k, &kind) in cfg.scorers.iter().enumerate() {
                let p = det.batch_patch_scores(task, &pixels, kind, &parts[k], device)?;
                image_scores[k].extend(p.chunks(l).map(|r| top_mean(r, cfg.top_fraction)));
                let sums = &mut patch_sums[k];
                for v in &p {
                    sums.0 += f64::from(*v);
                    sums.1 += f64::from(*v) * f64::from(*v);
                }
                sums.2 += p.len();
            }
            progress.inc(set.len() as u64);
            Ok(())
        })?;
        progress.finish();
        for (k, &kind) in cfg.scorers.iter().enumerate() {
            let (im, is) = mean_std(&image_scores[k]);
            let (s1, s2, n) = patch_sums[k];
            let n = n.max(1) as f64;
            let pm = s1 / n;
            let ps = (s2 / n - pm * pm).max(0.0).sqrt();
            det.state.stats.push(ScorerStats {
                kind,
                image_mean: im,
                image_std: is.max(1e-12),
                patch_mean: pm,
                patch_std: ps.max(1e-12),
            });
        }
        let n_cal = image_scores.first().map_or(0, Vec::len);
        det.state.n_calibration = n_cal;
        let combined: Vec<f64> = (0..n_cal)
            .map(|i| det.combine(&image_scores.iter().map(|v| v[i]).collect::<Vec<_>>()))
            .collect();
        det.state.threshold = calibrate_threshold(&combined, cfg.threshold, cfg.min_calibration)?;
        Ok(det)
    }

    /// Patch scores `(B x L)` of one scorer on normalised `pixels`, position-normalised for
    /// reconstruction.
    fn batch_patch_scores(
        &self,
        task: &MaeTask,
        pixels: &Tensor,
        kind: ScorerKind,
        partitions: &[Vec<Vec<u32>>],
        device: &Device,
    ) -> Result<Vec<f32>> {
        let mut p = raw_batch_scores(
            task,
            pixels,
            kind,
            &self.state.cfg,
            self.banks.iter().find(|(k, _)| *k == kind).map(|(_, b)| b),
            partitions,
            device,
        )?;
        let (mean, std) = (
            &self.state.recon_position_mean,
            &self.state.recon_position_std,
        );
        if kind == ScorerKind::Reconstruction && !mean.is_empty() {
            let l = mean.len();
            let zscore = self.state.cfg.recon_position_norm == PositionNorm::Zscore;
            if zscore && std.len() != l {
                return Err(VisionError::InvalidInput(format!(
                    "the detector asks for z-scored reconstruction errors but holds {} position deviations for {l} positions: refit it",
                    std.len()
                )));
            }
            for row in p.chunks_mut(l) {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = if zscore {
                        (*v - mean[i]) / std[i]
                    } else {
                        *v / mean[i]
                    };
                }
            }
        }
        Ok(p)
    }

    fn combine(&self, image_scores: &[f64]) -> f64 {
        let z: f64 = image_scores
            .iter()
            .zip(&self.state.stats)
            .map(|(s, st)| (s - st.image_mean) / st.image_std)
            .sum();
        z / image_scores.len().max(1) as f64
    }

    /// Scores images: combined score, flag, per-scorer scores, patch map; in batches of
    /// `detect.batch_size`, with a progress bar when there is more than one.
    pub fn score(
        &self,
        task: &MaeTask,
        images: &ImageSet,
        device: &Device,
    ) -> Result<Vec<ImageScore>> {
        let cfg = &self.state.cfg;
        let l = task.encoder().config().num_patches()?;
        let parts: Vec<Vec<Vec<Vec<u32>>>> = cfg
            .scorers
            .iter()
            .map(|&k| recon_partitions(k, l, cfg))
            .collect::<Result<_>>()?;
        let bs = cfg.batch_size.max(1);
        let progress = (images.len() > bs)
            .then(|| ssl_core::monitor::Progress::task("scores", images.len() as u64, "images"));
        let mut out = Vec::with_capacity(images.len());
        visit_batches(images, bs, &mut |set: &ImageSet| {
            let batch = set.batch(0, set.len(), device)?;
            let pixels = normalize_batch(&batch.pixels, task.augment())?;
            let per: Vec<Vec<f32>> = cfg
                .scorers
                .iter()
                .zip(&parts)
                .map(|(&k, p)| self.batch_patch_scores(task, &pixels, k, p, device))
                .collect::<Result<_>>()?;
            for i in 0..set.len() {
                let raw: Vec<f64> = per
                    .iter()
                    .map(|p| top_mean(&p[i * l..(i + 1) * l], cfg.top_fraction))
                    .collect();
                let score = self.combine(&raw);
                let mut map = vec![0f32; l];
                for (p, st) in per.iter().zip(&self.state.stats) {
                    for (m, v) in map.iter_mut().zip(&p[i * l..(i + 1) * l]) {
                        *m += ((f64::from(*v) - st.patch_mean) / st.patch_std) as f32
                            / per.len() as f32;
                    }
                }
                out.push(ImageScore {
                    score,
                    flag: score > self.state.threshold,
                    per_scorer: raw,
                    patch_map: map,
                });
            }
            if let Some(p) = &progress {
                p.inc(set.len() as u64);
            }
            Ok(())
        })?;
        if let Some(p) = progress {
            p.finish();
        }
        Ok(out)
    }

    /// The decision threshold on the combined score.
    pub fn threshold(&self) -> f64 {
        self.state.threshold
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.state.cfg
    }

    /// Normal-score statistics per scorer.
    pub fn stats(&self) -> &[ScorerStats] {
        &self.state.stats
    }

    /// Memory-bank sizes per bank-based scorer.
    pub fn bank_sizes(&self) -> Vec<(ScorerKind, usize)> {
        self.banks.iter().map(|(k, b)| (*k, b.len())).collect()
    }

    /// Images used for fitting and for calibration.
    pub fn counts(&self) -> (usize, usize) {
        (self.state.n_fit, self.state.n_calibration)
    }

    /// Writes `detector.json` and `memory_bank.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
        let p = dir.join(DETECTOR_FILE);
        let json = serde_json::to_string_pretty(&self.state).map_err(|e| VisionError::io(&p, e))?;
        std::fs::write(&p, json).map_err(|e| VisionError::io(&p, e))?;
        if !self.banks.is_empty() {
            let mut map = HashMap::new();
            for (kind, bank) in &self.banks {
                let t =
                    Tensor::from_vec(bank.features.clone(), (bank.len(), bank.dim), &Device::Cpu)?;
                map.insert(kind.name().to_string(), t);
            }
            let path = dir.join(BANK_FILE);
            candle_core::safetensors::save(&map, &path).map_err(|e| VisionError::io(&path, e))?;
        }
        Ok(())
    }

    /// Reads a detector written by [`Detector::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(DETECTOR_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| VisionError::io(&p, e))?;
        let state: DetectorState =
            serde_json::from_str(&text).map_err(|e| VisionError::io(&p, e))?;
        let mut banks = Vec::new();
        if state.cfg.scorers.iter().any(|k| k.uses_bank()) {
            let path = dir.join(BANK_FILE);
            let map = candle_core::safetensors::load(&path, &Device::Cpu)
                .map_err(|e| VisionError::io(&path, e))?;
            for &kind in state.cfg.scorers.iter().filter(|k| k.uses_bank()) {
                if banks.iter().any(|(k, _)| *k == kind) {
                    continue;
                }
                let t = map.get(kind.name()).ok_or_else(|| {
                    VisionError::io(&path, format!("no `{}` tensor", kind.name()))
                })?;
                let dim = t.dim(1)?;
                banks.push((
                    kind,
                    MemoryBank {
                        features: t.flatten_all()?.to_vec1::<f32>()?,
                        dim,
                    },
                ));
            }
        }
        Ok(Detector { state, banks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AugmentConfig, MaeConfig, ViTConfig};
    use ssl_core::ParamStore;

    #[test]
    fn top_mean_takes_the_highest() {
        assert_eq!(top_mean(&[1.0, 5.0, 3.0, 2.0], 0.5), 4.0);
        assert_eq!(top_mean(&[1.0, 5.0], 0.0), 5.0);
    }

    #[test]
    fn the_bank_pool_is_a_bounded_seeded_sample() {
        // Under the cap: every row, in order.
        let mut r = Reservoir::new(10, 1);
        let rows: Vec<f32> = (0..16).map(|v| v as f32).collect();
        r.add(&rows, 2);
        assert_eq!(r.rows, rows);
        // Over it: `cap` rows of the stream, seeded, spread over the whole stream.
        let sample = |seed| {
            let mut r = Reservoir::new(10, seed);
            for start in (0..1000).step_by(50) {
                let batch: Vec<f32> = (start..start + 50).map(|v| v as f32).collect();
                r.add(&batch, 1);
            }
            assert_eq!((r.rows.len(), r.seen), (10, 1000));
            r.rows
        };
        let a = sample(3);
        assert_eq!(a, sample(3));
        assert_ne!(a, sample(4));
        assert!(a.iter().any(|&v| v >= 500.0), "{a:?}");
    }

    #[test]
    fn position_stats_are_per_position_and_floored() {
        // Two positions over three images: (1, 0), (2, 0), (3, 0).
        let (m, s) = position_stats(&[1.0, 0.0, 2.0, 0.0, 3.0, 0.0], 2);
        assert!((m[0] - 2.0).abs() < 1e-6 && (s[0] - (2.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // The constant position is floored at 1e-3 of the mean over positions, not zero.
        assert!((m[1] - 1e-3).abs() < 1e-9, "{m:?}");
        assert!(s[1] > 0.0 && s[1] < 1e-3, "{s:?}");
    }

    #[test]
    fn too_small_calibration_set_is_a_clear_error() {
        let vit = ViTConfig {
            image_height: 8,
            image_width: 8,
            channels: 1,
            patch_size: 4,
            dim: 8,
            depth: 1,
            heads: 2,
            ..ViTConfig::default()
        };
        let mae = MaeConfig {
            decoder_dim: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            ..MaeConfig::default()
        };
        let store = ParamStore::new(&Device::Cpu);
        let task = MaeTask::new(&vit, &mae, &AugmentConfig::default(), &store.builder(0)).unwrap();
        let set = ImageSet::new(vec![0.5; 20 * 64], [1, 8, 8]).unwrap();
        let e = Detector::fit(&task, &set, &DetectorConfig::default(), &Device::Cpu).unwrap_err();
        assert!(
            e.to_string().contains("at least 10") && e.to_string().contains("got 4"),
            "{e}"
        );
    }
}

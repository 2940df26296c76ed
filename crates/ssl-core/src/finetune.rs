//! Supervised fine-tuning of a pretrained encoder for classification, the parts every
//! modality shares: a classification head on any [`FinetuneEncoder`] trained by the ordinary
//! [`crate::LoopTrainer`] (so checkpoints, resume, metrics and monitoring are those of
//! pretraining), layer-wise learning-rate decay, label smoothing, a frozen-encoder mode, the
//! seeded per-class draw of a label fraction, a resumable batch source over labelled
//! examples, the scores of a test split, and the plan of runs a report compares: each label
//! fraction from the pretrained encoder and, with the same budget, from random
//! initialisation.
//!
//! The recipe follows MAE's `main_finetune.py` (AdamW, layer-wise decay, label smoothing 0.1,
//! warm-up then cosine decay, a head initialised near zero) and its `main_linprobe.py` for the
//! frozen mode (the encoder in evaluation mode, the features standardised without an affine
//! part as its `BatchNorm1d(affine=False)` before the head, only the head trained).
//!
//! A modality implements [`FinetuneEncoder`] for its encoder (features of a batch, which
//! layer a parameter belongs to) and calls [`run_plan`] with a closure that trains and scores
//! one [`RunSpec`]; the closure builds the model (pretrained weights or a fresh seed), a
//! [`LabelledSource`] over the run's rows, trains a [`Classifier`] and scores it with
//! [`Classifier::predict`] and [`ClassScores::new`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nn::ops::{cross_entropy, log_softmax_last_dim};
use crate::nn::Linear;
use crate::{
    BatchSource, CoreError, Ctx, Init, ParamBuilder, ParamStore, PretextTask, Result, SslRng,
    TaskOutput, TrainConfig,
};

/// Whether the encoder trains with the head.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// Every parameter trains (the reference recipes' fine-tuning), the encoder's layers with
    /// layer-wise learning-rate decay (`finetune.layer_decay`).
    Full,
    /// The encoder stays as it is (evaluation mode, no gradient): only the head trains, on
    /// features standardised with their training statistics ([`Classifier::fit_standardizer`]),
    /// as MAE's linear probing.
    Frozen,
}

/// `[finetune]`: how a pretrained encoder becomes a classifier.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// The label column of the training and test data (any type; read as strings).
    pub label_column: String,
    /// Fractions of the labelled training rows to fine-tune on, each its own run (e.g.
    /// `[0.01, 0.1, 1.0]`): drawn per class with `finetune.seed`, at least one row of every
    /// class, so the smaller fractions show where pretraining pays.
    pub label_fractions: Vec<f64>,
    /// `full` (every parameter trains) or `frozen` (only the head).
    pub mode: FinetuneMode,
    /// Layer-wise learning-rate decay of `full` fine-tuning from a pretrained encoder: the
    /// head and the last layer's norm train at `train.lr`, block `i` of `L` at
    /// `lr * layer_decay^(L - i)`, the embeddings at `lr * layer_decay^(L + 1)` (MAE and BEiT;
    /// 1 turns it off). Runs from random initialisation train every layer at `train.lr`.
    pub layer_decay: f64,
    /// Label smoothing of the cross-entropy (MAE's fine-tuning uses 0.1; 0 turns it off).
    pub label_smoothing: f64,
    /// Standard deviation of the head's initial weights (near zero, as MAE's 2e-5, so the
    /// first steps do not disturb the pretrained features; its bias starts at zero).
    pub head_init_std: f64,
    /// The peak learning rate of `frozen` mode, where only the head trains, on standardised
    /// features (`train.lr` is the rate of full fine-tuning, set for the encoder: BERT's 5e-5
    /// left a frozen head near its initialisation). MAE's linear probe trains its head at a
    /// far higher rate than its fine-tuning too.
    pub frozen_lr: f64,
    /// Also train the same model from random initialisation with the same budget and
    /// settings for every fraction, and report both.
    pub compare_scratch: bool,
    /// Seed of the label-fraction draw (training itself uses `train.seed`).
    pub seed: u64,
    /// Each run's shortest length in optimizer steps, whatever `train.max_epochs` gives for
    /// a small fraction.
    pub min_steps: u64,
    /// Training settings of each run. `train.max_epochs` sets the length from the run's
    /// labelled rows (at least `finetune.min_steps`); with `max_epochs = 0`, `train.max_steps`
    /// does. The warm-up is at most a fifth of the run. `train.lr = 0` asks the modality for
    /// its rule (text: by the model's width).
    pub train: TrainConfig,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            label_column: "label".into(),
            label_fractions: vec![1.0],
            mode: FinetuneMode::Full,
            layer_decay: 0.75,
            label_smoothing: 0.1,
            head_init_std: 2e-5,
            frozen_lr: 1e-2,
            compare_scratch: true,
            seed: 0,
            min_steps: 100,
            train: TrainConfig {
                max_epochs: 30.0,
                max_steps: 0,
                lr: 1e-3,
                warmup_steps: 50,
                weight_decay: 0.05,
                checkpoint_every_steps: 0,
                health_every: 0,
                ..TrainConfig::default()
            },
        }
    }
}

impl FinetuneConfig {
    /// Checks the values that would make fine-tuning meaningless, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, v: String, why: &str| {
            Err(CoreError::Config(format!("finetune.{k} = {v}: {why}")))
        };
        if self.label_column.is_empty() {
            return bad("label_column", "\"\"".into(), "name the label column");
        }
        if self.label_fractions.is_empty() {
            return bad("label_fractions", "[]".into(), "give at least one fraction");
        }
        for &f in &self.label_fractions {
            if !(f > 0.0 && f <= 1.0) {
                return bad(
                    "label_fractions",
                    format!("{:?}", self.label_fractions),
                    "every fraction must be in (0, 1]",
                );
            }
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return bad(
                "layer_decay",
                self.layer_decay.to_string(),
                "must be in (0, 1]",
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                self.label_smoothing.to_string(),
                "must be in [0, 1)",
            );
        }
        if !(self.head_init_std.is_finite() && self.head_init_std >= 0.0) {
            return bad(
                "head_init_std",
                self.head_init_std.to_string(),
                "must be a number >= 0",
            );
        }
        if !(self.frozen_lr.is_finite() && self.frozen_lr > 0.0) {
            return bad(
                "frozen_lr",
                self.frozen_lr.to_string(),
                "must be a number > 0",
            );
        }
        // `train.lr = 0` leaves the rate to the modality's rule (e.g. text's by model width).
        let mut train = self.train.clone();
        if train.lr == 0.0 {
            train.lr = 1.0;
        }
        train.validate().map_err(|e| match e {
            CoreError::Config(msg) => CoreError::Config(format!("finetune.{msg}")),
            other => other,
        })
    }
}

/// Which part of an encoder a parameter belongs to, for layer-wise learning-rate decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerGroup {
    /// Below the first block: patch / token embeddings, positions, class token.
    Embedding,
    /// Block `i` (0-based) of the encoder's stack.
    Block(usize),
    /// Above the last block (the final norm) and the head: the full rate.
    Top,
}

/// The learning-rate factor of `group` in an encoder of `layers` blocks: `decay^(layers + 1 -
/// id)` with id 0 for the embeddings, `i + 1` for block `i` and `layers + 1` on top (BEiT's
/// and MAE's `param_groups_lrd`).
pub fn layer_decay_scale(group: LayerGroup, layers: usize, decay: f64) -> f64 {
    let id = match group {
        LayerGroup::Embedding => 0,
        LayerGroup::Block(i) => (i + 1).min(layers + 1),
        LayerGroup::Top => layers + 1,
    };
    decay.powi((layers + 1 - id) as i32)
}

/// An encoder a [`Classifier`] can fine-tune: features of a batch and the layer of each
/// parameter. Its parameters and the head's live in one [`ParamStore`].
pub trait FinetuneEncoder {
    /// The encoder's input batch (without labels).
    type Batch;

    /// The store holding the encoder's parameters (the head is added to it).
    fn params(&self) -> &ParamStore;

    /// Pooled features (B, D) of `batch`; dropout and augmentation follow `ctx.train`.
    fn features(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<Tensor>;

    /// D, the width of [`FinetuneEncoder::features`].
    fn feature_dim(&self) -> usize;

    /// Examples in `batch`.
    fn batch_len(&self, batch: &Self::Batch) -> usize;

    /// Blocks in the encoder's stack (for layer-wise decay).
    fn num_layers(&self) -> usize;

    /// The group of the parameter named `name` (a key of [`FinetuneEncoder::params`]).
    fn layer_of(&self, name: &str) -> LayerGroup;
}

/// A batch of inputs with their class ids.
#[derive(Debug, Clone)]
pub struct Labelled<B> {
    /// The encoder's input.
    pub inputs: B,
    /// Class ids, u32 of shape (B,) on the model's device.
    pub labels: Tensor,
}

impl<B> Labelled<B> {
    /// Pairs `inputs` with class ids `labels` (one per example), put on `device`.
    pub fn new(inputs: B, labels: &[usize], device: &Device) -> Result<Self> {
        let ids: Vec<u32> = labels.iter().map(|&c| c as u32).collect();
        let labels = Tensor::from_vec(ids, labels.len(), device)?;
        Ok(Labelled { inputs, labels })
    }
}

/// Where a [`Classifier`]'s parameters start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The pretrained encoder.
    Pretrained,
    /// The same architecture from random initialisation (the baseline).
    Scratch,
}

/// Prefix of the head's parameters in the store (`classifier.weight`, `classifier.bias`, and
/// in `frozen` mode the feature statistics `classifier.feature_mean`,
/// `classifier.feature_inv_std`).
pub const HEAD_PREFIX: &str = "classifier";

/// Names (under [`HEAD_PREFIX`]) of the frozen mode's feature statistics: stored with the
/// checkpoints, never trained.
const STAT_NAMES: [&str; 2] = ["feature_mean", "feature_inv_std"];

/// Added to the features' variance before its square root (MAE's linear probe's BatchNorm
/// uses 1e-6).
const STANDARDIZE_EPS: f64 = 1e-6;

/// The frozen mode's standardisation of the features: `(x - mean) * inv_std`, per feature.
struct Standardizer {
    mean: Tensor,
    inv_std: Tensor,
}

/// A classification head on an encoder, trained as a [`PretextTask`] whose batches carry
/// labels (loss: cross-entropy with label smoothing; metric: `accuracy`).
pub struct Classifier<E> {
    encoder: E,
    /// `frozen` mode only: the features' training statistics, applied before the head.
    standardizer: Option<Standardizer>,
    head: Linear,
    classes: usize,
    mode: FinetuneMode,
    label_smoothing: f64,
    /// The layer-wise decay in force (1 for runs from random initialisation).
    layer_decay: f64,
}

impl<E: FinetuneEncoder> Classifier<E> {
    /// A head of `classes` outputs on `encoder`, created in the encoder's store through `pb`
    /// (a builder of that store; its seed draws the head), set up by `cfg` for a run from
    /// `start` (layer-wise decay applies to pretrained encoders only).
    pub fn new(
        encoder: E,
        classes: usize,
        cfg: &FinetuneConfig,
        start: Start,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if classes < 2 {
            return Err(CoreError::InvalidInput(format!(
                "a classifier needs at least 2 classes, the labels hold {classes}"
            )));
        }
        if !pb.store().same_store(encoder.params()) {
            return Err(CoreError::InvalidInput(
                "the classifier's head must be built in the encoder's parameter store".into(),
            ));
        }
        let dim = encoder.feature_dim();
        let hp = pb.pp(HEAD_PREFIX);
        let head = Linear::new(dim, classes, true, Init::Normal(cfg.head_init_std), &hp)?;
        // Identity until `fit_standardizer` measures the features (or a checkpoint restores
        // them).
        let standardizer = match cfg.mode {
            FinetuneMode::Full => None,
            FinetuneMode::Frozen => Some(Standardizer {
                mean: hp.get_with_decay(STAT_NAMES[0], dim, Init::Zeros, false)?,
                inv_std: hp.get_with_decay(STAT_NAMES[1], dim, Init::Ones, false)?,
            }),
        };
        let layer_decay = match start {
            Start::Pretrained => cfg.layer_decay,
            Start::Scratch => 1.0,
        };
        Ok(Classifier {
            encoder,
            standardizer,
            head,
            classes,
            mode: cfg.mode,
            label_smoothing: cfg.label_smoothing,
            layer_decay,
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The encoder's features of `inputs` in evaluation mode with no backward to follow (the
    /// `frozen` mode's features, before standardisation).
    fn frozen_features(&self, inputs: &E::Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let mut frozen = Ctx::inference(&mut *ctx.rng).with_precision(ctx.precision);
        Ok(self
            .encoder
            .features(inputs, &mut frozen)?
            .detach()
            .to_dtype(DType::F32)?)
    }

    /// Logits (B, classes) of `inputs`. In `frozen` mode the encoder runs in evaluation mode,
    /// no gradient reaches it, and its features are standardised before the head.
    pub fn logits(&self, inputs: &E::Batch, ctx: &mut Ctx) -> Result<Tensor> {
        let features = match &self.standardizer {
            None => self.encoder.features(inputs, ctx)?.to_dtype(DType::F32)?,
            Some(s) => self
                .frozen_features(inputs, ctx)?
                .broadcast_sub(&s.mean.detach())?
                .broadcast_mul(&s.inv_std.detach())?,
        };
        self.head.forward(&features)
    }

    /// `frozen` mode: measures the mean and standard deviation of every feature over examples
    /// `0..n` (`make` builds the encoder's batch of the given example indices, `batch` at a
    /// time, as the test data is prepared: no augmentation) and stores them, so the head
    /// trains and predicts on standardised features (MAE's linear probe puts a
    /// `BatchNorm1d(affine=False)` before its head; with a frozen encoder, statistics measured
    /// once over the training examples are what its running averages converge to). Features
    /// of a frozen encoder have no common scale (a max-pooled TCN, a ViT's mean token), and a
    /// near-zero head on unscaled features learns far more slowly than on standardised ones.
    /// Give every rank the same examples (the run's, not a shard) so that ranks agree. A
    /// feature constant over the examples gets `inv_std` 0 (as the probes' standardisation;
    /// BatchNorm's 1 / sqrt(eps) would multiply its test-time deviations by 1,000 under a
    /// weight no training signal moved). In `full` mode it does nothing and returns `false`.
    pub fn fit_standardizer(
        &self,
        n: usize,
        batch: usize,
        mut make: impl FnMut(&[usize]) -> Result<E::Batch>,
        rng: &mut SslRng,
    ) -> Result<bool> {
        let Some(s) = &self.standardizer else {
            return Ok(false);
        };
        if n == 0 {
            return Err(CoreError::InvalidInput(
                "the features' statistics need at least one example".into(),
            ));
        }
        let dim = self.encoder.feature_dim();
        let (mut sum, mut sq) = (vec![0f64; dim], vec![0f64; dim]);
        let mut ctx = Ctx::inference(rng);
        let idx: Vec<usize> = (0..n).collect();
        // Centred on the first batch's mean, so the sums of squares do not cancel.
        let mut shift: Option<Vec<f64>> = None;
        for chunk in idx.chunks(batch.max(1)) {
            let x = self.frozen_features(&make(chunk)?, &mut ctx)?;
            let rows = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let shift = shift.get_or_insert_with(|| {
                let mut m = vec![0f64; dim];
                for r in &rows {
                    m.iter_mut().zip(r).for_each(|(m, v)| *m += v);
                }
                m.iter_mut().for_each(|m| *m /= rows.len().max(1) as f64);
                m
            });
            for r in &rows {
                if r.len() != dim {
                    return Err(CoreError::InvalidInput(format!(
                        "the encoder gave {} features where it declares {dim}",
                        r.len()
                    )));
                }
                for (((s, q), v), c) in sum.iter_mut().zip(&mut sq).zip(r).zip(shift.iter()) {
                    let d = v - c;
                    *s += d;
                    *q += d * d;
                }
            }
        }
        let shift = shift.unwrap_or_else(|| vec![0.0; dim]);
        let nf = n as f64;
        let mean: Vec<f32> = sum
            .iter()
            .zip(&shift)
            .map(|(s, c)| (c + s / nf) as f32)
            .collect();
        let inv_std: Vec<f32> = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| {
                // Sums of deviations from the first batch's mean: exactly 0 when constant.
                let var = (q / nf - (s / nf) * (s / nf)).max(0.0);
                if var > 0.0 {
                    (1.0 / (var + STANDARDIZE_EPS).sqrt()) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let device = s.mean.device();
        let set = |name: &str, values: Vec<f32>| -> Result<()> {
            let full = format!("{HEAD_PREFIX}.{name}");
            let var = self.encoder.params().get(&full).ok_or_else(|| {
                CoreError::InvalidInput(format!("the classifier's `{full}` is not in its store"))
            })?;
            var.set(&Tensor::from_vec(values, dim, device)?.to_dtype(var.dtype())?)?;
            Ok(())
        };
        set(STAT_NAMES[0], mean)?;
        set(STAT_NAMES[1], inv_std)?;
        Ok(true)
    }

    /// The predicted class of every example of `inputs` (evaluation mode, no backward).
    pub fn predict(&self, inputs: &E::Batch, rng: &mut SslRng) -> Result<Vec<usize>> {
        let mut ctx = Ctx::inference(rng);
        let logits = self.logits(inputs, &mut ctx)?;
        let pred = logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        Ok(pred.into_iter().map(|c| c as usize).collect())
    }
}

/// Cross-entropy of (B, C) logits against `labels` with label smoothing `eps`: `(1 - eps) *
/// CE + eps * mean over classes of -log p` (PyTorch's `label_smoothing`), and the accuracy.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let ce = cross_entropy(logits, labels)?;
    if eps == 0.0 {
        return Ok(ce);
    }
    let uniform = log_softmax_last_dim(logits)?.mean(1)?.mean_all()?.neg()?;
    Ok(((ce * (1.0 - eps))? + (uniform * eps)?)?)
}

impl<E: FinetuneEncoder> PretextTask for Classifier<E> {
    type Batch = Labelled<E::Batch>;

    fn params(&self) -> &ParamStore {
        self.encoder.params()
    }

    fn forward(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let logits = self.logits(&batch.inputs, ctx)?;
        let loss = smoothed_cross_entropy(&logits, &batch.labels, self.label_smoothing)?;
        let n = batch.labels.elem_count();
        let correct = logits
            .argmax(1)?
            .to_dtype(DType::U32)?
            .eq(&batch.labels.to_dtype(DType::U32)?)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        Ok(TaskOutput {
            loss,
            weight: n as f64,
            metrics: vec![("accuracy".into(), correct / n.max(1) as f64)],
        })
    }

    fn embed(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<Tensor> {
        self.encoder.features(&batch.inputs, ctx)
    }

    fn batch_len(&self, batch: &Self::Batch) -> usize {
        self.encoder.batch_len(&batch.inputs)
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if let Some(rest) = name.strip_prefix(&format!("{HEAD_PREFIX}.")) {
            // The frozen mode's feature statistics are measured, never trained.
            return if STAT_NAMES.contains(&rest) { 0.0 } else { 1.0 };
        }
        match self.mode {
            FinetuneMode::Frozen => 0.0,
            FinetuneMode::Full => layer_decay_scale(
                self.encoder.layer_of(name),
                self.encoder.num_layers(),
                self.layer_decay,
            ),
        }
    }
}

/// The rows of a `fraction` of the labelled rows, drawn per class with `seed`: of a class
/// with `n` rows, `round(fraction * n)` but at least one, chosen uniformly; returned in
/// increasing order. `labels[i]` is row `i`'s class id.
pub fn draw_label_fraction(labels: &[usize], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(CoreError::InvalidInput(format!(
            "label fraction {fraction}: must be in (0, 1]"
        )));
    }
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, &c) in labels.iter().enumerate() {
        by_class.entry(c).or_default().push(row);
    }
    let mut rng = SslRng::derived(seed, "label-fraction");
    let mut out = Vec::new();
    for rows in by_class.values_mut() {
        let keep = ((fraction * rows.len() as f64).round() as usize).clamp(1, rows.len());
        rng.shuffle(rows);
        out.extend_from_slice(&rows[..keep]);
    }
    out.sort_unstable();
    Ok(out)
}

/// Accuracy and macro-averaged F1 of predictions against the truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    /// Fraction of examples predicted right.
    pub accuracy: f64,
    /// F1 averaged over the classes present in the truth or the predictions.
    pub macro_f1: f64,
    /// Examples scored.
    pub examples: usize,
}

impl ClassScores {
    /// The scores of `pred` against `truth` (equal lengths, class ids below `classes`).
    pub fn new(pred: &[usize], truth: &[usize], classes: usize) -> Result<Self> {
        if pred.len() != truth.len() || truth.is_empty() {
            return Err(CoreError::InvalidInput(format!(
                "scoring {} predictions against {} labels",
                pred.len(),
                truth.len()
            )));
        }
        let mut tp = vec![0usize; classes];
        let mut fp = vec![0usize; classes];
        let mut fn_ = vec![0usize; classes];
        for (&p, &t) in pred.iter().zip(truth) {
            if p >= classes || t >= classes {
                return Err(CoreError::InvalidInput(format!(
                    "class id {} out of {classes} classes",
                    p.max(t)
                )));
            }
            if p == t {
                tp[t] += 1;
            } else {
                fp[p] += 1;
                fn_[t] += 1;
            }
        }
        let (mut f1_sum, mut present) = (0.0, 0usize);
        for c in 0..classes {
            if tp[c] + fp[c] + fn_[c] == 0 {
                continue;
            }
            present += 1;
            f1_sum += 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64;
        }
        let correct: usize = tp.iter().sum();
        Ok(ClassScores {
            accuracy: correct as f64 / truth.len() as f64,
            macro_f1: f1_sum / present.max(1) as f64,
            examples: truth.len(),
        })
    }
}

/// A resumable, endless source of labelled batches over `n` examples: a seeded shuffle of
/// the examples every epoch, cut into batches of `batch_size` (the last one of an epoch may
/// be smaller), each made by `make(&indices)` from the caller's store of examples (raw bytes,
/// token ids, series: whatever the modality keeps, decoded per batch).
pub struct LabelledSource<B, F> {
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    make: F,
    _batch: std::marker::PhantomData<fn() -> B>,
}

impl<B, F: FnMut(&[usize]) -> Result<B>> LabelledSource<B, F> {
    /// A source over examples `0..n`.
    pub fn new(n: usize, batch_size: usize, seed: u64, make: F) -> Result<Self> {
        if n == 0 || batch_size == 0 {
            return Err(CoreError::InvalidInput(format!(
                "a labelled source needs examples and a batch size (got {n} examples, batch {batch_size})"
            )));
        }
        let mut s = LabelledSource {
            n,
            batch_size,
            seed,
            epoch: 0,
            cursor: 0,
            order: Vec::new(),
            make,
            _batch: std::marker::PhantomData,
        };
        s.shuffle();
        Ok(s)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.n).collect();
        SslRng::derived(
            self.seed ^ self.epoch.wrapping_mul(0x9e37_79b9),
            "labelled-epoch",
        )
        .shuffle(&mut self.order);
    }
}

impl<B, F: FnMut(&[usize]) -> Result<B>> BatchSource<B> for LabelledSource<B, F> {
    fn next_batch(&mut self) -> Result<B> {
        if self.cursor >= self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.shuffle();
        }
        let end = (self.cursor + self.batch_size).min(self.n);
        let idx = self.order[self.cursor..end].to_vec();
        self.cursor = end;
        (self.make)(&idx)
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn position(&self) -> Value {
        serde_json::json!({ "epoch": self.epoch, "cursor": self.cursor })
    }

    fn restore(&mut self, position: &Value) -> Result<()> {
        let field = |k: &str| {
            position.get(k).and_then(Value::as_u64).ok_or_else(|| {
                CoreError::InvalidInput(format!("labelled source position {position}: no `{k}`"))
            })
        };
        self.epoch = field("epoch")?;
        self.cursor = (field("cursor")? as usize).min(self.n);
        self.shuffle();
        Ok(())
    }
}

/// One fine-tuning run of a plan: which rows, from where, into which directory, for how long.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The label fraction this run stands for.
    pub fraction: f64,
    /// Pretrained encoder or random initialisation.
    pub start: Start,
    /// The training rows (indices into the labels given to [`run_plan`]), increasing.
    pub rows: Vec<usize>,
    /// The run directory (checkpoints, metrics), `OUT/fraction-F/{pretrained,scratch}`.
    pub dir: PathBuf,
    /// The training settings with the run's length and warm-up filled in.
    pub train: TrainConfig,
}

/// What one run reached on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunScores {
    /// Test accuracy and macro-F1.
    pub test: ClassScores,
    /// Optimizer steps trained.
    pub steps: u64,
    /// Final training loss (mean of the last 10 steps this process trained; `None` when it
    /// trained none, e.g. a resumed run that had already finished).
    pub final_train_loss: Option<f64>,
    /// Wall-clock seconds of training and scoring.
    pub seconds: f64,
    /// The run directory.
    pub dir: PathBuf,
}

/// One label fraction's runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FractionReport {
    /// The fraction of labelled rows.
    pub label_fraction: f64,
    /// Training examples drawn.
    pub train_examples: usize,
    /// From the pretrained encoder.
    pub pretrained: RunScores,
    /// From random initialisation, same budget (when `finetune.compare_scratch`).
    pub scratch: Option<RunScores>,
}

/// The report of `ssl finetune`: every fraction, pretrained against random initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// The classes, in id order.
    pub classes: Vec<String>,
    /// `full` or `frozen`.
    pub mode: FinetuneMode,
    /// Labelled training rows available.
    pub train_rows: usize,
    /// Test rows scored.
    pub test_rows: usize,
    /// One entry per fraction, in the order configured.
    pub runs: Vec<FractionReport>,
}

/// The directory name of a fraction's runs (`fraction-0.1`).
pub fn fraction_dir(out: &Path, fraction: f64) -> PathBuf {
    out.join(format!("fraction-{fraction}"))
}

impl Start {
    /// The run directory's name for this start: `pretrained` or `scratch`.
    pub fn name(self) -> &'static str {
        match self {
            Start::Pretrained => "pretrained",
            Start::Scratch => "scratch",
        }
    }
}

/// The directory of one run of a plan: `out/fraction-F/{pretrained,scratch}`.
pub fn run_dir(out: &Path, fraction: f64, start: Start) -> PathBuf {
    fraction_dir(out, fraction).join(start.name())
}

/// The report's file in a fine-tuning output directory.
pub const REPORT_FILE: &str = "report.json";

/// The run's training settings: its length, `train.max_epochs` over its rows (at least
/// `min_steps`), or `train.max_steps` when epochs are off; warm-up at most a fifth of it; in
/// `frozen` mode the rate `frozen_lr`.
pub fn run_train_config(cfg: &FinetuneConfig, rows: usize) -> TrainConfig {
    let mut train = cfg.train.clone();
    if cfg.mode == FinetuneMode::Frozen {
        train.lr = cfg.frozen_lr;
    }
    if train.apply_epochs(rows as u64, 1).is_some() {
        train.max_steps = train.max_steps.max(cfg.min_steps);
        train.max_epochs = 0.0;
    }
    train.warmup_steps = train.warmup_steps.min(train.max_steps / 5);
    train
}

/// Runs the plan `cfg` makes for training rows labelled `labels` (class ids): for every
/// label fraction, the draw of its rows, a run from the pretrained encoder and (with
/// `compare_scratch`) one from random initialisation, each trained and scored by `run`.
/// `progress` hears one line per finished run. Returns the report (the caller writes it).
pub fn run_plan(
    cfg: &FinetuneConfig,
    classes: &[String],
    labels: &[usize],
    test_rows: usize,
    out: &Path,
    mut run: impl FnMut(&RunSpec) -> Result<RunScores>,
    mut progress: impl FnMut(&str),
) -> Result<FinetuneReport> {
    cfg.validate()?;
    let mut runs = Vec::new();
    for &fraction in &cfg.label_fractions {
        let rows = draw_label_fraction(labels, fraction, cfg.seed)?;
        let train = run_train_config(cfg, rows.len());
        let mut one = |start: Start| -> Result<RunScores> {
            let name = start.name();
            let spec = RunSpec {
                fraction,
                start,
                rows: rows.clone(),
                dir: run_dir(out, fraction, start),
                train: train.clone(),
            };
            let scores = run(&spec)?;
            progress(&format!(
                "fraction {fraction} ({} examples), {name}: test accuracy {:.4}, macro-F1 {:.4} after {} steps ({:.1} s)",
                rows.len(),
                scores.test.accuracy,
                scores.test.macro_f1,
                scores.steps,
                scores.seconds
            ));
            Ok(scores)
        };
        let pretrained = one(Start::Pretrained)?;
        let scratch = if cfg.compare_scratch {
            Some(one(Start::Scratch)?)
        } else {
            None
        };
        runs.push(FractionReport {
            label_fraction: fraction,
            train_examples: rows.len(),
            pretrained,
            scratch,
        });
    }
    Ok(FinetuneReport {
        classes: classes.to_vec(),
        mode: cfg.mode,
        train_rows: labels.len(),
        test_rows,
        runs,
    })
}

/// Mean of the last (up to) 10 losses of a training report; `None` without any.
pub fn final_loss(losses: &[(u64, f64)]) -> Option<f64> {
    let tail = &losses[losses.len().saturating_sub(10)..];
    if tail.is_empty() {
        return None;
    }
    Some(tail.iter().map(|(_, l)| l).sum::<f64>() / tail.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoopTrainer, Trainer};

    #[test]
    fn layer_decay_follows_beit() {
        let l = 4;
        assert_eq!(layer_decay_scale(LayerGroup::Top, l, 0.5), 1.0);
        assert_eq!(layer_decay_scale(LayerGroup::Block(3), l, 0.5), 0.5);
        assert_eq!(
            layer_decay_scale(LayerGroup::Block(0), l, 0.5),
            0.5f64.powi(4)
        );
        assert_eq!(
            layer_decay_scale(LayerGroup::Embedding, l, 0.5),
            0.5f64.powi(5)
        );
        assert_eq!(layer_decay_scale(LayerGroup::Embedding, l, 1.0), 1.0);
    }

    #[test]
    fn the_fraction_draw_keeps_every_class_and_repeats() {
        let labels: Vec<usize> = (0..1000).map(|i| if i % 10 == 0 { 1 } else { 0 }).collect();
        let a = draw_label_fraction(&labels, 0.01, 3).unwrap();
        assert_eq!(a, draw_label_fraction(&labels, 0.01, 3).unwrap());
        assert_ne!(a, draw_label_fraction(&labels, 0.01, 4).unwrap());
        let ones = a.iter().filter(|&&r| labels[r] == 1).count();
        assert_eq!((a.len(), ones), (10, 1)); // round(9) + max(1, round(1))
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(draw_label_fraction(&labels, 1.0, 0).unwrap().len(), 1000);
        assert!(draw_label_fraction(&labels, 0.0, 0).is_err());
        assert!(draw_label_fraction(&labels, 1.5, 0).is_err());
    }

    #[test]
    fn scores_match_a_hand_count() {
        // truth 0 0 1 1 2, pred 0 1 1 1 0: tp 1,2,0; fp 1,1,0... class 0: tp1 fp1 fn1 -> 0.5;
        // class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fp0 fn1 -> 0.
        let s = ClassScores::new(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], 3).unwrap();
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        assert!((s.macro_f1 - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert!(ClassScores::new(&[0], &[0, 1], 2).is_err());
        assert!(ClassScores::new(&[3], &[0], 2).is_err());
    }

    #[test]
    fn label_smoothing_matches_its_definition() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &dev).unwrap();
        let labels = Tensor::new(&[1u32, 2], &dev).unwrap();
        let got = smoothed_cross_entropy(&logits, &labels, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let rows = [[1.0f64, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let mut want = 0.0;
        for (r, t) in rows.iter().zip([1usize, 2]) {
            let lse = r.iter().map(|x| x.exp()).sum::<f64>().ln();
            let logp: Vec<f64> = r.iter().map(|x| x - lse).collect();
            want += -0.9 * logp[t] - 0.1 * logp.iter().sum::<f64>() / 3.0;
        }
        want /= 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// A two-layer MLP "encoder" on 2-D points.
    struct Mlp {
        store: ParamStore,
        l0: Linear,
        l1: Linear,
    }

    impl Mlp {
        fn new(seed: u64) -> Mlp {
            let store = ParamStore::new(&Device::Cpu);
            let pb = store.builder(seed);
            let l0 = Linear::new(2, 16, true, Init::Normal(0.5), &pb.pp("embed")).unwrap();
            let l1 = Linear::new(16, 8, true, Init::Normal(0.3), &pb.pp("block.0")).unwrap();
            Mlp { store, l0, l1 }
        }
    }

    impl FinetuneEncoder for Mlp {
        type Batch = Tensor;
        fn params(&self) -> &ParamStore {
            &self.store
        }
        fn features(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
            let h = self.l0.forward(x)?.tanh()?;
            Ok(self.l1.forward(&h)?.tanh()?)
        }
        fn feature_dim(&self) -> usize {
            8
        }
        fn batch_len(&self, x: &Tensor) -> usize {
            x.dims()[0]
        }
        fn num_layers(&self) -> usize {
            1
        }
        fn layer_of(&self, name: &str) -> LayerGroup {
            if name.starts_with("embed.") {
                LayerGroup::Embedding
            } else {
                LayerGroup::Block(0)
            }
        }
    }

    /// Two interleaved classes on a circle's halves: XOR-like, not linear in the raw input.
    fn points(n: usize) -> (Vec<f32>, Vec<usize>) {
        let mut rng = SslRng::new(11);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (a, b) = (rng.uniform_range(-1.0, 1.0), rng.uniform_range(-1.0, 1.0));
            x.extend([a, b]);
            y.push(usize::from((a > 0.0) != (b > 0.0)));
        }
        (x, y)
    }

    fn train_classifier(mode: FinetuneMode) -> (Classifier<Mlp>, Vec<(String, Tensor)>) {
        let enc = Mlp::new(1);
        // Copies: the store's tensors share storage with the parameters updated in place.
        let mut before: Vec<(String, Tensor)> = enc
            .store
            .tensors()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.copy().unwrap()))
            .collect();
        let cfg = FinetuneConfig {
            mode,
            head_init_std: 0.1,
            ..FinetuneConfig::default()
        };
        let pb = enc.store.builder(2);
        let clf = Classifier::new(enc, 2, &cfg, Start::Pretrained, &pb).unwrap();
        let (x, y) = points(256);
        let x = Tensor::from_vec(x, (256, 2), &Device::Cpu).unwrap();
        let fitted = clf
            .fit_standardizer(256, 48, |idx| rows_of(&x, idx), &mut SslRng::new(0))
            .unwrap();
        assert_eq!(fitted, mode == FinetuneMode::Frozen);
        if fitted {
            for name in STAT_NAMES {
                let full = format!("{HEAD_PREFIX}.{name}");
                let t = clf.encoder().store.get(&full).unwrap();
                before.push((full, t.as_tensor().copy().unwrap()));
            }
        }
        let mut src = LabelledSource::new(256, 32, 5, |idx: &[usize]| {
            let ids = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                &Device::Cpu,
            )?;
            let labels: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
            Labelled::new(x.index_select(&ids, 0)?, &labels, &Device::Cpu)
        })
        .unwrap();
        let train = TrainConfig {
            max_steps: 300,
            lr: 3e-2,
            warmup_steps: 10,
            log_every: 0,
            health_every: 0,
            ..TrainConfig::default()
        };
        LoopTrainer::new(train, None)
            .unwrap()
            .fit(&clf, &mut src, None)
            .unwrap();
        (clf, before)
    }

    fn rows_of(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
        let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        Ok(x.index_select(&Tensor::from_vec(ids, idx.len(), x.device())?, 0)?)
    }

    fn stat(clf: &Classifier<Mlp>, name: &str) -> Vec<f32> {
        let var = clf.encoder().store.get(&format!("{HEAD_PREFIX}.{name}"));
        var.unwrap().as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn frozen_features_are_standardised_with_their_training_statistics() {
        let enc = Mlp::new(1);
        let cfg = FinetuneConfig {
            mode: FinetuneMode::Frozen,
            ..FinetuneConfig::default()
        };
        // Feature 0 constant: its weights zero, so it is tanh(bias) for every input.
        let w = enc.store.get("block.0.weight").unwrap();
        let mut wv = w.as_tensor().to_vec2::<f32>().unwrap();
        wv[0].iter_mut().for_each(|x| *x = 0.0);
        w.set(&Tensor::new(wv, &Device::Cpu).unwrap()).unwrap();
        let pb = enc.store.builder(2);
        let clf = Classifier::new(enc, 2, &cfg, Start::Pretrained, &pb).unwrap();
        // Before the measurement the standardisation is the identity.
        assert!(stat(&clf, "feature_mean").iter().all(|&m| m == 0.0));
        assert!(stat(&clf, "feature_inv_std").iter().all(|&s| s == 1.0));
        let (x, _) = points(300);
        let x = Tensor::from_vec(x, (300, 2), &Device::Cpu).unwrap();
        // Uneven batches (300 = 7 x 41 + 13) give the statistics of the whole set.
        clf.fit_standardizer(300, 41, |idx| rows_of(&x, idx), &mut SslRng::new(0))
            .unwrap();
        let f = clf
            .encoder()
            .l1
            .forward(&clf.encoder().l0.forward(&x).unwrap().tanh().unwrap());
        let f = f.unwrap().tanh().unwrap().to_dtype(DType::F64).unwrap();
        let f = f.to_vec2::<f64>().unwrap();
        let (mean, inv_std) = (stat(&clf, "feature_mean"), stat(&clf, "feature_inv_std"));
        for j in 0..8 {
            let m = f.iter().map(|r| r[j]).sum::<f64>() / 300.0;
            let v = f.iter().map(|r| (r[j] - m).powi(2)).sum::<f64>() / 300.0;
            assert!(
                (mean[j] as f64 - m).abs() < 1e-6,
                "mean {j}: {} vs {m}",
                mean[j]
            );
            if j == 0 {
                // The constant feature is dropped, not magnified.
                assert_eq!((v, inv_std[0]), (0.0, 0.0));
                continue;
            }
            let want = 1.0 / (v + STANDARDIZE_EPS).sqrt();
            assert!(
                ((inv_std[j] as f64) / want - 1.0).abs() < 1e-5,
                "feature {j}"
            );
        }
        // Measured, never trained; saved with the head.
        assert_eq!(clf.lr_scale("classifier.feature_mean"), 0.0);
        assert_eq!(clf.lr_scale("classifier.feature_inv_std"), 0.0);
        assert_eq!(clf.lr_scale("classifier.weight"), 1.0);
        let names = clf.encoder().store.tensors().unwrap();
        assert!(names.contains_key("classifier.feature_mean"));
        // Full fine-tuning has no standardisation.
        let enc = Mlp::new(1);
        let pb = enc.store.builder(2);
        let full = Classifier::new(enc, 2, &FinetuneConfig::default(), Start::Pretrained, &pb);
        let full = full.unwrap();
        assert!(!full
            .fit_standardizer(300, 41, |i| rows_of(&x, i), &mut SslRng::new(0))
            .unwrap());
        assert!(full
            .encoder()
            .store
            .get("classifier.feature_mean")
            .is_none());
    }

    fn accuracy(clf: &Classifier<Mlp>) -> f64 {
        let (x, y) = points(512);
        let x = Tensor::from_vec(x, (512, 2), &Device::Cpu).unwrap();
        let pred = clf.predict(&x, &mut SslRng::new(0)).unwrap();
        ClassScores::new(&pred, &y, 2).unwrap().accuracy
    }

    #[test]
    fn full_fine_tuning_learns_what_a_frozen_random_encoder_cannot() {
        let (full, _) = train_classifier(FinetuneMode::Full);
        let (frozen, before) = train_classifier(FinetuneMode::Frozen);
        let (a_full, a_frozen) = (accuracy(&full), accuracy(&frozen));
        assert!(a_full > 0.9, "full fine-tuning reached {a_full}");
        assert!(a_full > a_frozen + 0.05, "full {a_full}, frozen {a_frozen}");
        // Frozen: the encoder's parameters are exactly as they were, the head moved; the
        // feature statistics, measured before training, did not move either.
        let (mean, inv_std) = (
            stat(&frozen, "feature_mean"),
            stat(&frozen, "feature_inv_std"),
        );
        assert!(mean.iter().any(|&m| m != 0.0) && inv_std.iter().any(|&s| s != 1.0));
        let after = frozen.encoder().store.tensors().unwrap();
        for (name, t) in &before {
            let diff = (after[name].clone() - t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name} moved in frozen mode");
        }
        assert!(after.contains_key("classifier.weight"));
    }

    #[test]
    fn layer_decay_slows_the_lower_layers() {
        let enc = Mlp::new(1);
        let cfg = FinetuneConfig {
            layer_decay: 0.5,
            ..FinetuneConfig::default()
        };
        let pb = enc.store.builder(2);
        let clf = Classifier::new(enc, 2, &cfg, Start::Pretrained, &pb).unwrap();
        assert_eq!(clf.lr_scale("classifier.weight"), 1.0);
        assert_eq!(clf.lr_scale("block.0.weight"), 0.5);
        assert_eq!(clf.lr_scale("embed.weight"), 0.25);
        let enc = Mlp::new(1);
        let pb = enc.store.builder(2);
        let scratch = Classifier::new(enc, 2, &cfg, Start::Scratch, &pb).unwrap();
        assert_eq!(scratch.lr_scale("embed.weight"), 1.0);
    }

    #[test]
    fn the_labelled_source_resumes_where_it_stopped() {
        let take = |src: &mut LabelledSource<Vec<usize>, _>, k: usize| -> Vec<Vec<usize>> {
            (0..k).map(|_| src.next_batch().unwrap()).collect()
        };
        let make = |idx: &[usize]| Ok(idx.to_vec());
        let mut a = LabelledSource::new(10, 4, 1, make).unwrap();
        let all = take(&mut a, 9);
        let mut b = LabelledSource::new(10, 4, 1, make).unwrap();
        let first = take(&mut b, 4);
        let pos = b.position();
        let mut c = LabelledSource::new(10, 4, 1, make).unwrap();
        c.restore(&pos).unwrap();
        let rest = take(&mut c, 5);
        assert_eq!([first, rest].concat(), all);
        // Each epoch is a permutation, and epochs differ.
        let e0: Vec<usize> = all[..3].concat();
        let e1: Vec<usize> = all[3..6].concat();
        let mut s0 = e0.clone();
        s0.sort_unstable();
        assert_eq!(s0, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1);
    }

    #[test]
    fn validation_names_the_key_and_leaves_a_zero_rate_to_the_modality() {
        let mut cfg = FinetuneConfig::default();
        cfg.train.lr = 0.0;
        cfg.validate().unwrap();
        cfg.train.lr = -1.0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("finetune.train.lr"), "{err}");
        let cfg = FinetuneConfig {
            label_fractions: vec![0.5, 0.0],
            ..FinetuneConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("finetune.label_fractions"), "{err}");
    }

    #[test]
    fn the_run_length_follows_epochs_with_a_floor() {
        let cfg = FinetuneConfig::default(); // 30 epochs, batch 32, min 100 steps
        assert_eq!(run_train_config(&cfg, 10).max_steps, 100);
        let t = run_train_config(&cfg, 6400);
        assert_eq!(t.max_steps, 6000);
        assert_eq!(t.warmup_steps, 50);
        let fixed = FinetuneConfig {
            train: TrainConfig {
                max_epochs: 0.0,
                max_steps: 40,
                ..cfg.train.clone()
            },
            ..cfg
        };
        let t = run_train_config(&fixed, 10_000);
        assert_eq!((t.max_steps, t.warmup_steps), (40, 8));
        assert_eq!(t.lr, fixed.train.lr);
        // A frozen head trains at its own rate.
        let frozen = FinetuneConfig {
            mode: FinetuneMode::Frozen,
            frozen_lr: 0.02,
            ..fixed
        };
        assert_eq!(run_train_config(&frozen, 10_000).lr, 0.02);
        let bad = FinetuneConfig {
            frozen_lr: 0.0,
            ..frozen
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("finetune.frozen_lr"), "{err}");
    }
}

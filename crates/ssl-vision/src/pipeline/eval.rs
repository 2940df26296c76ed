//! `eval`: linear-probe and k-NN accuracy of the pretrained encoder's embeddings, against a
//! randomly initialised encoder of the same shape and against the raw (normalised) pixels,
//! all on the same rows (ssl-core's probe harness), beside the majority-class rate.

use std::path::Path;

use serde::Serialize;
use ssl_core::probe::{
    majority_class_rate, probe_scores, probe_split, take_rows, warn_unseen_labels, ProbeScores,
};

use super::config::VisionConfig;
use super::embed::embed_images;
use super::images::{load_images, LoadedImages};
use super::task::{build_task, load_model, VisionTask};
use crate::{AugmentConfig, ImageSet, Result, VisionError};

/// The probes of one set of features.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FeatureProbe {
    /// Feature width.
    pub dim: usize,
    /// Weighted cosine k-NN test accuracy.
    pub knn_accuracy: f64,
    /// Linear probe test accuracy.
    pub linear_probe_accuracy: f64,
}

impl FeatureProbe {
    fn new(s: ProbeScores, dim: usize) -> Self {
        FeatureProbe {
            dim,
            knn_accuracy: s.knn,
            linear_probe_accuracy: s.linear,
        }
    }
}

/// What [`eval`] returns; serialises to the JSON object `ssl eval vision` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionEvalReport {
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// Classes (label ids below this).
    pub n_classes: usize,
    /// Test rows.
    pub n_test: usize,
    /// Training rows of the probes.
    pub n_train: usize,
    /// The pooling of the embeddings (`cls` or `mean`).
    pub pooling: String,
    /// The pretrained encoder.
    pub pretrained: FeatureProbe,
    /// A randomly initialised encoder of the same shape (the same seed as the run's start).
    pub random_init: FeatureProbe,
    /// The raw pixels, normalised with the run's mean and standard deviation.
    pub raw_pixels: FeatureProbe,
    /// The accuracy of always predicting the most frequent training class: the floor of
    /// every probe above.
    pub majority_class_rate: f64,
    /// Test rows whose label never occurs in training (absent when 0; a warning is printed).
    #[serde(skip_serializing_if = "is_zero")]
    pub unseen_test_rows: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The images' pixels normalised per channel with `a.mean` / `a.std` (one value: every
/// channel), flattened row-major.
fn normalised_pixels(s: &ImageSet, a: &AugmentConfig) -> Vec<f32> {
    let mut v = s.data.clone();
    let c = s.shape[0];
    let hw = s.shape[1] * s.shape[2];
    for (i, x) in s.data.iter().enumerate() {
        let ch = (i / hw) % c;
        let m = if a.mean.len() == 1 {
            a.mean[0]
        } else {
            a.mean[ch]
        };
        let sd = if a.std.len() == 1 {
            a.std[0]
        } else {
            a.std[ch]
        };
        v[i] = (x - m) / sd;
    }
    v
}

/// Evaluates the model of checkpoint directory `ckpt` configured by `cfg` (see
/// [`super::stored_config`]) on the labelled images of `data`: the probes train on `data`
/// and test on `test`, or, when `test` is empty, on a seeded stratified split of `data`.
/// Labels come from `label_column` (default `data.label_column`) and must be non-negative
/// integers.
pub fn eval(
    ckpt: &Path,
    cfg: &VisionConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<VisionEvalReport> {
    let (task, device) = load_model(ckpt, cfg)?;
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let train = load_images(data, &cfg.data, Some(&label))?;
    cfg.check_shape(&train.images)?;
    let test = if test.is_empty() {
        None
    } else {
        let t = load_images(test, &cfg.data, Some(&label))?;
        cfg.check_shape(&t.images)?;
        Some(t)
    };
    let to_ids = |l: &Option<Vec<i64>>| -> Result<Vec<usize>> {
        l.as_ref()
            .ok_or_else(|| VisionError::Config(format!("no labels read from column `{label}`")))?
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| {
                    VisionError::Config(format!("label {v} in column `{label}` is negative"))
                })
            })
            .collect()
    };
    let train_y = to_ids(&train.labels)?;
    let (tr_set, tr_y, te_set, te_y) = match &test {
        Some(LoadedImages { images, labels, .. }) => (
            train.images.clone(),
            train_y,
            images.clone(),
            to_ids(labels)?,
        ),
        None => {
            let (a, b) = probe_split(&train_y, cfg.train.seed)?;
            (
                train.images.select(&a),
                take_rows(&train_y, 1, &a),
                train.images.select(&b),
                take_rows(&train_y, 1, &b),
            )
        }
    };
    let n_classes = tr_y.iter().chain(&te_y).max().map_or(0, |m| m + 1);
    let unseen_test_rows = if test.is_some() {
        warn_unseen_labels(&tr_y, &te_y)
    } else {
        0
    };
    let seed = cfg.train.seed;
    let probe = |tr: &[f32], te: &[f32], dim: usize| -> Result<FeatureProbe> {
        let s = probe_scores((tr, &tr_y), (te, &te_y), dim, n_classes, seed)?;
        Ok(FeatureProbe::new(s, dim))
    };
    let bs = cfg.train.batch_size;
    let pooling = cfg.model.pooling;
    // The run's product precision (`train.matmul_precision`) applies to embedding too.
    let prec = cfg.train.matmul_precision;
    let embed = |t: &dyn VisionTask, s: &ImageSet| embed_images(t, s, pooling, bs, &device, prec);
    let (tr, dim) = embed(task.as_ref(), &tr_set)?;
    let (te, _) = embed(task.as_ref(), &te_set)?;
    let pretrained = probe(&tr, &te, dim)?;
    let (_, random) = build_task(cfg, &device, None)?;
    let (rtr, _) = embed(random.as_ref(), &tr_set)?;
    let (rte, _) = embed(random.as_ref(), &te_set)?;
    let random_init = probe(&rtr, &rte, dim)?;
    let a = &cfg.task.augment;
    let raw_pixels = probe(
        &normalised_pixels(&tr_set, a),
        &normalised_pixels(&te_set, a),
        tr_set.image_len(),
    )?;
    Ok(VisionEvalReport {
        checkpoint: ckpt.display().to_string(),
        n_classes,
        n_test: te_y.len(),
        n_train: tr_y.len(),
        pooling: format!("{pooling:?}").to_lowercase(),
        pretrained,
        random_init,
        raw_pixels,
        majority_class_rate: majority_class_rate(&tr_y, &te_y),
        unseen_test_rows,
    })
}

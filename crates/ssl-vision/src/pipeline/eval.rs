//! `eval`: linear-probe and k-NN accuracy of the pretrained encoder's embeddings, against a
//! randomly initialised encoder of the same shape and against the raw (normalised) pixels,
//! all on the same rows (ssl-core's probe harness), beside the majority-class rate.

use std::path::Path;

use serde::Serialize;
use ssl_core::probe::{
    majority_class_rate, probe_scores, probe_split, take_rows, warn_unseen_labels, ProbeScores,
};

use candle_core::DType;
use ssl_core::monitor::Progress;
use ssl_data::StreamPosition;

use super::config::VisionConfig;
use super::embed::examples_batch;
use super::stream::{ImageReader, Split};
use super::task::{build_task, load_model, VisionTask};
use crate::{AugmentConfig, Result, VisionError};

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

/// `pixels` (flat `(N, C, H, W)` of `c` channels of `hw` pixels) normalised per channel with
/// `a.mean` / `a.std` (one value: every channel), appended to `out`.
fn push_normalised(out: &mut Vec<f32>, pixels: &[f32], c: usize, hw: usize, a: &AugmentConfig) {
    out.reserve(pixels.len());
    for (i, x) in pixels.iter().enumerate() {
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
        out.push((x - m) / sd);
    }
}

/// The three feature sets of the rows of one data set, with their labels.
#[derive(Default)]
struct Features {
    pretrained: Vec<f32>,
    random: Vec<f32>,
    pixels: Vec<f32>,
    labels: Vec<usize>,
}

impl Features {
    fn select(&self, idx: &[usize], dim: usize, pixel_dim: usize) -> Features {
        Features {
            pretrained: take_rows(&self.pretrained, dim, idx),
            random: take_rows(&self.random, dim, idx),
            pixels: take_rows(&self.pixels, pixel_dim, idx),
            labels: take_rows(&self.labels, 1, idx),
        }
    }
}

/// Streams the labelled images of `data` (file order, `data.max_images` as a seeded sample)
/// through both encoders, keeping only the features and labels.
#[allow(clippy::too_many_arguments)]
fn stream_features(
    data: &[String],
    cfg: &VisionConfig,
    label: &str,
    pretrained: &dyn VisionTask,
    random: &dyn VisionTask,
    device: &candle_core::Device,
    what: &str,
) -> Result<Features> {
    let reader = ImageReader::open(data, &cfg.data, Some(label), cfg.train.seed)?;
    let bs = cfg.train.batch_size.max(1);
    let mut stream = reader.stream(
        reader.loader(bs, false, Some(1)),
        Split::All,
        StreamPosition::default(),
        false,
    )?;
    let shape = [
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
    ];
    let prec = ssl_core::inference_precision(&cfg.train, device);
    let pooling = cfg.model.pooling;
    let bar = Progress::task(what, reader.kept_rows() as u64, "images");
    let mut f = Features::default();
    loop {
        let examples = stream.take(bs)?;
        if examples.is_empty() {
            break;
        }
        for e in &examples {
            let v = e.label.unwrap_or(-1);
            f.labels.push(usize::try_from(v).map_err(|_| {
                VisionError::Config(format!(
                    "label {v} in column `{label}` (global row {}) is negative",
                    e.row
                ))
            })?);
        }
        let (_, batch) = examples_batch(&examples, shape, device)?;
        let emb = |t: &dyn VisionTask| -> Result<Vec<f32>> {
            let e = t.embed_with(&batch, pooling, prec)?;
            Ok(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        f.pretrained.extend(emb(pretrained)?);
        f.random.extend(emb(random)?);
        for e in &examples {
            push_normalised(
                &mut f.pixels,
                &e.pixels,
                shape[0],
                shape[1] * shape[2],
                &cfg.task.augment,
            );
        }
        bar.inc(examples.len() as u64);
    }
    bar.finish();
    Ok(f)
}

/// Evaluates the model of checkpoint directory `ckpt` configured by `cfg` (see
/// [`super::stored_config`]) on the labelled images of `data`: the probes train on `data`
/// and test on `test`, or, when `test` is empty, on a seeded stratified split of `data`.
/// Labels come from `label_column` (default `data.label_column`) and must be non-negative
/// integers.
///
/// The images stream (file order, `data.max_images` as a seeded sample) through the
/// pretrained and the random-init encoder; what is held for the probes is each row's
/// features: two embeddings and the normalised pixels (`C x H x W` values, the raw-pixel
/// baseline's features), so memory grows with the rows evaluated (cap them with
/// `data.max_images`).
pub fn eval(
    ckpt: &Path,
    cfg: &VisionConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<VisionEvalReport> {
    let (task, device) = load_model(ckpt, cfg)?;
    let (_, random) = build_task(cfg, &device, None)?;
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let dim = task.encoder().config().dim;
    let pixel_dim = cfg.model.channels * cfg.model.image_height * cfg.model.image_width;
    let features = |paths: &[String], what: &str| {
        stream_features(
            paths,
            cfg,
            &label,
            task.as_ref(),
            random.as_ref(),
            &device,
            what,
        )
    };
    let train = features(data, "eval: embed")?;
    let (tr, te, split) = if test.is_empty() {
        let (a, b) = probe_split(&train.labels, cfg.train.seed)?;
        (
            train.select(&a, dim, pixel_dim),
            train.select(&b, dim, pixel_dim),
            true,
        )
    } else {
        (train, features(test, "eval: embed test")?, false)
    };
    let n_classes = tr
        .labels
        .iter()
        .chain(&te.labels)
        .max()
        .map_or(0, |m| m + 1);
    let unseen_test_rows = if split {
        0
    } else {
        warn_unseen_labels(&tr.labels, &te.labels)
    };
    let seed = cfg.train.seed;
    let probe = |a: &[f32], b: &[f32], dim: usize| -> Result<FeatureProbe> {
        let s = probe_scores((a, &tr.labels), (b, &te.labels), dim, n_classes, seed)?;
        Ok(FeatureProbe::new(s, dim))
    };
    let pretrained = probe(&tr.pretrained, &te.pretrained, dim)?;
    let random_init = probe(&tr.random, &te.random, dim)?;
    let raw_pixels = probe(&tr.pixels, &te.pixels, pixel_dim)?;
    Ok(VisionEvalReport {
        checkpoint: ckpt.display().to_string(),
        n_classes,
        n_test: te.labels.len(),
        n_train: tr.labels.len(),
        pooling: format!("{:?}", cfg.model.pooling).to_lowercase(),
        pretrained,
        random_init,
        raw_pixels,
        majority_class_rate: majority_class_rate(&tr.labels, &te.labels),
        unseen_test_rows,
    })
}

//! `finetune`: a pretrained run's ViT as an image classifier (issue 24), on ssl-core's shared
//! fine-tuning machinery ([`ssl_core::finetune`]): a head on the encoder's pooled features,
//! full fine-tuning with layer-wise learning-rate decay or a frozen encoder, each label
//! fraction from the pretrained weights and from random initialisation with the same budget,
//! a report on a test split.
//!
//! The recipe is MAE's `main_finetune.py` scaled to small models: AdamW (betas 0.9, 0.999),
//! `lr = base lr 2e-2 x batch / 256` ([`FINETUNE_BASE_LR`]), layer decay 0.75, weight decay 0.05 (biases, norms and
//! the class token spared), label smoothing 0.1, warm-up then cosine, the head initialised
//! near zero; training images get a random resized crop and a horizontal flip (the run's
//! `task.augment`: crop range, ratio, flip on or off) before the run's normalisation. Left
//! out: RandAugment, random erasing, mixup / cutmix and drop path (our stack has none).
//! `frozen` mode trains the head on standardised features of whole images (flip only): on
//! Fashion-MNIST the crops of a 28 x 28 image cost a frozen head 6 points at 10 % of the
//! labels (0.686 against 0.747; the crate README has the runs).
//!
//! The encoder is the ViT alone (`vit.*` of the run's checkpoint): MAE's decoder and SimCLR's
//! projection are not part of the classifier. Its features are the run's pooled embedding
//! (`model.pooling`), exactly what `embed` computes: the normed class token (MAE's
//! fine-tuning without global pooling), or the mean of the normed patch tokens (MAE's global
//! pooling puts the norm after the average, as `fc_norm`; our ViT has its one final norm on
//! every token, and keeping it there makes the fine-tuned run embed with the features its
//! head was trained on).

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use ssl_core::checkpoint::{CheckpointManager, MODEL_FILE};
use ssl_core::finetune::{
    final_loss, run_plan, ClassScores, Classifier, FinetuneConfig, FinetuneEncoder, FinetuneMode,
    FinetuneReport, Labelled, LabelledSource, LayerGroup, RunScores, RunSpec, Start,
};
use ssl_core::probe::{probe_split, ClassIds};
use ssl_core::run_dir::{self, RunOptions};
use ssl_core::{parse_device, Ctx, Parallel, ParamStore, SslRng, TrainConfig, Trainer};
use ssl_data::{ColumnSpec, DataLoader, LoaderConfig, StreamPosition};

use super::config::VisionConfig;
use super::embed::examples_batch;
use super::stream::{check_example_shape, ImageExample, ImageReader, Split};
use super::task::ENCODER_PREFIX;
use crate::augment::{augment_batch, normalize_batch};
use crate::{AugmentConfig, Images, Result, VisionError, VisionTransformer};

/// The fine-tuning base learning rate: `train.lr = FINETUNE_BASE_LR x batch / 256`. MAE's
/// `--blr 5e-4` is tuned for ViT-B over 100 epochs at batch 1024; like the pretraining
/// default (`task.base_lr`, 40 x MAE's 1.5e-4), this is 40 x MAE's, for small models trained
/// for a few hundred to a few thousand steps (on Fashion-MNIST at 1 % of the labels, 300 steps
/// from an 800-step MAE: 0.31 test accuracy at MAE's rate, 0.50 at 4x, 0.63 at 10x, 0.68 at
/// 40x; crates/ssl-vision/README.md).
pub const FINETUNE_BASE_LR: f64 = 2e-2;

/// The vision defaults of `[finetune]`: MAE's fine-tuning recipe scaled to small models and
/// short runs (see the module documentation): batch 64 at `lr = 2e-2 x 64 / 256 = 5e-3`,
/// AdamW betas (0.9, 0.999), weight decay 0.05, layer decay 0.75, label smoothing 0.1, 30
/// epochs of the run's labelled images (at least 100 steps), a warm-up of 50 steps (at most a
/// fifth of the run), cosine to 1e-3 of the peak.
pub fn finetune_config() -> FinetuneConfig {
    let base = FinetuneConfig::default();
    let batch = 64;
    FinetuneConfig {
        layer_decay: 0.75,
        label_smoothing: 0.1,
        train: TrainConfig {
            batch_size: batch,
            lr: FINETUNE_BASE_LR * batch as f64 / 256.0,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.05,
            min_lr_ratio: 1e-3,
            grad_clip: 0.0,
            max_epochs: 30.0,
            warmup_steps: 50,
            ..base.train.clone()
        },
        ..base
    }
}

/// A batch for [`VitEncoder`]: raw `[0, 1]` images, and whether to augment them (training
/// batches: the run's random resized crop, off in frozen mode, and flip, from the trainer's
/// random stream) or only normalise them (prediction).
#[derive(Debug, Clone)]
pub struct VitBatch {
    /// The images, raw pixels `(B, C, H, W)` in `[0, 1]`.
    pub images: Images,
    /// Augment before normalising.
    pub augment: bool,
}

/// The ViT of a vision run as a [`FinetuneEncoder`]: its own parameter store (keys `vit.*`, as
/// in the run's checkpoint; the head is added beside them), the run's augmentation and
/// normalisation, its pooling.
pub struct VitEncoder {
    store: ParamStore,
    vit: VisionTransformer,
    augment: AugmentConfig,
}

impl VitEncoder {
    /// The encoder of `cfg` (a completed configuration: image shape and normalisation filled
    /// in) freshly initialised from `cfg.train.seed` (the same draws as the pretext task's
    /// encoder at the start of pretraining), on `device`.
    pub fn new(cfg: &VisionConfig, device: &Device) -> Result<Self> {
        cfg.task.augment.validate(cfg.model.channels)?;
        let store = ParamStore::new(device);
        let pb = store.builder(cfg.train.seed);
        let vit = VisionTransformer::new(&cfg.model, &pb.pp(ENCODER_PREFIX.trim_end_matches('.')))?;
        Ok(VitEncoder {
            store,
            vit,
            augment: cfg.task.augment.clone(),
        })
    }

    /// The encoder of `cfg` with the weights of checkpoint directory `ckpt` (see
    /// [`super::stored_config`]); the file's other tensors (decoder, projection, a head) are
    /// ignored, a missing encoder tensor is an error naming it.
    pub fn load(cfg: &VisionConfig, ckpt: &Path, device: &Device) -> Result<Self> {
        let enc = VitEncoder::new(cfg, device)?;
        enc.store.load_safetensors(&ckpt.join(MODEL_FILE))?;
        Ok(enc)
    }

    /// The ViT.
    pub fn vit(&self) -> &VisionTransformer {
        &self.vit
    }
}

impl FinetuneEncoder for VitEncoder {
    type Batch = VitBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn features(&self, batch: &VitBatch, ctx: &mut Ctx) -> ssl_core::Result<candle_core::Tensor> {
        let raw = &batch.images.pixels;
        let pixels = if batch.augment {
            augment_batch(raw, &self.augment, ctx.rng)?
        } else {
            normalize_batch(raw, &self.augment)?
        };
        let x = self.vit.embed_patches(&pixels)?;
        let (out, _) = self.vit.forward_tokens(&x, ctx)?;
        Ok(self.vit.pool(&out)?)
    }

    fn feature_dim(&self) -> usize {
        self.vit.config().dim
    }

    fn batch_len(&self, batch: &VitBatch) -> usize {
        batch.images.len()
    }

    fn num_layers(&self) -> usize {
        self.vit.config().depth
    }

    /// `vit.embeddings.*` (patch embedding, class token; the positions are fixed) below the
    /// first block, `vit.encoder.layer.{i}.*` block `i`, the final norm (and anything else)
    /// on top.
    fn layer_of(&self, name: &str) -> LayerGroup {
        let Some(rest) = name.strip_prefix(ENCODER_PREFIX) else {
            return LayerGroup::Top;
        };
        if rest.starts_with("embeddings.") {
            return LayerGroup::Embedding;
        }
        rest.strip_prefix("encoder.layer.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse().ok())
            .map_or(LayerGroup::Top, LayerGroup::Block)
    }
}

/// Labelled images held for fine-tuning: each image's decoded pixels at one byte per value
/// (ssl-data's decoder yields multiples of 1/255, so this is exact and a quarter of the
/// `f32` size), turned back into a batch of `[0, 1]` pixels per step.
struct HeldImages {
    bytes: Vec<u8>,
    shape: [usize; 3],
    labels: Vec<String>,
}

impl HeldImages {
    fn push(&mut self, e: &ImageExample, label: &str) -> Result<()> {
        check_example_shape(e, self.shape)?;
        self.bytes.extend(
            e.pixels
                .iter()
                .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8),
        );
        self.labels.push(label_text(e, label)?);
        Ok(())
    }

    fn batch(&self, idx: &[usize], device: &Device) -> Result<Images> {
        let per = self.shape.iter().product::<usize>();
        let mut data = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            data.extend(
                self.bytes[i * per..(i + 1) * per]
                    .iter()
                    .map(|&b| f32::from(b) / 255.0),
            );
        }
        let [c, h, w] = self.shape;
        Images::from_vec(data, [idx.len(), c, h, w], device)
    }
}

/// The label of a streamed example read with the label column `label`.
fn label_text(e: &ImageExample, label: &str) -> Result<String> {
    e.label_text.clone().ok_or_else(|| {
        VisionError::Config(format!(
            "global row {}: no value in the label column `{label}`",
            e.row
        ))
    })
}

/// The labelled images of `paths` streamed in file order (`data.max_images` as a seeded
/// sample), held as bytes with their labels.
fn read_labelled(
    paths: &[String],
    cfg: &VisionConfig,
    label: &str,
    shape: [usize; 3],
) -> Result<HeldImages> {
    let reader = ImageReader::open(paths, &cfg.data, Some(label), cfg.train.seed)?;
    let bs = cfg.train.batch_size.max(1);
    let mut stream = reader.stream(
        reader.loader(bs, false, Some(1)),
        Split::All,
        StreamPosition::default(),
        false,
    )?;
    let bar =
        ssl_core::monitor::Progress::task("finetune: read", reader.kept_rows() as u64, "images");
    let mut held = HeldImages {
        bytes: Vec::new(),
        shape,
        labels: Vec::new(),
    };
    loop {
        let examples = stream.take(bs)?;
        if examples.is_empty() {
            break;
        }
        for e in &examples {
            held.push(e, label)?;
        }
        bar.inc(examples.len() as u64);
    }
    bar.finish();
    if held.labels.is_empty() {
        return Err(VisionError::Config(format!(
            "no labelled images in {}",
            paths.join(", ")
        )));
    }
    Ok(held)
}

/// The label of every row of `paths` the `data.max_images` sample keeps, as text, read by
/// projection (the label column only, no image decoded): the test set's classes.
fn read_label_texts(paths: &[String], cfg: &VisionConfig, label: &str) -> Result<Vec<String>> {
    // Opening the image reader checks both columns, naming a missing one and its file.
    let reader = ImageReader::open(paths, &cfg.data, Some(label), cfg.train.seed)?;
    let loader = LoaderConfig {
        batch_size: 4096,
        shuffle: false,
        epochs: Some(1),
        skip_bad_rows: cfg.data.skip_bad_rows,
        ..LoaderConfig::new(vec![ColumnSpec::label(label)])
    };
    let mut loader = DataLoader::new(reader.source(), loader)?;
    let mut out = Vec::new();
    while let Some(batch) = loader.next_batch()? {
        let texts = batch.label_column(label)?.strings();
        for (k, &row) in batch.rows().iter().enumerate() {
            if reader.sample().keeps(row) {
                out.push(texts[k].clone());
            }
        }
    }
    Ok(out)
}

/// Where the test predictions come from: the test files, streamed, or held-out images.
enum TestSet<'a> {
    Files(&'a [String]),
    Held(&'a HeldImages, &'a [usize]),
}

/// Fine-tunes the ViT of the vision run at `checkpoint` (configured by `cfg`, both from
/// [`super::stored_config`]) as a classifier of `ft.label_column`, as `ft` says: for every
/// label fraction, from the pretrained weights and (with `ft.compare_scratch`) from random
/// initialisation with the same budget, each run trained by the ordinary trainer into
/// `out/fraction-F/{pretrained,scratch}` (checkpoints, `metrics.jsonl`, `config.toml`: the
/// run embeds and evaluates like a pretrained one) and scored on `test`, or, when `test` is
/// empty, on a seeded stratified split of `data`. Writes `out/report.json` and returns it.
///
/// Memory: the labelled training images of `data` are held, one byte per pixel value, for
/// the whole plan (cap them with `data.max_images`); each batch is turned back into `f32`,
/// augmented and normalised with the run's statistics as it is drawn. The test images stream
/// through the classifier in batches; only the predictions are kept.
///
/// `opts` as for pretraining: progress bars, a stop flag (the current run writes a
/// checkpoint and the call returns an error saying so), `resume` (runs with a checkpoint
/// continue from it, the others start) and the ranks of a data-parallel run (each takes an
/// equal share of a run's images; rank 0 writes).
pub fn finetune(
    checkpoint: &Path,
    cfg: &VisionConfig,
    ft: &FinetuneConfig,
    data: &[String],
    test: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<FinetuneReport> {
    ft.validate()?;
    if data.is_empty() {
        return Err(VisionError::Config(
            "no labelled image data given: pass at least one Parquet file, directory or glob"
                .into(),
        ));
    }
    cfg.model.validate()?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let label = ft.label_column.as_str();
    let shape = [
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
    ];
    let held = read_labelled(data, cfg, label, shape)?;
    let (train_idx, test_labels, test_set) = if test.is_empty() {
        let ids = ClassIds::new(&held.labels, None).ids(&held.labels);
        let (a, b) = probe_split(&ids, ft.seed)?;
        let labels: Vec<String> = b.iter().map(|&i| held.labels[i].clone()).collect();
        (a, labels, Some(b))
    } else {
        (
            (0..held.labels.len()).collect(),
            read_label_texts(test, cfg, label)?,
            None,
        )
    };
    let train_labels: Vec<String> = train_idx.iter().map(|&i| held.labels[i].clone()).collect();
    let classes = ClassIds::new(&train_labels, Some(&test_labels));
    let train_ids = classes.ids(&train_labels);
    let test = match &test_set {
        Some(b) => TestSet::Held(&held, b),
        None => TestSet::Files(test),
    };
    let ctx = PlanCtx {
        checkpoint,
        cfg,
        ft,
        held: &held,
        train_idx: &train_idx,
        train_ids: &train_ids,
        classes: &classes,
        test: &test,
        opts,
        par: &par,
        device: &device,
    };
    let report = run_plan(
        ft,
        &classes.classes,
        &train_ids,
        test_labels.len(),
        out,
        |spec| ctx.run(spec).map_err(Into::into),
        |line| {
            if par.is_main() {
                eprintln!("{line}");
            }
        },
    )?;
    if par.is_main() {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| VisionError::Config(format!("writing the report: {e}")))?;
        ssl_data::output::write_output(&out.join(ssl_core::finetune::REPORT_FILE), &json)?;
    }
    Ok(report)
}

/// What every run of a plan shares.
struct PlanCtx<'a> {
    checkpoint: &'a Path,
    cfg: &'a VisionConfig,
    ft: &'a FinetuneConfig,
    held: &'a HeldImages,
    train_idx: &'a [usize],
    train_ids: &'a [usize],
    classes: &'a ClassIds,
    test: &'a TestSet<'a>,
    opts: &'a RunOptions,
    par: &'a Parallel,
    device: &'a Device,
}

impl PlanCtx<'_> {
    /// Trains and scores one run of the plan.
    fn run(&self, spec: &RunSpec) -> Result<RunScores> {
        let started = Instant::now();
        // A resumed plan continues the runs that have a checkpoint and starts the others.
        let has_checkpoint = CheckpointManager::new(spec.dir.join("checkpoints"), usize::MAX)
            .latest()?
            .is_some();
        let opts = RunOptions {
            resume: self.opts.resume && has_checkpoint,
            ..self.opts.clone()
        };
        let run = opts.run_dir(&spec.dir, self.par)?;
        let mut run_cfg = self.cfg.clone();
        run_cfg.train = spec.train.clone();
        run_cfg.data.label_column = self.ft.label_column.clone();
        if self.ft.mode == FinetuneMode::Frozen {
            // A frozen head sees whole images, as the test does (see the module's comment).
            run_cfg.task.augment.crop = false;
        }
        let encoder = match spec.start {
            Start::Pretrained => VitEncoder::load(&run_cfg, self.checkpoint, self.device)?,
            Start::Scratch => VitEncoder::new(&run_cfg, self.device)?,
        };
        let pb = encoder.store.builder(spec.train.seed);
        let clf = Classifier::new(
            encoder,
            self.classes.classes.len(),
            self.ft,
            spec.start,
            &pb,
        )?;
        run.check_params(ssl_core::PretextTask::params(&clf))?;
        if self.par.is_main() {
            run_dir::write_config(&spec.dir, &run_cfg)?;
        }
        let (held, device) = (self.held, self.device);
        let (idx, ids) = (self.train_idx, self.train_ids);
        // The images of `k` (indices into `rows`, a list of the run's rows).
        let images = |rows: &[usize], k: &[usize], augment: bool| -> ssl_core::Result<VitBatch> {
            let examples: Vec<usize> = k.iter().map(|&j| idx[rows[j]]).collect();
            Ok(VitBatch {
                images: held.batch(&examples, device)?,
                augment,
            })
        };
        if !opts.resume {
            // Frozen mode: the features' statistics over the run's whole images, on every
            // rank (a resumed run has them in its checkpoint).
            clf.fit_standardizer(
                spec.rows.len(),
                spec.train.batch_size,
                |k: &[usize]| images(&spec.rows, k, false),
                &mut SslRng::new(spec.train.seed),
            )?;
        }
        // This rank's share of the run's images (every `world`-th).
        let rows = self.par.shard(spec.rows.clone(), "labelled images")?;
        let mut source = LabelledSource::new(
            rows.len(),
            spec.train.batch_size,
            spec.train.seed,
            |k: &[usize]| -> ssl_core::Result<Labelled<VitBatch>> {
                let labels: Vec<usize> = k.iter().map(|&j| ids[rows[j]]).collect();
                Labelled::new(images(&rows, k, true)?, &labels, device)
            },
        )?;
        let run_config =
            serde_json::to_value(&run_cfg).map_err(|e| VisionError::Config(e.to_string()))?;
        let report = opts
            .trainer(&spec.train, &spec.dir, run_config, self.par)?
            .fit(&clf, &mut source, None)?;
        run.finish();
        if report.interrupted {
            return Err(VisionError::Config(format!(
                "fine-tuning stopped at step {} of {}: checkpoint in {}; run again with --resume to continue",
                report.step,
                spec.train.max_steps,
                spec.dir.display()
            )));
        }
        let test = self.score(&clf, spec.train.batch_size)?;
        Ok(RunScores {
            test,
            steps: report.step,
            final_train_loss: final_loss(&report.losses),
            seconds: started.elapsed().as_secs_f64(),
            dir: spec.dir.clone(),
        })
    }

    /// The classifier's scores on the test split (files streamed, or held-out images).
    fn score(&self, clf: &Classifier<VitEncoder>, batch: usize) -> Result<ClassScores> {
        let bs = batch.max(1);
        let mut rng = SslRng::new(self.cfg.train.seed);
        let (mut pred, mut truth) = (Vec::new(), Vec::<String>::new());
        let mut predict = |images: Images| -> Result<()> {
            let batch = VitBatch {
                images,
                augment: false,
            };
            pred.extend(clf.predict(&batch, &mut rng)?);
            Ok(())
        };
        match self.test {
            TestSet::Held(held, rows) => {
                for chunk in rows.chunks(bs) {
                    predict(held.batch(chunk, self.device)?)?;
                    truth.extend(chunk.iter().map(|&i| held.labels[i].clone()));
                }
            }
            TestSet::Files(paths) => {
                let label = self.ft.label_column.as_str();
                let reader =
                    ImageReader::open(paths, &self.cfg.data, Some(label), self.cfg.train.seed)?;
                let mut stream = reader.stream(
                    reader.loader(bs, false, Some(1)),
                    Split::All,
                    StreamPosition::default(),
                    false,
                )?;
                let shape = self.held.shape;
                loop {
                    let examples = stream.take(bs)?;
                    if examples.is_empty() {
                        break;
                    }
                    for e in &examples {
                        truth.push(label_text(e, label)?);
                    }
                    predict(examples_batch(&examples, shape, self.device)?.1)?;
                }
            }
        }
        let truth = self.classes.ids(&truth);
        Ok(ClassScores::new(&pred, &truth, self.classes.classes.len())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssl_core::finetune::layer_decay_scale;
    use ssl_core::PretextTask;

    #[test]
    fn every_encoder_parameter_has_its_layer_and_decayed_rate() {
        let mut cfg = VisionConfig::default();
        (
            cfg.model.image_height,
            cfg.model.image_width,
            cfg.model.channels,
        ) = (8, 8, 1);
        cfg.model.patch_size = 4;
        (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 3, 2);
        (cfg.task.augment.mean, cfg.task.augment.std) = (vec![0.5], vec![0.25]);
        let enc = VitEncoder::new(&cfg, &Device::Cpu).unwrap();
        let (mut embedding, mut top, mut blocks) = (Vec::new(), Vec::new(), vec![0usize; 3]);
        for (name, _) in enc.store.vars() {
            match enc.layer_of(&name) {
                LayerGroup::Embedding => embedding.push(name),
                LayerGroup::Block(i) => blocks[i] += 1,
                LayerGroup::Top => top.push(name),
            }
        }
        embedding.sort();
        top.sort();
        assert_eq!(
            embedding,
            [
                "vit.embeddings.cls_token",
                "vit.embeddings.patch_embeddings.projection.bias",
                "vit.embeddings.patch_embeddings.projection.weight",
            ]
        );
        assert_eq!(top, ["vit.layernorm.bias", "vit.layernorm.weight"]);
        assert!(
            blocks[0] > 0 && blocks.iter().all(|&n| n == blocks[0]),
            "{blocks:?}"
        );

        let ft = finetune_config();
        let pb = enc.store.builder(1);
        let clf = Classifier::new(enc, 3, &ft, Start::Pretrained, &pb).unwrap();
        let d = ft.layer_decay;
        assert_eq!(clf.lr_scale("classifier.weight"), 1.0);
        assert_eq!(clf.lr_scale("vit.layernorm.weight"), 1.0);
        assert_eq!(
            clf.lr_scale("vit.encoder.layer.2.output.dense.weight"),
            layer_decay_scale(LayerGroup::Block(2), 3, d)
        );
        assert!((clf.lr_scale("vit.embeddings.cls_token") - d.powi(4)).abs() < 1e-12);
    }
}

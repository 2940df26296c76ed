//! The `vision` modality: images from a Parquet column (PNG/JPEG bytes or a Hugging Face
//! `{bytes, path}` struct), a ViT trained with MAE or SimCLR (ssl-vision); previews of
//! reconstructions; embeddings; linear-probe / k-NN evaluation against a random-init encoder
//! of the same shape and raw pixels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ssl_core::checkpoint::{read_state, MODEL_FILE};
use ssl_core::nn::MatmulPrecision;
use ssl_core::probe::{
    fit_linear_probe, knn_accuracy, stratified_split, KnnConfig, LinearProbeConfig,
};
use ssl_core::{
    parse_device, BatchSource, Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, StopFlag,
    TrainConfig, Trainer,
};
use ssl_data::{read_all, ColorMode, ColumnSpec, ReadOptions, Share};
use ssl_vision::preview::save_reconstruction_grid;
use ssl_vision::{
    scaled_lr, AugmentConfig, ImageSet, Images, InMemoryImageSource, MaeConfig, MaeTask, Pooling,
    SimClrConfig, SimClrTask, ViTConfig,
};

use crate::parallel::Parallel;
use crate::{config, CliError};

/// The embedded default data: 1,500 images (28x28 grey) with labels, sampled with a fixed
/// seed from the Fashion-MNIST training split (MIT licence, Zalando Research).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/fashion_mnist_sample.parquet");

/// Which pretext task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionTaskKind {
    /// Masked autoencoder.
    Mae,
    /// SimCLR two-view contrastive learning.
    Simclr,
}

/// `[data]`: where the images are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionDataConfig {
    /// Image column (binary PNG/JPEG or a `{bytes, path}` struct).
    pub column: String,
    /// Label column for `ssl eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings and scores ("" = `file:row`).
    pub id_column: String,
    /// `grey` or `rgb`.
    pub color: ColorMode,
    /// Resize every image to `[height, width]` (empty: keep; all images must then agree).
    pub resize: Vec<usize>,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Use at most this many images (0: all).
    pub max_images: usize,
    /// Images held out from the start of the data for embedding-health figures and previews.
    pub health_examples: usize,
}

impl Default for VisionDataConfig {
    fn default() -> Self {
        VisionDataConfig {
            column: "image".into(),
            label_column: "label".into(),
            id_column: String::new(),
            color: ColorMode::Grey,
            resize: Vec::new(),
            skip_bad_rows: false,
            max_images: 0,
            health_examples: 64,
        }
    }
}

/// `[task]`: which pretext task and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionTaskConfig {
    /// The task.
    pub kind: VisionTaskKind,
    /// When positive, `train.lr = base_lr x batch_size x accum_steps / 256` (MAE's rule).
    pub base_lr: f64,
    /// MAE settings.
    pub mae: MaeConfig,
    /// SimCLR settings.
    pub simclr: SimClrConfig,
    /// Augmentation and normalisation (empty mean/std: measured on the training images).
    pub augment: AugmentConfig,
    /// Write a reconstruction grid every N steps (MAE; 0: only at the end).
    pub preview_every: u64,
    /// Held-out images in each reconstruction grid.
    pub preview_images: usize,
}

impl Default for VisionTaskConfig {
    fn default() -> Self {
        VisionTaskConfig {
            kind: VisionTaskKind::Mae,
            // MAE's 1.5e-4 is tuned for 800 epochs at batch 4096; a one-minute run needs more.
            base_lr: 1.5e-3 * 4.0,
            mae: MaeConfig {
                mask_ratio: 0.75,
                norm_pix_loss: false,
                decoder_dim: 64,
                decoder_depth: 2,
                decoder_heads: 4,
                decoder_mlp_ratio: 2.0,
            },
            simclr: SimClrConfig::default(),
            augment: AugmentConfig {
                mean: Vec::new(),
                std: Vec::new(),
                ..AugmentConfig::default()
            },
            preview_every: 200,
            preview_images: 8,
        }
    }
}

/// The whole configuration of `ssl pretrain vision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// Training loop (MAE's recipe: AdamW betas (0.9, 0.95), weight decay 0.05, cosine).
    pub train: TrainConfig,
    /// Data.
    pub data: VisionDataConfig,
    /// The ViT (image size and channels are filled in from the data).
    pub model: ViTConfig,
    /// The pretext task.
    pub task: VisionTaskConfig,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            // Sized for the embedded sample: about a minute in release on 2 cores (README).
            train: TrainConfig {
                max_steps: 800,
                batch_size: 64,
                lr: 1e-3,
                warmup_steps: 40,
                beta1: 0.9,
                beta2: 0.95,
                weight_decay: 0.05,
                grad_clip: 0.0,
                checkpoint_every_steps: 200,
                checkpoint_every_minutes: 30.0,
                health_every: 100,
                ..TrainConfig::default()
            },
            data: VisionDataConfig::default(),
            model: ViTConfig {
                image_height: 0,
                image_width: 0,
                channels: 0,
                patch_size: 7,
                dim: 64,
                depth: 4,
                heads: 4,
                mlp_ratio: 2.0,
                layer_norm_eps: 1e-6,
                pooling: Pooling::Cls,
            },
            task: VisionTaskConfig::default(),
        }
    }
}

/// Images (and ids, labels) read from Parquet.
pub struct LoadedImages {
    /// The pixels, `[0, 1]`.
    pub images: ImageSet,
    /// Row ids.
    pub ids: Vec<String>,
    /// Labels as class ids, when asked for.
    pub labels: Option<Vec<i64>>,
}

/// Reads the image column (and label / id columns) of every file, directory or glob.
pub fn load_images(
    paths: &[String],
    cfg: &VisionDataConfig,
    label_column: Option<&str>,
) -> Result<LoadedImages, CliError> {
    load_images_of(paths, cfg, label_column, None)
}

/// [`load_images`] for this rank's share of the rows when `par` is given (every row
/// otherwise). With a share, `data.max_images` keeps the rows whose global row index is below
/// it; reading everything, it keeps the first `max_images` rows read (the same rows unless bad
/// rows were skipped).
fn load_images_of(
    paths: &[String],
    cfg: &VisionDataConfig,
    label_column: Option<&str>,
    par: Option<&Parallel>,
) -> Result<LoadedImages, CliError> {
    let resize = match cfg.resize.as_slice() {
        [] => None,
        [h, w] => Some([*h, *w]),
        other => {
            return Err(CliError::Config(format!(
                "data.resize = {other:?}: give [height, width] or []"
            )))
        }
    };
    let mut columns = vec![ColumnSpec::image(cfg.column.as_str(), cfg.color, resize)];
    if let Some(l) = label_column {
        columns.push(ColumnSpec::label(l));
    }
    if !cfg.id_column.is_empty() {
        columns.push(ColumnSpec::id(cfg.id_column.as_str()));
    }
    let options = match par {
        Some(p) => p.read_options(cfg.skip_bad_rows),
        None => ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..Default::default()
        },
    };
    let table = read_all(paths, &columns, &options)?;
    if let Some(p) = par {
        p.report_share(&table.share, table.row_index.len(), "images");
    }
    if table.bad_rows.count > 0 {
        eprintln!(
            "skipped {} bad rows: {}",
            table.bad_rows.count, table.bad_rows
        );
    }
    let batch = table.batch;
    let img = batch.image(&cfg.column)?;
    let [b, c, h, w] = img.shape;
    let per = c * h * w;
    if table.share != Share::All {
        let keep: Vec<usize> = (0..b)
            .filter(|&k| cfg.max_images == 0 || table.row_index[k] < cfg.max_images)
            .collect();
        let images = ImageSet::new(
            keep.iter()
                .flat_map(|&k| img.data[k * per..(k + 1) * per].iter().copied())
                .collect(),
            [c, h, w],
        )
        .map_err(|e| CliError::Config(e.to_string()))?;
        let labels = match label_column {
            Some(l) => {
                let ids = batch.labels(l)?;
                Some(keep.iter().map(|&k| ids[k]).collect())
            }
            None => None,
        };
        return Ok(LoadedImages {
            images,
            ids: keep.iter().map(|&k| batch.ids()[k].clone()).collect(),
            labels,
        });
    }
    let keep = if cfg.max_images > 0 {
        cfg.max_images.min(b)
    } else {
        b
    };
    let images = ImageSet::new(img.data[..keep * per].to_vec(), [c, h, w])
        .map_err(|e| CliError::Config(e.to_string()))?;
    let labels = match label_column {
        Some(l) => Some(batch.labels(l)?[..keep].to_vec()),
        None => None,
    };
    Ok(LoadedImages {
        images,
        ids: batch.ids()[..keep].to_vec(),
        labels,
    })
}

/// Encoder plus task behind one type.
pub enum AnyVisionTask {
    /// MAE.
    Mae(MaeTask),
    /// SimCLR.
    Simclr(SimClrTask),
}

impl AnyVisionTask {
    /// Builds the task of `cfg` with fresh parameters.
    pub fn build(cfg: &VisionConfig, device: &Device) -> Result<(ParamStore, Self), CliError> {
        let store = ParamStore::new(device);
        let pb = store.builder(cfg.train.seed);
        let task = match cfg.task.kind {
            VisionTaskKind::Mae => AnyVisionTask::Mae(
                MaeTask::new(&cfg.model, &cfg.task.mae, &cfg.task.augment, &pb).map_err(vis)?,
            ),
            VisionTaskKind::Simclr => AnyVisionTask::Simclr(
                SimClrTask::new(&cfg.model, &cfg.task.simclr, &cfg.task.augment, &pb)
                    .map_err(vis)?,
            ),
        };
        Ok((store, task))
    }

    /// Pooled embeddings with an explicit pooling (evaluation mode).
    fn embed_with(
        &self,
        batch: &Images,
        pooling: Pooling,
        precision: MatmulPrecision,
    ) -> Result<Tensor, CliError> {
        let (vit, augment) = match self {
            AnyVisionTask::Mae(t) => (t.encoder(), t.augment()),
            AnyVisionTask::Simclr(t) => (t.encoder(), t.augment()),
        };
        let pixels = ssl_vision::augment::normalize_batch(&batch.pixels, augment).map_err(vis)?;
        let mut rng = SslRng::new(0);
        let x = vit.embed_patches(&pixels).map_err(vis)?;
        let (out, _) = vit
            .forward_tokens(&x, &mut Ctx::inference(&mut rng).with_precision(precision))
            .map_err(vis)?;
        vit.pool_with(&out, pooling).map_err(vis)
    }
}

/// ssl-vision errors as CLI errors.
pub fn vis(e: ssl_vision::VisionError) -> CliError {
    match e {
        ssl_vision::VisionError::Core(c) => CliError::Core(c),
        ssl_vision::VisionError::Candle(c) => CliError::Candle(c),
        other => CliError::Config(other.to_string()),
    }
}

impl PretextTask for AnyVisionTask {
    type Batch = Images;
    fn params(&self) -> &ParamStore {
        match self {
            AnyVisionTask::Mae(t) => t.params(),
            AnyVisionTask::Simclr(t) => t.params(),
        }
    }
    fn forward(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            AnyVisionTask::Mae(t) => t.forward(batch, ctx),
            AnyVisionTask::Simclr(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &Images,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            AnyVisionTask::Mae(t) => t.forward_backward(batch, ctx),
            AnyVisionTask::Simclr(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            AnyVisionTask::Mae(t) => t.embed(batch, ctx),
            AnyVisionTask::Simclr(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &Images) -> usize {
        batch.len()
    }
}

/// A batch source that writes a reconstruction grid every `every` optimizer steps.
struct PreviewSource<'a> {
    inner: InMemoryImageSource,
    task: &'a AnyVisionTask,
    images: Option<Images>,
    every: u64,
    accum: u64,
    pulled: u64,
    dir: PathBuf,
    seed: u64,
}

impl BatchSource<Images> for PreviewSource<'_> {
    fn next_batch(&mut self) -> ssl_core::Result<Images> {
        if let (AnyVisionTask::Mae(t), Some(imgs)) = (self.task, &self.images) {
            let step = self.pulled / self.accum;
            if self.every > 0
                && self.pulled.is_multiple_of(self.accum)
                && step > 0
                && step.is_multiple_of(self.every)
            {
                let p = self.dir.join(format!("step-{step:08}.png"));
                save_reconstruction_grid(t, imgs, self.seed, &p)?;
            }
        }
        self.pulled += 1;
        self.inner.next_batch()
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn position(&self) -> Value {
        self.inner.position()
    }
    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        self.inner.restore(position)
    }
}

/// Fills the data-dependent parts of the configuration and checks it.
///
/// `images` is this rank's share: with several ranks the normalisation statistics are taken
/// over every rank's images (moments added over ranks), as one process would.
fn complete_config(
    cfg: &mut VisionConfig,
    images: &ImageSet,
    par: &Parallel,
) -> Result<(), CliError> {
    let [c, h, w] = images.shape;
    for (key, have, want) in [
        ("model.channels", cfg.model.channels, c),
        ("model.image_height", cfg.model.image_height, h),
        ("model.image_width", cfg.model.image_width, w),
    ] {
        if have != 0 && have != want {
            return Err(CliError::Config(format!(
                "{key} = {have} but the data's images have {want} (set data.resize to change the size)"
            )));
        }
    }
    cfg.model.channels = c;
    cfg.model.image_height = h;
    cfg.model.image_width = w;
    let aug = &mut cfg.task.augment;
    if aug.mean.is_empty() || aug.std.is_empty() {
        let (m, s) = par.channel_stats(&images.data, c, h * w)?;
        if aug.mean.is_empty() {
            aug.mean = m;
        }
        if aug.std.is_empty() {
            aug.std = s;
        }
    }
    if cfg.task.base_lr > 0.0 {
        cfg.train.lr = scaled_lr(
            cfg.task.base_lr,
            cfg.train.batch_size,
            cfg.train.accum_steps,
        );
    }
    cfg.model.validate().map_err(vis)?;
    cfg.train.validate()?;
    Ok(())
}

/// `ssl pretrain vision`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let mut cfg: VisionConfig = config::resolve(&VisionConfig::default(), base.as_deref(), set)?;
    let device = parse_device(&cfg.train.device)?;
    let _embedded;
    let paths: Vec<String> = if data.is_empty() {
        let (dir, p) = config::write_embedded("fashion_mnist_sample.parquet", EMBEDDED_TRAIN)?;
        eprintln!("no --data given: training on the embedded sample (1,500 Fashion-MNIST images, 28x28 grey)");
        _embedded = dir;
        vec![p]
    } else {
        data.to_vec()
    };
    let (mut par, device) = Parallel::init(device)?;
    // Each rank reads its share of the rows (its row groups).
    let loaded = load_images_of(&paths, &cfg.data, None, Some(&par))?;
    complete_config(&mut cfg, &loaded.images, &par)?;
    if par.is_main() {
        config::write_run_config(out, &config::to_toml(&cfg)?)?;
    }
    let (store, mut task) = AnyVisionTask::build(&cfg, &device)?;
    if let (AnyVisionTask::Simclr(t), true) = (&mut task, par.world > 1) {
        // NT-Xent's negatives span every rank: each step gathers all ranks' views.
        t.gather_across(par.shared());
    }
    let n = loaded.images.len();
    eprintln!(
        "{n} images {}x{}x{}; {:?} task; lr {:.3e}; {} parameters",
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
        cfg.task.kind,
        cfg.train.lr,
        store.num_elements()
    );
    // The health batch and the previews are rank 0's first images: rank 0 reads row group 0,
    // so they are the source's first images as in one process as long as they fit in it.
    let n_health = cfg.data.health_examples.min(n);
    let heldout = (n_health >= 2)
        .then(|| loaded.images.batch(0, n_health, &device))
        .transpose()
        .map_err(vis)?;
    // Previews are written by rank 0 only.
    let n_prev = if par.is_main() {
        cfg.task.preview_images.min(n)
    } else {
        0
    };
    let preview_imgs = (n_prev > 0)
        .then(|| loaded.images.batch(0, n_prev, &device))
        .transpose()
        .map_err(vis)?;
    let inner =
        InMemoryImageSource::new(loaded.images, cfg.train.batch_size, cfg.train.seed, &device)
            .map_err(vis)?;
    let preview_dir = out.join("previews");
    // On resume, previews continue the step numbering of the checkpoint resumed from.
    let accum = cfg.train.accum_steps.max(1) as u64;
    let resumed_step = if resume {
        ssl_core::checkpoint::CheckpointManager::new(out.join("checkpoints"), 1)
            .latest()?
            .map(|c| read_state(&c).map(|s| s.step))
            .transpose()?
            .unwrap_or(0)
    } else {
        0
    };
    let mut source = PreviewSource {
        inner,
        task: &task,
        images: preview_imgs.clone(),
        every: cfg.task.preview_every,
        accum,
        pulled: resumed_step * accum,
        dir: preview_dir.clone(),
        seed: cfg.train.seed,
    };
    let run_config = serde_json::to_value(&cfg).map_err(|e| CliError::Config(e.to_string()))?;
    let mut trainer = LoopTrainer::new(cfg.train.clone(), Some(out.to_path_buf()))?
        .resume(resume)
        .run_config(run_config)
        .stop_flag(StopFlag::from_signals()?)
        .progress(true)
        .collective(par.take());
    let report = trainer.fit(&task, &mut source, heldout.as_ref())?;
    if !par.is_main() {
        return Ok(());
    }
    if let (AnyVisionTask::Mae(t), Some(imgs)) = (&task, &preview_imgs) {
        save_reconstruction_grid(t, imgs, cfg.train.seed, &preview_dir.join("final.png"))
            .map_err(vis)?;
    }
    let last = report.losses.last().map(|(_, l)| *l).unwrap_or(f64::NAN);
    let first = report.losses.first().map(|(_, l)| *l).unwrap_or(f64::NAN);
    if report.interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint written, continue with --resume",
            report.step
        );
    }
    eprintln!(
        "done: step {} (loss {first:.4} -> {last:.4}); checkpoint {}; metrics {}; previews {}",
        report.step,
        report
            .last_checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        out.join("metrics.jsonl").display(),
        preview_dir.display()
    );
    Ok(())
}

/// Loads a checkpoint's model with its stored configuration (`set` overrides keys).
pub fn load_model(
    checkpoint: &Path,
    set: &[String],
) -> Result<(PathBuf, VisionConfig, AnyVisionTask, Device), CliError> {
    let (ckpt, cfg): (PathBuf, VisionConfig) = config::from_checkpoint(checkpoint, "vision", set)?;
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = AnyVisionTask::build(&cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((ckpt, cfg, task, device))
}

/// Checks that loaded images match the model's shape, with a message naming the setting.
pub fn check_shape(images: &ImageSet, cfg: &VisionConfig) -> Result<(), CliError> {
    let want = [
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
    ];
    if images.shape != want {
        return Err(CliError::Config(format!(
            "the images are {:?} (channels, height, width) but the model was trained on {want:?}; set data.resize / data.color",
            images.shape
        )));
    }
    Ok(())
}

fn embed_all(
    task: &AnyVisionTask,
    images: &ImageSet,
    pooling: Pooling,
    batch: usize,
    device: &Device,
    precision: MatmulPrecision,
) -> Result<(Vec<f32>, usize), CliError> {
    let mut out = Vec::new();
    let mut dim = 0;
    for start in (0..images.len()).step_by(batch.max(1)) {
        let b = images.batch(start, batch.max(1), device).map_err(vis)?;
        let e = task.embed_with(&b, pooling, precision)?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

/// `ssl embed vision` (pooling from `model.pooling`: `cls` or `mean`).
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let loaded = load_images(data, &cfg.data, None)?;
    check_shape(&loaded.images, &cfg)?;
    let (emb, dim) = embed_all(
        &task,
        &loaded.images,
        cfg.model.pooling,
        cfg.train.batch_size,
        &device,
        cfg.train.matmul_precision,
    )?;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-vision ViT".to_string());
    meta.insert("checkpoint".to_string(), ckpt.display().to_string());
    meta.insert(
        "pooling".to_string(),
        format!("{:?}", cfg.model.pooling).to_lowercase(),
    );
    meta.insert(
        "task".to_string(),
        format!("{:?}", cfg.task.kind).to_lowercase(),
    );
    crate::embeddings::write_embeddings(out, &loaded.ids, &emb, dim, meta)?;
    eprintln!(
        "wrote {} embeddings of dimension {dim} to {}",
        loaded.ids.len(),
        out.display()
    );
    Ok(())
}

/// Linear-probe and k-NN accuracy of features (`train`, `test`) of width `dim`.
fn probe(
    tr: &[f32],
    tr_y: &[usize],
    te: &[f32],
    te_y: &[usize],
    dim: usize,
    n_classes: usize,
    seed: u64,
) -> Result<Value, CliError> {
    let p = fit_linear_probe(
        tr,
        tr_y,
        dim,
        n_classes,
        &LinearProbeConfig {
            seed,
            ..Default::default()
        },
    )?;
    let linear = p.accuracy(te, te_y)?;
    let knn = knn_accuracy(tr, tr_y, te, te_y, dim, n_classes, &KnnConfig::default())?;
    Ok(json!({"linear_probe_accuracy": linear, "knn_accuracy": knn, "dim": dim}))
}

/// `ssl eval vision`: one JSON object with the pretrained encoder's probes, the same for a
/// randomly initialised encoder of the same shape, and for raw (normalised) pixels.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let train = load_images(data, &cfg.data, Some(&label))?;
    check_shape(&train.images, &cfg)?;
    let test = if test.is_empty() {
        None
    } else {
        let t = load_images(test, &cfg.data, Some(&label))?;
        check_shape(&t.images, &cfg)?;
        Some(t)
    };
    let to_ids = |l: &Option<Vec<i64>>| -> Result<Vec<usize>, CliError> {
        l.as_ref()
            .ok_or_else(|| CliError::Config(format!("no labels read from column `{label}`")))?
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| {
                    CliError::Config(format!("label {v} in column `{label}` is negative"))
                })
            })
            .collect()
    };
    let train_y = to_ids(&train.labels)?;
    let (tr_set, tr_y, te_set, te_y) = match &test {
        Some(t) => (
            train.images.clone(),
            train_y,
            t.images.clone(),
            to_ids(&t.labels)?,
        ),
        None => {
            let (a, b) = stratified_split(&train_y, 0.2, cfg.train.seed)?;
            (
                train.images.select(&a),
                a.iter().map(|&i| train_y[i]).collect(),
                train.images.select(&b),
                b.iter().map(|&i| train_y[i]).collect(),
            )
        }
    };
    let n_classes = tr_y.iter().chain(&te_y).max().map_or(0, |m| m + 1);
    let bs = cfg.train.batch_size;
    let pooling = cfg.model.pooling;
    // The run's product precision (`train.matmul_precision`) applies to embedding too.
    let prec = cfg.train.matmul_precision;
    let (tr, dim) = embed_all(&task, &tr_set, pooling, bs, &device, prec)?;
    let (te, _) = embed_all(&task, &te_set, pooling, bs, &device, prec)?;
    let pretrained = probe(&tr, &tr_y, &te, &te_y, dim, n_classes, cfg.train.seed)?;
    let (_, random) = AnyVisionTask::build(&cfg, &device)?;
    let (rtr, _) = embed_all(&random, &tr_set, pooling, bs, &device, prec)?;
    let (rte, _) = embed_all(&random, &te_set, pooling, bs, &device, prec)?;
    let random_init = probe(&rtr, &tr_y, &rte, &te_y, dim, n_classes, cfg.train.seed)?;
    let norm = |s: &ImageSet| -> Vec<f32> {
        let mut v = s.data.clone();
        let c = s.shape[0];
        let hw = s.shape[1] * s.shape[2];
        let a = &cfg.task.augment;
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
    };
    let px_dim = tr_set.image_len();
    let raw = probe(
        &norm(&tr_set),
        &tr_y,
        &norm(&te_set),
        &te_y,
        px_dim,
        n_classes,
        cfg.train.seed,
    )?;
    let report = json!({
        "checkpoint": ckpt.display().to_string(),
        "pooling": format!("{pooling:?}").to_lowercase(),
        "pretrained": pretrained,
        "random_init": random_init,
        "raw_pixels": raw,
        "n_train": tr_y.len(),
        "n_test": te_y.len(),
        "n_classes": n_classes,
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_read_their_images_with_global_caps_and_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.parquet");
        // 1,500 images in row groups of 100 (15 groups).
        crate::parallel::regroup(EMBEDDED_TRAIN, 100, &path);
        let paths = vec![path.to_string_lossy().into_owned()];
        let data = VisionDataConfig {
            max_images: 1000,
            ..VisionDataConfig::default()
        };
        let one = load_images(&paths, &data, None).unwrap();
        assert_eq!(one.ids.len(), 1000);
        // One process's normalisation statistics.
        let single = crate::parallel::on_ranks(1, |p| {
            let mut c = VisionConfig::default();
            complete_config(&mut c, &one.images, &p).unwrap();
            c.task.augment
        });
        let want_stats = &single[0];
        let out = crate::parallel::on_ranks(2, |p| {
            let l = load_images_of(&paths, &data, None, Some(&p)).unwrap();
            let mut c = VisionConfig::default();
            complete_config(&mut c, &l.images, &p).unwrap();
            (l.ids, c.task.augment.mean, c.task.augment.std)
        });
        let mut ids = Vec::new();
        for (rank_ids, mean, std) in out {
            // 5 groups of 100 below the cap on each rank.
            assert_eq!(rank_ids.len(), 500);
            ids.extend(rank_ids);
            for (a, b) in mean.iter().zip(&want_stats.mean) {
                assert!((a - b).abs() < 1e-6, "{mean:?}");
            }
            for (a, b) in std.iter().zip(&want_stats.std) {
                assert!((a - b).abs() < 1e-6, "{std:?}");
            }
        }
        let mut want = one.ids.clone();
        want.sort();
        ids.sort();
        assert_eq!(ids, want);
    }
}

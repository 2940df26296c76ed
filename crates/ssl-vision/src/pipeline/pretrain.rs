//! `pretrain`: a ViT trained with MAE or SimCLR on the images of Parquet files, with
//! reconstruction previews, checkpoints and metrics in a run directory.

use std::path::{Path, PathBuf};

use serde::Serialize;
use ssl_core::probe::KNN_BANK_MAX;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{heldout_task_loss, parse_device, HeldoutEval, HookCtx, TrainHook};
use ssl_data::heldout_label_column;

use super::config::VisionConfig;
use super::heldout::read_heldout;
use super::online_knn::OnlineKnn;
use super::previews::Previews;
use super::stats::sample_training_images;
use super::stream::{ImageReader, StreamingImageSource};
use super::task::{build_task, VisionTask};
use crate::export::{run_normalisation, write_vit_hf_dir, HF_DIR, VISION_RUN_PREFIX};
use crate::{ImageSet, Result, VisionError};
use candle_core::Device;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::read_safetensors;

/// Pixels of the preparation pass's images kept for the health batch, the previews and the
/// online k-NN bank, at most (the bank shrinks to fit).
const SAMPLE_BYTES: usize = 64 << 20;

/// What [`pretrain`] returns: the run's summary and where its previews are.
#[derive(Debug, Clone, Serialize)]
pub struct VisionRunSummary {
    /// Steps, losses, checkpoint.
    pub run: RunSummary,
    /// The reconstruction grids (`step-NNNNNNNN.png`, `final.png`; MAE only).
    pub previews: PathBuf,
    /// The Hugging Face directory (`out/hf`, see [`crate::export`]) of the newest weights;
    /// `None` on ranks other than 0.
    pub hf: Option<PathBuf>,
}

impl VisionRunSummary {
    /// Prints what `ssl pretrain vision` prints at the end: an interruption, and the `done:`
    /// line with the checkpoint, metrics and previews.
    pub fn print(&self) {
        let metrics = self.run.dir.join("metrics.jsonl");
        let mut files: Vec<(&str, &Path)> =
            vec![("metrics", &metrics), ("previews", &self.previews)];
        if let Some(hf) = &self.hf {
            files.push(("Hugging Face export", hf));
        }
        self.run.print_done("", &files);
    }
}

/// Pretrains the ViT of `cfg` on the images of `data` (Parquet files, directories or globs;
/// at least one) into the run directory `out`: `config.toml` (the completed configuration),
/// `checkpoints/`, `metrics.jsonl`, and `previews/` (MAE reconstruction grids every
/// `task.preview_every` steps and `final.png`).
///
/// The data-dependent settings are filled in first ([`VisionConfig::complete`]). With several
/// ranks each reads its share of the row groups; rank 0 writes the configuration, the
/// previews and prints the summary. Progress goes to stderr.
pub fn pretrain(
    mut cfg: VisionConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<VisionRunSummary> {
    if data.is_empty() {
        return Err(VisionError::Config(
            "no image data given: pass at least one Parquet file, directory or glob".into(),
        ));
    }
    // Settings that need no data are checked before any is read.
    cfg.task.simclr.validate()?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    // Checked and locked before anything is written.
    let run = opts.run_dir(out, &par)?;
    // The images stream: the footers are read here (the `data.max_images` sample is decided
    // from their row count), the pixels only by the passes below and the training stream.
    // Labels are read when there are held-out images and the data has `data.label_column`
    // (for the online k-NN).
    let d = &cfg.data;
    let label = heldout_label_column(data, &d.label_column, d.heldout_fraction)?;
    let reader = ImageReader::open(data, &cfg.data, label.as_deref(), cfg.train.seed)?;
    // The online k-NN accuracy (`eval_knn_accuracy`) runs in one process only (each rank
    // would hold a share of the bank).
    let knn_wanted = label.is_some() && par.world == 1;
    if label.is_some() && !knn_wanted && par.is_main() {
        eprintln!(
            "note: the held-out k-NN accuracy is computed in one process only; not with {} ranks",
            par.world
        );
    }
    // The preparation pass: normalisation statistics from the first `data.stats_images`
    // training images (seeded order, summed over ranks), keeping the few images the run
    // shows (health batch, previews, the k-NN bank) within SAMPLE_BYTES.
    let (n_health, n_prev) = (cfg.data.health_examples, cfg.task.preview_images);
    let keep = |shape: [usize; 3]| {
        let bank = if knn_wanted { KNN_BANK_MAX } else { 0 };
        let per = (shape.iter().product::<usize>() * 4).max(1);
        n_health
            .max(n_prev)
            .max(bank)
            .min((SAMPLE_BYTES / per).max(n_health.max(n_prev)))
    };
    let sample = sample_training_images(&reader, cfg.data.stats_images, keep, &par)?;
    let (held, held_labels) = if cfg.data.heldout_fraction > 0.0 {
        read_heldout(&reader, sample.shape, cfg.data.heldout_max_images, &par)?
    } else {
        (ImageSet::new(Vec::new(), sample.shape)?, None)
    };
    let lr_rule = cfg.complete_with(
        sample.shape,
        || sample.stats_over_ranks(&par),
        sample.local_images(),
        &par,
    )?;
    // Epochs: the schedule's steps from the footers' row count (the kept rows less the
    // held-out fraction), before the trainer is built.
    let per_epoch = reader.training_rows();
    if let Some(steps) = cfg.train.apply_epochs(per_epoch, par.world) {
        if par.is_main() {
            eprintln!(
                "train.max_epochs {} x {per_epoch} training images (from the Parquet footers) / (batch {} x accum_steps {} x {} rank(s)) = {steps} steps",
                cfg.train.max_epochs, cfg.train.batch_size, cfg.train.accum_steps, par.world
            );
        }
    }
    cfg.check_memory(sample.local_images())?;
    if par.is_main() {
        eprintln!("learning rate: {lr_rule}");
    }
    // SimCLR's NT-Xent negatives span every rank: each step gathers all ranks' views.
    let ranks = (par.world > 1).then(|| par.shared());
    let (store, task) = build_task(&cfg, &device, ranks)?;
    // A resumed run's model must match its checkpoint before the configuration is replaced.
    run.check_params(&store)?;
    if par.is_main() {
        run_dir::write_config(out, &cfg)?;
        eprintln!(
            "{per_epoch} images {}x{}x{}; {:?} task; lr {:.3e}; {} parameters",
            cfg.model.channels,
            cfg.model.image_height,
            cfg.model.image_width,
            cfg.task.kind,
            cfg.train.lr,
            store.num_elements()
        );
    }
    // The health batch and the previews are the first images of the preparation pass
    // (rank 0's are the ones written).
    let n = sample.images.len();
    let n_health = n_health.min(n);
    let heldout = (n_health >= 2)
        .then(|| sample.images.batch(0, n_health, &device))
        .transpose()?;
    // Previews are written by rank 0 only.
    let n_prev = if par.is_main() { n_prev.min(n) } else { 0 };
    let preview_imgs = (n_prev > 0)
        .then(|| sample.images.batch(0, n_prev, &device))
        .transpose()?;
    // The online k-NN accuracy: a bank of the sample's labelled training images against the
    // held-out ones.
    let knn = match (&sample.labels, &held_labels) {
        (Some(ty), Some(hy)) if knn_wanted => OnlineKnn::new(
            &sample.images,
            ty,
            held.clone(),
            hy,
            cfg.train.seed,
            cfg.model.pooling,
            cfg.train.batch_size,
        ),
        _ => None,
    };
    // The batch a step takes: `train.batch_size`, capped by this rank's images when it holds
    // fewer (as the learning-rate rule assumed).
    let batch = cfg.train.batch_size.min(sample.local_images()).max(1);
    let mut source = StreamingImageSource::from_reader(reader, &cfg, batch, &par, &device)?;
    drop(sample);
    let preview_dir = out.join("previews");
    let mut previews = match (task.as_mae(), preview_imgs) {
        (Some(mae), Some(images)) => Some(Previews {
            mae,
            images,
            every: cfg.task.preview_every,
            dir: preview_dir.clone(),
            seed: cfg.train.seed,
            tensorboard: None,
        }),
        _ => None,
    };
    let run_config = serde_json::to_value(&cfg).map_err(|e| VisionError::Config(e.to_string()))?;
    let mut trainer = opts.trainer(&cfg.train, out, run_config, &par)?;
    // Held-out pretext loss (`eval_loss`: MAE's reconstruction loss, SimCLR's NT-Xent) every
    // `train.eval_every_steps` and at the end, summed over ranks. SimCLR's forward gathers
    // every rank's views, so with several ranks only MAE is evaluated.
    let held_total = par.sum_f64(&[held.len() as f64])?[0];
    let bs = cfg.train.batch_size;
    let held_batches = (0..held.len())
        .step_by(bs.max(1))
        .map(|s| held.batch(s, bs.min(held.len() - s), &device))
        .collect::<Result<Vec<_>>>()?;
    let seed = cfg.train.seed;
    let mut eval = (held_total > 0.0 && (par.world == 1 || task.as_mae().is_some())).then(|| {
        HeldoutEval::new(&cfg.train, |ctx: &HookCtx<'_, Box<dyn VisionTask>>| {
            let mut figures =
                heldout_task_loss(&par, ctx.task, &held_batches, seed, ctx.precision)?;
            if let Some(k) = &knn {
                let acc = k.accuracy(ctx.task.as_ref(), &device, ctx.precision)?;
                figures.insert("knn_accuracy".into(), acc);
            }
            Ok(figures)
        })
    });
    let mut hooks: Vec<&mut dyn TrainHook<Box<dyn VisionTask>>> = Vec::new();
    if let Some(p) = &mut previews {
        hooks.push(p);
    }
    if let Some(e) = &mut eval {
        hooks.push(e);
    }
    let report = trainer.fit_with_hooks(&task, &mut source, heldout.as_ref(), &mut hooks)?;
    run.finish();
    let bad = source.bad_rows();
    if bad.count > 0 {
        let who = if par.world > 1 {
            format!("rank {}: ", par.rank)
        } else {
            String::new()
        };
        eprintln!("{who}training images: {bad}");
    }
    // The newest weights (those of the last checkpoint), exported for transformers.
    let hf = if par.is_main() {
        let (params, source) = match &report.last_checkpoint {
            Some(ck) => {
                let path = ck.join(MODEL_FILE);
                (read_safetensors(&path, &Device::Cpu)?, path)
            }
            None => (store.tensors()?, out.to_path_buf()),
        };
        let dir = out.join(HF_DIR);
        write_vit_hf_dir(
            &cfg.model,
            &params,
            VISION_RUN_PREFIX,
            run_normalisation(&cfg),
            &source,
            &dir,
        )?;
        Some(dir)
    } else {
        None
    };
    Ok(VisionRunSummary {
        run: RunSummary::new(out, &report, par.rank),
        previews: preview_dir,
        hf,
    })
}

//! `pretrain`: a ViT trained with MAE or SimCLR on the images of Parquet files, with
//! reconstruction previews, checkpoints and metrics in a run directory.

use std::path::{Path, PathBuf};

use serde::Serialize;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{heldout_task_loss, parse_device, HeldoutEval, HookCtx, TrainHook};
use ssl_data::{heldout_label_column, is_heldout};

use super::config::VisionConfig;
use super::images::{load_rank_images, LoadedImages};
use super::online_knn::OnlineKnn;
use super::previews::Previews;
use super::task::{build_task, VisionTask};
use crate::{ImageSet, InMemoryImageSource, Result, VisionError};

/// What [`pretrain`] returns: the run's summary and where its previews are.
#[derive(Debug, Clone, Serialize)]
pub struct VisionRunSummary {
    /// Steps, losses, checkpoint.
    pub run: RunSummary,
    /// The reconstruction grids (`step-NNNNNNNN.png`, `final.png`; MAE only).
    pub previews: PathBuf,
}

impl VisionRunSummary {
    /// Prints what `ssl pretrain vision` prints at the end: an interruption, and the `done:`
    /// line with the checkpoint, metrics and previews.
    pub fn print(&self) {
        let metrics = self.run.dir.join("metrics.jsonl");
        self.run
            .print_done("", &[("metrics", &metrics), ("previews", &self.previews)]);
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
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    // Checked and locked before anything is written.
    let run = opts.run_dir(out, &par)?;
    // Each rank reads its share of the rows (its row groups), with their labels when there
    // are held-out images and the data has `data.label_column` (for the online k-NN).
    let d = &cfg.data;
    let label = heldout_label_column(data, &d.label_column, d.heldout_fraction)?;
    let mut loaded = load_rank_images(data, &cfg.data, label.as_deref(), &par)?;
    // The held-out split (`data.heldout_fraction`) by global row index, before the
    // normalisation statistics, which are the training images'.
    let (held, held_labels) = split_heldout(&mut loaded, &cfg)?;
    let lr_rule = cfg.complete(&loaded.images, &par)?;
    cfg.check_memory(loaded.images.len())?;
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
        .transpose()?;
    // Previews are written by rank 0 only.
    let n_prev = if par.is_main() {
        cfg.task.preview_images.min(n)
    } else {
        0
    };
    let preview_imgs = (n_prev > 0)
        .then(|| loaded.images.batch(0, n_prev, &device))
        .transpose()?;
    // The online k-NN accuracy (`eval_knn_accuracy`): a fixed bank of labelled training
    // images against the held-out ones, in one process only (each rank holds a share).
    let knn = match (&loaded.labels, &held_labels) {
        (Some(ty), Some(hy)) if par.world == 1 => OnlineKnn::new(
            &loaded.images,
            ty,
            held.clone(),
            hy,
            cfg.train.seed,
            cfg.model.pooling,
            cfg.train.batch_size,
        ),
        (Some(_), Some(_)) => {
            if par.is_main() {
                eprintln!("note: the held-out k-NN accuracy is computed in one process only; not with {} ranks", par.world);
            }
            None
        }
        _ => None,
    };
    let mut source =
        InMemoryImageSource::new(loaded.images, cfg.train.batch_size, cfg.train.seed, &device)?;
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
    Ok(VisionRunSummary {
        run: RunSummary::new(out, &report, par.rank),
        previews: preview_dir,
    })
}

/// Takes the held-out images (`data.heldout_fraction`, by a seeded hash of each image's global
/// row index) out of `loaded`; returns them with their labels (when `loaded` has labels).
fn split_heldout(
    loaded: &mut LoadedImages,
    cfg: &VisionConfig,
) -> Result<(ImageSet, Option<Vec<i64>>)> {
    let frac = cfg.data.heldout_fraction;
    if !(0.0..1.0).contains(&frac) {
        return Err(VisionError::Config(format!(
            "data.heldout_fraction = {frac}: must be in [0, 1)"
        )));
    }
    let (held, kept): (Vec<usize>, Vec<usize>) = (0..loaded.rows.len())
        .partition(|&i| frac > 0.0 && is_heldout(loaded.rows[i], cfg.train.seed, frac));
    let held_set = loaded.images.select(&held);
    let held_labels = loaded
        .labels
        .as_ref()
        .map(|l| held.iter().map(|&i| l[i]).collect());
    if !held.is_empty() {
        loaded.images = loaded.images.select(&kept);
        loaded.ids = kept.iter().map(|&i| loaded.ids[i].clone()).collect();
        loaded.rows = kept.iter().map(|&i| loaded.rows[i]).collect();
        loaded.labels = loaded
            .labels
            .take()
            .map(|l| kept.iter().map(|&i| l[i]).collect());
    }
    Ok((held_set, held_labels))
}

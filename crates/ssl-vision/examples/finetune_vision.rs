//! Label-efficient fine-tuning through the library alone: a vision run (pretrained here first
//! when its directory has no checkpoint) fine-tuned as a classifier at several label
//! fractions, from the pretrained weights and from random initialisation, scored on a test
//! set.
//!
//! ```text
//! cargo run --release -p ssl-vision --example finetune_vision                      # the shipped sample
//! cargo run --release -p ssl-vision --example finetune_vision -- TRAIN TEST RUN OUT [key=value ...]
//! ```
//!
//! `RUN` is a vision run directory (`ssl pretrain vision --out RUN`); without a checkpoint it is
//! pretrained on `TRAIN` with the defaults and `pretrain_steps` steps. Keys: `fractions=0.01,0.1`,
//! `mode=full|frozen`, `epochs=E` (or `steps=N`: a fixed length), `min_steps=N`, `lr=X`
//! (full fine-tuning), `frozen_lr=X` (frozen mode),
//! `batch=N`, `max_images=N` (a seeded sample of the training images), `scratch=false`,
//! `pretrain_steps=N`, `pooling=cls|mean`, `crop=true|false` (the training images' random crops).

use std::path::{Path, PathBuf};

use ssl_core::finetune::FinetuneMode;
use ssl_core::run_dir::RunOptions;
use ssl_vision::{finetune, finetune_config, pretrain, stored_config, Pooling, VisionConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _tmp;
    let (train, test, run, out, keys) = if args.len() >= 4 {
        let p = |i: usize| PathBuf::from(&args[i]);
        (
            vec![args[0].clone()],
            vec![args[1].clone()],
            p(2),
            p(3),
            &args[4..],
        )
    } else {
        // The shipped sample (1,500 labelled images), no test set: a held-out split of it.
        let sample = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ssl-cli/data/fashion_mnist_sample.parquet"
        );
        _tmp = tempfile::tempdir()?;
        let dir = _tmp.path();
        let keys: &[String] = &[];
        (
            vec![sample.to_string()],
            Vec::new(),
            dir.join("run"),
            dir.join("finetune"),
            keys,
        )
    };
    let mut ft = finetune_config();
    ft.label_fractions = vec![0.1, 1.0];
    let mut pretrain_steps = 300;
    let (mut max_images, mut pooling, mut crop) = (0, None, None);
    for kv in keys {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("`{kv}`: expected key=value"))?;
        match k {
            "fractions" => {
                ft.label_fractions = v.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "mode" => {
                ft.mode = match v {
                    "full" => FinetuneMode::Full,
                    "frozen" => FinetuneMode::Frozen,
                    _ => return Err(format!("mode={v}: full or frozen").into()),
                }
            }
            "epochs" => ft.train.max_epochs = v.parse()?,
            "steps" => (ft.train.max_epochs, ft.train.max_steps) = (0.0, v.parse()?),
            "min_steps" => ft.min_steps = v.parse()?,
            "lr" => ft.train.lr = v.parse()?,
            "frozen_lr" => ft.frozen_lr = v.parse()?,
            "batch" => ft.train.batch_size = v.parse()?,
            "max_images" => max_images = v.parse()?,
            "scratch" => ft.compare_scratch = v.parse()?,
            "pretrain_steps" => pretrain_steps = v.parse()?,
            "crop" => crop = Some(v.parse()?),
            "pooling" => {
                pooling = Some(match v {
                    "cls" => Pooling::Cls,
                    "mean" => Pooling::Mean,
                    _ => return Err(format!("pooling={v}: cls or mean").into()),
                })
            }
            _ => return Err(format!("unknown key `{k}`").into()),
        }
    }
    if !has_checkpoint(&run) {
        let mut cfg = VisionConfig::default();
        cfg.train.max_steps = pretrain_steps;
        if let Some(p) = pooling {
            cfg.model.pooling = p;
        }
        pretrain(cfg, &train, &run, &RunOptions::default())?;
    }
    // The completed configuration (image shape, normalisation) is stored with the checkpoint.
    let (ckpt, mut cfg) = stored_config(&run)?;
    cfg.data.max_images = max_images;
    if let Some(p) = pooling {
        cfg.model.pooling = p;
    }
    if let Some(c) = crop {
        cfg.task.augment.crop = c;
    }
    let opts = RunOptions {
        progress: false,
        ..RunOptions::default()
    };
    let report = finetune(&ckpt, &cfg, &ft, &train, &test, &out, &opts)?;
    println!(
        "{} training images, {} test images, {:?} mode",
        report.train_rows, report.test_rows, report.mode
    );
    println!("| fraction | examples | pretrained | scratch |");
    println!("|---|---|---|---|");
    for r in &report.runs {
        let scratch = r
            .scratch
            .as_ref()
            .map_or("-".to_string(), |s| format!("{:.4}", s.test.accuracy));
        println!(
            "| {} | {} | {:.4} | {scratch} |",
            r.label_fraction, r.train_examples, r.pretrained.test.accuracy
        );
    }
    println!("report: {}", out.join("report.json").display());
    Ok(())
}

fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

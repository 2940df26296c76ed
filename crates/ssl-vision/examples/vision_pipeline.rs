//! A tiny MAE pretrained on the Fashion-MNIST sample that ships with ssl-cli (Parquet, PNG
//! bytes and labels), then embeddings and the probe report, through the library alone:
//! `cargo run --release -p ssl-vision --example vision_pipeline`.

use ssl_core::run_dir::RunOptions;
use ssl_vision::{embed, eval, pretrain, stored_config, VisionConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ssl-cli/data/fashion_mnist_sample.parquet"
    );
    let data = vec![sample.to_string()];
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");

    let mut cfg = VisionConfig::default();
    cfg.data.max_images = 600;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (32, 2, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (
        cfg.train.max_steps,
        cfg.train.batch_size,
        cfg.train.warmup_steps,
    ) = (600, 32, 20);
    cfg.train.checkpoint_every_steps = 600;
    let summary = pretrain(cfg, &data, &run, &RunOptions::default())?;
    println!(
        "loss {:.4} -> {:.4}",
        summary.run.first_loss, summary.run.last_loss
    );

    // The completed configuration (image shape, normalisation) is stored with the checkpoint.
    let (ckpt, cfg) = stored_config(&run)?;
    let written = embed(&ckpt, &cfg, &data, &dir.path().join("embeddings.parquet"))?;
    println!("{} embeddings of width {}", written.rows, written.dim);
    // No test set: the probes test on a seeded stratified 20% of the labelled images.
    let report = eval(&ckpt, &cfg, &data, &[], None)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

//! Pretrains a small CLIP model on image-caption pairs from Parquet, embeds the images and
//! evaluates retrieval and zero-shot accuracy, through the pipeline API alone.
//!
//! ```sh
//! cargo run --release -p ssl-multimodal --example multimodal_pipeline
//! ```

use ssl_core::run_dir::RunOptions;
use ssl_multimodal::{embed, eval, pretrain, stored_config, toy, MultimodalConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // 512 coloured shapes (16x16 PNG) with captions and `shape` / `color` label columns.
    let file = dir.path().join("pairs.parquet");
    toy::write_parquet(&toy::toy_pairs(512, 16, 0)?, &file, 128)?;
    let data = vec![file.to_string_lossy().into_owned()];

    let mut cfg = MultimodalConfig::default();
    cfg.train.max_steps = 150;
    cfg.data.resize = vec![16, 16];
    cfg.tokenizer.train.vocab_size = 100;
    cfg.max_seq_len = 12;
    cfg.model.embed_dim = 32;
    cfg.model.image.patch_size = 4;
    cfg.eval.zero_shot_columns = vec!["shape".into(), "color".into()];
    cfg.eval.templates = vec!["a {}".into(), "a {} shape".into()];

    let run = dir.path().join("run");
    pretrain(cfg, &data, &run, &RunOptions::default())?.print();
    let (ckpt, cfg) = stored_config(&run)?;
    let e = embed(&ckpt, &cfg, &data, &dir.path().join("images.parquet"))?;
    println!("{e}");
    let report = eval(&ckpt, &cfg, &data, &[], None)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

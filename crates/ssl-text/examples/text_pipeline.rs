//! Pretrains a tiny BERT on a small labelled Parquet file, embeds and evaluates it, through the
//! public pipeline API: `cargo run --release -p ssl-text --example text_pipeline`.
use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use ssl_core::run_dir::RunOptions;
use ssl_text::{embed, eval, pretrain, stored_config, TextConfig};

const WORDS: [[&str; 4]; 2] = [
    ["kernel", "driver", "module", "interrupt"],
    ["licence", "copyright", "warranty", "notice"],
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 80 short documents on two topics, labelled by topic.
    let doc = |i: usize| {
        format!(
            "the {} of the {} {i}",
            WORDS[i % 2][i % 4],
            WORDS[i % 2][i / 2 % 4]
        )
    };
    let texts: Vec<String> = (0..80).map(doc).collect();
    let labels: Vec<&str> = (0..80).map(|i| ["code", "legal"][i % 2]).collect();
    let batch = RecordBatch::try_from_iter([
        ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
        ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
    ])?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("docs.parquet");
    let file = std::fs::File::create(&path)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    let data = vec![path.to_string_lossy().into_owned()];

    // The tiny preset, 20 steps; 20% of the documents held out for the perplexity curve.
    let mut cfg = TextConfig::default();
    cfg.train.max_steps = 20;
    cfg.train.batch_size = 8;
    cfg.train.checkpoint_every_steps = 10;
    cfg.tokenizer.train.vocab_size = 200;
    cfg.input.max_seq_len = 32;
    cfg.data.heldout_fraction = 0.2;
    let run = dir.path().join("run");
    pretrain(cfg, &data, &run, &RunOptions::default())?.print();

    let (ckpt, cfg) = stored_config(&run)?;
    embed(&ckpt, &cfg, &data, &dir.path().join("embeddings.parquet"))?;
    let report = eval(&ckpt, &cfg, &data, &[], None)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

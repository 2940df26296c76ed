//! Fine-tunes a pretrained text model for classification through the public API, at several
//! label fractions, beside the same model from random initialisation.
//!
//! Without arguments it writes a small labelled Parquet file, pretrains the tiny preset on it
//! for 30 steps and fine-tunes that (a few seconds):
//! `cargo run --release -p ssl-text --example finetune`.
//!
//! With arguments it fine-tunes an existing run or Hugging Face BERT directory:
//! `cargo run --release -p ssl-text --example finetune -- CHECKPOINT DATA OUT [key=value ...]`
//! where the keys are `test=FILE`, `fractions=0.01,0.1,1`, `epochs=3`, `min_steps=100`,
//! `lr=2e-4` (full), `frozen_lr=1e-2` (frozen), `batch=32`, `max_docs=N` (the `data.max_docs` sample), `max_seq_len=N`,
//! `label=COLUMN`, `mode=full|frozen`, `layer_decay=X`, `scratch=true|false`, and
//! `pretrain_steps=N`: first pretrain the default configuration (the tiny preset, batch 32)
//! on DATA for N steps into CHECKPOINT.
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use ssl_core::finetune::FinetuneMode;
use ssl_core::run_dir::RunOptions;
use ssl_text::{finetune, finetune_config, pretrain, stored_config, TextConfig};

const WORDS: [[&str; 4]; 3] = [
    ["kernel", "driver", "module", "interrupt"],
    ["licence", "copyright", "warranty", "notice"],
    ["recipe", "flour", "oven", "butter"],
];

/// 150 short documents on three topics, labelled by topic.
fn write_docs(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let doc = |i: usize| {
        let w = &WORDS[i % 3];
        format!("the {} and the {} {i}", w[i % 4], w[i / 3 % 4])
    };
    let texts: Vec<String> = (0..150).map(doc).collect();
    let labels: Vec<&str> = (0..150).map(|i| ["code", "legal", "food"][i % 3]).collect();
    let batch = RecordBatch::try_from_iter([
        ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
        ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
    ])?;
    let file = std::fs::File::create(path)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut ft = finetune_config();
    let tmp = tempfile::tempdir()?;
    let (ckpt_arg, data, out, rest) = if args.len() >= 3 {
        (
            args[0].clone().into(),
            vec![args[1].clone()],
            args[2].clone().into(),
            &args[3..],
        )
    } else {
        let path = tmp.path().join("docs.parquet");
        write_docs(&path)?;
        let data = vec![path.to_string_lossy().into_owned()];
        let mut cfg = TextConfig::default();
        cfg.train.max_steps = 30;
        cfg.train.batch_size = 8;
        cfg.tokenizer.train.vocab_size = 200;
        cfg.input.max_seq_len = 32;
        let run = tmp.path().join("run");
        pretrain(cfg, &data, &run, &RunOptions::default())?.print();
        ft.label_fractions = vec![0.1, 1.0];
        ft.train.max_epochs = 2.0;
        ft.min_steps = 20;
        (run, data, tmp.path().join("finetuned"), &args[..0])
    };
    let ckpt_arg: std::path::PathBuf = ckpt_arg;
    let out: std::path::PathBuf = out;
    let mut kvs = Vec::new();
    for kv in rest {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
        if k == "pretrain_steps" {
            // Pretrain the default configuration (tiny preset) on DATA into CHECKPOINT first.
            let mut cfg = TextConfig::default();
            cfg.train.max_steps = v.parse()?;
            cfg.train.batch_size = 32;
            cfg.train.warmup_steps = cfg.train.max_steps / 10;
            cfg.train.checkpoint_every_steps = cfg.train.max_steps;
            pretrain(cfg, &data, &ckpt_arg, &RunOptions::default())?.print();
        } else {
            kvs.push((k, v));
        }
    }
    let (ckpt, mut cfg) = stored_config(&ckpt_arg)?;
    let mut test = Vec::new();
    for (k, v) in kvs {
        match k {
            "test" => test.push(v.to_string()),
            "fractions" => {
                ft.label_fractions = v.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "epochs" => ft.train.max_epochs = v.parse()?,
            "min_steps" => ft.min_steps = v.parse()?,
            "lr" => ft.train.lr = v.parse()?,
            "frozen_lr" => ft.frozen_lr = v.parse()?,
            "batch" => ft.train.batch_size = v.parse()?,
            "max_docs" => cfg.data.max_docs = v.parse()?,
            "max_seq_len" => cfg.input.max_seq_len = v.parse()?,
            "label" => ft.label_column = v.to_string(),
            "layer_decay" => ft.layer_decay = v.parse()?,
            "scratch" => ft.compare_scratch = v.parse()?,
            "mode" => {
                ft.mode = match v {
                    "frozen" => FinetuneMode::Frozen,
                    _ => FinetuneMode::Full,
                }
            }
            other => return Err(format!("unknown key {other:?}").into()),
        }
    }
    let report = finetune(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default())?;
    println!("| label fraction | examples | pretrained acc. | scratch acc. | steps |");
    println!("|---|---|---|---|---|");
    for r in &report.runs {
        let scratch = r
            .scratch
            .as_ref()
            .map_or("-".to_string(), |s| format!("{:.3}", s.test.accuracy));
        println!(
            "| {} | {} | {:.3} | {scratch} | {} |",
            r.label_fraction, r.train_examples, r.pretrained.test.accuracy, r.pretrained.steps
        );
    }
    println!(
        "{} classes, {} test rows",
        report.classes.len(),
        report.test_rows
    );
    Ok(())
}

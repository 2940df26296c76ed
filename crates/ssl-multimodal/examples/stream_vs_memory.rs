//! Steps per second of the same CLIP model trained from pairs in memory
//! (`InMemoryPairSource`) and streamed from Parquet (`StreamingPairSource`: decoding,
//! shuffling, tokenizing in background threads), on `N` toy pairs (32x32) written to a
//! temporary file; the first `WARM` steps of each are not timed.
//!
//! ```sh
//! cargo run --release -p ssl-multimodal --example stream_vs_memory -- 20000 400
//! ```

use std::time::Instant;

use candle_core::Device;
use ssl_core::{BatchSource, LoopTrainer, ParamStore, TrainConfig, Trainer};
use ssl_data::ParquetSource;
use ssl_multimodal::*;

const WARM: u64 = 20;

fn steps_per_s(
    source: &mut dyn BatchSource<PairBatch>,
    cfg: &ClipConfig,
    steps: u64,
) -> Result<f64> {
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(cfg, &store.builder(0))?;
    let train = |max_steps| TrainConfig {
        max_steps,
        batch_size: 64,
        warmup_steps: 5,
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        ..TrainConfig::default()
    };
    LoopTrainer::new(train(WARM), None)?.fit(&model, source, None)?;
    let t0 = Instant::now();
    LoopTrainer::new(train(steps), None)?.fit(&model, source, None)?;
    Ok(steps as f64 / t0.elapsed().as_secs_f64())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<std::result::Result<_, _>>()?;
    let (n, steps) = (
        args.first().copied().unwrap_or(20_000),
        args.get(1).copied().unwrap_or(400) as u64,
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pairs.parquet");
    toy::write_parquet(&toy::toy_pairs(n, 32, 0)?, &path, 1000)?;
    let paths = vec![path.to_string_lossy().into_owned()];
    let (pairs, _) = read_pairs(&paths, &PairColumns::default())?;
    let tok = train_caption_tokenizer(&pairs.captions, 200)?;
    let mut cfg = ClipConfig::default();
    cfg.image.image_height = 32;
    cfg.image.image_width = 32;
    cfg.text.vocab_size = tok.get_vocab_size(true);
    let seqs = tokenize_captions(&tok, &pairs.captions, &pairs.ids, 24)?;
    let mut mem = InMemoryPairSource::new(pairs.images.clone(), seqs, &tok, 64, 0, &Device::Cpu)?;
    drop(pairs);
    let source = ParquetSource::open(&paths)?;
    let mut stream = StreamingPairSource::new(
        &source,
        PairStreamConfig {
            columns: PairColumns::default(),
            split: RowSplit {
                seed: 0,
                heldout_fraction: 0.0,
                max_pairs: 0,
                num_rows: n,
            },
            batch_size: 64,
            seed: 0,
            rank: 0,
            world: 1,
            max_seq_len: 24,
            shape: [3, 32, 32],
            shuffle_bytes: 256 << 20,
            workers: 0,
        },
        &tok,
        None,
        &Device::Cpu,
    )?;
    let m = steps_per_s(&mut mem, &cfg, steps)?;
    let s = steps_per_s(&mut stream, &cfg, steps)?;
    println!(
        "{n} pairs, {steps} steps of 64: in memory {m:.1} steps/s, streamed {s:.1} steps/s ({:+.1}%)",
        100.0 * (s / m - 1.0)
    );
    Ok(())
}

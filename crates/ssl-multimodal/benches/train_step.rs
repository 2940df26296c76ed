//! One CLIP training step (both towers forward, symmetric cross-entropy, backward, clipping,
//! AdamW, the `logit_scale` clamp) of the default `ssl pretrain multimodal` model, timed over
//! repeated steps after a warm-up. `bench/train_step_torch.py` runs the same model in PyTorch.
//!
//! Configuration: batch 64 pairs; images 3x32x32, ViT patch 8 (16 patches + class token),
//! width 64, depth 2, 4 heads, MLP 128; captions of 16 tokens, BERT width 64, 2 layers,
//! 4 heads, feed-forward 128, vocabulary 1000; projections to 64; no dropout.
//! The second line times the same batch with gradient caching in chunks of 16.
//!
//! Run: `cargo bench -p ssl-multimodal --bench train_step` (add `-- --steps N` to change N).

use std::time::Instant;

use candle_core::{Device, Tensor};
use ssl_core::{LoopTrainer, ParamStore, RepeatBatch, SslRng, TrainConfig, Trainer};
use ssl_multimodal::{ClipConfig, ClipModel, PairBatch};
use ssl_text::BertInput;
use ssl_vision::Images;

const BATCH: usize = 64;
const SEQ: usize = 16;
const VOCAB: usize = 1000;

fn batch() -> PairBatch {
    let dev = Device::Cpu;
    let mut rng = SslRng::new(0);
    let px = rng.uniform_vec(BATCH * 3 * 32 * 32, 0.0, 1.0);
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|_| 5 + rng.below(VOCAB - 5) as u32)
        .collect();
    PairBatch::new(
        Images::from_vec(px, [BATCH, 3, 32, 32], &dev).expect("images"),
        BertInput {
            input_ids: Tensor::from_vec(ids, (BATCH, SEQ), &dev).expect("ids"),
            attention_mask: Tensor::ones((BATCH, SEQ), candle_core::DType::F32, &dev)
                .expect("mask"),
            token_type_ids: Tensor::zeros((BATCH, SEQ), candle_core::DType::U32, &dev)
                .expect("types"),
        },
    )
    .expect("batch")
}

fn time(name: &str, micro_batch: usize, steps: u64) {
    let mut cfg = ClipConfig {
        micro_batch,
        ..ClipConfig::default()
    };
    cfg.text.vocab_size = VOCAB;
    let store = ParamStore::new(&Device::Cpu);
    let model = ClipModel::new(&cfg, &store.builder(0)).expect("model");
    let b = batch();
    let run = |n: u64| {
        let train = TrainConfig {
            max_steps: n,
            batch_size: BATCH,
            lr: 1e-3,
            warmup_steps: 0,
            log_every: 0,
            health_every: 0,
            grad_clip: 1.0,
            ..TrainConfig::default()
        };
        // The same random batch every step (the bench times compute, not data).
        let mut src = RepeatBatch(b.clone());
        let t0 = Instant::now();
        LoopTrainer::new(train, None)
            .expect("trainer")
            .fit(&model, &mut src, None)
            .expect("fit");
        t0.elapsed().as_secs_f64()
    };
    run(3); // warm-up
    let secs = run(steps);
    println!(
        "{name}: {:.2} ms/step over {steps} steps",
        1e3 * secs / steps as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(20u64);
    time("clip b64 (one pass)", 0, steps);
    time("clip b64 (gradient caching, chunks of 16)", 16, steps);
}

//! One training step (forward, backward, clipping, AdamW) of the two reference
//! configurations, timed over repeated steps after a warm-up. `bench/train_step_torch.py` runs
//! the same models in PyTorch (`OMP_NUM_THREADS=2 python bench/train_step_torch.py`); the crate README reports the ratio.
//!
//! - TS2Vec: dilated convolutions (hidden 64, output 320, depth 10), batch 8 x 150 steps x 1
//!   channel (GunPoint's shape), hierarchical contrastive loss on random overlapping crops;
//!   timed twice, with the composite candle-op blocks and with the fused `TcnOp` (before and
//!   after the fused op; the same seeds, so the same crops).
//! - PatchTST: masked-patch reconstruction, batch 32 x 336 steps x 1 channel, patches of 12,
//!   dim 64, depth 3, 4 heads, MLP 128, mask ratio 0.4.
//!
//! Run: `cargo bench -p ssl-timeseries --bench train_step` (add `-- --steps N` to change N).

use std::time::Instant;

use candle_core::Device;
use ssl_core::nn::{StackKernel, TransformerConfig};
use ssl_core::seq::{InMemorySeqSource, SeqExample};
use ssl_core::{LoopTrainer, ParamStore, PretextTask, SslRng, TrainConfig, Trainer};
use ssl_timeseries::*;

fn series(n: usize, t: usize, seed: u64) -> Vec<SeqExample> {
    let mut rng = SslRng::new(seed);
    (0..n)
        .map(|_| {
            let f = 1.0 + 4.0 * rng.uniform();
            let v = (0..t)
                .map(|s| {
                    (s as f32 * f / t as f32 * std::f32::consts::TAU).sin() + 0.1 * rng.normal()
                })
                .collect();
            SeqExample::new(v, t, 1).expect("valid series")
        })
        .collect()
}

fn time_steps<T: PretextTask<Batch = ssl_core::seq::SeqBatch>>(
    name: &str,
    task: &T,
    data: Vec<SeqExample>,
    batch: usize,
    steps: u64,
) {
    let run = |n: u64| {
        let mut src =
            InMemorySeqSource::new(data.clone(), batch, 0, true, &Device::Cpu).expect("source");
        let cfg = TrainConfig {
            max_steps: n,
            batch_size: batch,
            lr: 1e-3,
            warmup_steps: 0,
            log_every: 0,
            health_every: 0,
            grad_clip: 1.0,
            ..TrainConfig::default()
        };
        let t0 = Instant::now();
        LoopTrainer::new(cfg, None)
            .expect("trainer")
            .fit(task, &mut src, None)
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

    // The composite candle ops, the fused TCN op with the composite loss, then both fused.
    for (label, kernel, loss) in [
        (
            "ts2vec_tcn b8x150 (composite ops)",
            StackKernel::Reference,
            StackKernel::Reference,
        ),
        (
            "ts2vec_tcn b8x150 (fused TcnOp, composite loss)",
            StackKernel::Fused,
            StackKernel::Reference,
        ),
        (
            "ts2vec_tcn b8x150 (fused TcnOp and Ts2VecLossOp)",
            StackKernel::Fused,
            StackKernel::Fused,
        ),
    ] {
        let store = ParamStore::new(&Device::Cpu);
        let mut enc =
            TcnEncoder::new(&TcnConfig::default(), 1, &store.builder(0)).expect("encoder");
        enc.set_kernel(kernel);
        let mut task = Ts2VecTask::new(enc, Ts2VecConfig::default(), &store).expect("task");
        task.set_loss_kernel(loss);
        time_steps(label, &task, series(64, 150, 1), 8, steps);
    }

    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(0);
    let cfg = PatchTstConfig {
        patch_len: 12,
        stride: 12,
        dropout: 0.0,
        transformer: TransformerConfig {
            dim: 64,
            depth: 3,
            heads: 4,
            mlp_dim: 128,
            dropout: 0.0,
            ..TransformerConfig::default()
        },
    };
    let enc = PatchTstEncoder::new(&cfg, 1, &pb).expect("encoder");
    let task = MaskedPatchTask::new(enc, MaskedPatchConfig::default(), &pb).expect("task");
    time_steps(
        "patchtst_masked b32x336",
        &task,
        series(256, 336, 2),
        32,
        steps,
    );
}

//! Trains each of ssl-core's generic pretext tasks on synthetic three-class wave sequences and
//! compares k-NN accuracy of the frozen embeddings with a randomly initialised encoder.
//!
//! ```text
//! cargo run --release -p ssl-core --example pretext_tasks
//! ```

use candle_core::Device;
use ssl_core::nn::TransformerConfig;
use ssl_core::probe::{fit_linear_probe, knn_accuracy, KnnConfig, LinearProbeConfig};
use ssl_core::seq::*;
use ssl_core::{Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, TrainConfig, Trainer};

const STEPS: usize = 48;

fn waves(n: usize, seed: u64) -> (Vec<SeqExample>, Vec<usize>) {
    let mut rng = SslRng::new(seed);
    let (mut ex, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 4;
        let phase = rng.uniform() * std::f32::consts::TAU;
        let values: Vec<f32> = (0..STEPS)
            .map(|t| {
                let a = t as f32 / 12.0 * std::f32::consts::TAU + phase;
                let s = match class {
                    0 => a.sin(),
                    1 => (3.0 * a).sin(),
                    2 => a.sin().signum(),
                    _ => (a / std::f32::consts::PI).rem_euclid(2.0) - 1.0,
                };
                s + 0.2 * rng.normal()
            })
            .collect();
        let mut e = SeqExample::new(values, STEPS, 1).expect("consistent shape");
        e.normalize_instance();
        ex.push(e);
        y.push(class);
    }
    (ex, y)
}

fn embed<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    ex: &[SeqExample],
) -> ssl_core::Result<Vec<f32>> {
    let batch = SeqBatch::from_examples(&ex.iter().collect::<Vec<_>>(), &Device::Cpu)?;
    let mut rng = SslRng::new(0);
    Ok(task
        .embed(&batch, &mut Ctx::eval(&mut rng))?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn main() -> ssl_core::Result<()> {
    let (train, _) = waves(512, 1);
    let (probe_x, probe_y) = waves(200, 2);
    let (test_x, test_y) = waves(200, 3);
    let enc_cfg = SeqEncoderConfig {
        features: 1,
        transformer: TransformerConfig {
            dim: 32,
            depth: 2,
            heads: 4,
            mlp_dim: 64,
            ..Default::default()
        },
    };
    let train_cfg = TrainConfig {
        max_steps: 300,
        batch_size: 32,
        lr: 2e-3,
        warmup_steps: 20,
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        ..Default::default()
    };
    for kind in ["masked", "contrastive", "denoising"] {
        let store = ParamStore::new(&Device::Cpu);
        let pb = store.builder(0);
        let encoder = SeqTransformerEncoder::new(&enc_cfg, &pb)?;
        // (k-NN, linear-probe) accuracy of frozen embeddings on held-out waves.
        let knn = |task: &dyn Fn(&[SeqExample]) -> ssl_core::Result<Vec<f32>>| -> ssl_core::Result<(f64, f64)> {
            let (a, b) = (task(&probe_x)?, task(&test_x)?);
            let knn = knn_accuracy(&a, &probe_y, &b, &test_y, 32, 4, &KnnConfig::default())?;
            let linear = fit_linear_probe(&a, &probe_y, 32, 4, &LinearProbeConfig::default())?.accuracy(&b, &test_y)?;
            Ok((knn, linear))
        };
        let mut source = InMemorySeqSource::new(train.clone(), 32, 0, true, &Device::Cpu)?;
        let (before, after, loss) = match kind {
            "masked" => {
                let t = MaskedFeatureTask::new(
                    encoder,
                    1,
                    MaskedFeatureConfig {
                        mask_prob: 0.3,
                        span: 4,
                    },
                    &pb,
                )?;
                let before = knn(&|e| embed(&t, e))?;
                let r = LoopTrainer::new(train_cfg.clone(), None)?.fit(&t, &mut source, None)?;
                (before, knn(&|e| embed(&t, e))?, r.losses)
            }
            "contrastive" => {
                let t = ContrastiveTask::new(encoder, ContrastiveConfig::default(), &pb)?;
                let before = knn(&|e| embed(&t, e))?;
                let r = LoopTrainer::new(train_cfg.clone(), None)?.fit(&t, &mut source, None)?;
                (before, knn(&|e| embed(&t, e))?, r.losses)
            }
            _ => {
                let t = DenoisingTask::new(encoder, 1, DenoisingConfig::default(), &pb)?;
                let before = knn(&|e| embed(&t, e))?;
                let r = LoopTrainer::new(train_cfg.clone(), None)?.fit(&t, &mut source, None)?;
                (before, knn(&|e| embed(&t, e))?, r.losses)
            }
        };
        let first = loss.first().map(|x| x.1).unwrap_or(f64::NAN);
        let last = loss.last().map(|x| x.1).unwrap_or(f64::NAN);
        println!(
            "{kind:>12}: loss {first:.4} -> {last:.4}; random init k-NN {:.3} linear {:.3} -> trained k-NN {:.3} linear {:.3}",
            before.0, before.1, after.0, after.1
        );
    }
    Ok(())
}

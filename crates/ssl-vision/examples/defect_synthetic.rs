//! MAE pretraining and defect detection on synthetic images, end to end, in a few seconds:
//! normal images are smooth random stripes, defects add a bright disc. Prints each scorer's
//! AUROC and how many defects the calibrated threshold flags.
//!
//! ```text
//! cargo run --release -p ssl-vision --example defect_synthetic
//! ```

use candle_core::Device;
use ssl_core::{LoopTrainer, ParamStore, SslRng, Trainer};
use ssl_vision::detect::{Detector, DetectorConfig, ScorerKind};
use ssl_vision::*;

const S: usize = 32;

fn image(rng: &mut SslRng, defect: bool) -> Vec<f32> {
    let (f, ph) = (rng.uniform_range(0.2, 0.5), rng.uniform_range(0.0, 6.0));
    let mut v: Vec<f32> = (0..S * S)
        .map(|i| ((i % S) as f32 * f + ph).sin() * 0.15 + 0.4 + 0.01 * rng.normal())
        .collect();
    if defect {
        let (cy, cx) = (rng.below(S - 8) + 4, rng.below(S - 8) + 4);
        for y in cy - 2..=cy + 2 {
            for x in cx - 2..=cx + 2 {
                v[y * S + x] = 0.95;
            }
        }
    }
    v
}

fn auroc(normal: &[f64], defect: &[f64]) -> f64 {
    let wins: f64 = defect
        .iter()
        .flat_map(|d| {
            normal.iter().map(move |n| {
                if d > n {
                    1.0
                } else if d == n {
                    0.5
                } else {
                    0.0
                }
            })
        })
        .sum();
    wins / (normal.len() * defect.len()) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let mut rng = SslRng::new(0);
    let set = |n: usize, defect: bool, rng: &mut SslRng| -> Result<ImageSet, VisionError> {
        ImageSet::new((0..n).flat_map(|_| image(rng, defect)).collect(), [1, S, S])
    };
    let normal = set(300, false, &mut rng)?;
    let vit = ViTConfig {
        image_height: S,
        image_width: S,
        channels: 1,
        patch_size: 4,
        dim: 64,
        depth: 4,
        heads: 4,
        mlp_ratio: 2.0,
        ..ViTConfig::default()
    };
    let mae = MaeConfig {
        decoder_dim: 32,
        decoder_depth: 1,
        decoder_heads: 4,
        mask_ratio: 0.6,
        ..MaeConfig::default()
    };
    let aug = AugmentConfig {
        crop: false,
        mean: vec![0.4],
        std: vec![0.15],
        ..AugmentConfig::default()
    };
    let store = ParamStore::new(&dev);
    let task = MaeTask::new(&vit, &mae, &aug, &store.builder(0))?;
    let mut data = InMemoryImageSource::new(normal.clone(), 32, 0, &dev)?;
    let train = ssl_core::TrainConfig {
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        health_every: 0,
        ..recipe_train_config(2e-2, 32, 1, 150)
    };
    let report = LoopTrainer::new(train, None)?.fit(&task, &mut data, None)?;
    println!(
        "MAE loss {:.3} -> {:.3}",
        report.losses.first().map_or(f64::NAN, |l| l.1),
        report.losses.last().map_or(f64::NAN, |l| l.1)
    );
    let (tn, td) = (set(50, false, &mut rng)?, set(50, true, &mut rng)?);
    for scorers in [
        vec![ScorerKind::RawPixels],
        vec![ScorerKind::Reconstruction],
        vec![ScorerKind::PatchCore],
        vec![ScorerKind::Reconstruction, ScorerKind::PatchCore],
    ] {
        let cfg = DetectorConfig {
            scorers: scorers.clone(),
            patch_layer: 2,
            ..DetectorConfig::default()
        };
        let det = Detector::fit(&task, &normal, &cfg, &dev)?;
        let sn: Vec<f64> = det
            .score(&task, &tn, &dev)?
            .iter()
            .map(|s| s.score)
            .collect();
        let sd = det.score(&task, &td, &dev)?;
        let a = auroc(&sn, &sd.iter().map(|s| s.score).collect::<Vec<_>>());
        println!(
            "{scorers:?}: AUROC {a:.3}, {} / 50 defects flagged (threshold {:.2})",
            sd.iter().filter(|s| s.flag).count(),
            det.threshold()
        );
    }
    Ok(())
}

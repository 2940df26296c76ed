//! One MAE training step (augmentation off, forward, backward, AdamW) timed on random images;
//! `bench/mae_step_torch.py` runs the same configuration in PyTorch.
//!
//! ```text
//! cargo run --release -p ssl-vision --example bench_mae_step [-- STEPS]
//! ```

use std::time::Instant;

use candle_core::Device;
use ssl_core::optim::{AdamW, AdamWConfig};
use ssl_core::{Ctx, ParamStore, PretextTask, SslRng};
use ssl_vision::{AugmentConfig, Images, MaeConfig, MaeTask, ViTConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (b, c, s) = (64, 1, 28);
    let vit = ViTConfig {
        image_height: s,
        image_width: s,
        channels: c,
        patch_size: 4,
        dim: 128,
        depth: 4,
        heads: 4,
        mlp_ratio: 4.0,
        ..ViTConfig::default()
    };
    let mae = MaeConfig {
        mask_ratio: 0.75,
        norm_pix_loss: false,
        decoder_dim: 64,
        decoder_depth: 2,
        decoder_heads: 4,
        decoder_mlp_ratio: 4.0,
    };
    let aug = AugmentConfig {
        crop: false,
        hflip: false,
        mean: vec![0.0],
        std: vec![1.0],
        ..AugmentConfig::default()
    };
    let store = ParamStore::new(&Device::Cpu);
    let task = MaeTask::new(&vit, &mae, &aug, &store.builder(0))?;
    let mut opt = AdamW::new(
        &store,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        },
    )?;
    let mut rng = SslRng::new(0);
    let images = Images::from_vec(
        rng.uniform_vec(b * c * s * s, 0.0, 1.0),
        [b, c, s, s],
        &Device::Cpu,
    )?;
    let mut times = Vec::new();
    for i in 0..steps + 3 {
        let t0 = Instant::now();
        let out = task.forward(&images, &mut Ctx::train(&mut rng))?;
        let grads = out.loss.backward()?;
        let g: Vec<_> = opt
            .vars()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        opt.step(&g, 1e-4)?;
        if i >= 3 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\": \"candle\", \"params\": {}, \"batch\": {b}, \"steps\": {steps}, \"median_ms\": {median:.2}, \"min_ms\": {:.2}}}",
        store.num_elements(),
        times[0]
    );
    Ok(())
}

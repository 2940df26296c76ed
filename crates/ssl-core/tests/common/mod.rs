//! Shared helpers for the behaviour tests: a synthetic data set with known classes and tiny
//! models.
#![allow(dead_code)]

use candle_core::Device;
use ssl_core::nn::TransformerConfig;
use ssl_core::seq::*;
use ssl_core::{ParamBuilder, ParamStore, SslRng, TrainConfig};

pub const STEPS: usize = 24;
pub const FEATURES: usize = 2;

/// Three classes of noisy two-channel series (sine and cosine) with periods of 12, 6 and 4
/// steps, each with a random phase and amplitude. Returns (examples, labels).
pub fn waves(n: usize, seed: u64) -> (Vec<SeqExample>, Vec<usize>) {
    let mut rng = SslRng::new(seed);
    let mut ex = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = i % 3;
        let phase = rng.uniform() * std::f32::consts::TAU;
        let amp = 0.5 + rng.uniform();
        let mut v = Vec::with_capacity(STEPS * FEATURES);
        for t in 0..STEPS {
            let period = [12.0, 6.0, 4.0][class];
            let a = t as f32 / period * std::f32::consts::TAU + phase;
            v.push(amp * a.sin() + 0.1 * rng.normal());
            v.push(amp * a.cos() + 0.1 * rng.normal());
        }
        let mut e = SeqExample::new(v, STEPS, FEATURES).unwrap();
        e.normalize_instance();
        ex.push(e);
        labels.push(class);
    }
    (ex, labels)
}

pub fn tiny_encoder_config(dropout: f32) -> SeqEncoderConfig {
    SeqEncoderConfig {
        features: FEATURES,
        transformer: TransformerConfig {
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_dim: 32,
            dropout,
            ..Default::default()
        },
    }
}

pub fn masked_task(
    seed: u64,
    dropout: f32,
) -> (ParamStore, MaskedFeatureTask<SeqTransformerEncoder>) {
    let store = ParamStore::new(&Device::Cpu);
    let pb: ParamBuilder = store.builder(seed);
    let enc = SeqTransformerEncoder::new(&tiny_encoder_config(dropout), &pb).unwrap();
    let task = MaskedFeatureTask::new(
        enc,
        FEATURES,
        MaskedFeatureConfig {
            mask_prob: 0.3,
            span: 1,
        },
        &pb,
    )
    .unwrap();
    (store, task)
}

pub fn quick_train(max_steps: u64) -> TrainConfig {
    TrainConfig {
        max_steps,
        batch_size: 16,
        lr: 3e-3,
        warmup_steps: 5,
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        health_every: 0,
        ..Default::default()
    }
}

pub fn source(examples: Vec<SeqExample>, batch: usize, shuffle: bool) -> InMemorySeqSource {
    InMemorySeqSource::new(examples, batch, 7, shuffle, &Device::Cpu).unwrap()
}

pub fn param_bits(store: &ParamStore) -> Vec<(String, Vec<u32>)> {
    store
        .vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

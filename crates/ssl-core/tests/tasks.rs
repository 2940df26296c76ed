//! Each generic pretext task learns: its loss falls on structured data and its embeddings
//! separate the classes that generated the data (never seen in training).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use ssl_core::probe::{fit_linear_probe, knn_accuracy, KnnConfig, LinearProbeConfig};
use ssl_core::seq::*;
use ssl_core::{Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, Trainer};

fn embed<T: PretextTask<Batch = SeqBatch>>(task: &T, ex: &[SeqExample]) -> Vec<f32> {
    let batch = SeqBatch::from_examples(&ex.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let mut rng = SslRng::new(0);
    let e: Tensor = task.embed(&batch, &mut Ctx::eval(&mut rng)).unwrap();
    e.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// (k-NN, linear-probe) accuracy on held-out waves, probes fitted on other held-out waves.
fn probe<T: PretextTask<Batch = SeqBatch>>(task: &T) -> (f64, f64) {
    let (test, test_y) = waves(90, 11);
    let (probe_train, probe_train_y) = waves(90, 12);
    let (a, b) = (embed(task, &probe_train), embed(task, &test));
    let knn = knn_accuracy(
        &a,
        &probe_train_y,
        &b,
        &test_y,
        16,
        3,
        &KnnConfig {
            k: 5,
            temperature: 0.07,
        },
    )
    .unwrap();
    let linear = fit_linear_probe(&a, &probe_train_y, 16, 3, &LinearProbeConfig::default())
        .unwrap()
        .accuracy(&b, &test_y)
        .unwrap();
    (knn, linear)
}

fn train_and_check<T: PretextTask<Batch = SeqBatch>>(
    name: &str,
    task: &T,
    steps: u64,
    lr: f64,
    min_drop: f64,
) {
    let (train, _) = waves(96, 10);
    let (knn_before, linear_before) = probe(task);
    let mut cfg = quick_train(steps);
    cfg.lr = lr;
    let report = LoopTrainer::new(cfg, None)
        .unwrap()
        .fit(task, &mut source(train, 16, true), None)
        .unwrap();
    assert!(
        report.params_without_grad.is_empty(),
        "{name}: {:?}",
        report.params_without_grad
    );
    let losses: Vec<f64> = report.losses.iter().map(|(_, l)| *l).collect();
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(
        last < first * min_drop,
        "{name}: loss {first:.4} -> {last:.4} did not fall enough"
    );
    let (knn, linear) = probe(task);
    eprintln!("{name}: loss {first:.4} -> {last:.4}; linear {linear_before:.3} -> {linear:.3}; knn {knn_before:.3} -> {knn:.3}");
    assert!(
        knn >= 0.85,
        "{name}: k-NN accuracy {knn:.3} on held-out waves"
    );
    assert!(
        linear >= 0.9 && linear >= linear_before + 0.1,
        "{name}: linear-probe accuracy {linear_before:.3} at init -> {linear:.3} trained"
    );
}

fn store_and_encoder(seed: u64) -> (ParamStore, ssl_core::ParamBuilder, SeqTransformerEncoder) {
    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(seed);
    let enc = SeqTransformerEncoder::new(&tiny_encoder_config(0.0), &pb).unwrap();
    (store, pb, enc)
}

#[test]
fn masked_feature_prediction_learns() {
    let (_, pb, enc) = store_and_encoder(1);
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
    train_and_check("masked", &task, 300, 5e-3, 0.5);
}

#[test]
fn denoising_reconstruction_learns() {
    let (_, pb, enc) = store_and_encoder(2);
    let task = DenoisingTask::new(enc, FEATURES, DenoisingConfig::default(), &pb).unwrap();
    train_and_check("denoising", &task, 300, 5e-3, 0.5);
}

#[test]
fn contrastive_views_learn() {
    let (_, pb, enc) = store_and_encoder(3);
    let task = ContrastiveTask::new(
        enc,
        ContrastiveConfig {
            proj_dim: 16,
            ..Default::default()
        },
        &pb,
    )
    .unwrap();
    train_and_check("contrastive", &task, 400, 3e-3, 0.7);
}

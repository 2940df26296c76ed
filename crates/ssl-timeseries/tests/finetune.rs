//! Fine-tuning a pretrained time-series run as a classifier (`finetune_timeseries`): the plan
//! of runs, what each writes, the label-fraction draw, the frozen mode, layer groups, errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::finetune::{FinetuneConfig, FinetuneEncoder, FinetuneMode, LayerGroup, Start};
use ssl_core::read_safetensors;
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::timeseries::{self, finetune_encoder, finetune_run_dir};
use ssl_timeseries::{
    embed_timeseries, finetune_timeseries, finetune_timeseries_config, EncoderKind,
    TimeseriesConfig,
};

/// A tiny TS2Vec/TCN pretrained for a few steps on `data`: its checkpoint and configuration.
fn pretrained(data: &[String], run: &Path) -> (PathBuf, TimeseriesConfig) {
    let mut cfg = TimeseriesConfig::default();
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (cfg.train.max_steps, cfg.train.warmup_steps) = (3, 1);
    cfg.train.health_every = 0;
    timeseries::pretrain(cfg, data, run, &RunOptions::default()).unwrap();
    timeseries::stored_config(run).unwrap()
}

/// Time-series defaults shortened to `steps` steps per run.
fn short(steps: u64, fractions: Vec<f64>) -> FinetuneConfig {
    let mut ft = finetune_timeseries_config();
    ft.label_fractions = fractions;
    (
        ft.train.max_epochs,
        ft.train.max_steps,
        ft.train.warmup_steps,
    ) = (0.0, steps, 1);
    ft.train.batch_size = 4;
    ft
}

/// Every parameter of the newest checkpoint of run directory `run`.
fn weights(run: &Path) -> HashMap<String, Tensor> {
    let (ckpt, _) = timeseries::stored_config(run).unwrap();
    read_safetensors(&ckpt.join(MODEL_FILE), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fine_tuning_runs_the_plan_writes_runs_that_embed_and_draws_the_fractions() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("train.parquet"), 24);
    let test = common::labelled_series(&dir.path().join("test.parquet"), 10);
    let (ckpt, cfg) = pretrained(&data, &dir.path().join("run"));
    let out = dir.path().join("ft");
    let ft = short(5, vec![0.25, 1.0]);
    let report =
        finetune_timeseries(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default()).unwrap();

    assert_eq!(report.classes, vec!["fast".to_string(), "slow".into()]);
    assert_eq!((report.train_rows, report.test_rows), (24, 10));
    assert_eq!(report.runs.len(), 2);
    // 12 series a class: round(0.25 x 12) = 3 of each, then all of them.
    assert_eq!(report.runs[0].train_examples, 6);
    assert_eq!(report.runs[1].train_examples, 24);
    for run in &report.runs {
        let scratch = run
            .scratch
            .as_ref()
            .expect("compare_scratch is on by default");
        for scores in [&run.pretrained, scratch] {
            assert_eq!(scores.steps, 5);
            assert_eq!(scores.test.examples, 10);
            assert!((0.0..=1.0).contains(&scores.test.accuracy));
            assert!(scores.final_train_loss.is_some_and(f64::is_finite));
        }
        assert_eq!(
            run.pretrained.dir,
            finetune_run_dir(&out, run.label_fraction, Start::Pretrained)
        );
    }
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved["runs"].as_array().unwrap().len(), 2, "{saved}");

    // A fine-tuned run is a run directory like a pretrained one: it embeds (the classifier's
    // weights are extra keys the embedding ignores) with the run's configuration.
    let tuned = finetune_run_dir(&out, 1.0, Start::Pretrained);
    let (tuned_ckpt, tuned_cfg) = timeseries::stored_config(&tuned).unwrap();
    assert_eq!(tuned_cfg, cfg);
    assert!(weights(&tuned).contains_key("classifier.weight"));
    let emb = embed_timeseries(
        &tuned_ckpt,
        &tuned_cfg,
        &test,
        &dir.path().join("e.parquet"),
    )
    .unwrap();
    assert_eq!((emb.rows, emb.dim), (10, cfg.model.tcn.output));

    // Full fine-tuning moved the pretrained encoder; the scratch run started elsewhere.
    let before = read_safetensors(&ckpt.join(MODEL_FILE), &Device::Cpu).unwrap();
    let after = weights(&tuned);
    assert!(max_abs_diff(&before["input_fc.weight"], &after["input_fc.weight"]) > 0.0);

    // A second run into the same directory without resume is refused; with it, every run is
    // already done and continues from its last checkpoint.
    let again = finetune_timeseries(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default());
    assert!(again.is_err());
    let resumed = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let again = finetune_timeseries(&ckpt, &cfg, &ft, &data, &test, &out, &resumed).unwrap();
    assert_eq!(
        again.runs[1].pretrained.test,
        report.runs[1].pretrained.test
    );
}

#[test]
fn a_frozen_encoder_stays_as_pretrained_and_a_missing_test_set_is_split_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("train.parquet"), 30);
    let (ckpt, cfg) = pretrained(&data, &dir.path().join("run"));
    let out = dir.path().join("ft");
    let mut ft = short(4, vec![1.0]);
    ft.mode = FinetuneMode::Frozen;
    ft.compare_scratch = false;
    let report =
        finetune_timeseries(&ckpt, &cfg, &ft, &data, &[], &out, &RunOptions::default()).unwrap();
    assert!(report.runs[0].scratch.is_none());
    // A seeded stratified split of the training data scores the run.
    assert!(report.test_rows > 0);
    assert_eq!(report.train_rows + report.test_rows, 30);
    assert_eq!(report.runs[0].pretrained.test.examples, report.test_rows);

    let before = read_safetensors(&ckpt.join(MODEL_FILE), &Device::Cpu).unwrap();
    let after = weights(&finetune_run_dir(&out, 1.0, Start::Pretrained));
    for (name, t) in &before {
        assert_eq!(max_abs_diff(t, &after[name]), 0.0, "{name} moved");
    }
    assert!(after.contains_key("classifier.bias"));
    // The head trained on standardised features: their measured statistics are stored with it.
    let mean = after["classifier.feature_mean"].to_vec1::<f32>().unwrap();
    assert!(
        mean.iter().any(|&m| m != 0.0),
        "feature statistics never measured"
    );
}

#[test]
fn a_missing_label_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("train.parquet"), 12);
    let (ckpt, cfg) = pretrained(&data, &dir.path().join("run"));
    let mut ft = short(2, vec![1.0]);
    ft.label_column = "species".into();
    let err = finetune_timeseries(
        &ckpt,
        &cfg,
        &ft,
        &data,
        &[],
        &dir.path().join("ft"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("species"), "{err}");
    assert!(err.contains("train.parquet"), "{err}");
}

#[test]
fn encoder_parameters_fall_into_layer_groups_and_load_as_pretrained() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("train.parquet"), 12);
    let (ckpt, cfg) = pretrained(&data, &dir.path().join("run"));
    let dev = Device::Cpu;
    let (enc, _) = finetune_encoder(&cfg, &ckpt, Start::Pretrained, 9, &dev).unwrap();
    assert_eq!(enc.num_layers(), cfg.model.tcn.depth + 1);
    assert_eq!(enc.layer_of("input_fc.weight"), LayerGroup::Embedding);
    assert_eq!(
        enc.layer_of("feature_extractor.net.2.projector.weight"),
        LayerGroup::Block(2)
    );
    assert_eq!(enc.layer_of("classifier.weight"), LayerGroup::Top);
    let stored = read_safetensors(&ckpt.join(MODEL_FILE), &dev).unwrap();
    let loaded = enc.params().tensors().unwrap();
    for (name, t) in &stored {
        assert_eq!(max_abs_diff(t, &loaded[name]), 0.0, "{name} not loaded");
    }
    // From scratch: the same architecture, other weights.
    let (fresh, _) = finetune_encoder(&cfg, &ckpt, Start::Scratch, 9, &dev).unwrap();
    let fresh = fresh.params().tensors().unwrap();
    assert!(max_abs_diff(&stored["input_fc.weight"], &fresh["input_fc.weight"]) > 0.0);

    // A GRU's layers by their index.
    let mut gru = cfg.clone();
    gru.model.kind = EncoderKind::Gru;
    gru.model.rnn.layers = 2;
    let (enc, _) = finetune_encoder(&gru, &ckpt, Start::Scratch, 0, &dev).unwrap();
    assert_eq!(enc.num_layers(), 2);
    assert_eq!(enc.layer_of("rnn.weight_hh_l1"), LayerGroup::Block(1));
    assert_eq!(enc.layer_of("rnn.bias_ih_l0"), LayerGroup::Block(0));
}

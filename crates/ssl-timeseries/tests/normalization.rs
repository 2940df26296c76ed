//! `data.normalize = "channel"` (the default) end to end: the channel statistics measured at
//! pretraining are stored with the run, read back from it, and applied to the series embed
//! reads; older configurations' booleans still read.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, ListBuilder};
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::{features, timeseries};
use ssl_timeseries::{FeaturesConfig, Normalization, NormalizeMode, TimeseriesConfig};

/// `rows` series of 2 channels x 16 steps, on scales apart (around 500 and around 0), as
/// `list<list<f32>>`; with `scale`, each value mapped through it first (channel, value).
fn two_channels(path: &Path, rows: usize, scale: impl Fn(usize, f32) -> f32) -> Vec<String> {
    let mut x = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
    for i in 0..rows {
        let a = (0..16).map(|t| 500.0 + 3.0 * i as f32 + 40.0 * ((t + i) as f32 / 4.0).sin());
        let b = (0..16).map(|t| 0.1 * ((t * (i + 1)) % 5) as f32);
        let channels: [Vec<f32>; 2] = [a.collect(), b.collect()];
        for (c, ch) in channels.iter().enumerate() {
            let v: Vec<f32> = ch.iter().map(|&v| scale(c, v)).collect();
            x.values().values().append_slice(&v);
            x.values().append(true);
        }
        x.append(true);
    }
    common::write(path, vec![("x", Arc::new(x.finish()) as ArrayRef)]);
    vec![path.display().to_string()]
}

fn tiny() -> TimeseriesConfig {
    let mut cfg = TimeseriesConfig::default();
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (cfg.train.max_steps, cfg.train.warmup_steps) = (2, 1);
    cfg.train.batch_size = 4;
    cfg.data.health_examples = 4;
    cfg
}

#[test]
fn channel_statistics_are_stored_with_the_run_and_applied_at_embed_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = two_channels(&dir.path().join("d.parquet"), 24, |_, v| v);
    let run = dir.path().join("run");
    let cfg = tiny();
    assert_eq!(cfg.data.normalize, NormalizeMode::Channel, "the default");
    timeseries::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();

    // Stored: in config.toml, and read back as the run's normalisation.
    let (ckpt, stored) = timeseries::stored_config(&run).unwrap();
    let (mean, std) = (
        stored.data.channel_mean.clone(),
        stored.data.channel_std.clone(),
    );
    assert_eq!((mean.len(), std.len()), (2, 2));
    assert!(mean[0] > 400.0 && std[0] > 10.0, "{mean:?} {std:?}");
    assert!(mean[1].abs() < 1.0 && std[1] < 1.0, "{mean:?} {std:?}");
    let toml = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(toml.contains("channel_mean"), "{toml}");
    let Normalization::Channel(stats) = timeseries::stored_normalization(&run).unwrap() else {
        panic!("the run's normalisation is not per channel");
    };
    assert_eq!((&stats.mean, &stats.std), (&mean, &std));

    // Applied at embed time: the raw series embedded by the run equal the series
    // standardised here with the stored statistics, embedded with no normalisation.
    let raw_out = dir.path().join("raw.parquet");
    timeseries::embed(&ckpt, &stored, &data, &raw_out).unwrap();
    let scaled = two_channels(&dir.path().join("scaled.parquet"), 24, |c, v| {
        (v - mean[c]) / std[c]
    });
    let mut as_read = stored.clone();
    as_read.data.normalize = NormalizeMode::None;
    let scaled_out = dir.path().join("scaled_emb.parquet");
    timeseries::embed(&ckpt, &as_read, &scaled, &scaled_out).unwrap();
    let a = ssl_data::read_embeddings(&raw_out).unwrap();
    let b = ssl_data::read_embeddings(&scaled_out).unwrap();
    assert_eq!(a.values.len(), b.values.len());
    let worst = a
        .values
        .iter()
        .zip(&b.values)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "largest difference {worst}");
    // Without normalisation the raw series embed differently: the statistics did something.
    let unscaled_out = dir.path().join("unscaled_emb.parquet");
    timeseries::embed(&ckpt, &as_read, &data, &unscaled_out).unwrap();
    let c = ssl_data::read_embeddings(&unscaled_out).unwrap();
    assert!(a
        .values
        .iter()
        .zip(&c.values)
        .any(|(x, y)| (x - y).abs() > 1e-2));

    // A configuration asking for channel statistics it does not have is refused by name.
    let mut bare = stored.clone();
    (bare.data.channel_mean, bare.data.channel_std) = (Vec::new(), Vec::new());
    let err = timeseries::embed(&ckpt, &bare, &data, &dir.path().join("x.parquet")).unwrap_err();
    assert!(err.to_string().contains("data.channel_mean"), "{err}");
}

#[test]
fn the_features_pipeline_standardises_each_feature_alike() {
    let dir = tempfile::tempdir().unwrap();
    let data = two_channels(&dir.path().join("d.parquet"), 16, |_, v| v);
    let run = dir.path().join("run");
    let mut cfg = FeaturesConfig::default();
    (
        cfg.train.max_steps,
        cfg.train.warmup_steps,
        cfg.train.batch_size,
    ) = (2, 1, 4);
    (
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.mlp_dim,
    ) = (8, 1, 2, 16);
    assert_eq!(cfg.data.normalize, NormalizeMode::Channel, "the default");
    features::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    let (_, stored) = features::stored_config(&run).unwrap();
    assert_eq!(stored.data.channel_mean.len(), 2);
    assert!(stored.data.channel_mean[0] > 400.0);
    assert!(matches!(
        features::stored_normalization(&run).unwrap(),
        Normalization::Channel(_)
    ));
}

#[test]
fn older_configurations_with_a_boolean_still_read() {
    for (value, want) in [
        ("true", NormalizeMode::Series),
        ("false", NormalizeMode::None),
    ] {
        let json = format!(r#"{{"data": {{"normalize": {value}}}}}"#);
        let cfg: TimeseriesConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(cfg.data.normalize, want, "{value}");
        let cfg: FeaturesConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(cfg.data.normalize, want, "{value}");
    }
    // A boolean run keeps its per-series normalisation, with no statistics needed.
    let cfg: TimeseriesConfig = serde_json::from_str(r#"{"data": {"normalize": true}}"#).unwrap();
    assert_eq!(
        timeseries::normalization(&cfg).unwrap(),
        Normalization::Series
    );
}

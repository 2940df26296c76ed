//! The pipelines as library calls: pretrain, resume from the stored configuration, embed and
//! evaluate, on small Parquet files written here.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, ListBuilder, StringArray};
use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::{features, timeseries};
use ssl_timeseries::{FeaturesConfig, TimeseriesConfig, TimeseriesEvalReport};

#[test]
fn features_pretrain_resume_embed_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("d.parquet"), 24);
    let run = dir.path().join("run");
    let mut cfg = FeaturesConfig::default();
    (
        cfg.train.max_steps,
        cfg.train.warmup_steps,
        cfg.train.batch_size,
    ) = (3, 1, 8);
    (
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.mlp_dim,
    ) = (16, 1, 2, 32);
    let s = features::pretrain(cfg.clone(), &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.step, 3);
    assert!(s.last_loss.is_finite());
    assert!(run.join("config.toml").is_file());

    // The stored configuration has the data's width; more steps resume from step 3.
    let (_, mut stored) = features::stored_config(&run).unwrap();
    assert_eq!(stored.features, 1);
    stored.train.max_steps = 4;
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let s = features::pretrain(stored, &data, &run, &opts).unwrap();
    assert_eq!((s.start_step, s.step), (3, 4));

    let (ckpt, cfg) = features::stored_config(&run).unwrap();
    let out = dir.path().join("e.parquet");
    let e = features::embed(&ckpt, &cfg, &data, &out).unwrap();
    assert_eq!((e.rows, e.dim), (24, 16));
    assert!(out.is_file());
    let r = features::eval(&ckpt, &cfg, &data, &[], None).unwrap();
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["n_classes"], 2);
    assert_eq!(json["embedding_dim"], 16);
    assert_eq!(r.n_train + r.n_test, 24);
    assert!((0.0..=1.0).contains(&r.linear_probe_accuracy));
    // Beside the probes: a randomly initialised encoder's and the majority-class rate.
    for k in [
        "random_init_linear_probe_accuracy",
        "random_init_knn_accuracy",
        "majority_class_rate",
    ] {
        let a = json[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{k} = {a} in {json}");
    }

    let err = features::eval(&ckpt, &cfg, &data, &[], Some("nope")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let wrong = FeaturesConfig {
        features: 3,
        ..FeaturesConfig::default()
    };
    let err = features::pretrain(wrong, &data, &dir.path().join("r2"), &RunOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("features = 3"), "{err}");
    let err = features::pretrain(cfg, &[], &run, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no data"), "{err}");
}

#[test]
fn forecasting_a_long_series_is_scored_against_naive_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::long_series(&dir.path().join("long.parquet"), 200);
    let mut cfg = TimeseriesConfig::default();
    cfg.data.long_column = "y".into();
    cfg.task.kind = timeseries::TaskKind::Forecast;
    (cfg.task.forecast.context, cfg.task.forecast.horizon) = (24, 4);
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (cfg.train.max_steps, cfg.train.warmup_steps) = (3, 1);
    (cfg.eval.horizons, cfg.eval.season) = (vec![1, 4], 12);
    let run = dir.path().join("run");
    let s = timeseries::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.step, 3);
    let (ckpt, cfg) = timeseries::stored_config(&run).unwrap();
    assert_eq!(cfg.channels, 1);
    let report = timeseries::eval(&ckpt, &cfg, &data, &[], None).unwrap();
    let TimeseriesEvalReport::Forecast(f) = &report else {
        panic!("not a forecast report: {report:?}")
    };
    assert!(f.test_windows > 0);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["horizons"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json["horizons"][1]["horizon"], 4, "{json}");
    assert!(json.get("checkpoint").is_some());
}

#[test]
fn ts2vec_needs_a_per_timestep_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("d.parquet"), 24);
    let mut cfg = TimeseriesConfig::default();
    cfg.model.kind = ssl_timeseries::EncoderKind::Patchtst;
    let err = timeseries::pretrain(cfg, &data, &dir.path().join("run"), &RunOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("needs one token per timestep"),
        "{err}"
    );
}

/// Five series: rows 1 (empty) and 3 (every value null) carry nothing.
fn series_with_empty_rows(path: &Path) -> Vec<String> {
    let mut x = ListBuilder::new(Float32Builder::new());
    let mut labels = Vec::new();
    for i in 0..5 {
        match i {
            1 => {}
            3 => {
                for _ in 0..32 {
                    x.values().append_null();
                }
            }
            _ => {
                let v: Vec<f32> = (0..32).map(|t| ((t + i) as f32 / 4.0).sin()).collect();
                x.values().append_slice(&v);
            }
        }
        x.append(true);
        labels.push(["a", "b"][i % 2]);
    }
    let labels: ArrayRef = Arc::new(StringArray::from(labels));
    common::write(path, vec![("x", Arc::new(x.finish())), ("label", labels)]);
    vec![path.display().to_string()]
}

#[test]
fn empty_and_all_missing_series_are_errors_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = series_with_empty_rows(&dir.path().join("d.parquet"));
    let err = ssl_timeseries::read_series(&data, "x", Some("label"), None, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 1") && err.contains("empty") && err.contains("data.skip_bad_rows"),
        "{err}"
    );
    let set = ssl_timeseries::read_series(&data, "x", Some("label"), None, true).unwrap();
    assert_eq!(set.series.len(), 3);
    assert_eq!(set.row_index, [0, 2, 4]);
    assert_eq!(set.labels.unwrap(), ["a", "a", "a"]);
    assert_eq!(set.ids.len(), 3);

    // The pipelines refuse them too (embed as well as pretrain).
    let mut cfg = FeaturesConfig::default();
    (cfg.train.max_steps, cfg.train.batch_size) = (1, 4);
    let err = features::pretrain(cfg, &data, &dir.path().join("run"), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("skip_bad_rows"), "{err}");
    let mut cfg = TimeseriesConfig::default();
    cfg.train.max_steps = 1;
    let err = timeseries::pretrain(cfg, &data, &dir.path().join("r2"), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no observed value") || err.contains("empty"),
        "{err}"
    );
    // Met mid-stream, the error names the file, row group and row.
    assert!(err.contains("d.parquet, row group 0, row"), "{err}");

    // With data.skip_bad_rows the stream skips them and trains on the other three.
    let mut cfg = TimeseriesConfig::default();
    (cfg.train.max_steps, cfg.train.batch_size) = (2, 2);
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    cfg.data.skip_bad_rows = true;
    let s =
        timeseries::pretrain(cfg, &data, &dir.path().join("r3"), &RunOptions::default()).unwrap();
    assert_eq!(s.step, 2);
}

#[test]
fn the_default_length_is_ts2vecs_rule_and_is_stored() {
    // 24 series x 32 steps x 1 channel = 768 values: 200 steps (TS2Vec's rule, small data).
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("d.parquet"), 24);
    let mut cfg = TimeseriesConfig::default();
    assert_eq!(cfg.train.max_steps, 0, "the default is the rule");
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (4, 4, 1);
    (cfg.train.batch_size, cfg.train.health_every) = (2, 0);
    cfg.data.heldout_fraction = 0.0;
    let run = dir.path().join("run");
    let s = timeseries::pretrain(cfg.clone(), &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.step, 200);
    // The run's configuration holds the resolved length, so a resume trains no further.
    let (_, stored) = timeseries::stored_config(&run).unwrap();
    assert_eq!(stored.train.max_steps, 200);
    // A long series cut into overlapping windows counts its own steps: 3,000 (of which
    // the training part is trained on), not ~2,400 windows x 64 = 150,000: still 200.
    let long = common::long_series(&dir.path().join("long.parquet"), 3000);
    let mut lc = cfg.clone();
    lc.data.long_column = "y".into();
    (lc.data.window, lc.data.stride) = (64, 1);
    let s =
        timeseries::pretrain(lc, &long, &dir.path().join("r3"), &RunOptions::default()).unwrap();
    assert_eq!(s.step, 200);
    // An explicit length is kept.
    cfg.train.max_steps = 3;
    let s =
        timeseries::pretrain(cfg, &data, &dir.path().join("r2"), &RunOptions::default()).unwrap();
    assert_eq!(s.step, 3);
}

//! Held-out evaluation while pretraining: `data.heldout_fraction` holds rows out by global row
//! index (a long series: the end of its training steps), and `eval_loss` (the task's loss on
//! them) is logged every `train.eval_every_steps` and at the end; a forecasting run also logs
//! its error against the naive forecast's.

mod common;

use std::path::Path;

use ssl_core::run_dir::RunOptions;
use ssl_timeseries::pipeline::{features, timeseries};
use ssl_timeseries::{FeaturesConfig, TimeseriesConfig};

/// The metrics.jsonl records of `run` that hold `key`: (step, record).
fn evals(run: &Path, key: &str) -> Vec<(u64, serde_json::Value)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.get(key)?;
            Some((v["step"].as_u64()?, v))
        })
        .collect()
}

fn steps(e: &[(u64, serde_json::Value)]) -> Vec<u64> {
    e.iter().map(|x| x.0).collect()
}

fn tiny_features() -> FeaturesConfig {
    let mut cfg = FeaturesConfig::default();
    (cfg.train.max_steps, cfg.train.warmup_steps) = (5, 1);
    cfg.train.batch_size = 8;
    cfg.train.checkpoint_every_steps = 0;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.eval_every_steps = 2;
    cfg.data.health_examples = 0;
    (
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.mlp_dim,
    ) = (16, 1, 2, 32);
    cfg
}

#[test]
fn features_heldout_loss_is_logged_at_eval_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("d.parquet"), 40);
    let run = dir.path().join("run");
    let mut cfg = tiny_features();
    cfg.data.heldout_fraction = 0.25;
    features::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    let e = evals(&run, "eval_loss");
    assert_eq!(steps(&e), [2, 4, 5]);
    assert!(
        e.iter()
            .all(|(_, v)| v["eval_loss"].as_f64().is_some_and(|x| x.is_finite())),
        "{e:?}"
    );
    assert!(run.join("checkpoints/best").is_dir());
    // The rows have labels: the online k-NN accuracy of the held-out rows, at the same steps.
    let k = evals(&run, "eval_knn_accuracy");
    assert_eq!(steps(&k), [2, 4, 5]);
    for (step, v) in &k {
        let a = v["eval_knn_accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "step {step}: {v}");
    }

    // The contrastive task too (NT-Xent on held-out pairs of views).
    let run = dir.path().join("contrastive");
    let mut cfg = tiny_features();
    cfg.task.kind = features::TaskKind::Contrastive;
    cfg.data.heldout_fraction = 0.25;
    features::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(steps(&evals(&run, "eval_loss")), [2, 4, 5]);

    // Without the label column in the data: no k-NN accuracy.
    let run = dir.path().join("unlabelled");
    let mut cfg = tiny_features();
    cfg.data.label_column = "topic".into();
    cfg.data.heldout_fraction = 0.25;
    features::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(steps(&evals(&run, "eval_loss")), [2, 4, 5]);
    assert!(evals(&run, "eval_knn_accuracy").is_empty());

    // The default (no held-out fraction): nothing is evaluated and the metrics are those of
    // the same run before held-out evaluation existed.
    let run = dir.path().join("all");
    features::pretrain(tiny_features(), &data, &run, &RunOptions::default()).unwrap();
    assert!(evals(&run, "eval_loss").is_empty());
    assert!(!run.join("checkpoints/best").exists());

    let mut bad = tiny_features();
    bad.data.heldout_fraction = 1.0;
    let err = features::pretrain(bad, &data, &dir.path().join("bad"), &RunOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("data.heldout_fraction"), "{err}");
}

fn tiny_series() -> TimeseriesConfig {
    let mut cfg = TimeseriesConfig::default();
    (
        cfg.model.tcn.hidden,
        cfg.model.tcn.output,
        cfg.model.tcn.depth,
    ) = (8, 8, 2);
    (cfg.train.max_steps, cfg.train.warmup_steps) = (5, 1);
    cfg.train.checkpoint_every_steps = 0;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.eval_every_steps = 2;
    cfg.data.health_examples = 0;
    cfg
}

#[test]
fn timeseries_heldout_loss_of_rows_is_logged_at_eval_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::labelled_series(&dir.path().join("d.parquet"), 40);
    for kind in [timeseries::TaskKind::Ts2vec, timeseries::TaskKind::Masked] {
        let run = dir.path().join(format!("{kind:?}"));
        let mut cfg = tiny_series();
        cfg.task.kind = kind;
        cfg.data.heldout_fraction = 0.25;
        timeseries::pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
        let e = evals(&run, "eval_loss");
        assert_eq!(steps(&e), [2, 4, 5], "{kind:?}");
        assert!(
            e.iter()
                .all(|(_, v)| v["eval_loss"].as_f64().is_some_and(|x| x.is_finite())),
            "{kind:?}: {e:?}"
        );
        // Not a forecasting task: no forecast errors; labelled rows: the k-NN accuracy.
        assert!(evals(&run, "eval_mse").is_empty());
        let k = evals(&run, "eval_knn_accuracy");
        assert_eq!(steps(&k), [2, 4, 5], "{kind:?}");
        assert!(
            k.iter().all(|(_, v)| v["eval_knn_accuracy"]
                .as_f64()
                .is_some_and(|a| (0.0..=1.0).contains(&a))),
            "{kind:?}: {k:?}"
        );
    }
}

#[test]
fn forecasting_logs_heldout_errors_against_the_naive_forecast() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::long_series(&dir.path().join("long.parquet"), 240);
    let mut cfg = tiny_series();
    cfg.data.long_column = "y".into();
    cfg.task.kind = timeseries::TaskKind::Forecast;
    (cfg.task.forecast.context, cfg.task.forecast.horizon) = (24, 4);
    (cfg.eval.horizons, cfg.eval.season) = (vec![1, 4], 12);
    cfg.data.heldout_fraction = 0.25;
    let run = dir.path().join("run");
    timeseries::pretrain(cfg.clone(), &data, &run, &RunOptions::default()).unwrap();
    let e = evals(&run, "eval_loss");
    assert_eq!(steps(&e), [2, 4, 5]);
    for (step, v) in &e {
        for k in ["eval_mse", "eval_naive_mse", "eval_mae", "eval_naive_mae"] {
            let x = v[k].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x >= 0.0, "step {step}: {k} = {v}");
        }
        // A long series has no labels.
        assert!(v.get("eval_knn_accuracy").is_none(), "{v}");
    }
    // The naive forecast does not depend on the model: the same at every evaluation.
    let naive: Vec<f64> = e
        .iter()
        .map(|(_, v)| v["eval_naive_mse"].as_f64().unwrap())
        .collect();
    assert!(
        naive.iter().all(|x| (x - naive[0]).abs() < 1e-9),
        "{naive:?}"
    );

    // The held-out end must hold a window.
    cfg.data.heldout_fraction = 0.01;
    let err = timeseries::pretrain(
        cfg,
        &data,
        &dir.path().join("short"),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("data.heldout_fraction"), "{err}");
}

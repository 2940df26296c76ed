//! Held-out evaluation while pretraining: `data.heldout_fraction` holds images out by global
//! row index and `eval_loss` (MAE's reconstruction loss on them) is logged every
//! `train.eval_every_steps` and at the end; the best of them is `checkpoints/best`.

use ssl_core::checkpoint::read_state;
use ssl_core::run_dir::RunOptions;
use ssl_vision::{pretrain, VisionConfig};

fn tiny() -> VisionConfig {
    let mut cfg = VisionConfig::default();
    cfg.data.max_images = 64;
    cfg.data.health_examples = 0;
    cfg.task.preview_images = 0;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 1, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (cfg.train.max_steps, cfg.train.batch_size) = (5, 8);
    cfg.train.warmup_steps = 1;
    cfg.train.checkpoint_every_steps = 0;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.eval_every_steps = 2;
    cfg
}

fn sample() -> Vec<String> {
    vec![concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ssl-cli/data/fashion_mnist_sample.parquet"
    )
    .to_string()]
}

/// (step, eval_loss) of the run's metrics.jsonl.
fn evals(run: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["eval_loss"].as_f64()?))
        })
        .collect()
}

/// (step, value) of the figure `key` in the run's metrics.jsonl.
fn figure(run: &std::path::Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v[key].as_f64()?))
        })
        .collect()
}

#[test]
fn mae_heldout_loss_is_logged_at_eval_steps_and_best_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut cfg = tiny();
    cfg.data.heldout_fraction = 0.25;
    pretrain(cfg, &sample(), &run, &RunOptions::default()).unwrap();
    let e = evals(&run);
    let steps: Vec<u64> = e.iter().map(|x| x.0).collect();
    assert_eq!(steps, [2, 4, 5]);
    // The sample has a label column: the online k-NN accuracy is logged beside eval_loss.
    let knn = figure(&run, "eval_knn_accuracy");
    assert_eq!(knn.iter().map(|x| x.0).collect::<Vec<_>>(), steps);
    assert!(knn.iter().all(|x| (0.0..=1.0).contains(&x.1)), "{knn:?}");
    assert!(e.iter().all(|x| x.1.is_finite() && x.1 > 0.0), "{e:?}");
    let best = e.iter().fold(e[0], |b, x| if x.1 < b.1 { *x } else { b });
    assert_eq!(
        read_state(&run.join("checkpoints/best")).unwrap().step,
        best.0
    );

    // No held-out fraction (the default): every image trains, nothing is evaluated.
    let run = dir.path().join("all");
    pretrain(tiny(), &sample(), &run, &RunOptions::default()).unwrap();
    assert!(evals(&run).is_empty());
    assert!(figure(&run, "eval_knn_accuracy").is_empty());
    assert!(!run.join("checkpoints/best").exists());
}

//! Held-out evaluation while pretraining: the run's held-out pairs (`data.heldout_fraction`)
//! give `eval_loss` (the CLIP loss) and recall@K both ways every `train.eval_every_steps` and
//! at the end; the best `eval_loss` is `checkpoints/best`.

mod common;

use std::path::Path;

use ssl_core::checkpoint::read_state;
use ssl_core::run_dir::RunOptions;
use ssl_multimodal::*;

/// The shared tiny configuration, five steps, evaluating a quarter of 120 pairs every two.
fn tiny_config() -> MultimodalConfig {
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 5;
    cfg.train.checkpoint_every_steps = 0;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.eval_every_steps = 2;
    cfg.data.max_pairs = 120;
    cfg.data.heldout_fraction = 0.25;
    cfg.eval.ks = vec![1, 5];
    cfg
}

/// The metrics.jsonl records of `run` with an `eval_loss`: (step, record).
fn evals(run: &Path) -> Vec<(u64, serde_json::Value)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.get("eval_loss")?;
            Some((v["step"].as_u64()?, v))
        })
        .collect()
}

#[test]
fn clip_loss_and_recall_on_heldout_pairs_are_logged_at_eval_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.parquet");
    toy::write_parquet(&toy::toy_pairs(120, 16, 3).unwrap(), &path, 60).unwrap();
    let paths = vec![path.to_string_lossy().into_owned()];
    let run = dir.path().join("run");
    pretrain(tiny_config(), &paths, &run, &RunOptions::default()).unwrap();
    let e = evals(&run);
    assert_eq!(e.iter().map(|x| x.0).collect::<Vec<_>>(), [2, 4, 5]);
    for (step, v) in &e {
        assert!(v["eval_loss"].as_f64().unwrap().is_finite(), "{step}: {v}");
        for side in ["image_to_text", "text_to_image"] {
            for k in [1, 5] {
                let r = v[format!("eval_{side}_r@{k}")].as_f64().unwrap_or(-1.0);
                assert!((0.0..=1.0).contains(&r), "step {step}: {side} r@{k} in {v}");
            }
        }
    }
    let best = e
        .iter()
        .map(|(s, v)| (*s, v["eval_loss"].as_f64().unwrap()))
        .fold((0, f64::INFINITY), |b, x| if x.1 < b.1 { x } else { b });
    assert_eq!(
        read_state(&run.join("checkpoints/best")).unwrap().step,
        best.0
    );
}

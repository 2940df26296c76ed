//! End-to-end behaviour of `ssl pretrain/embed/eval vision` and `ssl detect` on the embedded
//! Fashion-MNIST sample, with a tiny model and a few steps.

mod common;

use common::{ok, ssl};

const TINY: [&str; 11] = [
    "model.dim=16",
    "model.depth=1",
    "model.heads=2",
    "model.patch_size=7",
    "task.mae.decoder_dim=8",
    "task.mae.decoder_depth=1",
    "task.mae.decoder_heads=2",
    "train.batch_size=16",
    "train.warmup_steps=1",
    "data.max_images=120",
    "task.preview_images=3",
];

#[test]
fn pretrain_embed_eval_detect_on_the_embedded_sample() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let mut args = vec!["pretrain", "vision", "--out", run_s];
    for s in TINY.iter().chain(&[
        "train.max_steps=6",
        "task.preview_every=3",
        "train.checkpoint_every_steps=3",
    ]) {
        args.extend(["--set", s]);
    }
    ok(&ssl(&args));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "previews/step-00000003.png",
        "previews/final.png",
        "checkpoints/step-00000006/model.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("image_height = 28"), "{config}");

    // Resuming continues the step count, and the preview numbering with it.
    ok(&ssl(&[
        "pretrain",
        "vision",
        "--out",
        run_s,
        "--resume",
        "--set",
        "train.max_steps=10",
    ]));
    assert!(run.join("previews/step-00000009.png").exists());

    // TensorBoard: the loss of every step, and the preview grids as images (one event file
    // per session).
    use ssl_core::tensorboard::{event_files, read_events, SummaryData};
    let files = event_files(&run.join("tensorboard")).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let (mut loss_steps, mut image_steps) = (Vec::new(), Vec::new());
    for f in &files {
        for ev in read_events(f).unwrap() {
            for (tag, data) in ev.values {
                match (tag.as_str(), data) {
                    ("loss", SummaryData::Scalar(_)) => loss_steps.push(ev.step),
                    ("mae_preview", SummaryData::Image { width, .. }) => {
                        assert!(width > 0);
                        image_steps.push(ev.step)
                    }
                    _ => {}
                }
            }
        }
    }
    loss_steps.sort();
    loss_steps.dedup();
    assert_eq!(loss_steps, (1..=10).collect::<Vec<_>>());
    for step in [3, 6, 9, 10] {
        assert!(image_steps.contains(&step), "{image_steps:?}");
    }

    let data = dir.path().join("fm.parquet");
    std::fs::write(
        &data,
        include_bytes!("../data/fashion_mnist_sample.parquet"),
    )
    .unwrap();
    let data_s = data.to_str().unwrap();
    let emb = dir.path().join("emb.parquet");
    ok(&ssl(&[
        "embed",
        "vision",
        "--checkpoint",
        run_s,
        "--data",
        data_s,
        "--out",
        emb.to_str().unwrap(),
        "--set",
        "model.pooling=mean",
    ]));
    assert!(emb.exists());

    let out = ssl(&["eval", "vision", "--checkpoint", run_s, "--data", data_s]);
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for part in ["pretrained", "random_init", "raw_pixels"] {
        for k in ["linear_probe_accuracy", "knn_accuracy"] {
            let v = report[part][k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{part}.{k} = {v}");
        }
    }
    assert_eq!(report["n_classes"], 10);
    let m = report["majority_class_rate"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&m), "majority_class_rate = {m}");

    // Too few calibration images: a clear error, not a panic.
    let det = dir.path().join("det");
    let det_s = det.to_str().unwrap();
    let out = ssl(&[
        "detect",
        "fit",
        "--checkpoint",
        run_s,
        "--data",
        data_s,
        "--out",
        det_s,
        "--set",
        "data.max_images=30",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("calibration needs at least 10"), "{err}");

    ok(&ssl(&[
        "detect",
        "fit",
        "--checkpoint",
        run_s,
        "--data",
        data_s,
        "--out",
        det_s,
        "--set",
        "data.max_images=60",
    ]));
    for f in [
        "detector.json",
        "memory_bank.safetensors",
        "model.safetensors",
        "vision_config.json",
    ] {
        assert!(det.join(f).exists(), "{f} missing");
    }
    let scores = dir.path().join("scores.parquet");
    let out = ssl(&[
        "detect",
        "score",
        "--detector",
        det_s,
        "--data",
        data_s,
        "--out",
        scores.to_str().unwrap(),
        "--set",
        "data.max_images=5",
    ]);
    ok(&out);
    assert!(scores.exists());
    // The sample has a `label` column (0 counts as normal): one JSON line with AUROC and F1.
    let labelled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(labelled["label_column"], "label", "{labelled}");
    let f1 = labelled["f1"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&f1), "{labelled}");
    let heat = dir.path().join("scores_heatmaps");
    assert_eq!(std::fs::read_dir(&heat).unwrap().count(), 5);
}

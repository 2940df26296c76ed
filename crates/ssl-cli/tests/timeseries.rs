//! End-to-end behaviour of `ssl ... timeseries` on its embedded GunPoint sample, with tiny
//! encoders so the test runs in seconds.

mod common;

use std::path::Path;

use common::{ok, ssl};

fn with_sets<'a>(mut args: Vec<&'a str>, sets: &[&'a str]) -> Vec<&'a str> {
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    args
}

/// Pretrains with `sets`, then embeds and evaluates the embedded sample with the checkpoint.
fn pretrain_embed_eval(dir: &Path, sets: &[&str]) -> serde_json::Value {
    let run = dir.join("run");
    let run_s = run.to_str().unwrap();
    let mut all = vec![
        "train.max_steps=6",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "train.health_every=3",
        "data.health_examples=8",
    ];
    all.extend_from_slice(sets);
    ok(&ssl(&with_sets(
        vec!["pretrain", "timeseries", "--out", run_s],
        &all,
    )));
    assert!(run
        .join("checkpoints/step-00000006/model.safetensors")
        .exists());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{l}");
    }

    let data = dir.join("gunpoint.parquet");
    std::fs::write(&data, include_bytes!("../data/gunpoint_train.parquet")).unwrap();
    let emb = dir.join("emb.parquet");
    ok(&ssl(&[
        "embed",
        "timeseries",
        "--checkpoint",
        run_s,
        "--data",
        data.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]));
    assert!(emb.exists());
    let out = ssl(&[
        "eval",
        "timeseries",
        "--checkpoint",
        run_s,
        "--data",
        data.to_str().unwrap(),
    ]);
    ok(&out);
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn ts2vec_on_a_tiny_tcn_pretrains_embeds_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let report = pretrain_embed_eval(
        dir.path(),
        &[
            "task.kind=ts2vec",
            "model.kind=tcn",
            "model.tcn.hidden=8",
            "model.tcn.output=16",
            "model.tcn.depth=2",
        ],
    );
    assert_eq!(report["n_classes"], 2, "{report}");
    assert_eq!(report["embedding_dim"], 16, "{report}");
    for k in [
        "linear_probe_accuracy",
        "knn_accuracy",
        "random_init_knn_accuracy",
        "majority_class_rate",
    ] {
        let a = report[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{k} = {a} in {report}");
    }
}

#[test]
fn masked_patches_on_a_tiny_patchtst_pretrains_embeds_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let report = pretrain_embed_eval(
        dir.path(),
        &[
            "task.kind=masked",
            "model.kind=patchtst",
            "model.patchtst.patch_len=16",
            "model.patchtst.stride=16",
            "model.patchtst.transformer.dim=16",
            "model.patchtst.transformer.depth=1",
            "model.patchtst.transformer.heads=2",
            "model.patchtst.transformer.mlp_dim=32",
        ],
    );
    assert!(report["pretext_loss"].as_f64().is_some_and(f64::is_finite));
    assert_eq!(report["n_classes"], 2, "{report}");
}

#[test]
fn a_missing_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gunpoint.parquet");
    std::fs::write(&data, include_bytes!("../data/gunpoint_train.parquet")).unwrap();
    let run = dir.path().join("run");
    let out = ssl(&[
        "pretrain",
        "timeseries",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--set",
        "data.column=signal",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signal"), "{err}");
}

//! `ssl finetune` through the binary: settings layered and checked before anything trains,
//! label fractions against random initialisation in the report, runs that embed like
//! pretrained ones, and the settings printed as commented TOML.

mod common;

use common::{ok, ssl};

fn sets(args: &mut Vec<String>, sets: &[&str]) {
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
}

fn run(args: &[String]) -> std::process::Output {
    ssl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn a_pretrained_series_encoder_fine_tunes_on_label_fractions() {
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre");
    let mut args: Vec<String> = ["pretrain", "timeseries", "--out", pre.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    sets(
        &mut args,
        &[
            "train.max_steps=4",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "model.tcn.hidden=8",
            "model.tcn.output=16",
            "model.tcn.depth=2",
        ],
    );
    ok(&run(&args));
    let data = dir.path().join("gunpoint.parquet");
    std::fs::write(&data, include_bytes!("../data/gunpoint_train.parquet")).unwrap();
    let out = dir.path().join("ft");
    let finetune = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "finetune",
            "timeseries",
            "--checkpoint",
            pre.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--label-fraction",
            "0.2",
            "1",
        ]
        .map(String::from)
        .to_vec();
        sets(
            &mut args,
            &[
                "finetune.train.max_epochs=0",
                "finetune.train.max_steps=3",
                "finetune.train.warmup_steps=1",
            ],
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // A bad setting is refused before anything is read or written.
    let bad = run(&finetune(&["--set", "finetune.layer_decay=1.5"]));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("finetune.layer_decay"), "{err}");
    assert!(!out.exists(), "a refused configuration must write nothing");

    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(&finetune(&[])))).expect("one JSON report on stdout");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    // 40 of GunPoint's 50 training series remain after the 20 % test hold-out; 0.2 of them
    // per class.
    let (small, all) = (
        runs[0]["train_examples"].as_u64().unwrap(),
        runs[1]["train_examples"].as_u64().unwrap(),
    );
    assert!(small < all && small >= 2, "{report}");
    assert_eq!(report["train_rows"].as_u64().unwrap(), all, "{report}");
    for r in runs {
        for start in ["pretrained", "scratch"] {
            let acc = r[start]["test"]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{report}");
            assert_eq!(r[start]["steps"], 3, "{report}");
        }
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved, report);

    // A fine-tuned run embeds like a pretrained one.
    let emb = dir.path().join("emb.parquet");
    ok(&ssl(&[
        "embed",
        "timeseries",
        "--checkpoint",
        out.join("fraction-1/pretrained").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]));
    assert!(emb.exists());
}

#[test]
fn the_settings_print_commented_and_modalities_without_finetuning_say_so() {
    let text = ok(&ssl(&["config", "vision", "--finetune"]));
    assert!(text.contains("layer_decay"), "{text}");
    assert!(text.contains("label_fractions"), "{text}");
    let out = ssl(&["config", "multimodal", "--finetune"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no fine-tuning"));
}

//! The text pipeline through its public API: pretrain (and resume), embed, and eval with
//! labels, on a small labelled Parquet file; the JSON keys `ssl eval text` prints and the
//! lines of `heldout.jsonl`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use ssl_core::run_dir::RunOptions;
use ssl_text::{embed, eval, pretrain, stored_config, HeldoutPoint, TextConfig, HELDOUT_FILE};

fn write_docs(path: &Path) {
    let words = [
        ["kernel", "driver", "module"],
        ["licence", "warranty", "notice"],
    ];
    let texts: Vec<String> = (0..48)
        .map(|i| {
            format!(
                "the {} of the {} {i}",
                words[i % 2][i % 3],
                words[i % 2][i / 2 % 3]
            )
        })
        .collect();
    let labels: Vec<&str> = (0..48).map(|i| ["code", "legal"][i % 2]).collect();
    let batch = RecordBatch::try_from_iter([
        ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
        ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn tiny() -> TextConfig {
    let mut cfg = TextConfig::default();
    cfg.train.max_steps = 4;
    cfg.train.batch_size = 4;
    cfg.train.checkpoint_every_steps = 2;
    cfg.tokenizer.train.vocab_size = 120;
    cfg.model.preset.clear();
    let m = &mut cfg.model.config;
    m.hidden_size = 16;
    m.num_hidden_layers = 1;
    m.num_attention_heads = 2;
    m.intermediate_size = 32;
    cfg.input.max_seq_len = 16;
    cfg.data.heldout_fraction = 0.25;
    cfg
}

/// The records of the run's metrics.jsonl holding held-out figures.
fn eval_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect()
}

#[test]
fn pretrain_resume_embed_and_eval_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    write_docs(&path);
    let data = vec![path.to_string_lossy().into_owned()];
    let run = dir.path().join("run");

    let s = pretrain(tiny(), &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 4);
    assert_eq!(s.hf.as_deref(), Some(run.join("hf").as_path()));
    assert!(run.join("hf/model.safetensors").is_file());
    // Before training, then the kept checkpoints; the file holds the same points.
    let steps: Vec<u64> = s.heldout.iter().map(|p| p.step).collect();
    assert_eq!(steps, [0, 2, 4]);
    let text = std::fs::read_to_string(run.join(HELDOUT_FILE)).unwrap();
    let lines: Vec<HeldoutPoint> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, s.heldout);
    assert!(text.starts_with("{\"loss\":"), "{text}");
    // The same evaluations in metrics.jsonl, with an `eval_` prefix, at the checkpoint
    // interval (train.eval_every_steps = 0) and the end; the best of them is checkpoints/best.
    let evals = eval_records(&run);
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4]);
    for (e, p) in evals.iter().zip(&s.heldout[1..]) {
        assert_eq!(e["eval_loss"].as_f64(), Some(p.loss));
        assert_eq!(e["eval_perplexity"].as_f64(), Some(p.perplexity));
        assert_eq!(e["eval_masked_accuracy"].as_f64(), Some(p.masked_accuracy));
        // The data has a label column: the online k-NN accuracy of the held-out documents.
        let knn = e["eval_knn_accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&knn), "{e}");
    }
    let best = if s.heldout[1].loss <= s.heldout[2].loss {
        2
    } else {
        4
    };
    let best_state = ssl_core::checkpoint::read_state(&run.join("checkpoints/best")).unwrap();
    assert_eq!(best_state.step, best);

    // Resume to 6 steps from the stored configuration: the curve goes on from the file.
    let (_, mut cfg) = stored_config(&run).unwrap();
    cfg.train.max_steps = 6;
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let s = pretrain(cfg, &data, &run, &opts).unwrap();
    assert_eq!((s.run.start_step, s.run.step), (4, 6));
    let steps: Vec<u64> = s.heldout.iter().map(|p| p.step).collect();
    assert_eq!(steps, [0, 2, 4, 6]);
    let text = std::fs::read_to_string(run.join(HELDOUT_FILE)).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    let steps: Vec<u64> = eval_records(&run)
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6]);

    let (ckpt, cfg) = stored_config(&run).unwrap();
    assert!(ckpt.ends_with("step-00000006"), "{}", ckpt.display());
    let e = embed(&ckpt, &cfg, &data, &dir.path().join("emb.parquet")).unwrap();
    assert_eq!((e.rows, e.dim), (48, 16));

    let report = eval(&ckpt, &cfg, &data, &[], None).unwrap();
    let v = serde_json::to_value(&report).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "checkpoint",
            "embedding_dim",
            "knn_accuracy",
            "layer",
            "linear_probe_accuracy",
            "majority_class_rate",
            "masked_accuracy",
            "masked_loss",
            "masked_tokens",
            "n_classes",
            "n_test",
            "n_train",
            "perplexity",
            "pooling",
            "random_init_knn_accuracy",
            "random_init_linear_probe_accuracy"
        ]
    );
    // Beside the probes: a randomly initialised BERT's and the majority-class rate.
    for k in [
        "random_init_knn_accuracy",
        "random_init_linear_probe_accuracy",
        "majority_class_rate",
    ] {
        let a = v[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{k} = {a} in {v}");
    }
    // 24 + 24 documents: the stratified test rows are half of each class.
    assert_eq!(v["majority_class_rate"], 0.5);
    // The seeded stratified 20% split of 24 + 24 documents.
    assert_eq!(
        (v["n_train"].as_u64(), v["n_test"].as_u64()),
        (Some(38), Some(10))
    );
    assert_eq!(v["pooling"], "mean");
    // A test set: the probes train on every document of `data`.
    let report = eval(&ckpt, &cfg, &data, &data, Some("label")).unwrap();
    let probe = report.probe.unwrap();
    assert_eq!((probe.n_train, probe.n_test, probe.n_classes), (48, 48, 2));
    // Without the label column: the masked-LM figures only.
    let v = serde_json::to_value(eval(&ckpt, &cfg, &data, &[], Some("nope")).unwrap()).unwrap();
    assert!(v.get("knn_accuracy").is_none() && v["perplexity"].as_f64().unwrap() > 1.0);
}

/// A Parquet file with one text column `text` holding `texts` (None: null).
#[test]
fn no_knn_accuracy_without_the_label_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    write_docs(&path);
    let data = vec![path.to_string_lossy().into_owned()];
    let run = dir.path().join("run");
    let mut cfg = tiny();
    cfg.train.max_steps = 2;
    cfg.data.label_column = "topic".into();
    pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    let evals = eval_records(&run);
    assert_eq!(evals.len(), 1);
    assert!(evals[0].get("eval_knn_accuracy").is_none(), "{}", evals[0]);
}

fn write_texts(path: &Path, texts: Vec<Option<&str>>) -> Vec<String> {
    let batch =
        RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(texts)) as ArrayRef)])
            .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    vec![path.display().to_string()]
}

#[test]
fn a_tokenizer_is_not_trained_on_empty_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_texts(
        &dir.path().join("e.parquet"),
        vec![Some(""), Some("  "), Some("")],
    );
    let cfg = ssl_text::TokenizerConfig {
        vocab_size: 100,
        ..Default::default()
    };
    let err = ssl_text::train_from_parquet(&data, "text", &cfg, |_| false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no text to train the tokenizer on") && err.contains("3 documents"),
        "{err}"
    );
}

#[test]
fn a_one_document_set_names_the_hold_out_as_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_texts(
        &dir.path().join("one.parquet"),
        vec![Some("the kernel driver")],
    );
    let mut cfg = tiny();
    cfg.data.heldout_fraction = 0.5;
    // A seed whose hold-out takes row 0, the only document.
    cfg.train.seed = (0..1000)
        .find(|&s| ssl_data::is_heldout(0, s, 0.5))
        .unwrap();
    let err = pretrain(cfg, &data, &dir.path().join("run"), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("held out") && err.contains("data.heldout_fraction"),
        "{err}"
    );
}

#[test]
fn data_skip_bad_rows_skips_null_texts() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_texts(
        &dir.path().join("n.parquet"),
        vec![Some("a kernel"), None, Some("a driver")],
    );
    let mut cfg = ssl_text::DataConfig::default();
    let err = ssl_text::read_docs(&data, &cfg, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("skip_bad_rows"), "{err}");
    cfg.skip_bad_rows = true;
    let docs = ssl_text::read_docs(&data, &cfg, None, false).unwrap();
    assert_eq!(docs.texts, ["a kernel", "a driver"]);
    assert_eq!(docs.rows, [0, 2]);
}

//! Fine-tuning for classification through the public API (`ssl_text::finetune`) on a tiny
//! pretrained model and a tiny labelled set, and the default learning rate of pretraining
//! with and without `model.init_from`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use candle_core::{Device, Tensor};
use ssl_core::finetune::{FinetuneConfig, FinetuneMode, FinetuneReport, Start};
use ssl_core::run_dir::RunOptions;
use ssl_text::{
    embed, finetune, finetune_config, finetune_lr, finetune_run_dir, pretrain, stored_config,
    TextConfig, ADAPT_LR, FINETUNE_REPORT_FILE, SCRATCH_LR,
};

const WORDS: [[&str; 3]; 2] = [
    ["kernel", "driver", "module"],
    ["licence", "warranty", "notice"],
];

/// `n` documents on two topics, labelled by topic (strings, or integers with `int_labels`).
fn write_docs(path: &Path, n: usize, offset: usize, int_labels: bool) {
    let texts: Vec<String> = (offset..offset + n)
        .map(|i| {
            format!(
                "the {} of the {} {i}",
                WORDS[i % 2][i % 3],
                WORDS[i % 2][i / 2 % 3]
            )
        })
        .collect();
    let labels: ArrayRef = if int_labels {
        Arc::new(Int64Array::from(
            (offset..offset + n)
                .map(|i| (i % 2) as i64)
                .collect::<Vec<_>>(),
        ))
    } else {
        Arc::new(StringArray::from(
            (offset..offset + n)
                .map(|i| ["code", "legal"][i % 2])
                .collect::<Vec<_>>(),
        ))
    };
    let batch = RecordBatch::try_from_iter([
        ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
        ("topic", labels),
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
    cfg.train.checkpoint_every_steps = 4;
    cfg.tokenizer.train.vocab_size = 120;
    cfg.model.preset.clear();
    let m = &mut cfg.model.config;
    m.hidden_size = 16;
    m.num_hidden_layers = 2;
    m.num_attention_heads = 2;
    m.intermediate_size = 32;
    cfg.input.max_seq_len = 16;
    cfg.data.heldout_fraction = 0.0;
    cfg
}

/// A tiny fine-tuning setup: the label column `topic`, 40 steps at most.
fn ft_cfg(fractions: &[f64], mode: FinetuneMode) -> FinetuneConfig {
    let mut ft = finetune_config();
    ft.label_column = "topic".into();
    ft.label_fractions = fractions.to_vec();
    ft.mode = mode;
    ft.min_steps = 10;
    ft.train.max_epochs = 4.0;
    ft.train.batch_size = 8;
    ft.train.lr = 3e-3;
    ft
}

/// A pretrained tiny run on `train.parquet` (48 documents) and `test.parquet` (24 others).
fn setup(dir: &Path, int_labels: bool) -> (Vec<String>, Vec<String>) {
    let train = dir.join("train.parquet");
    let test = dir.join("test.parquet");
    write_docs(&train, 48, 0, int_labels);
    write_docs(&test, 24, 1000, int_labels);
    let data = vec![train.to_string_lossy().into_owned()];
    pretrain(tiny(), &data, &dir.join("run"), &RunOptions::default()).unwrap();
    (data, vec![test.to_string_lossy().into_owned()])
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn newest_model(run: &Path) -> std::path::PathBuf {
    stored_config(run).unwrap().0.join("model.safetensors")
}

#[test]
fn fine_tuning_runs_end_to_end_and_its_runs_embed() {
    let dir = tempfile::tempdir().unwrap();
    let (data, test) = setup(dir.path(), false);
    let (ckpt, cfg) = stored_config(&dir.path().join("run")).unwrap();
    let out = dir.path().join("ft");
    let mut ft = ft_cfg(&[0.25, 1.0], FinetuneMode::Full);
    // The default rate: by the model's width (3e-3 at width 16), stored in each run.
    ft.train.lr = finetune_config().train.lr;
    assert_eq!(ft.train.lr, 0.0);
    let report = finetune(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default()).unwrap();

    assert_eq!(report.classes, ["code", "legal"]);
    assert_eq!((report.train_rows, report.test_rows), (48, 24));
    // Per class: round(0.25 * 24) = 6 of each; all 48.
    let sizes: Vec<usize> = report.runs.iter().map(|r| r.train_examples).collect();
    assert_eq!(sizes, [12, 48]);
    for r in &report.runs {
        let scratch = r
            .scratch
            .as_ref()
            .expect("compare_scratch is on by default");
        for (s, start) in [
            (&r.pretrained, Start::Pretrained),
            (scratch, Start::Scratch),
        ] {
            let run = finetune_run_dir(&out, r.label_fraction, start);
            assert_eq!(s.dir, run);
            assert_eq!(s.test.examples, 24);
            assert!(s.final_train_loss.is_some_and(f64::is_finite));
            // min_steps 10 for 12 examples; 4 epochs of 48 in batches of 8 = 24 steps.
            let want = if r.train_examples == 12 { 10 } else { 24 };
            assert_eq!(s.steps, want, "{}", run.display());
            assert!(run.join("config.toml").is_file());
            assert!(run.join("tokenizer.json").is_file());
            assert!(run.join("hf/model.safetensors").is_file());
            assert!(newest_model(&run).is_file());
        }
    }
    // The two topics have disjoint words: every fine-tuned model separates them.
    let full = &report.runs[1].pretrained.test;
    assert!(full.accuracy >= 0.9, "accuracy {}", full.accuracy);
    // The report on disk is the one returned.
    let on_disk: FinetuneReport =
        serde_json::from_str(&std::fs::read_to_string(out.join(FINETUNE_REPORT_FILE)).unwrap())
            .unwrap();
    assert_eq!(on_disk, report);

    // A fine-tuned run embeds like a pretrained one (its head's tensors are ignored), and its
    // encoder moved away from the pretrained weights.
    let run = finetune_run_dir(&out, 1.0, Start::Pretrained);
    let (ft_ckpt, ft_cfg) = stored_config(&run).unwrap();
    assert_eq!(ft_cfg.model.config, cfg.model.config);
    assert_eq!(ft_cfg.train.lr, finetune_lr(16));
    let emb = embed(&ft_ckpt, &ft_cfg, &data, &dir.path().join("emb.parquet")).unwrap();
    assert_eq!((emb.rows, emb.dim), (48, 16));
    let before = tensors(&ckpt.join("model.safetensors"));
    let after = tensors(&ft_ckpt.join("model.safetensors"));
    assert!(after.contains_key("classifier.weight"));
    let name = "bert.encoder.layer.0.attention.self.query.weight";
    assert!(max_diff(&before[name], &after[name]) > 0.0);
    // The masked-LM head, which no classification loss reaches, is kept as it was.
    let head = "cls.predictions.transform.dense.weight";
    assert_eq!(max_diff(&before[head], &after[head]), 0.0);
}

#[test]
fn frozen_fine_tuning_leaves_the_encoder_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // Integer labels, and no test files: a held-out fifth of the training rows.
    let (data, _) = setup(dir.path(), true);
    let (ckpt, cfg) = stored_config(&dir.path().join("run")).unwrap();
    let out = dir.path().join("ft");
    let mut ft = ft_cfg(&[1.0], FinetuneMode::Frozen);
    ft.compare_scratch = false;
    // The encoder's rate is left to the width rule; a frozen head trains at its own.
    ft.train.lr = finetune_config().train.lr;
    let report = finetune(&ckpt, &cfg, &ft, &data, &[], &out, &RunOptions::default()).unwrap();
    assert_eq!(report.classes, ["0", "1"]);
    assert_eq!(report.train_rows + report.test_rows, 48);
    assert!(report.test_rows > 0 && report.runs[0].scratch.is_none());

    let run = finetune_run_dir(&out, 1.0, Start::Pretrained);
    let before = tensors(&ckpt.join("model.safetensors"));
    let after = tensors(&newest_model(&run));
    for (name, t) in &before {
        assert_eq!(
            max_diff(t, &after[name]),
            0.0,
            "{name} moved in frozen mode"
        );
    }
    let head = &after["classifier.weight"];
    assert!(head.dims() == [2, 16]);
    // The head trained on standardised features: their measured statistics are stored with it.
    let mean = after["classifier.feature_mean"].to_vec1::<f32>().unwrap();
    assert!(
        mean.iter().any(|&m| m != 0.0),
        "feature statistics never measured"
    );
    assert_eq!(stored_config(&run).unwrap().1.train.lr, ft.frozen_lr);
    // BERT's rate at BERT-base's width, more for narrower models, capped.
    assert_eq!(finetune_lr(768), 5e-5);
    assert!(finetune_lr(384) > finetune_lr(768) && finetune_lr(128) > finetune_lr(384));
    assert_eq!(finetune_lr(16), 3e-3);
}

#[test]
fn a_missing_label_column_is_an_error_naming_it_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, test) = setup(dir.path(), false);
    let (ckpt, cfg) = stored_config(&dir.path().join("run")).unwrap();
    let mut ft = ft_cfg(&[1.0], FinetuneMode::Full);
    ft.label_column = "category".into();
    let out = dir.path().join("ft");
    let err = finetune(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default())
        .expect_err("no column `category`")
        .to_string();
    assert!(
        err.contains("\"category\"") && err.contains("train.parquet"),
        "{err}"
    );
    // In the test files only.
    let bad_test = dir.path().join("other.parquet");
    let batch = RecordBatch::try_from_iter([(
        "text",
        Arc::new(StringArray::from(vec!["a kernel driver"])) as ArrayRef,
    )])
    .unwrap();
    let file = std::fs::File::create(&bad_test).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    ft.label_column = "topic".into();
    let test = vec![bad_test.to_string_lossy().into_owned()];
    let err = finetune(&ckpt, &cfg, &ft, &data, &test, &out, &RunOptions::default())
        .expect_err("no column `topic` in the test file")
        .to_string();
    assert!(
        err.contains("\"topic\"") && err.contains("other.parquet"),
        "{err}"
    );
}

#[test]
fn the_default_learning_rate_depends_on_init_from() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = setup(dir.path(), false);
    // From scratch: the from-scratch rate, stored in the run's configuration.
    let (_, scratch) = stored_config(&dir.path().join("run")).unwrap();
    assert_eq!(TextConfig::default().train.lr, 0.0);
    assert_eq!(scratch.train.lr, SCRATCH_LR);
    // Adapting a checkpoint (the first run's Hugging Face export): the adaptation rate.
    let mut adapt = tiny();
    adapt.train.max_steps = 1;
    adapt.model.init_from = dir.path().join("run/hf").to_string_lossy().into_owned();
    let run = dir.path().join("adapted");
    pretrain(adapt.clone(), &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(stored_config(&run).unwrap().1.train.lr, ADAPT_LR);
    // An explicit rate wins, with or without init_from.
    for init_from in [adapt.model.init_from.clone(), String::new()] {
        let mut explicit = adapt.clone();
        explicit.model.init_from = init_from;
        explicit.train.lr = 1e-3;
        let run = dir
            .path()
            .join(format!("explicit{}", explicit.model.init_from.len()));
        pretrain(explicit, &data, &run, &RunOptions::default()).unwrap();
        assert_eq!(stored_config(&run).unwrap().1.train.lr, 1e-3);
    }
}

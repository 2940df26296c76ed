//! Fine-tuning a pretrained ViT as a classifier (`ssl_vision::finetune`): end to end on tiny
//! synthetic images with string labels (checkpoints, report, the drawn fraction sizes, the
//! test split streamed), a frozen encoder keeps its weights while full fine-tuning moves
//! them, the fine-tuned run directory embeds, and a missing label column is named.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use candle_core::{Device, Tensor};
use ssl_core::finetune::{FinetuneConfig, FinetuneMode, FinetuneReport};
use ssl_core::run_dir::RunOptions;
use ssl_vision::{embed, finetune, finetune_config, pretrain, stored_config, VisionConfig};

const S: usize = 8;

/// Grey `S x S` PNGs: class `h` horizontal stripes, class `v` vertical ones (a random phase
/// and noise per image), `counts[k]` images of class k, written with a `label` column.
fn write_images(path: &Path, counts: [usize; 2], seed: u64) -> Vec<String> {
    let mut rng = ssl_core::SslRng::new(seed);
    let (mut pngs, mut labels) = (Vec::new(), Vec::new());
    for (class, &n) in counts.iter().enumerate() {
        for _ in 0..n {
            let phase = rng.below(4);
            let px: Vec<u8> = (0..S * S)
                .map(|p| {
                    let (y, x) = (p / S, p % S);
                    let on = (if class == 0 { y } else { x } + phase) % 4 < 2;
                    let noise = rng.below(40) as u8;
                    if on {
                        200 + noise
                    } else {
                        noise
                    }
                })
                .collect();
            let img = image::GrayImage::from_raw(S as u32, S as u32, px).unwrap();
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            pngs.push(out.into_inner());
            labels.push(if class == 0 { "h" } else { "v" });
        }
    }
    let batch = RecordBatch::try_from_iter([
        (
            "image",
            Arc::new(BinaryArray::from_iter_values(pngs.iter())) as ArrayRef,
        ),
        ("label", Arc::new(StringArray::from(labels)) as ArrayRef),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(16))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    vec![path.display().to_string()]
}

/// A tiny MAE pretrained for a few steps on `data` into `run`.
fn pretrained(data: &[String], run: &Path) {
    let mut cfg = VisionConfig::default();
    cfg.model.patch_size = 4;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 2, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (cfg.train.max_steps, cfg.train.batch_size) = (4, 8);
    cfg.train.warmup_steps = 1;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.data.health_examples = 0;
    cfg.task.preview_images = 0;
    pretrain(cfg, data, run, &RunOptions::default()).unwrap();
}

/// The vision defaults, shortened to `steps` steps of batch 8.
fn short(fractions: &[f64], mode: FinetuneMode, steps: u64) -> FinetuneConfig {
    let mut ft = finetune_config();
    ft.label_fractions = fractions.to_vec();
    ft.mode = mode;
    (ft.train.max_epochs, ft.train.max_steps) = (0.0, steps);
    ft.train.batch_size = 8;
    ft.train.warmup_steps = 2;
    ft.train.lr = 3e-3;
    ft.train.log_every = 0;
    ft
}

fn model(dir: &Path) -> HashMap<String, Tensor> {
    let (ckpt, _) = stored_config(dir).unwrap();
    candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap()
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

#[test]
fn fine_tuning_runs_end_to_end_and_the_run_embeds() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_images(&dir.path().join("train.parquet"), [40, 20], 1);
    let test = write_images(&dir.path().join("test.parquet"), [10, 14], 2);
    let run = dir.path().join("run");
    pretrained(&train, &run);
    let (ckpt, cfg) = stored_config(&run).unwrap();
    let out = dir.path().join("ft");
    let ft = short(&[0.1, 1.0], FinetuneMode::Full, 30);
    let report = finetune(
        &ckpt,
        &cfg,
        &ft,
        &train,
        &test,
        &out,
        &RunOptions::default(),
    )
    .unwrap();

    assert_eq!(report.classes, ["h", "v"]);
    assert_eq!((report.train_rows, report.test_rows), (60, 24));
    // Per class round(fraction x n), at least one: 4 + 2 of 40 + 20, then all.
    let sizes: Vec<usize> = report.runs.iter().map(|r| r.train_examples).collect();
    assert_eq!(sizes, [6, 60]);
    for r in &report.runs {
        let scratch = r
            .scratch
            .as_ref()
            .expect("compare_scratch is on by default");
        for s in [&r.pretrained, scratch] {
            assert_eq!(s.steps, 30);
            assert_eq!(s.test.examples, 24);
            assert!(s.final_train_loss.is_some_and(f64::is_finite));
            assert!(s.dir.join("checkpoints").is_dir(), "{}", s.dir.display());
        }
    }
    // Stripes by orientation are easy: well above the majority class (14 of 24) after 30
    // steps on all 60 images.
    let full = &report.runs[1].pretrained.test;
    assert!(full.accuracy > 0.75, "accuracy {}", full.accuracy);
    let written: FinetuneReport =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(written, report);

    // Full fine-tuning moved the encoder; the checkpoint holds the encoder and the head, not
    // the decoder, and embeds like a pretrained run.
    let tuned_dir = &report.runs[1].pretrained.dir;
    let (before, after) = (model(&run), model(tuned_dir));
    let key = "vit.encoder.layer.0.attention.attention.query.weight";
    assert!(max_diff(&before[key], &after[key]) > 0.0);
    assert!(after.contains_key("classifier.weight"));
    assert!(!after.keys().any(|k| k.starts_with("decoder.")));
    let (tuned, tuned_cfg) = stored_config(tuned_dir).unwrap();
    assert_eq!(tuned_cfg.model, cfg.model);
    let emb = embed(&tuned, &tuned_cfg, &test, &dir.path().join("emb.parquet")).unwrap();
    assert_eq!((emb.rows, emb.dim), (24, 16));
}

#[test]
fn a_frozen_encoder_keeps_its_weights_and_a_held_out_split_scores() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_images(&dir.path().join("train.parquet"), [30, 30], 3);
    let run = dir.path().join("run");
    pretrained(&train, &run);
    let (ckpt, cfg) = stored_config(&run).unwrap();
    let mut ft = short(&[1.0], FinetuneMode::Frozen, 12);
    ft.compare_scratch = false;
    let out = dir.path().join("ft");
    // No test files: a seeded stratified part of the data is held out and scored.
    let report = finetune(&ckpt, &cfg, &ft, &train, &[], &out, &RunOptions::default()).unwrap();
    let r = &report.runs[0];
    assert!(r.scratch.is_none());
    assert_eq!(r.train_examples + report.test_rows, 60);
    assert_eq!(r.pretrained.test.examples, report.test_rows);
    let (before, after) = (model(&run), model(&r.pretrained.dir));
    let mut encoder = 0;
    for (name, t) in before.iter().filter(|(k, _)| k.starts_with("vit.")) {
        assert_eq!(
            max_diff(t, &after[name]),
            0.0,
            "{name} moved in frozen mode"
        );
        encoder += 1;
    }
    assert!(encoder > 10);
    // The head trained on standardised features: their measured statistics are stored with it.
    let mean = after["classifier.feature_mean"].to_vec1::<f32>().unwrap();
    assert!(
        mean.iter().any(|&m| m != 0.0),
        "feature statistics never measured"
    );
    let head = &after["classifier.weight"];
    let init_scale = head
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(init_scale > 1e-3, "the head did not train ({init_scale})");
}

#[test]
fn a_missing_label_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_images(&dir.path().join("train.parquet"), [8, 8], 4);
    let run = dir.path().join("run");
    pretrained(&train, &run);
    let (ckpt, cfg) = stored_config(&run).unwrap();
    let mut ft = short(&[1.0], FinetuneMode::Full, 2);
    ft.label_column = "species".into();
    let err = finetune(
        &ckpt,
        &cfg,
        &ft,
        &train,
        &[],
        &dir.path().join("ft"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("species"), "{err}");
    assert!(err.contains("train.parquet"), "{err}");
}

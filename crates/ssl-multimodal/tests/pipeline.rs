//! The pipeline as library calls: ranks split their rows as one process splits the source,
//! and a tiny run pretrains, embeds both towers and evaluates from a Parquet file.

mod common;

use std::path::Path;

use ssl_core::run_dir::RunOptions;
use ssl_core::Parallel;
use ssl_multimodal::pipeline::{
    filter_scores, pair_filter, read_run_pairs, row_split, training_sample,
};
use ssl_multimodal::*;

/// 400 toy pairs (16x16) in row groups of `rows_per_group`.
fn toy_file(dir: &Path, rows_per_group: usize) -> Vec<String> {
    let path = dir.join("pairs.parquet");
    toy::write_parquet(&toy::toy_pairs(400, 16, 3).unwrap(), &path, rows_per_group).unwrap();
    vec![path.to_string_lossy().into_owned()]
}

#[test]
fn max_pairs_is_a_seeded_sample_spread_over_the_source() {
    let dir = tempfile::tempdir().unwrap();
    // 400 pairs in row groups of 30 (14 groups).
    let paths = toy_file(dir.path(), 30);
    let mut cfg = MultimodalConfig::default();
    cfg.data.max_pairs = 300;
    cfg.data.resize = vec![16, 16];
    let all = read_run_pairs(
        &paths,
        &MultimodalConfig {
            data: MultimodalDataConfig {
                max_pairs: 0,
                ..cfg.data.clone()
            },
            ..cfg.clone()
        },
        &[],
    )
    .unwrap();
    assert_eq!(all.len(), 400);
    let some = read_run_pairs(&paths, &cfg, &[]).unwrap();
    assert!((260..340).contains(&some.len()), "{}", some.len());
    let split = row_split(&cfg, &ssl_data::ParquetSource::open(&paths).unwrap()).unwrap();
    let want: Vec<String> = (0..400)
        .filter(|&i| split.in_sample(i))
        .map(|i| all.ids[i].clone())
        .collect();
    assert_eq!(some.ids, want);
    // Not the first rows: rows of the last tenth are in the sample too.
    assert!((360..400).any(|i| split.in_sample(i)));
    cfg.train.seed = 1;
    let other = read_run_pairs(&paths, &cfg, &[]).unwrap();
    assert_ne!(other.ids, some.ids, "the seed picks the sample");
}

/// The shared tiny configuration, four steps, zero-shot over `shape` and `color`.
fn tiny_config() -> MultimodalConfig {
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 4;
    cfg.eval.zero_shot_columns = vec!["shape".into(), "color".into()];
    cfg.eval.templates = vec!["a {}".into()];
    cfg
}

#[test]
fn pretrain_embed_and_eval_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path(), 100);
    let run = dir.path().join("run");
    let summary = pretrain(tiny_config(), &paths, &run, &RunOptions::default()).unwrap();
    assert_eq!(summary.run.step, 4);
    assert!(summary.run.first_loss.is_finite() && summary.logit_scale.is_finite());
    for f in ["config.toml", "tokenizer.json", "metrics.jsonl"] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let (ckpt, mut cfg) = stored_config(&run).unwrap();
    assert_eq!(cfg.model.image.image_height, 16);
    for tower in [Tower::Image, Tower::Text] {
        cfg.embed.tower = tower;
        let out = dir.path().join(format!("{}.parquet", tower.name()));
        let e = embed(&ckpt, &cfg, &paths, &out).unwrap();
        assert_eq!((e.written.rows, e.written.dim), (400, 16));
        let read = ssl_data::read_embeddings(&out).unwrap();
        assert_eq!(read.ids.len(), 400);
    }
    let report = eval(&ckpt, &cfg, &paths, &[], None).unwrap();
    // The run's held-out rows (by global row index), all of them under data.max_heldout_pairs.
    let split = row_split(&cfg, &ssl_data::ParquetSource::open(&paths).unwrap()).unwrap();
    let n_held = split.counts().1;
    assert!((50..110).contains(&n_held), "{n_held}");
    assert_eq!(report.n_heldout, n_held);
    let v = serde_json::to_value(&report).unwrap();
    for side in ["trained", "untrained"] {
        for k in ["r@1", "r@5", "r@10"] {
            let r = v[side]["image_to_text"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&r), "{side} {k} {r}");
        }
        for c in ["shape", "color"] {
            assert!(v[side]["zero_shot"][c]["accuracy"].is_number(), "{v}");
        }
    }
    let chance = 5.0 / n_held as f64;
    assert!((v["trained"]["chance"]["r@5"].as_f64().unwrap() - chance).abs() < 1e-12);
}

#[test]
fn towers_start_from_text_and_vision_runs_and_a_run_filters_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path(), 100);
    let opts = RunOptions::default();
    // A tiny MAE run on the toy images.
    let mut v = ssl_vision::VisionConfig::default();
    v.train.max_steps = 2;
    v.train.batch_size = 32;
    v.data.resize = vec![16, 16];
    v.data.color = ssl_data::ColorMode::Rgb;
    v.model.patch_size = 4;
    v.model.dim = 32;
    v.model.depth = 1;
    v.model.heads = 2;
    v.task.mae.decoder_dim = 16;
    v.task.mae.decoder_depth = 1;
    v.task.mae.decoder_heads = 2;
    let vision_run = dir.path().join("vision");
    ssl_vision::pretrain(v, &paths, &vision_run, &opts).unwrap();
    // A tiny MLM run on the toy captions.
    let mut t = ssl_text::TextConfig::default();
    t.train.max_steps = 2;
    t.train.batch_size = 16;
    t.data.column = "caption".into();
    t.tokenizer.train.vocab_size = 100;
    let text_run = dir.path().join("text");
    ssl_text::pretrain(t, &paths, &text_run, &opts).unwrap();
    let (_, vision) = ssl_vision::stored_config(&vision_run).unwrap();
    let (_, text) = ssl_text::stored_config(&text_run).unwrap();

    let mut cfg = tiny_config();
    cfg.init.image_from = vision_run.to_string_lossy().into_owned();
    cfg.init.text_from = text_run.to_string_lossy().into_owned();
    let run = dir.path().join("clip");
    pretrain(cfg, &paths, &run, &opts).unwrap();
    let (_, got) = stored_config(&run).unwrap();
    assert_eq!(got.model.image, vision.model);
    assert_eq!(got.model.image_mean, vision.task.augment.mean);
    assert_eq!(got.model.image_std, vision.task.augment.std);
    assert_eq!(got.model.text, text.model.config);
    let tok = |f: &str| std::fs::read_to_string(f).unwrap();
    assert_eq!(tok(&got.tokenizer.file), tok(&text.tokenizer.file));

    // The trained run scores the pairs of a second run, which drops the lowest 10%: the
    // threshold is the 10% quantile of a sample's scores (here the sample is every training
    // pair), applied pair by pair as they stream.
    let mut cfg = tiny_config();
    cfg.data.filter_checkpoint = run.to_string_lossy().into_owned();
    cfg.data.filter_drop_fraction = 0.1;
    let source = ssl_data::ParquetSource::open(&paths).unwrap();
    let split = row_split(&cfg, &source).unwrap();
    let sample = training_sample(&source, &cfg, &split).unwrap();
    assert_eq!(sample.len(), split.counts().0);
    let filter = pair_filter(&cfg, &sample, &Parallel::single())
        .unwrap()
        .unwrap();
    let scores = filter_scores(&pipeline::LoadedRun::open(&run).unwrap(), &sample).unwrap();
    let dropped = scores.iter().filter(|&&s| s < filter.threshold).count();
    assert_eq!(dropped, (sample.len() as f64 * 0.1).round() as usize);
    pretrain(cfg, &paths, &dir.path().join("filtered"), &opts).unwrap();
}

#[test]
fn images_over_data_max_image_pixels_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path(), 100);
    let mut cfg = MultimodalConfig::default();
    // The toy images are 16x16 = 256 pixels; `resize` is checked against the same limit.
    cfg.data.resize = vec![];
    cfg.data.max_image_pixels = 255;
    let err = read_run_pairs(&paths, &cfg, &[]).unwrap_err().to_string();
    // Row groups decode in parallel workers: the row named is the first one any of them met.
    assert!(
        err.contains("16x16") && err.contains("data.max_image_pixels") && err.contains(" row "),
        "{err}"
    );
    cfg.data.max_image_pixels = 256;
    assert!(read_run_pairs(&paths, &cfg, &[]).is_ok());
    cfg.data.resize = vec![100_000, 100_000];
    let err = read_run_pairs(&paths, &cfg, &[]).unwrap_err().to_string();
    assert!(
        err.contains("resize") && err.contains("data.max_image_pixels"),
        "{err}"
    );
}

#[test]
fn empty_captions_are_errors_or_skipped_with_skip_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = toy::toy_pairs(6, 16, 3).unwrap();
    pairs.captions[2] = "  ".into();
    let path = dir.path().join("pairs.parquet");
    toy::write_parquet(&pairs, &path, 100).unwrap();
    let paths = vec![path.to_string_lossy().into_owned()];
    let mut cols = PairColumns {
        resize: vec![16, 16],
        ..PairColumns::default()
    };
    let err = read_pairs(&paths, &cols).unwrap_err().to_string();
    assert!(
        err.contains("row 2") && err.contains("empty") && err.contains("data.skip_bad_rows"),
        "{err}"
    );
    cols.skip_bad_rows = true;
    let r = read_pairs_of(&paths, &cols, 0, 1).unwrap();
    assert_eq!(r.set.len(), 5);
    assert_eq!(r.row_index, [0, 1, 3, 4, 5]);
}

#[test]
fn a_single_training_pair_is_refused_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.parquet");
    toy::write_parquet(&toy::toy_pairs(1, 16, 3).unwrap(), &path, 100).unwrap();
    let paths = vec![path.to_string_lossy().into_owned()];
    let mut cfg = tiny_config();
    cfg.data.heldout_fraction = 0.0;
    let err = pretrain(cfg, &paths, &dir.path().join("run"), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at least 2 pairs") && err.contains("1 training pair"),
        "{err}"
    );
}

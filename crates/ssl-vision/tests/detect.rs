//! Defect detection on synthetic images: normal images are smooth random stripes; defects
//! add a bright blob. Trained and fitted on normal images only.

use candle_core::Device;
use ssl_core::{LoopTrainer, ParamStore, SslRng, TrainConfig, Trainer};
use ssl_vision::detect::calibrate::ThresholdMethod;
use ssl_vision::detect::{Detector, DetectorConfig, PositionNorm, ScorerKind};
use ssl_vision::*;

const S: usize = 16;

fn stripes(rng: &mut SslRng) -> Vec<f32> {
    let f = rng.uniform_range(0.3, 0.6);
    let ph = rng.uniform_range(0.0, std::f32::consts::TAU);
    let mut v = Vec::with_capacity(S * S);
    for y in 0..S {
        for x in 0..S {
            let t = (x as f32 * f + ph).sin() * 0.15 + 0.4 + 0.01 * y as f32;
            v.push(t + 0.01 * rng.normal());
        }
    }
    v
}

/// Adds a bright disc of radius 2; returns the image and the disc's centre.
fn with_blob(mut v: Vec<f32>, rng: &mut SslRng) -> (Vec<f32>, (usize, usize)) {
    let (cy, cx) = (rng.below(S - 6) + 3, rng.below(S - 6) + 3);
    for y in 0..S {
        for x in 0..S {
            let d2 = (y as f32 - cy as f32).powi(2) + (x as f32 - cx as f32).powi(2);
            if d2 <= 4.0 {
                v[y * S + x] = 1.0;
            }
        }
    }
    (v, (cy, cx))
}

fn auroc(normal: &[f64], defect: &[f64]) -> f64 {
    let mut wins = 0.0;
    for d in defect {
        for n in normal {
            wins += if d > n {
                1.0
            } else if d == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (normal.len() * defect.len()) as f64
}

#[test]
fn bright_blob_scores_above_normal_images() {
    let dev = Device::Cpu;
    let mut rng = SslRng::new(0);
    let normal: Vec<f32> = (0..120).flat_map(|_| stripes(&mut rng)).collect();
    let normal = ImageSet::new(normal, [1, S, S]).unwrap();
    let vit = ViTConfig {
        image_height: S,
        image_width: S,
        channels: 1,
        patch_size: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 2.0,
        ..ViTConfig::default()
    };
    let mae = MaeConfig {
        decoder_dim: 16,
        decoder_depth: 1,
        decoder_heads: 2,
        mask_ratio: 0.5,
        ..MaeConfig::default()
    };
    let aug = AugmentConfig {
        crop: false,
        hflip: false,
        mean: vec![0.4],
        std: vec![0.2],
        ..AugmentConfig::default()
    };
    let store = ParamStore::new(&dev);
    let task = MaeTask::new(&vit, &mae, &aug, &store.builder(0)).unwrap();
    let mut src = InMemoryImageSource::new(normal.clone(), 32, 0, &dev).unwrap();
    let train = TrainConfig {
        lr: 2e-3,
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        health_every: 0,
        divergence_factor: 0.0,
        ..recipe_train_config(1e-3, 32, 1, 80)
    };
    LoopTrainer::new(train, None)
        .unwrap()
        .fit(&task, &mut src, None)
        .unwrap();

    let test_normal: Vec<f32> = (0..20).flat_map(|_| stripes(&mut rng)).collect();
    let mut centres = Vec::new();
    let test_defect: Vec<f32> = (0..20)
        .flat_map(|_| {
            let s = stripes(&mut rng);
            let (img, c) = with_blob(s, &mut rng);
            centres.push(c);
            img
        })
        .collect();
    let tn = ImageSet::new(test_normal, [1, S, S]).unwrap();
    let td = ImageSet::new(test_defect, [1, S, S]).unwrap();
    let mean = PositionNorm::Mean;
    for (scorers, recon_position_norm, recon_repeats) in [
        (vec![ScorerKind::Reconstruction], mean, 1),
        (vec![ScorerKind::Reconstruction], PositionNorm::Zscore, 2),
        (vec![ScorerKind::PatchCore], mean, 1),
        (vec![ScorerKind::RawPixels], mean, 1),
        (
            vec![ScorerKind::Reconstruction, ScorerKind::PatchCore],
            mean,
            1,
        ),
    ] {
        let cfg = DetectorConfig {
            scorers: scorers.clone(),
            recon_position_norm,
            recon_repeats,
            threshold: ThresholdMethod::MeanStd { k: 3.0 },
            coreset_ratio: 0.25,
            ..DetectorConfig::default()
        };
        let det = Detector::fit(&task, &normal, &cfg, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        det.save(dir.path()).unwrap();
        let det = Detector::load(dir.path()).unwrap();
        let sn: Vec<f64> = det
            .score(&task, &tn, &dev)
            .unwrap()
            .iter()
            .map(|s| s.score)
            .collect();
        let sd = det.score(&task, &td, &dev).unwrap();
        let a = auroc(&sn, &sd.iter().map(|s| s.score).collect::<Vec<_>>());
        assert!(a > 0.9, "{scorers:?}: AUROC {a}");
        let flagged = sd.iter().filter(|s| s.flag).count();
        assert!(
            flagged >= 14,
            "{scorers:?}: only {flagged}/20 defects flagged"
        );
        // The heat-map's hottest patch is the blob's patch or touches it (4x4 grid of 4 px).
        let mut located = 0;
        for (s, &(cy, cx)) in sd.iter().zip(&centres) {
            assert_eq!(s.patch_map.len(), 16);
            let hot = (0..16)
                .max_by(|&a, &b| s.patch_map[a].total_cmp(&s.patch_map[b]))
                .unwrap();
            let (hy, hx) = (hot / 4, hot % 4);
            if hy.abs_diff(cy / 4) <= 1 && hx.abs_diff(cx / 4) <= 1 {
                located += 1;
            }
        }
        assert!(
            located >= 16,
            "{scorers:?}: blob located in {located}/20 heat-maps"
        );
    }
}

/// A Parquet file at `path` with the grey images `imgs` (`S` x `S`, values in [0, 1]) as PNG
/// bytes in column `image`, and the numeric column `defect_prob` when `labels` is given.
fn write_images(path: &std::path::Path, imgs: &[Vec<f32>], labels: Option<&[f64]>) -> Vec<String> {
    use arrow::array::{ArrayRef, BinaryArray, Float64Array, RecordBatch};
    use std::sync::Arc;
    let pngs: Vec<Vec<u8>> = imgs
        .iter()
        .map(|v| {
            let px: Vec<u8> = v
                .iter()
                .map(|x| (x.clamp(0.0, 1.0) * 255.0) as u8)
                .collect();
            let img = image::GrayImage::from_raw(S as u32, S as u32, px).unwrap();
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        })
        .collect();
    let mut cols: Vec<(&str, ArrayRef)> = vec![(
        "image",
        Arc::new(BinaryArray::from_iter_values(pngs.iter())) as ArrayRef,
    )];
    if let Some(l) = labels {
        cols.push(("defect_prob", Arc::new(Float64Array::from(l.to_vec()))));
    }
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    vec![path.display().to_string()]
}

#[test]
fn detect_score_with_a_label_column_reports_auroc_and_f1() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SslRng::new(3);
    let normal: Vec<Vec<f32>> = (0..60).map(|_| stripes(&mut rng)).collect();
    let normal = write_images(&dir.path().join("normal.parquet"), &normal, None);
    // 12 normal images (0), 12 with a blob (1 and 2/3), 4 uncertain ones (1/3) left out.
    let (mut imgs, mut labels) = (Vec::new(), Vec::new());
    for i in 0..28 {
        let s = stripes(&mut rng);
        match i % 7 {
            0..=2 => (imgs.push(s), labels.push(0.0)),
            3 => (imgs.push(s), labels.push(1.0 / 3.0)),
            k => (
                imgs.push(with_blob(s, &mut rng).0),
                labels.push(if k == 4 { 2.0 / 3.0 } else { 1.0 }),
            ),
        };
    }
    let test = write_images(&dir.path().join("test.parquet"), &imgs, Some(&labels));

    let mut cfg = VisionConfig::default();
    (
        cfg.model.image_height,
        cfg.model.image_width,
        cfg.model.patch_size,
    ) = (S, S, 4);
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 1, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (
        cfg.train.max_steps,
        cfg.train.batch_size,
        cfg.train.warmup_steps,
    ) = (2, 8, 1);
    cfg.train.checkpoint_every_minutes = 0.0;
    (cfg.data.health_examples, cfg.task.preview_images) = (0, 0);
    let run = dir.path().join("run");
    pretrain(cfg, &normal, &run, &Default::default()).unwrap();
    let (ckpt, vcfg) = stored_config(&run).unwrap();
    let mut fit = DetectFitConfig::for_model(&vcfg);
    fit.detect.scorers = vec![ScorerKind::RawPixels];
    fit.detect.threshold = ThresholdMethod::MeanStd { k: 3.0 };
    let det = dir.path().join("det");
    detect_fit(&ckpt, vcfg, &fit, &normal, &det).unwrap();

    let mut vcfg = detector_config(&det).unwrap();
    let out = dir.path().join("scores.parquet");
    // The default label column (`label`) is not in the files: no report.
    let s = detect_score(&det, &vcfg, &test, &out, None).unwrap();
    assert!(s.labelled.is_none());
    std::fs::remove_file(&out).unwrap();
    vcfg.data.label_column = "defect_prob".into();
    let s = detect_score(&det, &vcfg, &test, &out, None).unwrap();
    let r = s.labelled.expect("a label report");
    assert_eq!((r.n_normal, r.n_defect, r.n_excluded), (12, 12, 4), "{r:?}");
    assert_eq!(r.threshold, s.threshold);
    let auroc = r.auroc.unwrap();
    assert!(auroc > 0.9, "{r:?}");
    assert!((0.0..=1.0).contains(&r.f1) && r.f1 > 0.5, "{r:?}");
    let v = serde_json::to_value(&r).unwrap();
    for k in [
        "auroc",
        "f1",
        "precision",
        "recall",
        "threshold",
        "label_column",
    ] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
}

#[test]
fn detect_fit_defaults_follow_the_cross_set_rule() {
    use ssl_vision::detect::pipeline::default_patch_layer;
    // 3 x depth / 4, rounded down: the layer the cross-set rule chose (README).
    for (depth, layer) in [(1, 0), (2, 1), (4, 3), (6, 4), (12, 9)] {
        assert_eq!(default_patch_layer(depth), layer, "depth {depth}");
    }
    for depth in 1..=32 {
        assert!(default_patch_layer(depth) < depth, "depth {depth}");
    }
    let mut vcfg = VisionConfig::default();
    vcfg.model.depth = 4;
    vcfg.train.seed = 7;
    let fit = DetectFitConfig::for_model(&vcfg);
    assert_eq!(fit.detect.patch_layer, 3);
    assert_eq!(fit.detect.seed, 7);
    assert_eq!(
        fit.detect.scorers,
        vec![ScorerKind::Reconstruction, ScorerKind::PatchCore]
    );
}

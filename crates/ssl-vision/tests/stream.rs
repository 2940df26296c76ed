//! Streaming vision pretraining: a run resumed from a checkpoint taken in the middle of an
//! epoch (and of a shuffle window) continues bit-identically, the streaming source serves the
//! same batches after `restore` as without it, and `train.max_epochs` sets the steps from the
//! footers' row count.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, Int64Array, RecordBatch};
use candle_core::Device;
use ssl_core::run_dir::RunOptions;
use ssl_core::{BatchSource, Parallel};
use ssl_vision::{pretrain, StreamingImageSource, VisionConfig, VisionTaskKind};

const S: usize = 8;

/// `n` grey `S x S` PNG images (varied pixels) with a label column, in row groups of `group`.
fn write_images(path: &Path, n: usize, group: usize) -> Vec<String> {
    let pngs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let px: Vec<u8> = (0..S * S)
                .map(|p| ((p * 37 + i * 101 + (p * i) % 13) % 256) as u8)
                .collect();
            let img = image::GrayImage::from_raw(S as u32, S as u32, px).unwrap();
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        })
        .collect();
    let batch = RecordBatch::try_from_iter([
        (
            "image",
            Arc::new(BinaryArray::from_iter_values(pngs.iter())) as ArrayRef,
        ),
        (
            "label",
            Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i % 3))) as ArrayRef,
        ),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    vec![path.display().to_string()]
}

fn tiny(kind: VisionTaskKind) -> VisionConfig {
    let mut cfg = VisionConfig::default();
    cfg.task.kind = kind;
    cfg.model.patch_size = 4;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 1, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    cfg.task.simclr.proj_dim = 8;
    cfg.train.batch_size = 8;
    cfg.train.warmup_steps = 1;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.data.health_examples = 4;
    cfg.task.preview_images = 2;
    cfg.task.preview_every = 0;
    cfg.data.heldout_fraction = 0.25;
    // Windows of one batch (8 rows, two row groups): several per epoch.
    cfg.data.shuffle_buffer_mb = 0.0;
    cfg
}

fn model_bytes(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/model.safetensors"))).unwrap()
}

/// Trains 7 steps, then resumes a copy of the run from its step-4 checkpoint (the later ones
/// removed, as if stopped there) and checks steps 5 to 7 are bit-identical.
fn resume_is_bit_identical(kind: VisionTaskKind) {
    let dir = tempfile::tempdir().unwrap();
    // 32 images, a quarter held out: about 24 training images, 3 batches of 8 per epoch.
    let data = write_images(&dir.path().join("images.parquet"), 32, 4);
    let mut cfg = tiny(kind);
    cfg.train.max_steps = 7;
    cfg.train.checkpoint_every_steps = 1;
    cfg.train.keep_checkpoints = 10;
    cfg.train.eval_every_steps = 3;
    let a = dir.path().join("a");
    let s = pretrain(cfg, &data, &a, &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 7);

    // Step 4 stands in the second epoch, past its start.
    let state = ssl_core::checkpoint::read_state(&a.join("checkpoints/step-00000004")).unwrap();
    let pos = &state.data_position;
    assert_eq!(pos["loader"]["epoch"].as_u64(), Some(1), "{pos}");
    let inside = pos["loader"]["row_group"].as_u64().unwrap() > 0
        || pos["loader"]["offset"].as_u64().unwrap() > 0
        || pos["skip"].as_u64().unwrap() > 0;
    assert!(inside, "{pos}");

    let b = dir.path().join("b");
    ssl_core::run_dir::fork_run(&a, &b, 4).unwrap();
    let (_, cfg) = ssl_vision::stored_config(&b).unwrap();
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let s = pretrain(cfg, &data, &b, &opts).unwrap();
    assert_eq!((s.run.start_step, s.run.step), (4, 7));
    for step in 5..=7 {
        assert!(
            model_bytes(&a, step) == model_bytes(&b, step),
            "step {step} differs after resuming at step 4 ({kind:?})"
        );
    }
}

#[test]
fn an_mae_run_resumed_mid_epoch_is_bit_identical() {
    resume_is_bit_identical(VisionTaskKind::Mae);
}

#[test]
fn a_simclr_run_resumed_mid_epoch_is_bit_identical() {
    // SimCLR's augmentations draw from the trainer's random stream, saved with the position.
    resume_is_bit_identical(VisionTaskKind::Simclr);
}

#[test]
fn the_source_serves_the_same_batches_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_images(&dir.path().join("images.parquet"), 30, 4);
    let mut cfg = tiny(VisionTaskKind::Mae);
    (
        cfg.model.channels,
        cfg.model.image_height,
        cfg.model.image_width,
    ) = (1, S, S);
    let par = Parallel::single();
    let mut a = StreamingImageSource::new(&data, &cfg, 5, &par, &Device::Cpu).unwrap();
    let mut batches = Vec::new();
    let mut positions = Vec::new();
    for _ in 0..12 {
        positions.push(a.position());
        let b = a.next_batch().unwrap();
        batches.push(b.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    // Epochs go on: 12 batches of 5 are more than two epochs of about 22 training images.
    assert!(a.epoch() >= 2);
    for start in [1, 4, 7, 11] {
        let mut b = StreamingImageSource::new(&data, &cfg, 5, &par, &Device::Cpu).unwrap();
        b.restore(&positions[start]).unwrap();
        for want in &batches[start..] {
            let got = b.next_batch().unwrap();
            assert_eq!(
                &got.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want
            );
        }
    }
}

#[test]
fn max_epochs_sets_the_steps_from_the_footers() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_images(&dir.path().join("images.parquet"), 40, 8);
    let mut cfg = tiny(VisionTaskKind::Mae);
    cfg.data.heldout_fraction = 0.0;
    cfg.data.max_images = 36;
    cfg.train.max_steps = 1000;
    cfg.train.max_epochs = 2.0;
    let run = dir.path().join("run");
    let s = pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    // 36 images (the max_images sample) / batch 8 = 5 steps an epoch.
    assert_eq!(s.run.step, 10);
    let (_, stored) = ssl_vision::stored_config(&run).unwrap();
    assert_eq!(stored.train.max_steps, 10);
}

#[test]
fn two_ranks_stream_their_share_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    // 12 row groups of 4: 6 for each rank.
    let data = write_images(&dir.path().join("images.parquet"), 48, 4);
    let run = dir.path().join("run");
    let mut cfg = tiny(VisionTaskKind::Mae);
    cfg.train.max_steps = 4;
    cfg.train.eval_every_steps = 2;
    let out = Parallel::on_threads(2, |p| {
        let opts = RunOptions {
            collective: Some(p.shared()),
            ..RunOptions::default()
        };
        let s = pretrain(cfg.clone(), &data, &run, &opts).unwrap();
        (s.run.step, s.run.first_loss, s.run.last_loss)
    });
    assert_eq!(out[0], out[1]);
    assert_eq!(out[0].0, 4);
    assert!(out[0].2.is_finite());
    // The statistics are the ranks' together: those of one process over every training image
    // (the sample is larger than the data).
    let (_, two) = ssl_vision::stored_config(&run).unwrap();
    let one_run = dir.path().join("one");
    pretrain(cfg, &data, &one_run, &RunOptions::default()).unwrap();
    let (_, one) = ssl_vision::stored_config(&one_run).unwrap();
    assert!((two.task.augment.mean[0] - one.task.augment.mean[0]).abs() < 1e-6);
    assert!((two.task.augment.std[0] - one.task.augment.std[0]).abs() < 1e-6);
}

#[test]
fn a_bad_image_mid_stream_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.parquet");
    let good = write_images(&dir.path().join("good.parquet"), 40, 4);
    // The same images with row 29's bytes broken.
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&good[0]).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let batch = reader.map(|b| b.unwrap()).next().unwrap();
    let images = batch
        .column(0)
        .as_any()
        .downcast_ref::<BinaryArray>()
        .unwrap();
    let broken: Vec<&[u8]> = (0..images.len())
        .map(|i| {
            if i == 29 {
                &b"not a png"[..]
            } else {
                images.value(i)
            }
        })
        .collect();
    let batch = RecordBatch::try_from_iter([
        (
            "image",
            Arc::new(BinaryArray::from_iter_values(broken)) as ArrayRef,
        ),
        ("label", batch.column(1).clone()),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(4))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let data = vec![path.display().to_string()];
    let mut cfg = tiny(VisionTaskKind::Mae);
    cfg.data.heldout_fraction = 0.0;
    cfg.data.stats_images = 8;
    cfg.train.max_steps = 12;
    let err = pretrain(
        cfg.clone(),
        &data,
        &dir.path().join("a"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("images.parquet") && err.contains("29"),
        "{err}"
    );
    cfg.data.skip_bad_rows = true;
    let s = pretrain(cfg, &data, &dir.path().join("b"), &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 12);
}

#[test]
fn a_bad_simclr_setting_is_refused_before_any_data_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(VisionTaskKind::Simclr);
    cfg.task.simclr.jitter_p = 2.0;
    // The data does not exist: the setting must be named, not the file.
    let missing = vec![dir.path().join("missing.parquet").display().to_string()];
    let err = pretrain(
        cfg,
        &missing,
        &dir.path().join("run"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("task.simclr.jitter_p"), "{err}");
    assert!(!dir.path().join("run").exists(), "nothing is written");
}

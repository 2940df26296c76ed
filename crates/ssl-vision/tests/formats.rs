//! An image folder (class subfolders of PNG files, written by the test) trains, embeds and
//! evaluates like a Parquet file: `ssl_data` reads it as `image`, `path` and `label` columns.

use std::path::Path;

use ssl_core::run_dir::RunOptions;
use ssl_vision::{embed, eval, pretrain, stored_config, VisionConfig};

/// 28x28 grey PNGs: "top" images bright in the top half, "bottom" ones in the bottom half,
/// with a little per-image variation.
fn write_folder(root: &Path, per_class: usize) {
    for (class, top) in [("top", true), ("bottom", false)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..per_class {
            let img = image::GrayImage::from_fn(28, 28, |x, y| {
                let bright = (y < 14) == top;
                let base = if bright { 200 } else { 30 };
                image::Luma([base + ((x as usize + i) % 7) as u8])
            });
            img.save(root.join(format!("{class}/{i:02}.png"))).unwrap();
        }
    }
}

#[test]
fn an_image_folder_pretrains_embeds_and_evaluates_with_folder_labels() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("images");
    write_folder(&folder, 12);
    let data = vec![format!("{}/", folder.display())];
    let source = ssl_data::ParquetSource::open(&data).unwrap();
    assert_eq!(
        (source.num_rows(), source.format(0)),
        (24, Some("image folder"))
    );
    let mut cfg = VisionConfig::default();
    cfg.data.health_examples = 0;
    cfg.data.id_column = "path".into();
    cfg.task.preview_images = 0;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 1, 2);
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (cfg.train.max_steps, cfg.train.batch_size) = (3, 8);
    cfg.train.warmup_steps = 1;
    cfg.train.checkpoint_every_minutes = 0.0;
    let run = dir.path().join("run");
    let summary = pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(summary.run.step, 3);
    assert!(summary.run.last_loss.is_finite());
    let ckpt = summary.run.last_checkpoint.expect("a final checkpoint");
    let (ckpt, cfg) = stored_config(&ckpt).unwrap();

    let out = dir.path().join("emb.parquet");
    let emb = embed(&ckpt, &cfg, &data, &out).unwrap();
    assert_eq!((emb.rows, emb.dim), (24, 16));
    let written = ssl_data::read_embeddings(&out).unwrap();
    assert_eq!(written.ids[0], "bottom/00.png");
    assert_eq!(written.ids[23], "top/11.png");

    let report = eval(&ckpt, &cfg, &data, &data, Some("label")).unwrap();
    assert_eq!((report.n_classes, report.n_test), (2, 24));
    // The halves differ in brightness: raw pixels separate the folders' classes, so the
    // labels came out of the folder names right.
    assert!(report.raw_pixels.linear_probe_accuracy > 0.99, "{report:?}");
}

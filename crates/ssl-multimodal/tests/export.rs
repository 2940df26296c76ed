//! The Hugging Face export of a multimodal run: `pretrain` writes `RUN/hf` (`vision/`, a
//! `ViTModel` directory; `text/`, a `BertModel` directory with the tokenizer; the projections;
//! a README) and `export_hf` writes the same from a checkpoint. Names, shapes, configuration
//! fields, the safetensors metadata and file modes are checked here, and that the exported
//! towers, read back, compute the run's own features; that transformers computes them too is
//! checked by `bench/hf_check.py`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ssl_core::run_dir::RunOptions;
use ssl_core::{read_safetensors, Ctx, Encoder, ParamStore, SslRng};
use ssl_multimodal::*;
use ssl_text::{MaskingConfig, TextBatch};
use ssl_vision::{Images, VisionTransformer};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `__metadata__` of a safetensors file's header.
fn metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

fn shapes(path: &Path) -> HashMap<String, Vec<usize>> {
    read_safetensors(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.dims().to_vec()))
        .collect()
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
fn a_run_exports_both_towers_and_the_projections() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.parquet");
    toy::write_parquet(&toy::toy_pairs(96, 16, 3).unwrap(), &data, 48).unwrap();
    let data = vec![data.to_string_lossy().into_owned()];
    let run = dir.path().join("run");
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 2;
    cfg.model.image.depth = 2;
    let summary = pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    let hf = run.join("hf");
    assert_eq!(summary.hf.as_deref(), Some(hf.as_path()));
    let loaded = LoadedRun::open(&run).unwrap();
    let m = &loaded.cfg.model;

    // The image tower: transformers' ViTModel names, the run's normalisation.
    let vision = hf.join("vision");
    let conf = json(&vision.join("config.json"));
    assert_eq!(conf["model_type"], "vit");
    assert_eq!(conf["hidden_size"], m.image.dim);
    assert_eq!(conf["num_hidden_layers"], 2);
    assert_eq!(conf["image_size"], 16);
    let pre = json(&vision.join("preprocessor_config.json"));
    let mean: Vec<f32> = pre["image_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(mean.len(), 3);
    for (c, v) in mean.iter().enumerate() {
        let want = if m.image_mean.len() == 1 {
            m.image_mean[0]
        } else {
            m.image_mean[c]
        };
        assert_eq!(*v, want);
    }
    let vs = shapes(&vision.join("model.safetensors"));
    let (d, p) = (m.image.dim, m.image.patch_size);
    assert_eq!(
        vs["embeddings.patch_embeddings.projection.weight"],
        [d, 3, p, p]
    );
    assert_eq!(vs["embeddings.position_embeddings"], [1, 1 + 16, d]);
    assert_eq!(
        vs["encoder.layer.1.attention.attention.query.weight"],
        [d, d]
    );
    assert!(vs.keys().all(|k| !k.starts_with("vision_model")), "{vs:?}");

    // The text tower: a BertModel configuration, ssl-text's keys, no MLM head, the tokenizer.
    let text = hf.join("text");
    let conf = json(&text.join("config.json"));
    assert_eq!(conf["model_type"], "bert");
    assert_eq!(conf["architectures"], serde_json::json!(["BertModel"]));
    assert_eq!(conf["hidden_size"], m.text.hidden_size);
    assert_eq!(conf["vocab_size"], m.text.vocab_size);
    assert_eq!(conf["ssl_pooling"], "mean");
    assert_eq!(conf["ssl_max_seq_len"], loaded.cfg.max_seq_len);
    let ts = shapes(&text.join("model.safetensors"));
    assert_eq!(
        ts["bert.embeddings.word_embeddings.weight"],
        [m.text.vocab_size, m.text.hidden_size]
    );
    assert!(ts.keys().all(|k| k.starts_with("bert.")), "{ts:?}");
    assert!(text.join("tokenizer.json").is_file());

    // The projections and the temperature.
    let ps = shapes(&hf.join("projections.safetensors"));
    assert_eq!(ps["visual_projection.weight"], [m.embed_dim, m.image.dim]);
    assert_eq!(
        ps["text_projection.weight"],
        [m.embed_dim, m.text.hidden_size]
    );
    assert_eq!(ps["logit_scale"], Vec::<usize>::new());
    assert_eq!(ps.len(), 3);
    assert!(std::fs::read_to_string(hf.join("README.md"))
        .unwrap()
        .contains("projections.safetensors"));

    // Every safetensors file says format = pt; every file has an ordinary mode.
    let files = [
        vision.join("config.json"),
        vision.join("model.safetensors"),
        vision.join("preprocessor_config.json"),
        text.join("config.json"),
        text.join("model.safetensors"),
        text.join("tokenizer.json"),
        hf.join("projections.safetensors"),
        hf.join("README.md"),
    ];
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
    {
        assert_eq!(metadata(f)["format"], "pt", "{}", f.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for f in &files {
            assert_eq!(mode(f), mode(&plain), "{}", f.display());
        }
    }

    // Read back, the towers compute the run's features.
    let mut rng = SslRng::new(0);
    let pairs = toy::toy_pairs(4, 16, 7).unwrap();
    let images = pairs.images.batch(0, 4, &Device::Cpu).unwrap();
    let ours = loaded
        .model
        .image_features(&images, &mut Ctx::eval(&mut rng))
        .unwrap();
    let store = ParamStore::new(&Device::Cpu);
    let vit = VisionTransformer::new(&m.image, &store.builder(1)).unwrap();
    let report = store
        .load_from(
            &read_safetensors(&vision.join("model.safetensors"), &Device::Cpu).unwrap(),
            &vision,
        )
        .unwrap();
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    let stat = |v: &[f32]| Tensor::from_vec(mean_or(v, 3), (1, 3, 1, 1), &Device::Cpu).unwrap();
    let px = images
        .pixels
        .broadcast_sub(&stat(&m.image_mean))
        .unwrap()
        .broadcast_div(&stat(&m.image_std))
        .unwrap();
    let theirs = vit
        .encode(&Images { pixels: px }, &mut Ctx::eval(&mut rng))
        .unwrap()
        .pooled;
    assert!(max_diff(&ours, &theirs) < 1e-6);

    let seqs = tokenize_captions(
        &loaded.tok,
        &pairs.captions,
        &pairs.ids,
        loaded.cfg.max_seq_len,
    )
    .unwrap();
    let pad = ssl_text::SpecialIds::of(&loaded.tok).unwrap().pad;
    let input = TextBatch {
        seqs,
        pad_id: pad,
        device: Device::Cpu,
    }
    .tensors()
    .unwrap();
    let ours = loaded
        .model
        .text_features(&input, &mut Ctx::eval(&mut rng))
        .unwrap();
    let bert = ssl_text::load_hf_dir(&text, MaskingConfig::default(), 0, &Device::Cpu).unwrap();
    assert!(bert.fresh_head, "the text directory holds the encoder only");
    let theirs = bert
        .model
        .bert()
        .encode(&input, &mut Ctx::eval(&mut rng))
        .unwrap()
        .pooled;
    assert!(max_diff(&ours, &theirs) < 1e-6);

    // The library call writes the same files from the run's newest checkpoint.
    let again = dir.path().join("again");
    export_hf(&run, &again).unwrap();
    for f in &files {
        let rel = f.strip_prefix(&hf).unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(again.join(rel)).unwrap(),
            "{}",
            rel.display()
        );
    }
}

/// One value per channel from one value or one per channel.
fn mean_or(v: &[f32], c: usize) -> Vec<f32> {
    if v.len() == 1 {
        vec![v[0]; c]
    } else {
        v.to_vec()
    }
}

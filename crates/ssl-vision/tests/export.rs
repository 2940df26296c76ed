//! The Hugging Face export of a vision run: `pretrain` writes `RUN/hf` and `export_hf` writes
//! the same directory from a checkpoint; its key names and shapes are transformers' `ViTModel`
//! ones, `config.json` and `preprocessor_config.json` carry the run's settings, the
//! safetensors header has `{"format": "pt"}` and the files have ordinary modes. (That
//! transformers loads it and computes our embeddings is checked by `bench/hf_check.py`.)

use std::path::Path;

use ssl_core::run_dir::RunOptions;
use ssl_vision::{export_hf, pretrain, stored_config, Pooling, VisionConfig};

fn sample() -> Vec<String> {
    vec![concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ssl-cli/data/fashion_mnist_sample.parquet"
    )
    .to_string()]
}

fn tiny() -> VisionConfig {
    let mut cfg = VisionConfig::default();
    cfg.data.max_images = 32;
    cfg.data.health_examples = 0;
    cfg.data.heldout_fraction = 0.0;
    cfg.task.preview_images = 0;
    (cfg.model.dim, cfg.model.depth, cfg.model.heads) = (16, 2, 2);
    cfg.model.pooling = Pooling::Mean;
    (cfg.task.mae.decoder_dim, cfg.task.mae.decoder_depth) = (16, 1);
    cfg.task.mae.decoder_heads = 2;
    (cfg.train.max_steps, cfg.train.batch_size) = (2, 8);
    cfg.train.warmup_steps = 1;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_run_exports_a_transformers_vit_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let summary = pretrain(tiny(), &sample(), &run, &RunOptions::default()).unwrap();
    let hf = run.join("hf");
    assert_eq!(summary.hf.as_deref(), Some(hf.as_path()));
    let (_, cfg) = stored_config(&run).unwrap();
    let m = &cfg.model;
    let (d, p, c) = (m.dim, m.patch_size, m.channels);
    let l = (m.image_height / p) * (m.image_width / p);

    // config.json: transformers' ViTConfig fields, from the run's model.
    let conf = json(&hf.join("config.json"));
    assert_eq!(conf["model_type"], "vit");
    assert_eq!(conf["hidden_size"], d);
    assert_eq!(conf["num_hidden_layers"], m.depth);
    assert_eq!(conf["num_attention_heads"], m.heads);
    assert_eq!(conf["intermediate_size"], m.transformer().mlp_dim);
    assert_eq!(conf["image_size"], m.image_height); // the sample is square (28x28)
    assert_eq!(conf["patch_size"], p);
    assert_eq!(conf["num_channels"], c);
    assert_eq!(conf["qkv_bias"], true);
    assert_eq!(conf["hidden_act"], "gelu");
    assert_eq!(conf["layer_norm_eps"], m.layer_norm_eps);
    assert_eq!(conf["ssl_pooling"], "mean");

    // preprocessor_config.json: the run's normalisation statistics, per channel.
    let pre = json(&hf.join("preprocessor_config.json"));
    assert_eq!(pre["image_processor_type"], "ViTImageProcessor");
    assert_eq!(pre["size"]["height"], m.image_height);
    assert_eq!(pre["size"]["width"], m.image_width);
    let stat = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let aug = &cfg.task.augment;
    assert_eq!(stat(&pre["image_mean"]), vec![aug.mean[0]; c]);
    assert_eq!(stat(&pre["image_std"]), vec![aug.std[0]; c]);
    assert_ne!(
        aug.mean[0], 0.5,
        "the statistics are the data's, not the default"
    );

    // model.safetensors: transformers' ViTModel names and shapes, metadata format = pt.
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |k: &str| -> Vec<usize> {
        st.tensor(k)
            .unwrap_or_else(|_| panic!("{k} missing"))
            .shape()
            .to_vec()
    };
    assert_eq!(shape("embeddings.cls_token"), [1, 1, d]);
    assert_eq!(shape("embeddings.position_embeddings"), [1, 1 + l, d]);
    assert_eq!(
        shape("embeddings.patch_embeddings.projection.weight"),
        [d, c, p, p]
    );
    assert_eq!(shape("embeddings.patch_embeddings.projection.bias"), [d]);
    let ff = m.transformer().mlp_dim;
    for i in 0..m.depth {
        let k = |s: &str| format!("encoder.layer.{i}.{s}");
        for qkv in ["query", "key", "value"] {
            assert_eq!(
                shape(&k(&format!("attention.attention.{qkv}.weight"))),
                [d, d]
            );
            assert_eq!(shape(&k(&format!("attention.attention.{qkv}.bias"))), [d]);
        }
        assert_eq!(shape(&k("attention.output.dense.weight")), [d, d]);
        assert_eq!(shape(&k("intermediate.dense.weight")), [ff, d]);
        assert_eq!(shape(&k("output.dense.weight")), [d, ff]);
        for ln in ["layernorm_before", "layernorm_after"] {
            assert_eq!(shape(&k(&format!("{ln}.weight"))), [d]);
            assert_eq!(shape(&k(&format!("{ln}.bias"))), [d]);
        }
    }
    assert_eq!(shape("layernorm.weight"), [d]);
    // 4 embedding tensors, 16 per layer, the final norm's 2: nothing of MAE's decoder.
    assert_eq!(st.names().len(), 4 + 16 * m.depth + 2, "{:?}", st.names());
    assert!(st.names().iter().all(|n| !n.starts_with("vit.")));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let format = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format").cloned());
    assert_eq!(format.as_deref(), Some("pt"));
    // The class token's position slot is zero (MAE), the patches' are sin-cos values.
    let pos: Vec<f32> = st
        .tensor("embeddings.position_embeddings")
        .unwrap()
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(pos[..d].iter().all(|v| *v == 0.0));
    assert!(
        pos[d..].iter().all(|v| (-1.0..=1.0).contains(v)) && pos[d..].iter().any(|v| *v != 0.0)
    );

    // Ordinary file modes: those of a file written with std::fs::write (0644 under umask 022).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            assert_eq!(mode(&hf.join(f)), mode(&plain), "{f}");
        }
    }

    // The library call writes the same directory from the run's newest checkpoint.
    let again = dir.path().join("again");
    assert_eq!(export_hf(&run, &again).unwrap(), again);
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        assert_eq!(
            std::fs::read(hf.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    // A directory that is no run is refused with its name.
    let err = export_hf(dir.path(), &dir.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

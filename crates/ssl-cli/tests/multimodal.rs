//! End-to-end behaviour of `ssl pretrain/embed/eval/config multimodal` on the embedded emoji
//! sample, with tiny towers and a few steps.

mod common;

use common::{ok, ssl};

const TINY: [&str; 15] = [
    "model.embed_dim=16",
    "model.image.dim=16",
    "model.image.depth=1",
    "model.image.heads=2",
    "model.image.patch_size=8",
    "model.text.hidden_size=16",
    "model.text.num_hidden_layers=1",
    "model.text.num_attention_heads=2",
    "model.text.intermediate_size=32",
    "model.micro_batch=8",
    "train.batch_size=16",
    "train.warmup_steps=1",
    "train.health_every=2",
    "data.max_pairs=120",
    "tokenizer.train.vocab_size=200",
];

#[test]
fn pretrain_embed_eval_on_the_embedded_sample() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let mut args = vec!["pretrain", "multimodal", "--out", run_s];
    for s in TINY.iter().chain(&["train.max_steps=4"]) {
        args.extend(["--set", s]);
    }
    ok(&ssl(&args));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "tokenizer.json",
        "checkpoints/step-00000004/model.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in [
        "loss",
        "i2t_accuracy",
        "t2i_accuracy",
        "logit_scale",
        "emb_std",
    ] {
        assert!(last.get(k).is_some(), "{k} missing from {last}");
    }

    let data = dir.path().join("emoji.parquet");
    std::fs::write(&data, include_bytes!("../data/emoji_sample.parquet")).unwrap();
    let data_s = data.to_str().unwrap();
    for tower in ["image", "text"] {
        let emb = dir.path().join(format!("{tower}.parquet"));
        ok(&ssl(&[
            "embed",
            "multimodal",
            "--checkpoint",
            run_s,
            "--data",
            data_s,
            "--out",
            emb.to_str().unwrap(),
            "--set",
            &format!("embed.tower={tower}"),
        ]));
        let e = ssl_data::read_embeddings(&emb).unwrap();
        assert_eq!((e.ids.len(), e.dim), (400, 16), "{tower}");
    }

    let out = ok(&ssl(&[
        "eval",
        "multimodal",
        "--checkpoint",
        run_s,
        "--data",
        data_s,
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // data.max_pairs = 120 is stored in the run: a seeded sample of about 120 of the 400
    // rows, of which the seeded 20% hold-out (by global row index) is about 24 pairs.
    let split = ssl_multimodal::RowSplit {
        seed: 0,
        heldout_fraction: 0.2,
        max_pairs: 120,
        num_rows: 400,
    };
    let n_held = split.counts().1;
    assert!((12..40).contains(&n_held), "{n_held}");
    assert_eq!(v["n_heldout"], n_held);
    for side in ["trained", "untrained"] {
        for k in ["r@1", "r@5", "r@10"] {
            let r = v[side]["image_to_text"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&r), "{side} {k} {r}");
            assert!(v[side]["text_to_image"][k].is_number());
        }
        for c in ["category", "subcategory"] {
            assert!(v[side]["zero_shot"][c]["accuracy"].is_number(), "{v}");
        }
    }
    let chance = 5.0 / n_held as f64;
    assert!((v["trained"]["chance"]["r@5"].as_f64().unwrap() - chance).abs() < 1e-12);

    // accum_steps would lose negatives across micro-batches: refused with the alternative.
    let bad = ssl(&[
        "pretrain",
        "multimodal",
        "--out",
        dir.path().join("bad").to_str().unwrap(),
        "--set",
        "train.accum_steps=2",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("model.micro_batch"));

    let cfg = ok(&ssl(&["config", "multimodal"]));
    assert!(
        cfg.contains("micro_batch") && cfg.contains("logit_scale_max"),
        "{cfg}"
    );
}

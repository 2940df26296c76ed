//! `ssl tokenizer train`, `ssl pretrain text`, `ssl embed text`, `ssl eval text` end to end on
//! the embedded SPDX sample, with a tiny model and a few steps.

mod common;

use std::path::Path;

use common::{ok, ssl};

#[test]
fn text_tokenizer_pretrain_embed_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/spdx_licenses_sample.parquet");
    let sample = sample.to_str().unwrap();

    // Tokenizer: BPE, fertility on the same sample.
    let tok_dir = d.join("tok");
    let out = ssl(&[
        "tokenizer",
        "train",
        "--data",
        sample,
        "--column",
        "text",
        "--out",
        tok_dir.to_str().unwrap(),
        "--set",
        "kind=bpe",
        "--set",
        "vocab_size=500",
        "--heldout",
        sample,
    ]);
    ok(&out);
    assert!(tok_dir.join("tokenizer.json").is_file());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["fertility"]["tokens_per_word"].as_f64().unwrap() >= 1.0);

    // Pretrain on the embedded sample: tiny BERT, whole-word masking, a few steps.
    let run = d.join("run");
    let run_s = run.to_str().unwrap();
    let mut args = vec!["pretrain", "text", "--out", run_s];
    for s in [
        "train.max_steps=6",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.checkpoint_every_steps=3",
        "tokenizer.train.vocab_size=400",
        "model.preset=",
        "model.config.hidden_size=32",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.intermediate_size=64",
        "input.max_seq_len=32",
        "masking.strategy=whole_word",
        "data.heldout_fraction=0.1",
    ] {
        args.push("--set");
        args.push(s);
    }
    ok(&ssl(&args));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "tokenizer.json",
        "heldout.jsonl",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let curve = std::fs::read_to_string(run.join("heldout.jsonl")).unwrap();
    assert!(curve.lines().count() >= 2, "{curve}");

    // Embed with CLS pooling of layer 1.
    let emb = d.join("emb.parquet");
    ok(&ssl(&[
        "embed",
        "text",
        "--checkpoint",
        run_s,
        "--data",
        sample,
        "--out",
        emb.to_str().unwrap(),
        "--set",
        "embed.pooling=cls",
        "--set",
        "embed.layer=1",
        "--set",
        "data.id_column=id",
    ]));
    assert!(emb.is_file());

    // Eval: the sample has no text label column, so perplexity and masked accuracy only.
    let out = ssl(&["eval", "text", "--checkpoint", run_s, "--data", sample]);
    ok(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ppl = r["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{r}");

    // Exported directory loads back as a checkpoint for eval.
    let out = ssl(&[
        "eval",
        "text",
        "--checkpoint",
        run.join("hf").to_str().unwrap(),
        "--data",
        sample,
    ]);
    ok(&out);

    // A missing column is an error naming it.
    let out = ssl(&[
        "tokenizer",
        "train",
        "--data",
        sample,
        "--column",
        "nope",
        "--out",
        tok_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

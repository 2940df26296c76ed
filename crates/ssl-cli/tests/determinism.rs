//! Runs repeat: the same data, configuration and seed give a byte-identical `tokenizer.json`
//! and bit-identical checkpoints. Each run is its own process, so anything seeded per
//! process (Hugging Face tokenizers' hash maps) differs between the two runs, as it does
//! between a user's two runs.

mod common;

use std::path::{Path, PathBuf};

use common::{ok, ssl};

fn sample(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts that `name` is byte-identical under `a` and `b`.
fn assert_same(a: &Path, b: &Path, name: &str) {
    let (x, y) = (read(&a.join(name)), read(&b.join(name)));
    assert!(
        x == y,
        "{name} differs between two identical runs ({} and {} bytes; {} and {})",
        x.len(),
        y.len(),
        a.display(),
        b.display()
    );
}

/// `ssl tokenizer train` of `kind` on the SPDX sample into `out`.
fn train_tokenizer(kind: &str, out: &Path) {
    let kind = format!("kind={kind}");
    ok(&ssl(&[
        "tokenizer",
        "train",
        "--data",
        &sample("spdx_licenses_sample.parquet"),
        "--column",
        "text",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &kind,
        "--set",
        "vocab_size=700",
    ]));
}

#[test]
fn every_tokenizer_kind_trains_the_same_file_in_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["word_piece", "bpe", "unigram"] {
        let (a, b) = (dir.path().join(kind), dir.path().join(format!("{kind}-2")));
        train_tokenizer(kind, &a);
        train_tokenizer(kind, &b);
        assert_same(&a, &b, "tokenizer.json");
    }
}

/// Runs `ssl pretrain <modality>` on its embedded sample with `sets` into `out`, and returns
/// the directory of its checkpoint after `steps` steps.
fn pretrain(modality: &str, out: &Path, sets: &[&str], steps: u64) -> PathBuf {
    let out_s = out.to_str().unwrap();
    let max_steps = format!("train.max_steps={steps}");
    let mut args = vec!["pretrain", modality, "--out", out_s];
    for s in sets.iter().chain([&max_steps.as_str()]) {
        args.extend(["--set", s]);
    }
    ok(&ssl(&args));
    out.join(format!("checkpoints/step-{steps:08}"))
}

/// Two runs of `modality` with the same settings: the same weights and optimizer state, bit
/// for bit (and the same tokenizer where the run trains one).
fn runs_repeat(modality: &str, sets: &[&str], steps: u64) {
    let dir = tempfile::tempdir().unwrap();
    let a = pretrain(modality, &dir.path().join("a"), sets, steps);
    let b = pretrain(modality, &dir.path().join("b"), sets, steps);
    assert_same(&a, &b, "model.safetensors");
    assert_same(&a, &b, "optimizer.safetensors");
    let tok = |ckpt: &Path| ckpt.join("../../tokenizer.json");
    if tok(&a).is_file() {
        assert_same(&a, &b, "../../tokenizer.json");
    }
}

#[test]
fn text_runs_repeat() {
    // The default tokenizer (WordPiece) is trained by each run.
    runs_repeat(
        "text",
        &[
            "train.batch_size=4",
            "train.warmup_steps=1",
            "tokenizer.train.vocab_size=400",
            "model.preset=",
            "model.config.hidden_size=32",
            "model.config.num_hidden_layers=1",
            "model.config.num_attention_heads=2",
            "model.config.intermediate_size=64",
            "input.max_seq_len=32",
            "data.heldout_fraction=0.1",
        ],
        4,
    );
}

#[test]
fn vision_runs_repeat() {
    runs_repeat(
        "vision",
        &[
            "model.dim=16",
            "model.depth=1",
            "model.heads=2",
            "model.patch_size=7",
            "task.mae.decoder_dim=8",
            "task.mae.decoder_depth=1",
            "task.mae.decoder_heads=2",
            "train.batch_size=16",
            "train.warmup_steps=1",
            "data.max_images=120",
            "data.heldout_fraction=0.1",
        ],
        4,
    );
}

#[test]
fn timeseries_runs_repeat() {
    runs_repeat(
        "timeseries",
        &[
            "task.kind=ts2vec",
            "model.kind=tcn",
            "model.tcn.hidden=8",
            "model.tcn.output=16",
            "model.tcn.depth=2",
            "train.batch_size=8",
            "train.warmup_steps=1",
        ],
        4,
    );
}

#[test]
fn features_runs_repeat() {
    runs_repeat(
        "features",
        &[
            "model.dim=16",
            "model.depth=1",
            "model.heads=2",
            "model.mlp_dim=32",
            "train.batch_size=8",
            "train.warmup_steps=1",
        ],
        4,
    );
}

#[test]
fn multimodal_runs_repeat() {
    runs_repeat(
        "multimodal",
        &[
            "model.embed_dim=16",
            "model.image.dim=16",
            "model.image.depth=1",
            "model.image.heads=2",
            "model.image.patch_size=8",
            "model.text.hidden_size=16",
            "model.text.num_hidden_layers=1",
            "model.text.num_attention_heads=2",
            "model.text.intermediate_size=32",
            "train.batch_size=16",
            "train.warmup_steps=1",
            "data.max_pairs=120",
            "tokenizer.train.vocab_size=200",
        ],
        3,
    );
}

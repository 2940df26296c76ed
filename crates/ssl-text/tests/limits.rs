//! Limits checked before anything is allocated (issue 26 case 5): an oversized batch is a
//! named memory error, and a tokenizer that does not match the stored model's vocabulary is
//! a named error instead of an index past the embedding table.

use std::time::Instant;

use ssl_core::run_dir::RunOptions;
use ssl_text::{
    pretrain, save_tokenizer, train_from_texts, TextConfig, TextError, TextModel, TokenizerConfig,
};

#[test]
fn an_oversized_batch_is_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TextConfig::default();
    cfg.train.batch_size = 1_000_000_000;
    let run = dir.path().join("run");
    let data = [dir.path().join("d.parquet").display().to_string()];
    let started = Instant::now();
    let e = pretrain(cfg.clone(), &data, &run, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(started.elapsed().as_secs() < 1, "{:?}", started.elapsed());
    assert!(e.contains("not enough memory"), "{e}");
    assert!(
        e.contains("train.batch_size") && e.contains("input.max_seq_len"),
        "{e}"
    );
    assert!(e.contains("train.max_memory_gb"), "{e}");
    assert!(!run.exists(), "nothing is written");

    // The default configuration fits in 1 GiB; train.max_memory_gb is the limit when set.
    cfg.train.batch_size = TextConfig::default().train.batch_size;
    assert!(cfg.memory_estimate() < 1 << 30, "{}", cfg.memory_estimate());
    cfg.train.max_memory_gb = 1e-6;
    let e = cfg.check_memory().unwrap_err().to_string();
    assert!(e.contains("(train.max_memory_gb)"), "{e}");
    // Old configuration files, without the key, still load (0: the available memory).
    let old: TextConfig = serde_json::from_str(r#"{"train": {"batch_size": 4}}"#).unwrap();
    assert_eq!(old.train.max_memory_gb, 0.0);
}

#[test]
fn a_tokenizer_that_does_not_match_the_model_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let texts = ["the cat sat on the mat", "a dog ran in the park"];
    let tcfg = TokenizerConfig {
        vocab_size: 60,
        ..TokenizerConfig::default()
    };
    let tok = train_from_texts(texts.iter(), &tcfg).unwrap();
    let path = save_tokenizer(&tok, dir.path()).unwrap();
    let vocab = tok.get_vocab_size(true);
    let mut cfg = TextConfig::default();
    cfg.tokenizer.file = path.display().to_string();
    // A model trained with a smaller vocabulary than this tokenizer's: refused before the
    // weights are read (the checkpoint directory need not hold any).
    cfg.model.config.vocab_size = vocab - 5;
    let err = TextModel::load(&dir.path().join("ckpt"), &cfg)
        .err()
        .expect("a vocabulary mismatch is an error");
    assert!(matches!(err, TextError::VocabMismatch { .. }), "{err}");
    let e = err.to_string();
    assert!(e.contains(&format!("{vocab} tokens")), "{e}");
    assert!(e.contains(&format!("vocab_size is {}", vocab - 5)), "{e}");
    assert!(e.contains("tokenizer.json"), "{e}");
}

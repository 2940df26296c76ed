//! The text pipeline on the inputs users have besides Parquet: JSON Lines (a field per
//! column), CSV (a header row) and plain text (one document per line), written by the test.
//! Each pretrains a few steps; the JSON Lines run embeds every document.

use std::path::{Path, PathBuf};

use ssl_core::run_dir::RunOptions;
use ssl_text::{embed, pretrain, stored_config, TextConfig};

fn documents() -> Vec<(String, &'static str)> {
    let words = [
        ["kernel", "driver", "module"],
        ["licence", "warranty", "notice"],
    ];
    (0..32)
        .map(|i| {
            let text = format!(
                "the {} of the {}, \"quoted\" {i}",
                words[i % 2][i % 3],
                words[i % 2][i / 2 % 3]
            );
            (text, ["code", "legal"][i % 2])
        })
        .collect()
}

fn tiny() -> TextConfig {
    let mut cfg = TextConfig::default();
    cfg.train.max_steps = 2;
    cfg.train.batch_size = 4;
    cfg.train.checkpoint_every_steps = 0;
    cfg.tokenizer.train.vocab_size = 100;
    cfg.model.preset.clear();
    let m = &mut cfg.model.config;
    m.hidden_size = 16;
    m.num_hidden_layers = 1;
    m.num_attention_heads = 2;
    m.intermediate_size = 32;
    cfg.input.max_seq_len = 16;
    cfg.data.heldout_fraction = 0.25;
    cfg
}

fn write(dir: &Path, name: &str, body: String) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn jsonl_csv_and_txt_pretrain_and_jsonl_embeds() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    let jsonl: String = docs
        .iter()
        .map(|(t, l)| format!("{}\n", serde_json::json!({"text": t, "label": l})))
        .collect();
    let csv: String = std::iter::once("text,label\n".to_string())
        .chain(
            docs.iter()
                .map(|(t, l)| format!("\"{}\",{l}\n", t.replace('"', "\"\""))),
        )
        .collect();
    let txt: String = docs.iter().map(|(t, _)| format!("{t}\n")).collect();
    let inputs = [
        write(dir.path(), "corpus.jsonl", jsonl),
        write(dir.path(), "corpus.csv", csv),
        write(dir.path(), "corpus.txt", txt),
    ];
    for input in &inputs {
        let data = vec![input.display().to_string()];
        let run = dir
            .path()
            .join(input.extension().unwrap().to_string_lossy().as_ref());
        let s = pretrain(tiny(), &data, &run, &RunOptions::default()).unwrap();
        assert_eq!(s.run.step, 2, "{}", input.display());
        assert!(s.run.last_loss.is_finite(), "{}", input.display());
    }
    let (ckpt, cfg) = stored_config(&dir.path().join("jsonl")).unwrap();
    let data = vec![inputs[0].display().to_string()];
    let out = dir.path().join("emb.parquet");
    let summary = embed(&ckpt, &cfg, &data, &out).unwrap();
    assert_eq!(summary.rows, docs.len());
}

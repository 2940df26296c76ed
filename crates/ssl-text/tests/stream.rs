//! Streaming text pretraining: a run resumed from a checkpoint taken in the middle of an epoch
//! (and in the middle of a loader batch's sequences) continues bit-identically, and the
//! streaming source serves the same sequences after `restore` as without it.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use ssl_core::run_dir::RunOptions;
use ssl_core::BatchSource;
use ssl_data::ParquetSource;
use ssl_text::{
    pretrain, save_tokenizer, train_from_texts, DocPacker, InputMode, RowFilter, SpecialIds,
    StreamingTextSource, TextConfig, TokenizerConfig,
};

/// `n` documents in row groups of `group` rows.
fn write_docs(path: &Path, n: usize, group: usize) -> Vec<String> {
    let words = [
        "kernel", "driver", "module", "licence", "warranty", "notice",
    ];
    let texts: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "the {} of the {} number {i} and the {}",
                words[i % 6],
                words[(i / 2) % 6],
                words[(i / 3) % 6]
            )
        })
        .collect();
    let batch = RecordBatch::try_from_iter([(
        "text",
        Arc::new(StringArray::from(texts.clone())) as ArrayRef,
    )])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    texts
}

fn tiny(tok_file: &Path) -> TextConfig {
    let mut cfg = TextConfig::default();
    cfg.train.batch_size = 4;
    cfg.train.warmup_steps = 1;
    cfg.tokenizer.file = tok_file.display().to_string();
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

fn model_bytes(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/model.safetensors"))).unwrap()
}

/// The sequences of one epoch of `docs` documents (one loader batch holds them all): the
/// training documents tokenized and packed together.
fn epoch_seqs(tok: &tokenizers::Tokenizer, cfg: &TextConfig, texts: &[String]) -> usize {
    let filter = RowFilter::new(&cfg.data, cfg.train.seed, texts.len());
    let train: Vec<String> = (0..texts.len())
        .filter(|&i| filter.training(i))
        .map(|i| texts[i].clone())
        .collect();
    ssl_text::tokenize(tok, &train, None, cfg).unwrap().len()
}

/// Trains 7 steps, then resumes a copy of the run from its step-4 checkpoint (with the later
/// ones removed, as if stopped there) and checks steps 5 to 7 are bit-identical. The number
/// of documents is chosen so an epoch holds 9 to 15 sequences (about 3 batches of 4, never a
/// multiple of 4): step 4 then stops inside an epoch.
fn resume_is_bit_identical(mode: InputMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    let all = write_docs(&path, 60, 4);
    let tok = train_from_texts(
        all.iter(),
        &TokenizerConfig {
            vocab_size: 120,
            ..TokenizerConfig::default()
        },
    )
    .unwrap();
    let tok_file = save_tokenizer(&tok, &dir.path().join("tok")).unwrap();
    let mut cfg = tiny(&tok_file);
    cfg.input.mode = mode;
    let docs = (4..60)
        .find(|&n| (9..=15).contains(&epoch_seqs(&tok, &cfg, &all[..n])))
        .expect("a document count giving 9 to 15 sequences per epoch");
    write_docs(&path, docs, 4);
    let data = vec![path.display().to_string()];
    cfg.train.max_steps = 7;
    cfg.train.checkpoint_every_steps = 1;
    cfg.train.keep_checkpoints = 10;
    let a = dir.path().join("a");
    let s = pretrain(cfg, &data, &a, &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 7);

    // Where step 4 stood: inside a loader batch's sequences (one loader batch holds a whole
    // epoch of these few rows), so in the middle of an epoch.
    let state = ssl_core::checkpoint::read_state(&a.join("checkpoints/step-00000004")).unwrap();
    let pos = &state.data_position["stream"];
    assert!(pos["skip"].as_u64().unwrap() > 0, "{}", state.data_position);

    let b = dir.path().join("b");
    ssl_core::run_dir::fork_run(&a, &b, 4).unwrap();
    let (_, cfg) = ssl_text::stored_config(&b).unwrap();
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let s = pretrain(cfg, &data, &b, &opts).unwrap();
    assert_eq!((s.run.start_step, s.run.step), (4, 7));
    for step in 5..=7 {
        assert!(
            model_bytes(&a, step) == model_bytes(&b, step),
            "step {step} differs after resuming at step 4 ({mode:?})"
        );
    }
}

#[test]
fn a_run_resumed_mid_epoch_is_bit_identical_documents() {
    resume_is_bit_identical(InputMode::Document);
}

#[test]
fn a_run_resumed_mid_epoch_is_bit_identical_packed() {
    resume_is_bit_identical(InputMode::Packed);
}

#[test]
fn the_streaming_source_restores_to_the_same_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    let texts = write_docs(&path, 40, 4);
    let tok = train_from_texts(texts.iter(), &TokenizerConfig::default()).unwrap();
    let mut cfg = tiny(Path::new(""));
    cfg.input.mode = InputMode::Document;
    let source = ParquetSource::open(&[&path]).unwrap();
    let filter = RowFilter::new(&cfg.data, cfg.train.seed, source.num_rows());
    let packer = DocPacker::new(&tok, &cfg, filter, None);
    let pad = SpecialIds::of(&tok).unwrap().pad;
    let make = || StreamingTextSource::new(&source, packer.clone(), 0, 1, pad, &Device::Cpu);
    let mut a = make().unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.extend(a.next_batch().unwrap().seqs);
    }
    // The first epoch: the training documents, each once, shuffled (document mode: one
    // sequence each).
    let train: Vec<String> = (0..40)
        .filter(|&i| filter.training(i))
        .map(|i| texts[i].clone())
        .collect();
    let mut want: Vec<Vec<u32>> = ssl_text::tokenize(&tok, &train, None, &cfg)
        .unwrap()
        .into_iter()
        .map(|s| s.ids)
        .collect();
    assert!(seen.len() > train.len());
    let mut first: Vec<Vec<u32>> = seen
        .iter()
        .take(train.len())
        .map(|s| s.ids.clone())
        .collect();
    assert_ne!(first, want, "the rows are shuffled");
    first.sort();
    want.sort();
    assert_eq!(first, want);
    let pos = a.position();
    let mut b = make().unwrap();
    b.restore(&pos).unwrap();
    for _ in 0..12 {
        assert_eq!(a.next_batch().unwrap().seqs, b.next_batch().unwrap().seqs);
    }
    assert!(a.epoch() >= 1);
    // An in-memory source's position is refused with a message.
    let e = b
        .restore(&serde_json::json!({"epoch": 0, "cursor": 3}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("stream"), "{e}");
}

/// Pretraining over 2 ranks (threads): rank 0 trains the tokenizer from the files and sends
/// it, each rank streams its row groups (or, with fewer row groups than ranks, its rows), the
/// held-out figures are summed over ranks, and both ranks end at the same step.
fn two_ranks(group: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    write_docs(&path, 32, group);
    let data = vec![path.display().to_string()];
    let mut cfg = tiny(Path::new(""));
    cfg.tokenizer.train.vocab_size = 120;
    cfg.train.max_steps = 3;
    cfg.train.checkpoint_every_steps = 3;
    let run = dir.path().join("run");
    let outs: Vec<(u64, usize, bool)> = std::thread::scope(|sc| {
        let hs: Vec<_> = ssl_core::ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let (cfg, data, run) = (cfg.clone(), data.clone(), run.clone());
                sc.spawn(move || {
                    let opts = RunOptions {
                        collective: Some(Arc::new(c)),
                        ..RunOptions::default()
                    };
                    let s = pretrain(cfg, &data, &run, &opts).unwrap();
                    (s.run.step, s.heldout.len(), s.hf.is_some())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outs, [(3, 2, true), (3, 2, false)]);
    assert!(run.join("tokenizer.json").is_file());
    assert!(run
        .join("checkpoints/step-00000003/model.safetensors")
        .is_file());
}

#[test]
fn two_ranks_stream_their_row_groups() {
    two_ranks(4);
}

#[test]
fn two_ranks_share_the_rows_of_a_single_row_group() {
    two_ranks(64);
}

/// A null text mid-stream stops training with an error naming the file (and
/// `data.skip_bad_rows`); with `data.skip_bad_rows` the row is skipped and training goes on.
#[test]
fn a_null_text_mid_stream_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nulls.parquet");
    let texts: Vec<Option<String>> = (0..24)
        .map(|i| (i != 13).then(|| format!("the kernel driver number {i} loads a module")))
        .collect();
    let batch = RecordBatch::try_from_iter([(
        "text",
        Arc::new(StringArray::from(texts.clone())) as ArrayRef,
    )])
    .unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let good: Vec<String> = texts.into_iter().flatten().collect();
    let tok = train_from_texts(good.iter(), &TokenizerConfig::default()).unwrap();
    let tok_file = save_tokenizer(&tok, &dir.path().join("tok")).unwrap();
    let data = vec![path.display().to_string()];
    let mut cfg = tiny(&tok_file);
    cfg.train.max_steps = 2;
    let e = pretrain(
        cfg.clone(),
        &data,
        &dir.path().join("a"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("nulls.parquet") && e.contains("row 13") && e.contains("skip_bad_rows"),
        "{e}"
    );
    cfg.data.skip_bad_rows = true;
    let s = pretrain(cfg, &data, &dir.path().join("b"), &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 2);
}

/// `train.max_epochs` sets the steps from the estimated sequences per epoch (document mode:
/// one sequence per document, so 32 rows x (1 - 0.25) = 24 sequences, 6 batches of 4 per
/// epoch), and the completed configuration stores them.
#[test]
fn max_epochs_sets_the_steps_from_the_estimated_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.parquet");
    let texts = write_docs(&path, 32, 8);
    let tok = train_from_texts(texts.iter(), &TokenizerConfig::default()).unwrap();
    let tok_file = save_tokenizer(&tok, &dir.path().join("tok")).unwrap();
    let mut cfg = tiny(&tok_file);
    cfg.input.mode = InputMode::Document;
    cfg.train.max_epochs = 1.5;
    cfg.train.max_steps = 1000;
    cfg.train.checkpoint_every_steps = 100;
    let run = dir.path().join("run");
    let data = vec![path.display().to_string()];
    let s = pretrain(cfg, &data, &run, &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 9);
    let (_, stored) = ssl_text::stored_config(&run).unwrap();
    assert_eq!(stored.train.max_steps, 9);
}

//! Streaming training: a run resumed mid-epoch from a checkpoint (whose data position is the
//! pair stream's) ends bit-identical to an uninterrupted run; ranks stream disjoint training
//! rows whose union is the run's training set; held-out rows never reach training.

mod common;

use std::path::Path;

use candle_core::Device;
use ssl_core::run_dir::RunOptions;
use ssl_core::{BatchSource, Parallel};
use ssl_data::ParquetSource;
use ssl_multimodal::pipeline::{row_split, training_sample};
use ssl_multimodal::*;

/// 100 toy pairs (16x16), each caption naming its row (`row17 ...`).
fn pairs() -> PairSet {
    let mut p = toy::toy_pairs(100, 16, 3).unwrap();
    for (i, c) in p.captions.iter_mut().enumerate() {
        *c = format!("row{i} {c}");
    }
    p
}

/// [`pairs`] in row groups of 10: with 20% held out about 80 training pairs, two and a half
/// batches of 32 an epoch, so batch and epoch boundaries fall apart.
fn toy_file(dir: &Path) -> Vec<String> {
    let path = dir.join("pairs.parquet");
    toy::write_parquet(&pairs(), &path, 10).unwrap();
    vec![path.to_string_lossy().into_owned()]
}

fn model_bytes(ckpt: &Path) -> Vec<u8> {
    std::fs::read(ckpt.join("model.safetensors")).unwrap()
}

#[test]
fn a_run_resumed_mid_epoch_is_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path());
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 7;
    cfg.train.checkpoint_every_steps = 4;
    cfg.train.checkpoint_every_minutes = 0.0;
    cfg.train.keep_checkpoints = 5;
    let full = dir.path().join("full");
    let s = pretrain(cfg.clone(), &paths, &full, &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 7);
    let at4 = full.join("checkpoints/step-00000004");
    let state = ssl_core::checkpoint::read_state(&at4).unwrap();
    // 4 batches of 32 over about 80 pairs an epoch: the stream stands inside epoch 1.
    let pos: ssl_data::StreamPosition = serde_json::from_value(state.data_position.clone())
        .unwrap_or_else(|e| panic!("{e}: {}", state.data_position));
    assert_eq!(pos.loader.epoch, 1, "{pos:?}");
    assert!(
        pos.loader.row_group > 0 || pos.loader.offset > 0 || pos.skip > 0,
        "{pos:?}"
    );

    // The run as a stop at step 4 leaves it: checkpoints up to 4 only.
    let cut = dir.path().join("cut");
    ssl_core::run_dir::fork_run(&full, &cut, 4).unwrap();
    let (_, stored) = stored_config(&cut).unwrap();
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let r = pretrain(stored, &paths, &cut, &opts).unwrap();
    assert_eq!((r.run.start_step, r.run.step), (4, 7));
    assert!(
        model_bytes(&full.join("checkpoints/step-00000007"))
            == model_bytes(&cut.join("checkpoints/step-00000007")),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

/// The captions each rank streams over `world` ranks, one epoch's worth from each rank (and
/// the rest of the batch that crosses into the next), read back from the token ids.
fn streamed_rows(
    paths: &[String],
    cfg: &MultimodalConfig,
    tok: &tokenizers::Tokenizer,
    world: usize,
) -> Vec<Vec<String>> {
    let source = ParquetSource::open(paths).unwrap();
    let split = row_split(cfg, &source).unwrap();
    Parallel::on_threads(world, |p| {
        let mut s = StreamingPairSource::new(
            &source,
            PairStreamConfig {
                columns: cfg.data.columns(&[]),
                split,
                batch_size: 2,
                seed: cfg.train.seed,
                rank: p.rank,
                world: p.world,
                max_seq_len: 12,
                shape: [3, 16, 16],
                shuffle_bytes: 1 << 20,
                workers: 1,
            },
            tok,
            None,
            &Device::Cpu,
        )
        .unwrap();
        let mut rows = Vec::new();
        while s.epoch() == 0 {
            let b = s.next_batch().unwrap();
            let ids = b.text.input_ids.to_vec2::<u32>().unwrap();
            for r in ids {
                rows.push(tok.decode(&r, true).unwrap());
            }
        }
        rows
    })
}

#[test]
fn ranks_stream_disjoint_training_rows_and_never_held_out_ones() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path());
    let mut cfg = common::tiny_config();
    cfg.data.heldout_fraction = 0.3;
    let pairs = pairs();
    let source = ParquetSource::open(&paths).unwrap();
    let split = row_split(&cfg, &source).unwrap();
    let tok = train_caption_tokenizer(&pairs.captions, 200).unwrap();
    let norm = |c: &str| {
        tok.decode(tok.encode(c, false).unwrap().get_ids(), true)
            .unwrap()
    };
    let mut want: Vec<String> = (0..100)
        .filter(|&i| split.is_training(i))
        .map(|i| norm(&pairs.captions[i]))
        .collect();
    want.sort();
    let held: Vec<String> = (0..100)
        .filter(|&i| split.is_heldout(i))
        .map(|i| norm(&pairs.captions[i]))
        .collect();
    assert!(held.len() > 10, "{}", held.len());
    assert_eq!(
        want.windows(2).filter(|w| w[0] == w[1]).count(),
        0,
        "captions name their rows"
    );
    for world in [1, 3] {
        let per_rank = streamed_rows(&paths, &cfg, &tok, world);
        if world > 1 {
            // Each rank reads its own row groups: fewer rows than the whole epoch.
            assert!(
                per_rank.iter().all(|r| r.len() < want.len()),
                "world {world}"
            );
        }
        let mut got: Vec<String> = per_rank.into_iter().flatten().collect();
        got.sort();
        got.dedup();
        assert_eq!(got, want, "world {world}");
        assert!(
            got.iter().all(|c| !held.contains(c)),
            "world {world}: a held-out row was streamed"
        );
    }
    // The statistics sample holds training rows only.
    cfg.data.sample_pairs = 20;
    let sample = training_sample(&source, &cfg, &split).unwrap();
    assert_eq!(sample.len(), 20);
    for c in &sample.captions {
        assert!(want.contains(&norm(c)), "{c} is not a training caption");
    }
}

#[test]
fn max_epochs_sets_the_steps_from_the_footers_row_count() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path());
    let mut cfg = common::tiny_config();
    cfg.train.max_epochs = 2.0;
    cfg.train.checkpoint_every_steps = 0;
    let run = dir.path().join("run");
    let s = pretrain(cfg.clone(), &paths, &run, &RunOptions::default()).unwrap();
    let split = row_split(&cfg, &ParquetSource::open(&paths).unwrap()).unwrap();
    let steps = 2 * split.counts().0.div_ceil(32) as u64;
    assert_eq!(s.run.step, steps);
    let (_, stored) = stored_config(&run).unwrap();
    assert_eq!(stored.train.max_steps, steps);
}

#[test]
fn an_empty_caption_met_mid_stream_names_its_row_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pairs();
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 3;
    cfg.train.checkpoint_every_steps = 0;
    // Outside the statistics sample (its first 10 training pairs), inside the stream.
    cfg.data.sample_pairs = 10;
    let source_rows = 100;
    let split = ssl_multimodal::RowSplit {
        seed: 0,
        heldout_fraction: 0.2,
        max_pairs: 0,
        num_rows: source_rows,
    };
    let path = dir.path().join("pairs.parquet");
    toy::write_parquet(&p, &path, 10).unwrap();
    let paths = vec![path.to_string_lossy().into_owned()];
    let sample = training_sample(&ParquetSource::open(&paths).unwrap(), &cfg, &split).unwrap();
    let blank = (0..source_rows)
        .filter(|&i| split.is_training(i))
        .find(|&i| !sample.captions.contains(&p.captions[i]))
        .unwrap();
    p.captions[blank] = "   ".into();
    toy::write_parquet(&p, &path, 10).unwrap();
    let err = pretrain(
        cfg.clone(),
        &paths,
        &dir.path().join("a"),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("row {blank} ")) && err.contains("data.skip_bad_rows"),
        "{err}"
    );
    cfg.data.skip_bad_rows = true;
    let s = pretrain(cfg, &paths, &dir.path().join("b"), &RunOptions::default()).unwrap();
    assert_eq!(s.run.step, 3);
}

/// Pretraining over 2 ranks (threads) with gradient caching and a pair filter: rank 0 makes
/// the tokenizer and the filter threshold and sends them, each rank streams its row groups,
/// the loss gathers both ranks' embeddings, and both end at the same step.
#[test]
fn two_ranks_stream_with_gradient_caching_and_a_pair_filter() {
    let dir = tempfile::tempdir().unwrap();
    let paths = toy_file(dir.path());
    let mut cfg = common::tiny_config();
    cfg.train.max_steps = 2;
    let filter_run = dir.path().join("filter");
    pretrain(cfg.clone(), &paths, &filter_run, &RunOptions::default()).unwrap();
    cfg.train.max_steps = 3;
    cfg.train.batch_size = 16;
    cfg.train.checkpoint_every_steps = 3;
    cfg.model.micro_batch = 8;
    cfg.data.filter_checkpoint = filter_run.to_string_lossy().into_owned();
    cfg.data.filter_drop_fraction = 0.2;
    let run = dir.path().join("run");
    let steps: Vec<u64> = std::thread::scope(|sc| {
        let hs: Vec<_> = ssl_core::ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let (cfg, paths, run) = (cfg.clone(), paths.clone(), run.clone());
                sc.spawn(move || {
                    let opts = RunOptions {
                        collective: Some(std::sync::Arc::new(c)),
                        ..RunOptions::default()
                    };
                    pretrain(cfg, &paths, &run, &opts).unwrap().run.step
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(steps, [3, 3]);
    assert!(run.join("tokenizer.json").is_file());
    assert!(run
        .join("checkpoints/step-00000003/model.safetensors")
        .is_file());
}

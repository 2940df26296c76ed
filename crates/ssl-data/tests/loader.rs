//! Sharding, shuffling, epochs and exact resumption of the streaming loader.

mod common;

use std::collections::BTreeSet;

use ssl_data::{Batch, ColumnSpec, DataError, DataLoader, LoaderConfig, ParquetSource, Position};

fn source(dir: &std::path::Path) -> ParquetSource {
    // 3 files, 47 rows, row groups of 4/5/6 rows: 12 + 8 + 8 = 28 row groups... sizes vary.
    common::id_file(dir, "a", 17, 4);
    common::id_file(dir, "b", 12, 5);
    common::id_file(dir, "c", 18, 6);
    ParquetSource::open(&[dir]).unwrap()
}

fn config(batch_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        seed: 42,
        shuffle_buffer: 9,
        workers: 2,
        prefetch: 2,
        ..LoaderConfig::new(vec![ColumnSpec::id("id"), ColumnSpec::label("value")])
    }
}

fn all(loader: DataLoader) -> Vec<Batch> {
    loader.map(|b| b.unwrap()).collect()
}

fn ids(batches: &[Batch]) -> Vec<String> {
    batches.iter().flat_map(|b| b.ids().to_vec()).collect()
}

#[test]
fn one_epoch_sees_every_row_once_in_shuffled_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    assert_eq!(src.num_rows(), 47);
    let batches = all(DataLoader::new(&src, config(10)).unwrap());
    assert_eq!(
        batches.iter().map(Batch::len).collect::<Vec<_>>(),
        vec![10, 10, 10, 10, 7]
    );
    let seen = ids(&batches);
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), 47);
    let in_order: Vec<String> = ids(&all(DataLoader::new(
        &src,
        LoaderConfig {
            shuffle: false,
            ..config(10)
        },
    )
    .unwrap()));
    assert_ne!(seen, in_order, "shuffle changed nothing");
    assert_eq!(in_order[..3], ["a-0", "a-1", "a-2"]);
    assert_eq!(in_order[46], "c-17");
    // Same seed: same order; other seed: other order.
    assert_eq!(seen, ids(&all(DataLoader::new(&src, config(10)).unwrap())));
    let other = ids(&all(DataLoader::new(
        &src,
        LoaderConfig {
            seed: 1,
            ..config(10)
        },
    )
    .unwrap()));
    assert_ne!(seen, other);
}

#[test]
fn ranks_together_see_every_row_exactly_once_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for world_size in [2, 3] {
        let mut per_epoch = vec![Vec::new(), Vec::new()];
        for rank in 0..world_size {
            let cfg = LoaderConfig {
                rank,
                world_size,
                epochs: Some(2),
                ..config(4)
            };
            for b in DataLoader::new(&src, cfg).unwrap() {
                let b = b.unwrap();
                // The position after a batch names the epoch it belongs to (or the next one).
                let epoch = if b.position().row_group == 0 && b.position().offset == 0 {
                    b.position().epoch - 1
                } else {
                    b.position().epoch
                };
                per_epoch[epoch as usize].extend(b.ids().iter().map(|s| (rank, s.clone())));
            }
        }
        for rows in &per_epoch {
            let unique: BTreeSet<&String> = rows.iter().map(|(_, s)| s).collect();
            assert_eq!(
                rows.len(),
                47,
                "world {world_size}: a row was read twice or missed"
            );
            assert_eq!(unique.len(), 47);
        }
        // Shuffled row-group assignment: a rank's rows differ between epochs.
        let r0 = |e: usize| -> BTreeSet<String> {
            per_epoch[e]
                .iter()
                .filter(|(r, _)| *r == 0)
                .map(|(_, s)| s.clone())
                .collect()
        };
        assert_ne!(r0(0), r0(1));
    }
}

#[test]
fn resuming_from_any_position_gives_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let cfg = LoaderConfig {
        epochs: Some(3),
        ..config(7)
    };
    let reference = all(DataLoader::new(&src, cfg.clone()).unwrap());
    assert!(reference.len() > 15);
    for stop_after in [1, 2, 5, 7, 8, reference.len() - 1] {
        let mut loader = DataLoader::new(&src, cfg.clone()).unwrap();
        for _ in 0..stop_after {
            loader.next_batch().unwrap().unwrap();
        }
        // What a checkpoint stores and reads back.
        let saved = serde_json::to_string(&loader.position()).unwrap();
        drop(loader);
        let position: Position = serde_json::from_str(&saved).unwrap();
        let rest = all(DataLoader::resume(&src, cfg.clone(), position).unwrap());
        assert_eq!(
            rest,
            reference[stop_after..],
            "resume after batch {stop_after} at {saved}"
        );
    }
}

#[test]
fn endless_stream_keeps_going_and_epochs_differ() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let cfg = LoaderConfig {
        epochs: None,
        drop_last: true,
        ..config(10)
    };
    let mut loader = DataLoader::new(&src, cfg).unwrap();
    let batches: Vec<Batch> = (0..20)
        .map(|_| loader.next_batch().unwrap().unwrap())
        .collect();
    // drop_last: 4 full batches per epoch (the 7 rows left over are dropped).
    assert!(batches.iter().all(|b| b.len() == 10));
    assert_eq!(batches[3].position().epoch, 0);
    assert_eq!(batches[4].position().epoch, 1);
    assert_eq!(loader.position().epoch, 4);
    assert_ne!(ids(&batches[0..4]), ids(&batches[4..8]));
}

#[test]
fn dropping_a_busy_loader_stops_its_threads() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let cfg = LoaderConfig {
        epochs: None,
        prefetch: 1,
        ..config(1)
    };
    let mut loader = DataLoader::new(&src, cfg).unwrap();
    loader.next_batch().unwrap();
    let t = std::time::Instant::now();
    drop(loader);
    assert!(t.elapsed().as_secs() < 5);
}

/// Dropped at any moment (here right after the first batch, many times, with several decoding
/// threads), a loader joins its threads: a worker that sees the stop flag leaves its job
/// unanswered, and the batch thread must not wait for it forever.
#[test]
fn dropping_a_loader_mid_window_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    // Row groups large enough that decoding one takes a while.
    let path = common::id_file(dir.path(), "big", 120_000, 20_000);
    let src = ParquetSource::open(&[path]).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..200 {
            let cfg = LoaderConfig {
                epochs: None,
                prefetch: 1,
                workers: 3,
                shuffle_buffer: 1,
                seed: i,
                columns: vec![ColumnSpec::id("id"), ColumnSpec::label("value")],
                ..config(1)
            };
            let mut loader = DataLoader::new(&src, cfg).unwrap();
            loader.next_batch().unwrap();
            drop(loader);
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("200 loaders dropped mid-stream within 2 minutes (a hang otherwise)");
}

#[test]
fn invalid_configs_and_positions_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let err = DataLoader::new(
        &src,
        LoaderConfig {
            rank: 2,
            world_size: 2,
            ..config(4)
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("rank 2 is outside world_size 2"),
        "{err}"
    );
    let err = DataLoader::new(
        &src,
        LoaderConfig {
            world_size: 100,
            ..config(4)
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("fewer than world_size 100"),
        "{err}"
    );
    let err = DataLoader::new(
        &src,
        LoaderConfig {
            batch_size: 0,
            ..config(4)
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::InvalidConfig { .. }));
    let bad = Position {
        epoch: 0,
        row_group: 1,
        offset: 0,
    };
    let err = DataLoader::resume(&src, config(4), bad).unwrap_err();
    assert!(
        err.to_string()
            .contains("not the start of a shuffle window"),
        "{err}"
    );
    let done = DataLoader::resume(&src, config(4), Position::start_of_epoch(1)).unwrap();
    assert_eq!(all(done).len(), 0);
}

#[test]
fn default_ids_name_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let cfg = LoaderConfig {
        shuffle: false,
        batch_size: 100,
        ..LoaderConfig::new(vec![ColumnSpec::label("value")])
    };
    let batch = DataLoader::new(&src, cfg)
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    assert_eq!(batch.ids()[0], "a:0");
    assert_eq!(batch.ids()[17], "b:0");
    assert_eq!(batch.labels("value").unwrap()[18], 1);
}

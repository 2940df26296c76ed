//! Examples made from a [`DataLoader`]'s batches on a background thread, with a resumable
//! position: the streaming input of every training pipeline.
//!
//! A pipeline's examples are rarely the loader's rows: text documents become packed token
//! sequences, held-out rows are dropped, a long series becomes windows. [`ExampleStream`] runs a
//! transform over each loader batch on its own thread (ahead of the consumer, a bounded number
//! of batches) and hands out examples `n` at a time. Its [`StreamPosition`] (the loader
//! position before the oldest batch still being consumed, and how many of that batch's
//! examples were taken) restarts the stream exactly where it stood, as long as the transform
//! is a pure function of the batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use serde::{Deserialize, Serialize};

use crate::bad_rows::BadRowReport;
use crate::batch::Batch;
use crate::error::DataError;
use crate::loader::{DataLoader, LoaderConfig};
use crate::position::Position;
use crate::source::ParquetSource;

/// Where an [`ExampleStream`] stands; serde-serialisable, for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The loader position before the oldest loader batch whose examples are not all taken.
    pub loader: Position,
    /// Examples of that batch already taken.
    pub skip: usize,
}

/// One loader batch's examples.
struct Chunk<E> {
    /// Loader position before the batch and after it.
    before: Position,
    after: Position,
    examples: VecDeque<E>,
    /// Examples already taken from the front of this chunk (including those skipped on start).
    taken: usize,
}

/// Examples from a [`DataLoader`] turned into `E`s by a transform on a background thread.
///
/// With `world_size` ranks and fewer row groups than ranks, every rank reads every row group
/// and keeps the rows whose global row index `i` has `i % world_size == rank` before the
/// transform sees them (correct, but each rank decodes everything); otherwise each rank reads
/// its own row groups, as the loader deals them.
///
/// Dropping the stream stops and joins its thread (and the loader's).
pub struct ExampleStream<E, Er> {
    rx: Option<Receiver<Result<Chunk<E>, Er>>>,
    queue: VecDeque<Chunk<E>>,
    /// Position of the stream's start (used until the first chunk arrives).
    start: StreamPosition,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    finished: bool,
    /// The loader's report of rows skipped under `skip_bad_rows`.
    report: Arc<Mutex<BadRowReport>>,
}

impl<E: Send + 'static, Er: From<DataError> + Send + 'static> ExampleStream<E, Er> {
    /// Starts streaming at `position` (the default position is the start of epoch 0).
    ///
    /// `transform` gets each loader batch (whose [`Batch::rows`] are the global row indices) and
    /// returns its examples, in a deterministic order; it runs on the stream's thread, `ahead`
    /// loader batches ahead of the consumer at most. The loader is opened (and the config
    /// checked) before this returns, so configuration errors surface here.
    pub fn new<F>(
        source: &ParquetSource,
        mut config: LoaderConfig,
        position: StreamPosition,
        ahead: usize,
        mut transform: F,
    ) -> Result<Self, Er>
    where
        F: FnMut(Batch) -> Result<Vec<E>, Er> + Send + 'static,
    {
        // Fewer row groups than ranks: every rank reads everything and keeps its rows.
        let rows_share = (config.world_size > 1 && source.num_row_groups() < config.world_size)
            .then_some((config.rank, config.world_size));
        if rows_share.is_some() {
            config.rank = 0;
            config.world_size = 1;
        }
        let mut loader = DataLoader::resume(source, config, position.loader)?;
        let report = loader.bad_row_report();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = bounded(ahead.max(1));
        let stop_t = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ssl-data-stream".into())
            .spawn(move || {
                let mut before = position.loader;
                while !stop_t.load(Ordering::Relaxed) {
                    let batch = match loader.next_batch() {
                        Ok(Some(b)) => b,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(Er::from(e)));
                            return;
                        }
                    };
                    let after = batch.position();
                    let batch = match rows_share {
                        Some((rank, world)) => {
                            let keep: Vec<usize> = (0..batch.len())
                                .filter(|&k| batch.rows()[k] % world == rank)
                                .collect();
                            batch.select(&keep)
                        }
                        None => batch,
                    };
                    let chunk = transform(batch).map(|examples| Chunk {
                        before,
                        after,
                        examples: examples.into(),
                        taken: 0,
                    });
                    let failed = chunk.is_err();
                    if tx.send(chunk).is_err() || failed {
                        return;
                    }
                    before = after;
                }
            })
            .map_err(|e| {
                Er::from(DataError::WorkerPanicked(format!(
                    "cannot start a thread: {e}"
                )))
            })?;
        Ok(Self {
            rx: Some(rx),
            queue: VecDeque::new(),
            start: position,
            stop,
            thread: Some(thread),
            finished: false,
            report,
        })
    }

    /// Receives the next chunk into the queue; false once the stream is over.
    fn pull(&mut self) -> Result<bool, Er> {
        if self.finished {
            return Ok(false);
        }
        let Some(rx) = &self.rx else {
            return Ok(false);
        };
        match rx.recv() {
            Ok(Ok(mut chunk)) => {
                if self.queue.is_empty() && chunk.before == self.start.loader && self.start.skip > 0
                {
                    // The batch the saved position was in the middle of.
                    let skip = self.start.skip.min(chunk.examples.len());
                    chunk.examples.drain(..skip);
                    chunk.taken = skip;
                    self.start.skip = 0;
                }
                self.queue.push_back(chunk);
                Ok(true)
            }
            Ok(Err(e)) => {
                self.finished = true;
                Err(e)
            }
            Err(_) => {
                self.finished = true;
                Ok(false)
            }
        }
    }

    /// The next `n` examples (fewer only when the configured epochs are over; empty then).
    pub fn take(&mut self, n: usize) -> Result<Vec<E>, Er> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.queue.front_mut() {
                Some(c) if !c.examples.is_empty() => {
                    let k = (n - out.len()).min(c.examples.len());
                    out.extend(c.examples.drain(..k));
                    c.taken += k;
                }
                // A used-up chunk: the stream now stands after it.
                Some(c) => {
                    self.start = StreamPosition {
                        loader: c.after,
                        skip: 0,
                    };
                    self.queue.pop_front();
                }
                None => {
                    if !self.pull()? {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Where the stream stands: pass it to [`ExampleStream::new`] to continue with exactly the
    /// examples that would have followed.
    pub fn position(&self) -> StreamPosition {
        match self.queue.front() {
            Some(c) if c.examples.is_empty() => StreamPosition {
                loader: c.after,
                skip: 0,
            },
            Some(c) => StreamPosition {
                loader: c.before,
                skip: c.taken,
            },
            None => self.start,
        }
    }

    /// Rows the loader skipped so far under `skip_bad_rows` (rows it could not decode; rows
    /// the transform drops are its own to count). It reads ahead of the consumer, so the
    /// count may include rows of batches not yet taken.
    pub fn bad_rows(&self) -> BadRowReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The epoch of the next example (that of the position).
    pub fn epoch(&self) -> u64 {
        self.position().loader.epoch
    }
}

impl<E, Er> Drop for ExampleStream<E, Er> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<E, Er> std::fmt::Debug for ExampleStream<E, Er> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExampleStream")
            .field("queued_chunks", &self.queue.len())
            .field("finished", &self.finished)
            .finish()
    }
}

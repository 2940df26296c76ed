//! The streaming loader: sharded, shuffled, resumable, decoded in background threads.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};

use crate::bad_rows::{BadRow, BadRowReport};
use crate::batch::{Batch, BatchBuilder};
use crate::column::{ColumnKind, ColumnSpec};
use crate::decode::{decode_row_group, DecodedRow, ResolvedColumn};
use crate::error::DataError;
use crate::plan::{rank_row_groups, window_order, windows};
use crate::position::Position;
use crate::source::{ParquetSource, RowGroupRef};

/// Everything a [`DataLoader`] needs to know. Serde-friendly; missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Columns to read and how to decode them (at most one [`ColumnKind::Id`]).
    pub columns: Vec<ColumnSpec>,
    /// Rows per batch (default 32).
    pub batch_size: usize,
    /// Seed of the row-group and row shuffles (default 0).
    pub seed: u64,
    /// Shuffle row-group order each epoch and rows within windows (default true).
    pub shuffle: bool,
    /// Rows shuffled together: windows of whole row groups holding at least this many rows
    /// (default 10,000). Larger mixes better and costs memory for the decoded window.
    pub shuffle_buffer: usize,
    /// Number of epochs; `None` streams forever (default `Some(1)`).
    pub epochs: Option<u64>,
    /// This process's rank (default 0).
    pub rank: usize,
    /// Number of ranks (default 1); each reads a disjoint set of row groups per epoch.
    pub world_size: usize,
    /// Skip rows that cannot be decoded and report them, instead of failing (default false).
    pub skip_bad_rows: bool,
    /// Batches prepared ahead of the consumer (default 4).
    pub prefetch: usize,
    /// Decoding threads; 0 picks the number of cores, at most 4 (default 0).
    pub workers: usize,
    /// Drop the last, incomplete batch of each epoch (default false).
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            columns: Vec::new(),
            batch_size: 32,
            seed: 0,
            shuffle: true,
            shuffle_buffer: 10_000,
            epochs: Some(1),
            rank: 0,
            world_size: 1,
            skip_bad_rows: false,
            prefetch: 4,
            workers: 0,
            drop_last: false,
        }
    }
}

impl LoaderConfig {
    /// A default configuration reading `columns`.
    pub fn new(columns: Vec<ColumnSpec>) -> Self {
        Self {
            columns,
            ..Self::default()
        }
    }

    fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        }
    }

    fn validate(&self, source: &ParquetSource) -> Result<(), DataError> {
        let bad = |reason: String| Err(DataError::InvalidConfig { reason });
        if self.columns.is_empty() {
            return bad("no columns requested".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} is outside world_size {} (ranks are 0..world_size)",
                self.rank, self.world_size
            ));
        }
        if self.epochs == Some(0) {
            return bad("epochs must be at least 1 (or None for an endless stream)".into());
        }
        let ids = self
            .columns
            .iter()
            .filter(|c| c.kind == ColumnKind::Id)
            .count();
        if ids > 1 {
            return bad(format!(
                "{ids} id columns requested; at most one is allowed"
            ));
        }
        for (i, c) in self.columns.iter().enumerate() {
            if self.columns[..i].iter().any(|d| d.name == c.name) {
                return bad(format!("column '{}' is requested twice", c.name));
            }
        }
        let n = source.num_row_groups();
        if n < self.world_size {
            return bad(format!(
                "{} has {n} row group(s), fewer than world_size {}: some ranks would get no data; write the files with smaller row groups",
                source.describe_files(),
                self.world_size
            ));
        }
        Ok(())
    }
}

/// Resolves label class lists (reading the label columns of the whole source when needed).
pub(crate) fn resolve_columns(
    source: &ParquetSource,
    columns: &[ColumnSpec],
) -> Result<Vec<ResolvedColumn>, DataError> {
    for spec in columns {
        spec.check_resize()?;
    }
    source.check_columns(columns)?;
    let mut out = Vec::with_capacity(columns.len());
    for spec in columns {
        let (classes, class_index) = match &spec.kind {
            ColumnKind::Label { classes } => {
                let is_string = source
                    .schema()
                    .iter()
                    .any(|(n, t)| n == &spec.name && !t.is_integer());
                let names = match classes {
                    Some(list) => Some(list.clone()),
                    None => source.class_names(&spec.name)?,
                };
                let index = match (&names, is_string) {
                    (Some(list), true) => {
                        let mut map = HashMap::with_capacity(list.len());
                        for (i, name) in list.iter().enumerate() {
                            if map.insert(name.clone(), i as i64).is_some() {
                                return Err(DataError::InvalidConfig {
                                    reason: format!(
                                        "class '{name}' appears twice in the class list of column '{}'",
                                        spec.name
                                    ),
                                });
                            }
                        }
                        Some(map)
                    }
                    _ => None,
                };
                (names.map(Arc::from), index)
            }
            _ => (None, None),
        };
        out.push(ResolvedColumn {
            spec: spec.clone(),
            classes,
            class_index,
        });
    }
    Ok(out)
}

/// State shared by the loader's threads.
struct Ctx {
    source: ParquetSource,
    columns: Arc<Vec<ResolvedColumn>>,
    config: LoaderConfig,
    row_groups: Vec<RowGroupRef>,
    /// Global index of each file's first row.
    file_first_rows: Arc<[usize]>,
    stop: Arc<AtomicBool>,
}

/// A window whose row groups have been (or are being) decoded.
struct PlannedWindow {
    epoch: u64,
    start: usize,
    end: usize,
    last_in_epoch: bool,
    order: Vec<(u32, u32)>,
    skip: usize,
    seqs: Vec<u64>,
    rgs: Vec<RowGroupRef>,
}

/// Generates the windows of the stream in order, from a start position.
struct Planner {
    ctx: Arc<Ctx>,
    epoch: u64,
    list: Vec<usize>,
    wins: Vec<(usize, usize)>,
    next_win: usize,
    skip: usize,
}

impl Planner {
    fn epoch_plan(ctx: &Ctx, epoch: u64) -> (Vec<usize>, Vec<(usize, usize)>) {
        let c = &ctx.config;
        let list = rank_row_groups(
            ctx.row_groups.len(),
            epoch,
            c.seed,
            c.shuffle,
            c.rank,
            c.world_size,
        );
        let rows: Vec<usize> = list.iter().map(|&i| ctx.row_groups[i].rows).collect();
        let wins = windows(&rows, c.shuffle, c.shuffle_buffer);
        (list, wins)
    }

    fn new(ctx: Arc<Ctx>, start: Position) -> Result<Self, DataError> {
        let invalid = |reason: String| DataError::InvalidPosition {
            position: start.to_json(),
            reason,
        };
        if let Some(n) = ctx.config.epochs {
            if start.epoch > n || (start.epoch == n && (start.row_group, start.offset) != (0, 0)) {
                return Err(invalid(format!(
                    "the loader is configured for {n} epoch(s)"
                )));
            }
        }
        let (list, wins) = Self::epoch_plan(&ctx, start.epoch);
        let finished = ctx.config.epochs.is_some_and(|n| start.epoch >= n);
        let next_win = if finished || (start.row_group == list.len() && start.offset == 0) {
            wins.len()
        } else {
            let w = wins
                .iter()
                .position(|&(s, _)| s == start.row_group)
                .ok_or_else(|| {
                    invalid(format!(
                        "row group {} is not the start of a shuffle window of this rank's {} row groups (was the position saved with another seed, shuffle buffer, rank or world size?)",
                        start.row_group,
                        list.len()
                    ))
                })?;
            let (s, e) = wins[w];
            let rows: usize = list[s..e].iter().map(|&i| ctx.row_groups[i].rows).sum();
            if start.offset >= rows.max(1) {
                return Err(invalid(format!(
                    "offset {} is past the window's {rows} rows",
                    start.offset
                )));
            }
            w
        };
        Ok(Self {
            ctx,
            epoch: start.epoch,
            list,
            wins,
            next_win,
            skip: start.offset,
        })
    }

    fn next_window(&mut self) -> Option<PlannedWindow> {
        if self.ctx.stop.load(Ordering::Relaxed) {
            return None;
        }
        while self.next_win >= self.wins.len() {
            self.epoch += 1;
            if self.ctx.config.epochs.is_some_and(|n| self.epoch >= n) {
                return None;
            }
            (self.list, self.wins) = Self::epoch_plan(&self.ctx, self.epoch);
            self.next_win = 0;
        }
        let (start, end) = self.wins[self.next_win];
        self.next_win += 1;
        let rgs: Vec<RowGroupRef> = self.list[start..end]
            .iter()
            .map(|&i| self.ctx.row_groups[i])
            .collect();
        let rows: Vec<usize> = rgs.iter().map(|r| r.rows).collect();
        let c = &self.ctx.config;
        let order = window_order(&rows, c.shuffle, c.seed, self.epoch, c.rank, start);
        Some(PlannedWindow {
            epoch: self.epoch,
            start,
            end,
            last_in_epoch: self.next_win == self.wins.len(),
            order,
            skip: std::mem::take(&mut self.skip),
            seqs: Vec::new(),
            rgs,
        })
    }
}

struct Job {
    seq: u64,
    rg: RowGroupRef,
    needed: Option<Vec<bool>>,
}

type JobResult = (u64, Result<Vec<DecodedRow>, DataError>);

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn worker(ctx: Arc<Ctx>, jobs: Receiver<Job>, results: Sender<JobResult>) {
    for job in jobs {
        if ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        let decoded = catch_unwind(AssertUnwindSafe(|| {
            decode_row_group(
                &ctx.source,
                job.rg.file,
                job.rg.row_group,
                &ctx.columns,
                job.needed.as_deref(),
            )
        }))
        .unwrap_or_else(|p| Err(DataError::WorkerPanicked(panic_message(p))));
        if results.send((job.seq, decoded)).is_err() {
            break;
        }
    }
}

/// Turns decoded windows into batches, in stream order.
struct Assembler {
    ctx: Arc<Ctx>,
    planner: Planner,
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    out: Sender<Result<Batch, DataError>>,
    report: Arc<Mutex<BadRowReport>>,
    next_seq: u64,
    in_flight: usize,
    max_in_flight: usize,
    done: HashMap<u64, Vec<DecodedRow>>,
    pending: VecDeque<PlannedWindow>,
    planner_done: bool,
}

/// Outcome of the assembler: finished normally or the consumer went away.
enum Flow {
    Go,
    Stop,
}

impl Assembler {
    fn dispatch(&mut self) -> Result<(), DataError> {
        while !self.planner_done && (self.pending.is_empty() || self.in_flight < self.max_in_flight)
        {
            let Some(mut w) = self.planner.next_window() else {
                self.planner_done = true;
                break;
            };
            let needed: Option<Vec<Vec<bool>>> = (w.skip > 0).then(|| {
                let mut m: Vec<Vec<bool>> = w.rgs.iter().map(|r| vec![false; r.rows]).collect();
                for &(k, r) in &w.order[w.skip..] {
                    m[k as usize][r as usize] = true;
                }
                m
            });
            for (k, rg) in w.rgs.iter().enumerate() {
                let seq = self.next_seq;
                self.next_seq += 1;
                w.seqs.push(seq);
                let job = Job {
                    seq,
                    rg: *rg,
                    needed: needed.as_ref().map(|m| m[k].clone()),
                };
                if let Some(jobs) = &self.jobs {
                    if jobs.send(job).is_err() {
                        return Err(DataError::WorkerPanicked(
                            "all decoding threads exited".into(),
                        ));
                    }
                }
                self.in_flight += 1;
            }
            self.pending.push_back(w);
        }
        Ok(())
    }

    fn wait_for(&mut self, seq: u64) -> Result<Vec<DecodedRow>, DataError> {
        loop {
            if let Some(rows) = self.done.remove(&seq) {
                return Ok(rows);
            }
            // A decoding thread that sees the stop flag exits without answering its job, so
            // waiting must watch the flag too (or a dropped loader would never join).
            let (s, r) = loop {
                match self
                    .results
                    .recv_timeout(std::time::Duration::from_millis(20))
                {
                    Ok(v) => break v,
                    Err(RecvTimeoutError::Timeout) if self.ctx.stop.load(Ordering::Relaxed) => {
                        // Nobody reads this error: the consumer is gone.
                        return Err(DataError::WorkerPanicked("the loader was stopped".into()));
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(DataError::WorkerPanicked(
                            "decoding threads exited early".into(),
                        ))
                    }
                }
            };
            self.in_flight -= 1;
            self.done.insert(s, r?);
            self.dispatch()?;
        }
    }

    fn send(&self, batch: Batch) -> Flow {
        if self.ctx.stop.load(Ordering::Relaxed) || self.out.send(Ok(batch)).is_err() {
            Flow::Stop
        } else {
            Flow::Go
        }
    }

    fn run(&mut self) -> Result<(), DataError> {
        let cfg = self.ctx.config.clone();
        let mut builder =
            BatchBuilder::new(self.ctx.columns.clone(), self.ctx.file_first_rows.clone());
        let mut epoch_good = 0usize;
        let mut epoch_from_start = self.planner.skip == 0 && self.planner.next_win == 0;
        loop {
            self.dispatch()?;
            let Some(mut w) = self.pending.pop_front() else {
                return Ok(());
            };
            let mut decoded = Vec::with_capacity(w.seqs.len());
            for &seq in &w.seqs {
                decoded.push(self.wait_for(seq)?);
            }
            let total = w.order.len();
            let order = std::mem::take(&mut w.order);
            for (i, &(k, r)) in order.iter().enumerate().skip(w.skip) {
                let item = decoded[k as usize][r as usize].take();
                let bad = match item {
                    Some(Ok(row)) => match builder.push(row) {
                        Ok(()) => {
                            epoch_good += 1;
                            None
                        }
                        Err((row, col, reason)) => Some(BadRow {
                            path: self.ctx.source.file(row.file).path.clone(),
                            row: row.row,
                            column: builder.column_name(col).to_string(),
                            reason,
                        }),
                    },
                    Some(Err(bad)) => Some(bad),
                    None => {
                        let rg = w.rgs[k as usize];
                        return Err(DataError::WorkerPanicked(format!(
                            "internal: row {r} of row group {} of {} was not decoded",
                            rg.row_group,
                            self.ctx.source.file(rg.file).path.display()
                        )));
                    }
                };
                if let Some(bad) = bad {
                    if !cfg.skip_bad_rows {
                        return Err(DataError::BadRow {
                            path: bad.path,
                            row: bad.row,
                            column: bad.column,
                            reason: bad.reason,
                        });
                    }
                    if let Ok(mut rep) = self.report.lock() {
                        rep.record(bad);
                    }
                }
                if builder.len() == cfg.batch_size {
                    let pos = if i + 1 < total {
                        Position {
                            epoch: w.epoch,
                            row_group: w.start,
                            offset: i + 1,
                        }
                    } else if w.last_in_epoch {
                        Position::start_of_epoch(w.epoch + 1)
                    } else {
                        Position {
                            epoch: w.epoch,
                            row_group: w.end,
                            offset: 0,
                        }
                    };
                    if let Flow::Stop = self.send(builder.finish(pos)) {
                        return Ok(());
                    }
                }
            }
            if w.last_in_epoch {
                if !builder.is_empty() {
                    if cfg.drop_last {
                        builder.clear();
                    } else if let Flow::Stop =
                        self.send(builder.finish(Position::start_of_epoch(w.epoch + 1)))
                    {
                        return Ok(());
                    }
                }
                if epoch_from_start && epoch_good == 0 {
                    return Err(DataError::EmptyDataset {
                        what: format!(
                            "every row that rank {} read in epoch {} of {} was bad and skipped",
                            cfg.rank,
                            w.epoch,
                            self.ctx.source.describe_files()
                        ),
                    });
                }
                epoch_good = 0;
                epoch_from_start = true;
            }
        }
    }
}

/// A streaming loader over a [`ParquetSource`].
///
/// Each epoch, the source's row groups (over all files) are shuffled with the seed and dealt
/// round-robin to the ranks; a rank reads its row groups in windows of at least
/// `shuffle_buffer` rows, shuffles the rows of each window, and cuts the stream into batches
/// (never across epochs). Reading and decoding run in background threads ahead of the consumer
/// (a bounded queue of `prefetch` batches); dropping the loader stops and joins them.
///
/// The stream is a pure function of the source, the config and the start position, so
/// [`DataLoader::position`] saved after any batch and passed to [`DataLoader::resume`] gives
/// exactly the batches that would have followed.
pub struct DataLoader {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    position: Position,
    report: Arc<Mutex<BadRowReport>>,
    columns: Arc<Vec<ResolvedColumn>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    finished: bool,
}

impl DataLoader {
    /// Starts a loader at the beginning of epoch 0.
    ///
    /// Checks the config and that every file has every column with a fitting type, and reads
    /// the string label columns of the whole source to fix their class lists.
    pub fn new(source: &ParquetSource, config: LoaderConfig) -> Result<Self, DataError> {
        Self::resume(source, config, Position::default())
    }

    /// Starts a loader at a saved [`Position`] (from [`DataLoader::position`] or
    /// [`Batch::position`]) with the same source and config.
    pub fn resume(
        source: &ParquetSource,
        config: LoaderConfig,
        position: Position,
    ) -> Result<Self, DataError> {
        config.validate(source)?;
        let columns = Arc::new(resolve_columns(source, &config.columns)?);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = config.worker_count();
        let prefetch = config.prefetch.max(1);
        let ctx = Arc::new(Ctx {
            source: source.clone(),
            columns: columns.clone(),
            config,
            row_groups: source.row_groups(),
            file_first_rows: file_first_rows(source).into(),
            stop: stop.clone(),
        });
        let planner = Planner::new(ctx.clone(), position)?;
        let (job_tx, job_rx) = unbounded::<Job>();
        let (res_tx, res_rx) = unbounded::<JobResult>();
        let (out_tx, out_rx) = bounded(prefetch);
        let report = Arc::new(Mutex::new(BadRowReport::default()));
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 0..workers {
            let (ctx, jobs, results) = (ctx.clone(), job_rx.clone(), res_tx.clone());
            threads.push(spawn(format!("ssl-data-decode-{i}"), move || {
                worker(ctx, jobs, results)
            })?);
        }
        drop(res_tx);
        drop(job_rx);
        let mut assembler = Assembler {
            ctx,
            planner,
            jobs: Some(job_tx),
            results: res_rx,
            out: out_tx,
            report: report.clone(),
            next_seq: 0,
            in_flight: 0,
            max_in_flight: 2 * workers,
            done: HashMap::new(),
            pending: VecDeque::new(),
            planner_done: false,
        };
        threads.push(spawn("ssl-data-batch".into(), move || {
            if let Err(e) = assembler.run() {
                let _ = assembler.out.send(Err(e));
            }
            // Dropping the assembler closes the job queue, which lets the decoding threads end.
            drop(assembler);
        })?);
        Ok(Self {
            rx: Some(out_rx),
            position,
            report,
            columns,
            stop,
            threads,
            finished: false,
        })
    }

    /// The next batch; `Ok(None)` once the configured epochs are done. After an error the
    /// stream is over and further calls return `Ok(None)`.
    pub fn next_batch(&mut self) -> Result<Option<Batch>, DataError> {
        if self.finished {
            return Ok(None);
        }
        let Some(rx) = &self.rx else {
            return Ok(None);
        };
        match rx.recv() {
            Ok(Ok(batch)) => {
                self.position = batch.position();
                Ok(Some(batch))
            }
            Ok(Err(e)) => {
                self.finished = true;
                Err(e)
            }
            Err(_) => {
                self.finished = true;
                Ok(None)
            }
        }
    }

    /// The position right after the last batch returned (the start position before the
    /// first): save it to resume with [`DataLoader::resume`].
    pub fn position(&self) -> Position {
        self.position
    }

    /// Rows skipped so far under `skip_bad_rows` (count and first examples).
    pub fn bad_rows(&self) -> BadRowReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The shared report behind [`DataLoader::bad_rows`], for a reader that moves the loader
    /// to another thread.
    pub(crate) fn bad_row_report(&self) -> Arc<Mutex<BadRowReport>> {
        self.report.clone()
    }

    /// Class names of a label column (indexed by class id), when known.
    pub fn class_names(&self, column: &str) -> Option<Arc<[String]>> {
        self.columns
            .iter()
            .find(|c| c.spec.name == column)
            .and_then(|c| c.classes.clone())
    }
}

/// Global index of the first row of each file of the source.
pub(crate) fn file_first_rows(source: &ParquetSource) -> Vec<usize> {
    let mut acc = 0;
    (0..source.files().len())
        .map(|f| {
            let first = acc;
            acc += source.file(f).rg_rows.iter().sum::<usize>();
            first
        })
        .collect()
}

fn spawn<F: FnOnce() + Send + 'static>(name: String, f: F) -> Result<JoinHandle<()>, DataError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| DataError::WorkerPanicked(format!("cannot start a thread: {e}")))
}

impl Iterator for DataLoader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks the batch thread, which closes the job queue.
        self.rx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoader")
            .field("position", &self.position)
            .field(
                "columns",
                &self.columns.iter().map(|c| &c.spec).collect::<Vec<_>>(),
            )
            .finish()
    }
}

//! Windows of a long series cut lazily by global row index: the windows of a part (a
//! [`WindowPlan`]) come in blocks of consecutive windows, each block read on demand from the
//! Parquet row groups that hold its rows (so windows span row-group and file boundaries, and
//! the column is never held whole). [`LongWindowSource`] trains on them (block order shuffled
//! each epoch, windows shuffled within a block, resumable); [`LongWindows::for_each_chunk`]
//! visits them in order, a chunk at a time (embedding, evaluation).

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{BatchSource, CoreError, SslRng};

use crate::{LongColumn, Normalization, Result, TsError, WindowPlan};

/// Rows a block of windows spans at most (about 4 MB of `f32`): the shuffle window of a long
/// series. A part shorter than this is one block, shuffled whole each epoch.
pub const LONG_BLOCK_ROWS: usize = 1 << 20;

/// The windows of one part of a long series, cut on demand.
#[derive(Debug, Clone)]
pub struct LongWindows {
    column: LongColumn,
    plan: WindowPlan,
    normalization: Normalization,
    block: usize,
}

/// The rows of one block and which of its windows have an observed value.
struct Block {
    /// First window of the block.
    k0: usize,
    /// The block's rows (from the first row of window `k0`).
    values: Vec<f32>,
    /// Windows (indices from `k0`) with at least one observed value, in order.
    kept: Vec<usize>,
}

impl LongWindows {
    /// The windows `plan` cuts from `column`, each scaled by `normalization`.
    pub fn new(column: LongColumn, plan: WindowPlan, normalization: Normalization) -> Self {
        let block = ((LONG_BLOCK_ROWS.saturating_sub(plan.len)) / plan.stride).max(1);
        LongWindows {
            column,
            plan,
            normalization,
            block,
        }
    }

    /// The plan.
    pub fn plan(&self) -> &WindowPlan {
        &self.plan
    }

    /// Windows in the part (before dropping those without an observed value).
    pub fn count(&self) -> usize {
        self.plan.count()
    }

    /// Blocks of windows.
    pub fn num_blocks(&self) -> usize {
        self.count().div_ceil(self.block)
    }

    /// Reads block `j`.
    fn read_block(&self, j: usize) -> Result<Block> {
        let k0 = j * self.block;
        let k1 = ((j + 1) * self.block).min(self.count());
        let (a, b) = self.plan.rows_of(k0, k1);
        let values = self.column.read(a, b)?;
        // Prefix counts of observed values: a window is kept when it holds one.
        let mut observed = Vec::with_capacity(values.len() + 1);
        observed.push(0u32);
        let mut n = 0u32;
        for v in &values {
            n += u32::from(v.is_finite());
            observed.push(n);
        }
        let (len, stride) = (self.plan.len, self.plan.stride);
        let kept = (0..k1 - k0)
            .filter(|&i| observed[i * stride + len] > observed[i * stride])
            .collect();
        Ok(Block { k0, values, kept })
    }

    /// Window `i` of `block` (an index from the block's first window).
    fn cut(&self, block: &Block, i: usize) -> Result<SeqExample> {
        let s = i * self.plan.stride;
        let mut e = SeqExample::new(
            block.values[s..s + self.plan.len].to_vec(),
            self.plan.len,
            1,
        )?;
        self.normalization.apply(&mut e)?;
        Ok(e)
    }

    /// The first `n` windows with an observed value, in order.
    pub fn first(&self, n: usize) -> Result<Vec<SeqExample>> {
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        self.for_each_chunk(
            n,
            |_| true,
            |w| {
                out.extend(w.into_iter().map(|(_, e)| e));
                Ok(false)
            },
        )?;
        Ok(out)
    }

    /// Windows with an observed value spread evenly over the part, at most `n` of them, in
    /// order: those whose window index is a multiple of `count / n` rounded up.
    pub fn spread(&self, n: usize) -> Result<Vec<SeqExample>> {
        let every = self.count().div_ceil(n.max(1)).max(1);
        let mut out = Vec::new();
        self.for_each_chunk(
            n.max(1),
            |k| k % every == 0,
            |w| {
                out.extend(w.into_iter().map(|(_, e)| e));
                Ok(true)
            },
        )?;
        out.truncate(n);
        Ok(out)
    }

    /// Calls `f` with the windows that have an observed value and whose index passes `keep`,
    /// `(window index, window)` in order, at most `chunk` at a time (only those are cut and
    /// held), while it returns true.
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        keep: impl Fn(usize) -> bool,
        mut f: impl FnMut(Vec<(usize, SeqExample)>) -> Result<bool>,
    ) -> Result<()> {
        let chunk = chunk.max(1);
        for j in 0..self.num_blocks() {
            let block = self.read_block(j)?;
            let mut out = Vec::with_capacity(chunk);
            for &i in &block.kept {
                if !keep(block.k0 + i) {
                    continue;
                }
                out.push((block.k0 + i, self.cut(&block, i)?));
                if out.len() == chunk && !f(std::mem::take(&mut out))? {
                    return Ok(());
                }
            }
            if !out.is_empty() && !f(out)? {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Where a [`LongWindowSource`] stands (serde: the trainer's checkpoint holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LongWindowPosition {
    /// Epoch.
    pub epoch: u64,
    /// Index of the current block in the epoch's block order.
    pub block: usize,
    /// Windows of that block (this rank's, in the block's shuffled order) already taken.
    pub offset: usize,
}

/// The trainer's source of a long series' windows: each epoch visits the blocks in an order
/// seeded by `(seed, epoch)` and each block's windows in an order seeded by `(seed, epoch,
/// block)`; with `world` ranks, rank `r` takes the windows at positions `p % world == r` of
/// each block's order (every rank reads the block). Endless; batches of `batch_size` windows.
pub struct LongWindowSource {
    windows: LongWindows,
    seed: u64,
    rank: usize,
    world: usize,
    batch_size: usize,
    device: Device,
    pos: LongWindowPosition,
    /// The current block and this rank's windows of it, in order.
    current: Option<(Block, Vec<usize>)>,
}

impl LongWindowSource {
    /// A source at the start of epoch 0.
    pub fn new(
        windows: LongWindows,
        seed: u64,
        rank: usize,
        world: usize,
        batch_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(TsError::Config("batch size must be at least 1".into()));
        }
        Ok(LongWindowSource {
            windows,
            seed,
            rank,
            world: world.max(1),
            batch_size,
            device: device.clone(),
            pos: LongWindowPosition::default(),
            current: None,
        })
    }

    fn epoch_seed(&self, epoch: u64) -> u64 {
        self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The epoch's block order.
    fn block_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.windows.num_blocks()).collect();
        SslRng::derived(self.epoch_seed(epoch), "long-window-blocks").shuffle(&mut order);
        order
    }

    /// Loads the block at `pos.block` of `pos.epoch`'s order with this rank's windows.
    fn load(&mut self) -> Result<()> {
        let j = self.block_order(self.pos.epoch)[self.pos.block];
        let block = self.windows.read_block(j)?;
        let mut order = block.kept.clone();
        let seed = self.epoch_seed(self.pos.epoch) ^ (j as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        SslRng::derived(seed, "long-window-order").shuffle(&mut order);
        let mine = order
            .into_iter()
            .enumerate()
            .filter(|(p, _)| p % self.world == self.rank)
            .map(|(_, i)| i)
            .collect();
        self.current = Some((block, mine));
        Ok(())
    }

    /// The next window (endless).
    fn next_window(&mut self) -> Result<SeqExample> {
        // Blocks visited since the last window: a whole epoch without one is an error.
        let mut empty_blocks = 0;
        loop {
            if self.current.is_none() {
                self.load()?;
            }
            let (block, mine) = self.current.as_ref().expect("loaded above");
            if let Some(&i) = mine.get(self.pos.offset) {
                let e = self.windows.cut(block, i)?;
                self.pos.offset += 1;
                return Ok(e);
            }
            empty_blocks += 1;
            if empty_blocks > self.windows.num_blocks() {
                return Err(TsError::InvalidInput(
                    "no window of the long series holds an observed value for this rank".into(),
                ));
            }
            self.pos.offset = 0;
            self.pos.block += 1;
            if self.pos.block >= self.windows.num_blocks() {
                self.pos = LongWindowPosition {
                    epoch: self.pos.epoch + 1,
                    block: 0,
                    offset: 0,
                };
            }
            self.current = None;
        }
    }
}

impl BatchSource<SeqBatch> for LongWindowSource {
    fn next_batch(&mut self) -> ssl_core::Result<SeqBatch> {
        let mut batch = Vec::with_capacity(self.batch_size);
        for _ in 0..self.batch_size {
            batch.push(self.next_window().map_err(CoreError::from)?);
        }
        SeqBatch::from_examples(&batch.iter().collect::<Vec<_>>(), &self.device)
    }

    fn epoch(&self) -> u64 {
        self.pos.epoch
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.pos).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let p: LongWindowPosition = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not a long-series window position: {e}"
            ))
        })?;
        if p.block >= self.windows.num_blocks() {
            return Err(CoreError::Config(format!(
                "data position {position}: block {} of {}",
                p.block,
                self.windows.num_blocks()
            )));
        }
        self.pos = p;
        self.current = None;
        Ok(())
    }
}

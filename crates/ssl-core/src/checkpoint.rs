//! Atomic, resumable checkpoints.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` holding `model.safetensors` (the model's own
//! key names), `optimizer.safetensors` (AdamW moments) and `trainer_state.json` (step, RNG,
//! data position, config...). It is written under a temporary name, every file fsynced, then
//! renamed, so a crash at any moment leaves either the old set or the new one, never half a
//! checkpoint. Only the newest `keep_last` are kept.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::optim::AdamW;
use crate::{CoreError, ParamStore, Result, SslRng};

/// Model weights file inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file inside a checkpoint directory.
pub const STATE_FILE: &str = "trainer_state.json";
const FORMAT_VERSION: u32 = 1;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format of this file.
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the data stream.
    pub epoch: u64,
    /// The training random stream (masks, augmentations, dropout).
    pub rng: SslRng,
    /// The data source's position.
    pub data_position: Value,
    /// The run's resolved configuration.
    pub config: Value,
    /// Multiplier on the scheduled learning rate (lowered by divergence rollbacks).
    pub lr_scale: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Rollbacks done after divergence.
    pub rollbacks: u32,
    /// Moving average of the loss (divergence detection).
    pub loss_ema: Option<f64>,
    /// Examples consumed so far.
    pub samples_seen: u64,
    /// The best value of `train.best_metric` so far and early stopping's count (absent in
    /// checkpoints of runs that never logged the metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<crate::best::BestState>,
    /// The precision the run's products took (`train.matmul_precision` after the CPU check),
    /// kept by a resumed run; absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul_precision: Option<crate::nn::MatmulPrecision>,
}

impl TrainerState {
    /// A fresh state for step 0.
    pub fn new(rng: SslRng, config: Value) -> Self {
        TrainerState {
            format_version: FORMAT_VERSION,
            step: 0,
            epoch: 0,
            rng,
            data_position: Value::Null,
            config,
            lr_scale: 1.0,
            skipped_steps: 0,
            rollbacks: 0,
            loss_ema: None,
            samples_seen: 0,
            best: None,
            matmul_precision: None,
        }
    }
}

/// Writes, lists, prunes and finds checkpoints in one directory.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn fsync_path(path: &Path) -> Result<()> {
    let f = fs::File::open(path).map_err(|e| CoreError::io("opening for fsync", path, e))?;
    f.sync_all().map_err(|e| CoreError::io("fsyncing", path, e))
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| CoreError::io("creating", path, e))?;
    f.write_all(bytes)
        .map_err(|e| CoreError::io("writing", path, e))?;
    f.sync_all().map_err(|e| CoreError::io("fsyncing", path, e))
}

/// Writes the checkpoint of `params`, `optimizer` and `state` as the folder `dest` in `dir`
/// (created if absent), atomically: refused (with an error naming the parameter) when a
/// parameter is not finite; stale `tmp` and `aside` folders removed; the three files written
/// and fsynced in the fresh folder `tmp` (on failure it is removed and nothing else changes),
/// a previous `dest` renamed to `aside`, `tmp` renamed into place, `dir` fsynced, then
/// `aside` removed.
pub(crate) fn write_dir_atomic(
    dir: &Path,
    dest: &Path,
    tmp: &Path,
    aside: &Path,
    params: &ParamStore,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    if let Some(name) = params.first_non_finite()? {
        return Err(CoreError::NonFiniteParameters {
            step: state.step,
            name,
        });
    }
    fs::create_dir_all(dir).map_err(|e| CoreError::io("creating", dir, e))?;
    for p in [tmp, aside] {
        if p.exists() {
            fs::remove_dir_all(p).map_err(|e| CoreError::io("removing", p, e))?;
        }
    }
    fs::create_dir(tmp).map_err(|e| CoreError::io("creating", tmp, e))?;
    let written = (|| {
        let model = tmp.join(MODEL_FILE);
        params.save_safetensors(&model)?;
        fsync_path(&model)?;
        let opt = tmp.join(OPTIMIZER_FILE);
        optimizer.save(&opt)?;
        fsync_path(&opt)?;
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(state).map_err(|source| CoreError::Json {
            path: state_path.clone(),
            source,
        })?;
        write_synced(&state_path, &json)?;
        fsync_path(tmp)
    })();
    if written.is_err() {
        // A failed write (a full disk) leaves no temporary folder behind.
        let _ = fs::remove_dir_all(tmp);
    }
    written?;
    if dest.exists() {
        fs::rename(dest, aside).map_err(|e| CoreError::io("renaming aside", dest, e))?;
    }
    fs::rename(tmp, dest).map_err(|e| CoreError::io("renaming into place", dest, e))?;
    fsync_path(dir)?;
    remove_tree(aside)
}

impl CheckpointManager {
    /// Checkpoints under `dir`, keeping the newest `keep_last` (at least 1).
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Self {
        CheckpointManager {
            dir: dir.into(),
            keep_last: keep_last.max(1),
        }
    }

    /// The directory holding the checkpoints.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the checkpoint of `step` is (or will be) written.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(step_name(step))
    }

    /// Writes a checkpoint for `state.step` atomically and prunes old ones; returns its path.
    /// Refuses (with an error naming the parameter) when a parameter is not finite.
    pub fn save(
        &self,
        params: &ParamStore,
        optimizer: &AdamW,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let name = step_name(state.step);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{:08}-{}",
            state.step,
            std::process::id()
        ));
        let final_dir = self.path_for(state.step);
        let doomed = self
            .dir
            .join(format!("{DEL_PREFIX}{name}-{}", std::process::id()));
        write_dir_atomic(
            &self.dir, &final_dir, &tmp, &doomed, params, optimizer, state,
        )?;
        self.prune()?;
        Ok(final_dir)
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = self.step_dirs()?;
        out.retain(|(_, p)| {
            [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
                .iter()
                .all(|f| p.join(f).is_file())
        });
        Ok(out)
    }

    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// Checkpoint folders (`step-N`) that lack one of the three files, oldest first, with
    /// the files they lack.
    pub fn incomplete(&self) -> Result<Vec<(u64, PathBuf, Vec<&'static str>)>> {
        let mut out = Vec::new();
        for (step, p) in self.step_dirs()? {
            let missing: Vec<&'static str> = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
                .into_iter()
                .filter(|f| !p.join(f).is_file())
                .collect();
            if !missing.is_empty() {
                out.push((step, p, missing));
            }
        }
        Ok(out)
    }

    /// Every `step-N` folder, complete or not, oldest first.
    fn step_dirs(&self) -> Result<Vec<(u64, PathBuf)>> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let entries =
            fs::read_dir(&self.dir).map_err(|e| CoreError::io("listing", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| CoreError::io("listing", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Repairs what a crash can leave (call once at the start of a run, by the one process
    /// that writes checkpoints): temporary folders of interrupted writes and deletions,
    /// incomplete checkpoint folders older than the newest complete one (a deletion cut
    /// short), and complete checkpoints beyond the newest `keep_last` (a rotation cut short).
    /// An incomplete folder newer than every complete checkpoint is left alone and reported
    /// as skipped. Returns one line for each thing done or skipped.
    pub fn recover(&self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        if !self.dir.exists() {
            return Ok(notes);
        }
        let entries =
            fs::read_dir(&self.dir).map_err(|e| CoreError::io("listing", &self.dir, e))?;
        let mut stale: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(TMP_PREFIX) || n.starts_with(DEL_PREFIX)
            })
            .map(|e| e.path())
            .collect();
        stale.sort();
        for p in stale {
            remove_tree(&p)?;
            notes.push(format!(
                "removed {}, left by an interrupted checkpoint write or rotation",
                p.display()
            ));
        }
        let newest = self.list()?.last().map(|(s, _)| *s);
        for (step, p, missing) in self.incomplete()? {
            if newest.is_some_and(|n| step < n) {
                remove_tree(&p)?;
                notes.push(format!(
                    "removed {}, an incomplete checkpoint (no {}) left by an interrupted rotation",
                    p.display(),
                    missing.join(", ")
                ));
            } else {
                notes.push(format!(
                    "skipping {}: incomplete checkpoint (no {})",
                    p.display(),
                    missing.join(", ")
                ));
            }
        }
        for p in self.prune_excess()? {
            notes.push(format!(
                "removed {}, beyond the newest {} checkpoints (a rotation cut short)",
                p.display(),
                self.keep_last
            ));
        }
        Ok(notes)
    }

    /// Removes complete checkpoints beyond the newest `keep_last`, oldest first; each is
    /// renamed out of the `step-N` namespace before it is deleted, so a crash mid-deletion
    /// never leaves a `step-N` folder that looks like a checkpoint. Returns what was removed.
    fn prune_excess(&self) -> Result<Vec<PathBuf>> {
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        let mut removed = Vec::new();
        for (step, p) in all.into_iter().take(excess) {
            let doomed = self.dir.join(format!(
                "{DEL_PREFIX}{}-{}",
                step_name(step),
                std::process::id()
            ));
            fs::rename(&p, &doomed).map_err(|e| CoreError::io("removing old checkpoint", &p, e))?;
            remove_tree(&doomed)?;
            removed.push(p);
        }
        Ok(removed)
    }

    fn prune(&self) -> Result<()> {
        self.prune_excess()?;
        // Leftovers of interrupted writes by this or earlier processes.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) || name.starts_with(DEL_PREFIX) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// Name prefix of a checkpoint being written.
const TMP_PREFIX: &str = ".tmp-step-";
/// Name prefix of a checkpoint being deleted.
const DEL_PREFIX: &str = ".del-";

fn remove_tree(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CoreError::io("removing", p, e)),
        _ => Ok(()),
    }
}

/// Reads the trainer state of a checkpoint directory.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| CoreError::io("reading", &path, e))?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|source| CoreError::Json {
        path: path.clone(),
        source,
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CoreError::checkpoint(
            &path,
            format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    Ok(state)
}

/// Finds the checkpoint meant by `path`: a checkpoint directory itself, or a run directory
/// (its newest checkpoint under `checkpoints/`).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.join("checkpoints"), path.to_path_buf()] {
        if let Some(p) = CheckpointManager::new(&dir, 1).latest()? {
            return Ok(p);
        }
    }
    Err(CoreError::checkpoint(
        path,
        format!("no checkpoint found (expected {MODEL_FILE} here or step-NNNNNNNN directories under checkpoints/)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use crate::Init;
    use candle_core::Device;

    #[test]
    fn save_prune_latest_and_refuse_nan() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParamStore::new(&Device::Cpu);
        store
            .builder(0)
            .get("w", (2, 2), Init::Normal(1.0))
            .unwrap();
        let opt = AdamW::new(&store, AdamWConfig::default()).unwrap();
        let mgr = CheckpointManager::new(dir.path().join("checkpoints"), 2);
        let mut state = TrainerState::new(SslRng::new(0), Value::Null);
        for step in [5, 10, 15] {
            state.step = step;
            mgr.save(&store, &opt, &state).unwrap();
        }
        let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [10, 15]);
        let latest = resolve_checkpoint(dir.path()).unwrap();
        assert!(latest.ends_with("step-00000015"));
        assert_eq!(read_state(&latest).unwrap().step, 15);
        // A half-written checkpoint (no state file) is ignored.
        fs::create_dir_all(dir.path().join("checkpoints/step-00000020")).unwrap();
        assert!(mgr.latest().unwrap().unwrap().ends_with("step-00000015"));
        // NaN parameters are never written.
        let w = store.get("w").unwrap();
        w.set(&candle_core::Tensor::new(&[[f32::NAN, 0.], [0., 0.]], &Device::Cpu).unwrap())
            .unwrap();
        state.step = 25;
        let err = mgr.save(&store, &opt, &state).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("25"), "{err}");
        assert!(!dir.path().join("checkpoints/step-00000025").exists());
    }

    #[test]
    fn resolve_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }
}

//! [`RunDir`]: a pretraining run's hold on its directory, taken before anything is written.
//!
//! Every pipeline's `pretrain` opens its run directory through [`RunDir::open`] first. It
//! checks, before any file is written, that the directory can be used as asked (a fresh run
//! finds no checkpoints; a resumed one finds a complete checkpoint), takes an exclusive
//! advisory lock on `DIR/.lock` for the run's lifetime (a second process gets an error naming
//! the holder), and lets the pipeline check its model against the checkpoint it resumes
//! ([`RunDir::check_params`]) before it rewrites `config.toml` or a tokenizer. A run that
//! fails before writing a checkpoint into a directory it created removes that directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointManager, MODEL_FILE};
use crate::{CoreError, ParamStore, Result};

/// The lock file in a run directory.
pub const LOCK_FILE: &str = ".lock";

/// A run's hold on its directory: the lock (on the writing process), what it resumes from,
/// and whether the directory is new. Dropped without [`RunDir::finish`] (the run failed), it
/// removes a directory it created that holds no checkpoint.
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    lock: Option<File>,
    created: bool,
    resume_from: Option<PathBuf>,
    finished: bool,
}

fn err(dir: &Path, message: impl Into<String>) -> CoreError {
    CoreError::RunDir {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// The checkpoint a run in `dir` (its checkpoints in `checkpoints`) starts from: with
/// `resume`, the newest complete one (an error when there is none, naming an incomplete
/// one); without, none (an error when `dir` already holds checkpoints, which a fresh run
/// would mix with its own). Changes nothing.
pub(crate) fn checkpoint_to_start_from(
    dir: &Path,
    checkpoints: &CheckpointManager,
    resume: bool,
) -> Result<Option<PathBuf>> {
    match (resume, checkpoints.latest()?) {
        (false, Some(found)) => Err(err(
            dir,
            format!(
                "already holds checkpoints (newest {}): resume it with --resume or train into a new directory",
                found.display()
            ),
        )),
        (true, None) => {
            let mut message = "holds no complete checkpoint to resume".to_string();
            if let Some((_, p, missing)) = checkpoints.incomplete()?.pop() {
                message.push_str(&format!(
                    " ({} is incomplete: no {}",
                    p.display(),
                    missing.join(", ")
                ));
                if !missing.contains(&MODEL_FILE) {
                    message.push_str(&format!(
                        "; its {MODEL_FILE} can still be embedded or used as model.init_from"
                    ));
                }
                message.push(')');
            }
            message.push_str("; train without --resume to start afresh");
            Err(err(dir, message))
        }
        (true, found) => Ok(found),
        (false, None) => Ok(None),
    }
}

/// Who holds a lock: `pid N on HOST since UNIX-SECONDS`.
fn holder_line() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into());
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "pid {} on {host} since unix time {since}",
        std::process::id()
    )
}

impl RunDir {
    /// Opens `dir` for a run. `resume`: continue from its newest complete checkpoint (an
    /// error when there is none); otherwise the directory must hold no checkpoint. `writer`:
    /// this process writes the run (rank 0): it creates the directory and takes the lock;
    /// other ranks only check. Nothing in the directory is changed except the lock file.
    pub fn open(dir: &Path, resume: bool, writer: bool) -> Result<RunDir> {
        let existed = dir.exists();
        if existed && !dir.is_dir() {
            return Err(err(dir, "exists and is not a directory"));
        }
        let mut guard = RunDir {
            dir: dir.to_path_buf(),
            lock: None,
            created: false,
            resume_from: None,
            finished: false,
        };
        if writer {
            if !existed {
                std::fs::create_dir_all(dir).map_err(|e| CoreError::io("creating", dir, e))?;
                guard.created = true;
            }
            guard.lock = Some(Self::lock(dir)?);
        }
        let manager = CheckpointManager::new(dir.join("checkpoints"), usize::MAX);
        guard.resume_from = checkpoint_to_start_from(dir, &manager, resume)?;
        Ok(guard)
    }

    /// Takes the exclusive lock on `dir/.lock` and writes this process into it.
    fn lock(dir: &Path) -> Result<File> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CoreError::io("opening", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(err(
                    dir,
                    format!(
                        "in use by another run ({}); wait for it to finish or use another directory",
                        if holder.is_empty() {
                            "holder unknown"
                        } else {
                            holder
                        }
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(CoreError::io("locking", &path, e)),
        }
        let line = holder_line();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(format!("{line}\n").as_bytes()))
            .map_err(|e| CoreError::io("writing", &path, e))?;
        Ok(file)
    }

    /// The run directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint a resumed run continues from (`None` for a fresh run).
    pub fn resume_from(&self) -> Option<&Path> {
        self.resume_from.as_deref()
    }

    /// On a resumed run, loads the checkpoint's model into `params`: an error (naming the
    /// parameter and its shapes) when the model changed, found before the pipeline writes
    /// anything. Call it after building the model and before writing `config.toml`.
    pub fn check_params(&self, params: &ParamStore) -> Result<()> {
        if let Some(ckpt) = &self.resume_from {
            params
                .load_safetensors(&ckpt.join(MODEL_FILE))
                .map_err(|e| {
                    err(
                        &self.dir,
                        format!("cannot resume with this configuration: {e}"),
                    )
                })?;
        }
        Ok(())
    }

    /// The run ended (finished or stopped on request): keep the directory and release the
    /// lock.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.finished || !self.created {
            return;
        }
        let has_checkpoint = CheckpointManager::new(self.dir.join("checkpoints"), usize::MAX)
            .list()
            .map_or(true, |l| !l.is_empty());
        if !has_checkpoint {
            // Everything in it was written by this failed run.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_by_name_and_a_failed_new_run_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let first = RunDir::open(&run, false, true).unwrap();
        let e = RunDir::open(&run, false, true).unwrap_err().to_string();
        assert!(
            e.contains("in use by another run")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first); // failed before any checkpoint: the new directory goes
        assert!(!run.exists());
        let ok = RunDir::open(&run, false, true).unwrap();
        ok.finish();
        assert!(run.is_dir());
        let e = RunDir::open(&run, true, true).unwrap_err().to_string();
        assert!(e.contains("no complete checkpoint to resume"), "{e}");
        // An existing directory is never removed.
        drop(RunDir::open(&run, false, true).unwrap());
        assert!(run.is_dir());
    }
}

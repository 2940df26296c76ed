//! The run directory every pipeline writes, and the options every `pretrain` takes.
//!
//! ```text
//! DIR/config.toml            the resolved configuration (what `--resume` starts from)
//! DIR/checkpoints/step-N/    model.safetensors, optimizer.safetensors, trainer_state.json
//!                            (which stores the configuration again, as JSON)
//! DIR/metrics.jsonl          one JSON object per logged step
//! DIR/loss.png               the curves
//! ```
//!
//! Modalities add their own files beside these (a tokenizer, previews, a Hugging Face export).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::checkpoint::{read_state, resolve_checkpoint};
pub use crate::run_guard::{RunDir, LOCK_FILE};
use crate::{
    CoreError, LoopTrainer, Parallel, Result, SharedCollective, StopFlag, TrainConfig, TrainReport,
};

/// The resolved configuration's file in a run directory.
pub const CONFIG_FILE: &str = "config.toml";

/// `DIR/config.toml`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join(CONFIG_FILE)
}

/// A configuration as TOML text.
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    toml::to_string_pretty(cfg).map_err(|e| CoreError::Config(format!("writing config: {e}")))
}

/// Creates the run directory `dir` and writes `cfg` to its `config.toml` (through a temporary
/// file and a rename, so a crash leaves the old file or the new one, never half of one).
pub fn write_config<T: Serialize>(dir: &Path, cfg: &T) -> Result<()> {
    let text = to_toml(cfg)?;
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io("creating", dir, e))?;
    let path = config_path(dir);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| CoreError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CoreError::io("renaming", &tmp, e))
}

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the
/// configuration stored with it as a `T` (`modality` names it in the error).
pub fn stored_config<T: DeserializeOwned>(
    checkpoint: &Path,
    modality: &str,
) -> Result<(PathBuf, T)> {
    let ckpt = resolve_checkpoint(checkpoint)?;
    let state = read_state(&ckpt)?;
    let cfg: T = serde_json::from_value(state.config).map_err(|e| {
        CoreError::checkpoint(
            &ckpt,
            format!("the stored configuration is not a {modality} configuration: {e}"),
        )
    })?;
    Ok((ckpt, cfg))
}

/// How a pipeline's `pretrain` runs, apart from its configuration.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in the run directory.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Checked every step: when set, the run writes a checkpoint and returns (e.g.
    /// [`StopFlag::from_signals`] for SIGINT / SIGTERM). Default: never set.
    pub stop: StopFlag,
    /// The ranks of a data-parallel run; `None`: MPI when started by `mpirun` in a build with
    /// the `mpi` feature, else a single process (see [`Parallel::init`]).
    pub collective: Option<SharedCollective>,
}

impl RunOptions {
    /// What a command-line run wants: a progress bar and a checkpoint on SIGINT / SIGTERM.
    pub fn interactive(resume: bool) -> Result<Self> {
        Ok(RunOptions {
            resume,
            progress: true,
            stop: StopFlag::from_signals()?,
            collective: None,
        })
    }

    /// Opens the run directory `out` for this run on `par`'s rank ([`RunDir::open`]: rank 0
    /// creates and locks it): first thing a `pretrain` does after choosing its device,
    /// before it writes anything.
    pub fn run_dir(&self, out: &Path, par: &Parallel) -> Result<RunDir> {
        RunDir::open(out, self.resume, par.is_main())
    }

    /// This process's place in the run and the device to train on.
    pub fn parallel(&self, device: Device) -> Result<(Parallel, Device)> {
        match &self.collective {
            Some(c) => Ok((Parallel::from_collective(c.clone()), device)),
            None => Parallel::init(device),
        }
    }

    /// The shared training loop for a run in `dir`, set up with these options: resume, stop
    /// flag, progress, the run's configuration (stored with each checkpoint) and `par`'s
    /// collective.
    pub fn trainer(
        &self,
        train: &TrainConfig,
        dir: &Path,
        run_config: Value,
        par: &Parallel,
    ) -> Result<LoopTrainer> {
        Ok(LoopTrainer::new(train.clone(), Some(dir.to_path_buf()))?
            .resume(self.resume)
            .run_config(run_config)
            .stop_flag(self.stop.clone())
            .progress(self.progress)
            .collective(par.take()))
    }
}

/// What a `pretrain` call returns: where the run stands when it returned.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub dir: PathBuf,
    /// The step training started from (non-zero after resume).
    pub start_step: u64,
    /// The step reached.
    pub step: u64,
    /// The first logged loss of this process (NaN when no step ran).
    pub first_loss: f64,
    /// The last logged loss (NaN when no step ran).
    pub last_loss: f64,
    /// True when a stop was requested before `max_steps`.
    pub interrupted: bool,
    /// The last checkpoint written or resumed from.
    pub last_checkpoint: Option<PathBuf>,
    /// Parameters that received no gradient in the first step (a model bug when non-empty).
    pub params_without_grad: Vec<String>,
    /// This process's rank (0 reports; every rank returns a summary).
    pub rank: usize,
}

impl RunSummary {
    /// The summary of a finished [`TrainReport`] of the run in `dir`, on rank `rank`.
    pub fn new(dir: &Path, report: &TrainReport, rank: usize) -> Self {
        RunSummary {
            rank,
            dir: dir.to_path_buf(),
            start_step: report.start_step,
            step: report.step,
            first_loss: report.losses.first().map_or(f64::NAN, |(_, l)| *l),
            last_loss: report.losses.last().map_or(f64::NAN, |(_, l)| *l),
            interrupted: report.interrupted,
            last_checkpoint: report.last_checkpoint.clone(),
            params_without_grad: report.params_without_grad.clone(),
        }
    }

    /// Prints the end of a series run as `ssl pretrain` does: [`RunSummary::print_done`]
    /// with the metrics and the plot.
    pub fn print(&self) {
        self.print_done(
            "",
            &[
                ("metrics", &self.dir.join("metrics.jsonl")),
                ("plot", &self.dir.join("loss.png")),
            ],
        );
    }

    /// Prints, on rank 0 only, the end of a run: an interruption, parameters without
    /// gradient, and the `done:` line with the step, the first and last loss (`loss_note`
    /// appended inside the parentheses), the checkpoint and each of `files` (label, path).
    pub fn print_done(&self, loss_note: &str, files: &[(&str, &Path)]) {
        if self.rank != 0 {
            return;
        }
        if self.interrupted {
            eprintln!(
                "interrupted at step {}: checkpoint written, continue with --resume",
                self.step
            );
        }
        if !self.params_without_grad.is_empty() {
            eprintln!(
                "warning: parameters without gradient: {:?}",
                self.params_without_grad
            );
        }
        let mut line = format!(
            "done: step {} (loss {:.4} -> {:.4}{loss_note}); checkpoint {}",
            self.step,
            self.first_loss,
            self.last_loss,
            self.last_checkpoint
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        for (label, path) in files {
            line.push_str(&format!("; {label} {}", path.display()));
        }
        eprintln!("{line}");
    }
}

/// Copies the run directory `src` to `dst` as it stood when checkpoint `step` was the
/// newest: every file, without the checkpoints of later steps (nor `checkpoints/best`, which
/// may be one of them). `ssl pretrain --resume` into `dst` then continues from that step, as
/// the original run did (a branch of a run, or the check that a resume repeats it).
/// Refuses a `dst` that exists, or a `step` with no checkpoint in `src`.
pub fn fork_run(src: &Path, dst: &Path, step: u64) -> Result<()> {
    let checkpoints = src.join("checkpoints");
    let keep = format!("step-{step:08}");
    if !checkpoints.join(&keep).is_dir() {
        return Err(CoreError::Config(format!(
            "{} has no checkpoint of step {step}",
            src.display()
        )));
    }
    if dst.exists() {
        return Err(CoreError::Config(format!(
            "{} exists: a fork goes to a new directory",
            dst.display()
        )));
    }
    copy_tree(src, dst, &|path: &Path| {
        let Ok(rel) = path.strip_prefix(&checkpoints) else {
            // Not the lock of a run that may still hold `src`.
            return path.file_name().is_none_or(|n| n != ".lock");
        };
        let name = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy());
        match name.as_deref().and_then(|n| n.strip_prefix("step-")) {
            Some(n) => n.parse::<u64>().is_ok_and(|n| n <= step),
            None => !rel.starts_with("best"),
        }
    })
}

fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| CoreError::io("creating", to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| CoreError::io("reading", from, e))? {
        let entry = entry.map_err(|e| CoreError::io("reading", from, e))?;
        let path = entry.path();
        if !keep(&path) {
            continue;
        }
        let dest = to.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(|e| CoreError::io("reading", &path, e))?;
        if kind.is_dir() {
            copy_tree(&path, &dest, keep)?;
        } else if kind.is_file() {
            std::fs::copy(&path, &dest).map_err(|e| CoreError::io("copying", &path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fork_keeps_the_run_up_to_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("run");
        for d in [
            "checkpoints/step-00000004",
            "checkpoints/step-00000008",
            "checkpoints/best",
        ] {
            std::fs::create_dir_all(src.join(d)).unwrap();
            std::fs::write(src.join(d).join("model.safetensors"), d).unwrap();
        }
        std::fs::write(src.join("config.toml"), "x = 1").unwrap();
        std::fs::write(src.join(".lock"), "pid").unwrap();
        let dst = tmp.path().join("fork");
        fork_run(&src, &dst, 4).unwrap();
        assert!(dst
            .join("checkpoints/step-00000004/model.safetensors")
            .is_file());
        assert!(dst.join("config.toml").is_file());
        for gone in ["checkpoints/step-00000008", "checkpoints/best", ".lock"] {
            assert!(!dst.join(gone).exists(), "{gone}");
        }
        // A fork needs a new directory and an existing checkpoint.
        assert!(fork_run(&src, &dst, 4).is_err());
        let e = fork_run(&src, &tmp.path().join("other"), 5).unwrap_err();
        assert!(e.to_string().contains("step 5"), "{e}");
    }

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Cfg {
        steps: u64,
        name: String,
    }

    #[test]
    fn config_round_trips_through_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let cfg = Cfg {
            steps: 3,
            name: "a b".into(),
        };
        write_config(&run, &cfg).unwrap();
        let text = std::fs::read_to_string(config_path(&run)).unwrap();
        assert_eq!(toml::from_str::<Cfg>(&text).unwrap(), cfg);
        assert!(!run.join(".config.toml.tmp").exists());
        let err = stored_config::<Cfg>(&run, "text").unwrap_err().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }
}

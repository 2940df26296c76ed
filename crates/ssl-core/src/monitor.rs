//! Monitoring: the `metrics.jsonl` log and the terminal progress display.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{CoreError, Result};

/// Appends one JSON object per line to `metrics.jsonl`, flushed after every line so a crash
/// loses nothing that was logged.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Opens (appending) the log at `path`. On resume, lines past `resume_step` (written after
    /// the checkpoint the run resumes from) are dropped so the log has one line per step.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let (Some(step), true) = (resume_step, path.exists()) {
            let text =
                std::fs::read_to_string(path).map_err(|e| CoreError::io("reading", path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::checkpoint::write_synced(path, kept.as_bytes())?;
        }
        if resume_step.is_none() && path.exists() {
            std::fs::remove_file(path).map_err(|e| CoreError::io("replacing", path, e))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CoreError::io("opening", path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
        })
    }

    /// Writes one record.
    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|source| CoreError::Json {
            path: self.path.clone(),
            source,
        })?;
        writeln!(self.out, "{line}").map_err(|e| CoreError::io("writing", &self.path, e))?;
        self.out
            .flush()
            .map_err(|e| CoreError::io("writing", &self.path, e))
    }
}

/// Progress display: a bar on a terminal, a plain line every `every` steps otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    every: u64,
    enabled: bool,
}

impl Progress {
    /// A display for a run of `total` steps starting at `start`. `enabled = false` prints nothing.
    pub fn new(total: u64, start: u64, every: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} ({eta}) {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            bar
        });
        Progress {
            bar,
            every: every.max(1),
            enabled,
        }
    }

    /// Reports step `step` with a short message.
    pub fn update(&self, step: u64, total: u64, msg: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg.to_string());
            }
            None if self.enabled && (step.is_multiple_of(self.every) || step == total) => {
                eprintln!("step {step}/{total} {msg}");
            }
            None => {}
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None if self.enabled => eprintln!("{msg}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_truncates_lines_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=5u64 {
            let mut m = Map::new();
            m.insert("step".into(), step.into());
            log.write(&m).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(&path, Some(3)).unwrap();
        let mut m = Map::new();
        m.insert("step".into(), 4.into());
        log.write(&m).unwrap();
        drop(log);
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }
}

//! Monitoring: the `metrics.jsonl` log (mirrored into TensorBoard event files) and the
//! progress display.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::tensorboard::EventWriter;
use crate::{CoreError, Result};

/// Appends one JSON object per line to `metrics.jsonl`, flushed after every line so a crash
/// loses nothing that was logged, and writes every numeric key of each record as a
/// TensorBoard scalar at the record's `step` (a new event file in the log's folder's
/// `tensorboard/` per opening; see [`crate::tensorboard`]).
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
    tensorboard: Option<EventWriter>,
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
        let tensorboard = match path.parent() {
            Some(dir) => {
                let mut tb = EventWriter::for_run(dir)?;
                if let Some(step) = resume_step {
                    tb.restart_at(step + 1)?;
                }
                Some(tb)
            }
            None => None,
        };
        Ok(MetricsLog {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
            tensorboard,
        })
    }

    /// The TensorBoard event file this log mirrors its records into.
    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(EventWriter::path)
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
            .map_err(|e| CoreError::io("writing", &self.path, e))?;
        if let (Some(tb), Some(step)) = (
            &mut self.tensorboard,
            record.get("step").and_then(Value::as_u64),
        ) {
            tb.record_scalars(step, record)?;
        }
        Ok(())
    }
}

static PROGRESS_ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns progress reports of the library's long loops (embedding, evaluation, detection,
/// tokenizer training: [`Progress::task`]) on or off for this process. Off by default, so a
/// library stays silent; the `ssl` binary turns it on.
pub fn set_progress_enabled(on: bool) {
    PROGRESS_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`Progress::task`] reports (see [`set_progress_enabled`]).
pub fn progress_enabled() -> bool {
    PROGRESS_ENABLED.load(Ordering::Relaxed)
}

/// Seconds between plain progress lines of a [`Progress::task`] when stderr is not a
/// terminal.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// `1h02m03s`, `4m05s` or `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// `time` as UTC `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The plain (log-file) form of a progress display: when a line is due and what it says.
/// Time is passed in, so the cadence is testable.
#[derive(Debug, Clone)]
pub struct PlainLines {
    label: String,
    unit: String,
    total: u64,
    start_pos: u64,
    started: Instant,
    last: Option<Instant>,
    interval: Duration,
    every: u64,
    unit_after_count: bool,
}

impl PlainLines {
    /// Lines for `total` `unit`s (0: unknown) from position `start_pos`, started at
    /// `started`. A line is due every `interval` of time (zero: never by time) and at every
    /// multiple of `every` positions (0: never by position), and at the end.
    pub fn new(
        label: &str,
        unit: &str,
        total: u64,
        start_pos: u64,
        started: Instant,
        interval: Duration,
        every: u64,
    ) -> Self {
        PlainLines {
            label: label.to_string(),
            unit: unit.to_string(),
            total,
            start_pos,
            started,
            last: None,
            interval,
            every,
            unit_after_count: true,
        }
    }

    /// Leaves the unit out after the count (`step 10/100`), keeping it in the rate.
    pub fn without_unit_after_count(mut self) -> Self {
        self.unit_after_count = false;
        self
    }

    /// The line for position `pos` at `now` (wall clock `wall`) with `msg` appended, or
    /// `None` when none is due.
    pub fn line(&mut self, pos: u64, msg: &str, now: Instant, wall: SystemTime) -> Option<String> {
        let by_time = !self.interval.is_zero()
            && now.duration_since(self.last.unwrap_or(self.started)) >= self.interval;
        let by_pos = self.every > 0 && pos.is_multiple_of(self.every) && pos > self.start_pos;
        let at_end = self.total > 0 && pos >= self.total;
        if !(by_time || by_pos || at_end) {
            return None;
        }
        self.last = Some(now);
        Some(self.format(pos, msg, now, wall))
    }

    /// The line for position `pos` at `now`, due or not.
    pub fn format(&self, pos: u64, msg: &str, now: Instant, wall: SystemTime) -> String {
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let done = pos.saturating_sub(self.start_pos) as f64;
        let rate = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let mut line = format!("{} {} ", format_timestamp(wall), self.label);
        if self.total > 0 {
            line.push_str(&format!("{pos}/{}", self.total));
        } else {
            line.push_str(&pos.to_string());
        }
        if self.unit_after_count {
            line.push(' ');
            line.push_str(&self.unit);
        }
        if self.total > 0 {
            let pct = 100.0 * pos as f64 / self.total as f64;
            line.push_str(&format!(" ({pct:.1}%)"));
        }
        line.push_str(&format!(", {} {}/s", fmt_rate(rate), self.unit));
        if self.total > 0 && pos < self.total && rate > 0.0 {
            let eta = Duration::from_secs_f64((self.total - pos) as f64 / rate);
            line.push_str(&format!(", ETA {}", format_duration(eta)));
        } else if self.total > 0 && pos >= self.total {
            line.push_str(&format!(
                ", done in {}",
                format_duration(Duration::from_secs_f64(elapsed))
            ));
        }
        if !msg.is_empty() {
            line.push_str(" | ");
            line.push_str(msg);
        }
        line
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.3}")
    }
}

/// Progress display: a bar with rate and ETA on a terminal; otherwise (a log file) plain
/// lines with a timestamp, the position, the rate and the ETA.
///
/// The trainer's display ([`Progress::new`]) prints a plain line every `every` steps; a
/// library loop's ([`Progress::task`]) every [`PLAIN_INTERVAL`] and at the end.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Option<Mutex<PlainLines>>,
    pos: AtomicU64,
    total: u64,
    enabled: bool,
    is_task: bool,
}

impl Progress {
    /// A display for a run of `total` steps starting at `start`. `enabled = false` prints nothing.
    pub fn new(total: u64, start: u64, every: u64, enabled: bool) -> Self {
        Self::build(
            enabled,
            "step",
            "steps",
            total,
            start,
            Duration::ZERO,
            every.max(1),
            "{elapsed_precise} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta}) {msg}",
        )
    }

    /// A display for a library loop over `total` `unit`s (0: unknown), e.g.
    /// `Progress::task("embed", rows, "rows")`; silent unless [`progress_enabled`].
    pub fn task(label: &str, total: u64, unit: &str) -> Self {
        Self::task_with(label, total, unit, progress_enabled(), PLAIN_INTERVAL)
    }

    /// [`Progress::task`] with the switch and the plain lines' interval given.
    pub fn task_with(
        label: &str,
        total: u64,
        unit: &str,
        enabled: bool,
        interval: Duration,
    ) -> Self {
        let template = format!(
            "{label} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
        );
        let p = Self::build(enabled, label, unit, total, 0, interval, 0, &template);
        if p.bar.is_none() && enabled {
            eprintln!(
                "{} {label}: {total} {unit}",
                format_timestamp(SystemTime::now())
            );
        }
        p
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        enabled: bool,
        label: &str,
        unit: &str,
        total: u64,
        start: u64,
        interval: Duration,
        every: u64,
        template: &str,
    ) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = if total > 0 {
                indicatif::ProgressBar::new(total)
            } else {
                indicatif::ProgressBar::new_spinner()
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        let plain = (enabled && bar.is_none()).then(|| {
            let lines = PlainLines::new(label, unit, total, start, Instant::now(), interval, every);
            Mutex::new(if label == "step" {
                lines.without_unit_after_count()
            } else {
                lines
            })
        });
        Progress {
            bar,
            plain,
            pos: AtomicU64::new(start),
            total,
            enabled,
            is_task: label != "step",
        }
    }

    fn plain_line(&self, pos: u64, msg: &str) {
        if let Some(plain) = &self.plain {
            let line = plain
                .lock()
                .ok()
                .and_then(|mut p| p.line(pos, msg, Instant::now(), SystemTime::now()));
            if let Some(line) = line {
                eprintln!("{line}");
            }
        }
    }

    /// Reports step `step` with a short message.
    pub fn update(&self, step: u64, total: u64, msg: &str) {
        let _ = total;
        self.pos.store(step, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg.to_string());
            }
            None => self.plain_line(step, msg),
        }
    }

    /// Advances a loop's position by `n`.
    pub fn inc(&self, n: u64) {
        let pos = self.pos.fetch_add(n, Ordering::Relaxed) + n;
        match &self.bar {
            Some(bar) => bar.set_position(pos),
            None => self.plain_line(pos, ""),
        }
    }

    /// Sets a loop's position (e.g. the items done before the current batch).
    pub fn set_position(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.set_position(pos),
            None => self.plain_line(pos, ""),
        }
    }

    /// Sets a short message shown beside the bar (and in the next plain line).
    pub fn set_message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
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

    /// Removes the bar. A loop's display ([`Progress::task`]) counts as complete: a plain one
    /// prints its final line unless the last [`Progress::inc`] / [`Progress::set_position`]
    /// already reached the total.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            if self.is_task && self.total > 0 {
                bar.set_position(self.total);
            }
            bar.finish();
            return;
        }
        let pos = self.pos.load(Ordering::Relaxed);
        if let (Some(plain), true) = (&self.plain, self.is_task) {
            if self.total == 0 || pos < self.total {
                let end = if self.total > 0 { self.total } else { pos };
                if let Ok(p) = plain.lock() {
                    eprintln!("{}", p.format(end, "", Instant::now(), SystemTime::now()));
                }
            }
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

    #[test]
    fn tensorboard_holds_every_numeric_key_of_metrics_jsonl() {
        use crate::tensorboard::{event_files, read_events, SummaryData, TENSORBOARD_DIR};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let record = |step: u64| {
            let mut m = Map::new();
            m.insert("step".into(), step.into());
            m.insert("loss".into(), (2.0 / step as f64).into());
            m.insert("lr".into(), (1e-4 * step as f64).into());
            m.insert("masked_accuracy".into(), (0.1 * step as f64).into());
            m.insert("skipped".into(), false.into());
            if step.is_multiple_of(2) {
                m.insert("eval_loss".into(), (3.0 / step as f64).into());
            }
            m
        };
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=4 {
            log.write(&record(step)).unwrap();
        }
        drop(log);
        // A resumed run appends a new event file starting with a restart at step 3.
        let mut log = MetricsLog::open(&path, Some(2)).unwrap();
        for step in 3..=5 {
            log.write(&record(step)).unwrap();
        }
        drop(log);

        // metrics.jsonl as (step, key) -> value.
        let mut expected = std::collections::BTreeMap::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let step = v["step"].as_u64().unwrap() as i64;
            for (k, x) in v.as_object().unwrap() {
                if let (true, Some(x)) = (k != "step", x.as_f64()) {
                    expected.insert((step, k.clone()), x as f32);
                }
            }
        }
        let files = event_files(&dir.path().join(TENSORBOARD_DIR)).unwrap();
        assert_eq!(files.len(), 2);
        // TensorBoard's merge: a START at step s drops earlier points at s and later.
        let mut got = std::collections::BTreeMap::new();
        let mut starts = Vec::new();
        for f in &files {
            for ev in read_events(f).unwrap() {
                if ev.session_status == Some(1) {
                    starts.push(ev.step);
                    got.retain(|(s, _): &(i64, String), _| *s < ev.step);
                }
                for (tag, data) in ev.values {
                    let SummaryData::Scalar(x) = data else {
                        panic!("{tag} is not a scalar")
                    };
                    got.insert((ev.step, tag), x);
                }
            }
        }
        assert_eq!(starts, [3]);
        assert_eq!(got, expected);
        assert!(got.contains_key(&(4, "eval_loss".to_string())));
        assert!(!got.keys().any(|(_, k)| k == "skipped"));
    }

    #[test]
    fn plain_lines_follow_the_interval_with_rate_eta_and_timestamp() {
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_764_930_000);
        let mut lines = PlainLines::new("embed", "rows", 100, 0, t0, Duration::from_secs(2), 0);
        let mut printed = Vec::new();
        // One row every 100 ms: a line every 2 s (20 rows), and one at the end.
        for pos in 1..=100u64 {
            let now = t0 + Duration::from_millis(100 * pos);
            if let Some(l) = lines.line(pos, "", now, wall) {
                printed.push((pos, l));
            }
        }
        let at: Vec<u64> = printed.iter().map(|p| p.0).collect();
        assert_eq!(at, [20, 40, 60, 80, 100]);
        assert_eq!(
            printed[0].1,
            "2025-12-05T10:20:00Z embed 20/100 rows (20.0%), 10.0 rows/s, ETA 8s"
        );
        assert_eq!(
            printed[4].1,
            "2025-12-05T10:20:00Z embed 100/100 rows (100.0%), 10.0 rows/s, done in 10s"
        );

        // The trainer's form: every 10 steps from a resumed step 50, no time cadence.
        let mut steps = PlainLines::new("step", "steps", 200, 50, t0, Duration::ZERO, 10)
            .without_unit_after_count();
        let mut at = Vec::new();
        for step in 51..=200u64 {
            let now = t0 + Duration::from_millis(500 * (step - 50));
            if let Some(l) = steps.line(step, "loss 1.0", now, wall) {
                at.push(step);
                if step == 60 {
                    assert_eq!(
                        l,
                        "2025-12-05T10:20:00Z step 60/200 (30.0%), 2.0 steps/s, ETA 1m10s | loss 1.0"
                    );
                }
            }
        }
        assert_eq!(at, (60..=200).step_by(10).collect::<Vec<_>>());
    }

    #[test]
    fn timestamps_and_durations_read_well() {
        assert_eq!(format_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(format_timestamp(leap), "2000-02-29T01:02:03Z");
        assert_eq!(format_duration(Duration::from_secs(6)), "6s");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}

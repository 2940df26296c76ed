//! A run's figures, prepared from its `metrics.jsonl`: `loss.png` (raw and smoothed training
//! loss with the held-out losses, learning rate, gradient norm), `metrics.png` (the task's
//! metrics, training beside held-out) and `health.png` (embedding health: std, effective
//! rank).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::{plot_panels, Line, LineKind, Panel, MAX_SERIES};
use crate::{CoreError, Result, EVAL_PREFIX};

/// Weight of the exponential moving average of the smoothed training loss (TensorBoard's
/// smoothing, debiased at the start).
pub const SMOOTHING: f64 = 0.9;

/// Bookkeeping keys of `metrics.jsonl` that no figure shows.
const NOT_PLOTTED: &[&str] = &[
    "step",
    "epoch",
    "samples_per_s",
    "step_time_s",
    "data_wait_s",
    "allreduce_s",
    "loss_average",
    "rolled_back_to",
    "lr_scale",
];

/// The panels of a run's three figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunFigures {
    /// `loss.png`: loss (raw, smoothed, held-out), learning rate, gradient norm.
    pub loss: Vec<Panel>,
    /// `metrics.png`: one panel per task metric, its held-out twin beside it.
    pub metrics: Vec<Panel>,
    /// `health.png`: one panel per embedding-health figure (`emb_*`).
    pub health: Vec<Panel>,
}

/// The debiased exponential moving average of `points` with weight `weight` on the past.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut avg = 0.0;
    let mut n = 0i32;
    points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| {
            avg = avg * weight + (1.0 - weight) * y;
            n += 1;
            let debias = 1.0 - weight.powi(n);
            (x, if debias > 0.0 { avg / debias } else { y })
        })
        .collect()
}

/// The records of a `metrics.jsonl` (lines that are not JSON objects are skipped).
pub fn read_records(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io("reading", path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Map<String, Value>>(l).ok())
        .collect())
}

/// Every numeric key's `(step, value)` points, in record order.
fn series(records: &[Map<String, Value>]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        let Some(step) = r.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (k, v) in r {
            if let (false, Some(y)) = (NOT_PLOTTED.contains(&k.as_str()), v.as_f64()) {
                out.entry(k.clone()).or_default().push((step, y));
            }
        }
    }
    out
}

fn line(label: &str, points: Vec<(f64, f64)>, kind: LineKind) -> Line {
    Line {
        label: label.to_string(),
        points,
        kind,
    }
}

/// Panels keyed by the metric's name without [`EVAL_PREFIX`]: the training line, then the
/// held-out one (drawn as points).
fn paired(keys: Vec<(String, Vec<(f64, f64)>)>, log_y: impl Fn(&str) -> bool) -> Vec<Panel> {
    let mut by_base: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    for (k, pts) in keys {
        let (base, kind) = match k.strip_prefix(EVAL_PREFIX) {
            Some(b) => (b.to_string(), LineKind::Points),
            None => (k.clone(), LineKind::Main),
        };
        by_base.entry(base).or_default().push(line(&k, pts, kind));
    }
    by_base
        .into_iter()
        .map(|(base, mut lines)| {
            lines.sort_by_key(|l| l.kind == LineKind::Points);
            Panel {
                log_y: log_y(&base),
                title: base,
                lines,
            }
        })
        .take(MAX_SERIES)
        .collect()
}

/// The figures of a run from its records.
pub fn run_figures(records: &[Map<String, Value>]) -> RunFigures {
    let mut all = series(records);
    let mut take = |k: &str| all.remove(k).unwrap_or_default();

    let raw = take("loss");
    let mut loss_lines = vec![
        line("loss", raw.clone(), LineKind::Raw),
        line("loss (smoothed)", smooth(&raw, SMOOTHING), LineKind::Main),
    ];
    let lr = take("lr");
    let grad_norm = take("grad_norm");
    let held_out_losses: Vec<String> = all
        .keys()
        .filter(|k| k.starts_with(EVAL_PREFIX) && k.contains("loss"))
        .cloned()
        .collect();
    for k in held_out_losses {
        let pts = all.remove(&k).unwrap_or_default();
        loss_lines.push(line(&k, pts, LineKind::Points));
    }
    let loss = vec![
        Panel {
            title: "loss".to_string(),
            lines: loss_lines,
            log_y: true,
        },
        Panel::single("lr", lr, false),
        Panel::single("grad_norm", grad_norm, true),
    ];

    let is_health = |k: &str| k.trim_start_matches(EVAL_PREFIX).starts_with("emb_");
    let (health, metrics): (Vec<_>, Vec<_>) = all.into_iter().partition(|(k, _)| is_health(k));
    RunFigures {
        loss,
        metrics: paired(metrics, |k| k.contains("perplexity")),
        health: paired(health, |_| false),
    }
}

/// Writes `dir/loss.png` from `dir/metrics.jsonl`, and `dir/metrics.png` / `dir/health.png`
/// when the run logged task metrics / embedding health.
pub fn plot_run_dir(dir: &Path) -> Result<()> {
    let figures = run_figures(&read_records(&dir.join("metrics.jsonl"))?);
    plot_panels(&dir.join("loss.png"), &figures.loss)?;
    for (name, panels) in [
        ("metrics.png", &figures.metrics),
        ("health.png", &figures.health),
    ] {
        if !panels.is_empty() {
            plot_panels(&dir.join(name), panels)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Map<String, Value>> {
        (1..=40u64)
            .map(|step| {
                let mut m = Map::new();
                m.insert("step".into(), step.into());
                m.insert("epoch".into(), 0.into());
                let noise = if step.is_multiple_of(2) { 0.3 } else { -0.3 };
                m.insert("loss".into(), (4.0 / step as f64 + 1.0 + noise).into());
                m.insert("lr".into(), 1e-3.into());
                m.insert("grad_norm".into(), 0.5.into());
                m.insert("samples_per_s".into(), 100.0.into());
                m.insert("masked_accuracy".into(), (step as f64 / 40.0).into());
                m.insert("event".into(), "none".into());
                if step.is_multiple_of(10) {
                    m.insert("emb_std".into(), 0.2.into());
                    m.insert("emb_effective_rank".into(), 7.5.into());
                    m.insert("eval_loss".into(), (4.0 / step as f64 + 1.1).into());
                    m.insert("eval_perplexity".into(), 3.0.into());
                    m.insert("eval_masked_accuracy".into(), 0.5.into());
                    m.insert("eval_emb_std".into(), 0.25.into());
                }
                m
            })
            .collect()
    }

    fn labels(p: &Panel) -> Vec<(&str, LineKind, usize)> {
        p.lines
            .iter()
            .map(|l| (l.label.as_str(), l.kind, l.points.len()))
            .collect()
    }

    #[test]
    fn figures_hold_the_expected_series() {
        let f = run_figures(&records());
        let titles = |ps: &[Panel]| ps.iter().map(|p| p.title.clone()).collect::<Vec<_>>();
        assert_eq!(titles(&f.loss), ["loss", "lr", "grad_norm"]);
        assert_eq!(
            labels(&f.loss[0]),
            [
                ("loss", LineKind::Raw, 40),
                ("loss (smoothed)", LineKind::Main, 40),
                ("eval_loss", LineKind::Points, 4)
            ]
        );
        assert_eq!(f.loss[0].lines[2].points[0], (10.0, 1.5));
        assert_eq!(titles(&f.metrics), ["masked_accuracy", "perplexity"]);
        assert_eq!(
            labels(&f.metrics[0]),
            [
                ("masked_accuracy", LineKind::Main, 40),
                ("eval_masked_accuracy", LineKind::Points, 4)
            ]
        );
        assert!(f.metrics[1].log_y);
        assert_eq!(titles(&f.health), ["emb_effective_rank", "emb_std"]);
        assert_eq!(
            labels(&f.health[1]),
            [
                ("emb_std", LineKind::Main, 4),
                ("eval_emb_std", LineKind::Points, 4)
            ]
        );
    }

    #[test]
    fn smoothing_is_a_debiased_moving_average() {
        let s = smooth(&[(1.0, 2.0), (2.0, 2.0), (3.0, f64::NAN), (4.0, 4.0)], 0.5);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], (1.0, 2.0));
        assert_eq!(s[1], (2.0, 2.0));
        // avg = 0.5 * 1.5 + 0.5 * 4 = 2.75 over 1 - 0.125.
        assert!((s[2].1 - 2.75 / 0.875).abs() < 1e-12);
        // The smoothed loss is less noisy than the raw one.
        let f = run_figures(&records());
        let wiggle = |pts: &[(f64, f64)]| {
            pts.windows(2)
                .skip(20)
                .map(|w| (w[1].1 - w[0].1).abs())
                .sum::<f64>()
        };
        let raw = wiggle(&f.loss[0].lines[0].points);
        let smoothed = wiggle(&f.loss[0].lines[1].points);
        assert!(smoothed < raw / 3.0, "{smoothed} vs {raw}");
    }

    #[test]
    fn writes_the_three_figures() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = records()
            .iter()
            .map(|r| format!("{}\n", serde_json::to_string(r).unwrap()))
            .collect();
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        plot_run_dir(dir.path()).unwrap();
        for (name, panels) in [("loss.png", 3), ("metrics.png", 2), ("health.png", 2)] {
            let bytes = std::fs::read(dir.path().join(name)).unwrap();
            let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
            assert_eq!(h, panels * super::super::PANEL_HEIGHT, "{name}");
        }
        // A run without task metrics or health gets loss.png only.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":1,\"loss\":1.0,\"lr\":0.1,\"grad_norm\":1.0}\n",
        )
        .unwrap();
        plot_run_dir(dir.path()).unwrap();
        assert!(dir.path().join("loss.png").exists());
        assert!(!dir.path().join("metrics.png").exists());
        assert!(!dir.path().join("health.png").exists());
    }
}

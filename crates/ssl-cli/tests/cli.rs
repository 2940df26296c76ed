//! End-to-end behaviour of the `ssl` binary on its embedded sample.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ssl, SSL};

/// Overrides that keep the model tiny so the tests run in seconds.
const TINY: [&str; 6] = [
    "model.dim=16",
    "model.depth=1",
    "model.heads=2",
    "model.mlp_dim=32",
    "train.batch_size=8",
    "train.warmup_steps=2",
];

fn with_tiny<'a>(mut args: Vec<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    for s in TINY.iter().chain(extra) {
        args.push("--set");
        args.push(s);
    }
    args
}

/// The arguments of a tiny `ssl pretrain features` into `run` that runs until stopped (no
/// step limit, no checkpoint interval).
fn endless_features(run: &str) -> Vec<&str> {
    with_tiny(
        vec!["pretrain", "features", "--out", run],
        &[
            "train.max_steps=1000000",
            "train.checkpoint_every_steps=0",
            "train.checkpoint_every_minutes=0",
        ],
    )
}

/// Starts `ssl` with `args`, its stdout discarded and its stderr to `stderr`.
fn spawn(args: &[&str], stderr: Stdio) -> Running {
    Running(
        Command::new(SSL)
            .args(args)
            .stderr(stderr)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A child `ssl` process that is killed if the test ends (or fails) while it still runs, so a
/// failed assertion never leaves an endless run behind.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits until `ready`, checking every 50 ms; fails with `what` after two minutes.
fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(120), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM to `child`.
fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn config_prints_defaults_and_unknown_keys_are_rejected_by_name() {
    let out = ssl(&["config", "features"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "max_steps",
        "batch_size",
        "checkpoint_every_minutes",
        "column",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    // Commented: every key with its explanation (tested against the types in the binary's
    // unit tests); the detector's settings too.
    assert!(text.contains("# Optimizer steps to run"), "{text}");
    let detect = ssl(&["config", "detect"]);
    assert!(detect.status.success());
    assert!(String::from_utf8_lossy(&detect.stdout).contains("[detect.threshold]"));
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = ssl(&[
        "pretrain",
        "features",
        "--out",
        out_dir.to_str().unwrap(),
        "--set",
        "train.max_stepz=3",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train") && err.contains("max_stepz"), "{err}");
}

#[test]
fn pretrain_embed_eval_on_the_embedded_sample() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let args = with_tiny(
        vec!["pretrain", "features", "--out", run_s],
        &[
            "train.max_steps=12",
            "train.checkpoint_every_steps=5",
            "train.health_every=6",
        ],
    );
    let out = ssl(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "loss.png",
        "checkpoints/step-00000012/model.safetensors",
        "checkpoints/step-00000012/trainer_state.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let lines = metric_lines(&run);
    assert_eq!(lines.len(), 12);
    for k in ["step", "loss", "lr", "grad_norm"] {
        assert!(lines[0].get(k).is_some(), "{k}");
    }
    assert!(lines[5].get("emb_effective_rank").is_some());

    // The embedded sample, written out, is a valid --data input for embed and eval.
    let data = dir.path().join("bm.parquet");
    std::fs::write(&data, include_bytes!("../data/basic_motions_train.parquet")).unwrap();
    let emb = dir.path().join("emb.parquet");
    let out = ssl(&[
        "embed",
        "features",
        "--checkpoint",
        run_s,
        "--data",
        data.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(emb.exists());

    let out = ssl(&[
        "eval",
        "features",
        "--checkpoint",
        run_s,
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    for k in [
        "linear_probe_accuracy",
        "knn_accuracy",
        "pretext_loss",
        "n_train",
        "n_test",
    ] {
        assert!(report.get(k).is_some(), "{k} missing in {report}");
    }
    assert_eq!(report["n_classes"], 4);
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero_then_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let args = endless_features(run_s);
    let mut child = spawn(&args, Stdio::piped());
    wait_until("training did not start", || metric_lines(&run).len() >= 3);
    terminate(&child);
    let stderr: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "exit {exit:?}; stderr:\n{}",
        stderr.join("\n")
    );
    assert!(
        stderr.iter().any(|l| l.contains("interrupted")),
        "{}",
        stderr.join("\n")
    );
    let step = metric_lines(&run).last().unwrap()["step"].as_u64().unwrap();
    let ckpt = run.join(format!("checkpoints/step-{step:08}"));
    assert!(
        ckpt.join("model.safetensors").exists(),
        "no checkpoint at the last logged step {step}"
    );

    let target = format!("train.max_steps={}", step + 3);
    let args = with_tiny(
        vec!["pretrain", "features", "--out", run_s, "--resume"],
        &[target.as_str()],
    );
    let out = ssl(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed from"));
    let steps: Vec<u64> = metric_lines(&run)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=step + 3).collect::<Vec<_>>());
}

#[test]
fn a_refused_pretrain_leaves_the_run_intact_and_resume_needs_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let first = ssl(&with_tiny(
        vec!["pretrain", "features", "--out", run_s],
        &["train.max_steps=2"],
    ));
    common::ok(&first);
    let config = std::fs::read(run.join("config.toml")).unwrap();
    // A fresh run over checkpoints, and a resume whose model changed, are refused before
    // anything is written.
    for (extra, resume, expect) in [
        ("model.dim=32", false, "already holds checkpoints"),
        (
            "model.dim=32",
            true,
            "cannot resume with this configuration",
        ),
    ] {
        let mut args = with_tiny(
            vec!["pretrain", "features", "--out", run_s],
            &[extra, "train.max_steps=3"],
        );
        if resume {
            args.push("--resume");
        }
        let out = ssl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{err}");
        assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config);
    }
    let resumed = ssl(&[
        "pretrain",
        "features",
        "--out",
        run_s,
        "--resume",
        "--set",
        "train.max_steps=3",
    ]);
    common::ok(&resumed);
    assert_eq!(metric_lines(&run).len(), 3);
    // --resume where there is nothing to resume is an error and creates nothing.
    let fresh = dir.path().join("fresh");
    let out = ssl(&[
        "pretrain",
        "features",
        "--out",
        fresh.to_str().unwrap(),
        "--resume",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no complete checkpoint"),
        "{err}"
    );
    assert!(!fresh.exists());
}

#[test]
fn a_second_simultaneous_run_into_one_directory_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let args = endless_features(run_s);
    let mut first = spawn(&args, Stdio::null());
    // Running, and so holding the lock, once it logs a step.
    wait_until("the first run did not start", || {
        run.join(".lock").exists() && !metric_lines(&run).is_empty()
    });
    let config = std::fs::read(run.join("config.toml")).unwrap();
    let second = ssl(&args);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("in use by another run"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.id())), "{stderr}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config);

    terminate(&first);
    let exit = first.wait().unwrap();
    assert!(exit.success(), "the first run: {exit:?}");
    assert!(run.join("checkpoints").is_dir());
}

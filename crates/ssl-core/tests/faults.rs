//! Fault injection: a run killed (SIGKILL) at random points, checkpoint rotation included,
//! many times over. Every checkpoint left must load and resume, the next start must clean
//! what the kill left, and the finished run must hold exactly `keep_checkpoints` of them.
//!
//! The test re-runs its own binary in a child mode (selected by an environment variable) that
//! trains a tiny model, checkpointing every step, and kills it after a random delay.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ssl_core::checkpoint::{read_state, CheckpointManager, MODEL_FILE};
use ssl_core::run_dir::RunDir;
use ssl_core::{LoopTrainer, SslRng, Trainer};

const CHILD_ENV: &str = "SSL_FAULT_CHILD_DIR";
const KEEP: usize = 2;
const MAX_STEPS: u64 = 1500;

/// Trains (resuming when there is a checkpoint) until `MAX_STEPS` in the run directory the
/// parent names; does nothing when run as an ordinary test.
#[test]
fn fault_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let resume = CheckpointManager::new(dir.join("checkpoints"), KEEP)
        .latest()
        .unwrap()
        .is_some();
    let run = RunDir::open(&dir, resume, true).unwrap();
    let mut cfg = quick_train(MAX_STEPS);
    cfg.checkpoint_every_steps = 1;
    cfg.keep_checkpoints = KEEP;
    cfg.log_every = 1;
    let (_, task) = masked_task(3, 0.0);
    LoopTrainer::new(cfg, Some(dir.clone()))
        .unwrap()
        .resume(resume)
        .fit(&task, &mut source(waves(48, 1).0, 16, true), None)
        .unwrap();
    run.finish();
}

fn child(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["fault_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every complete checkpoint's state reads and its model loads into a fresh task.
fn all_checkpoints_load(mgr: &CheckpointManager) -> Vec<u64> {
    let mut steps = Vec::new();
    for (step, p) in mgr.list().unwrap() {
        assert_eq!(read_state(&p).unwrap().step, step);
        let (store, _) = masked_task(5, 0.0);
        store.load_safetensors(&p.join(MODEL_FILE)).unwrap();
        steps.push(step);
    }
    steps
}

#[test]
fn runs_killed_at_random_points_always_resume_and_keep_exactly_keep_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mgr = CheckpointManager::new(dir.join("checkpoints"), KEEP);
    let mut rng = SslRng::new(26);
    let t0 = Instant::now();
    let mut kills = 0;
    let mut newest = 0;
    while kills < 30 && t0.elapsed() < Duration::from_secs(12) {
        let mut c = child(&dir);
        let delay = 20 + (rng.uniform() * 250.0) as u64;
        std::thread::sleep(Duration::from_millis(delay));
        if c.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        c.kill().unwrap();
        c.wait().unwrap();
        kills += 1;
        let steps = all_checkpoints_load(&mgr);
        // Never fewer than before: a kill cannot take away the newest complete checkpoint.
        let last = steps.last().copied().unwrap_or(0);
        assert!(
            last >= newest,
            "newest checkpoint went from {newest} to {last}"
        );
        newest = last;
        assert!(steps.len() <= KEEP + 1, "{steps:?}");
    }
    eprintln!("{kills} runs killed");
    assert!(kills >= 5, "only {kills} kills landed");
    // The last run finishes; it resumes from whatever the kills left.
    let out = child(&dir).wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let steps = all_checkpoints_load(&mgr);
    assert_eq!(steps.len(), KEEP, "{steps:?}");
    assert_eq!(steps.last(), Some(&MAX_STEPS));
    let leftovers: Vec<String> = std::fs::read_dir(mgr.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("step-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // metrics.jsonl holds each step once, in order, across every resumed run.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, (1..=MAX_STEPS).collect::<Vec<_>>());
}

#[test]
fn recovery_cleans_interrupted_rotation_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut cfg = quick_train(4);
    cfg.checkpoint_every_steps = 1;
    cfg.keep_checkpoints = KEEP;
    let (_, task) = masked_task(3, 0.0);
    LoopTrainer::new(cfg.clone(), Some(dir.clone()))
        .unwrap()
        .fit(&task, &mut source(waves(48, 1).0, 16, true), None)
        .unwrap();
    let ck = dir.join("checkpoints");
    // What crashes leave: a write cut short, a deletion cut short (old binaries deleted in
    // place), a rotation cut short (one checkpoint too many) and a renamed-for-deletion one.
    std::fs::create_dir_all(ck.join(".tmp-step-00000009-1")).unwrap();
    std::fs::create_dir_all(ck.join(".del-step-00000001-1")).unwrap();
    std::fs::create_dir_all(ck.join("step-00000001")).unwrap();
    let copy = |from: &str, to: &str| {
        std::fs::create_dir_all(ck.join(to)).unwrap();
        for f in std::fs::read_dir(ck.join(from)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), ck.join(to).join(f.file_name())).unwrap();
        }
    };
    copy("step-00000003", "step-00000002");
    let mgr = CheckpointManager::new(&ck, KEEP);
    let notes = mgr.recover().unwrap();
    assert_eq!(notes.len(), 4, "{notes:?}");
    assert!(notes
        .iter()
        .any(|n| n.contains("step-00000001") && n.contains("incomplete")));
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["step-00000003", "step-00000004"]);
    // An incomplete newest checkpoint is skipped with a line; resume uses the newest complete.
    std::fs::create_dir_all(ck.join("step-00000005")).unwrap();
    let notes = mgr.recover().unwrap();
    assert!(
        notes[0].contains("skipping") && notes[0].contains("step-00000005"),
        "{notes:?}"
    );
    cfg.max_steps = 6;
    let r = LoopTrainer::new(cfg, Some(dir.clone()))
        .unwrap()
        .resume(true)
        .fit(&task, &mut source(waves(48, 1).0, 16, true), None)
        .unwrap();
    assert_eq!((r.start_step, r.step), (4, 6));
    // Resuming where nothing complete is left is an error, never a silent step 0.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("checkpoints/step-00000003")).unwrap();
    std::fs::write(empty.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    let e = LoopTrainer::new(quick_train(3), Some(empty.clone()))
        .unwrap()
        .resume(true)
        .fit(&task, &mut source(waves(48, 1).0, 16, true), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");
    assert_eq!(
        std::fs::read_to_string(empty.join("metrics.jsonl")).unwrap(),
        "{\"step\":1}\n"
    );
}

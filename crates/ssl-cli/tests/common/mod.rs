//! Helpers shared by the `ssl` binary's integration tests.
// Each test file is its own crate and uses a subset of these.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The `ssl` binary under test.
pub const SSL: &str = env!("CARGO_BIN_EXE_ssl");

/// Runs `ssl` with `args` and waits for it.
pub fn ssl(args: &[&str]) -> Output {
    Command::new(SSL).args(args).output().expect("run ssl")
}

/// Asserts that the run succeeded (showing its stderr if not) and returns its stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

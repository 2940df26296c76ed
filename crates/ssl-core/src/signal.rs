//! Graceful stop on SIGINT / SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{CoreError, Result};

/// A flag the trainer checks between steps; set by a signal or by hand.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag set by SIGINT or SIGTERM. The trainer then finishes its step, writes a
    /// checkpoint and returns; a second SIGINT/SIGTERM while the flag is set exits at once.
    pub fn from_signals() -> Result<Self> {
        let flag = StopFlag::new();
        #[cfg(unix)]
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let err =
                |e| CoreError::Config(format!("cannot install handler for signal {sig}: {e}"));
            // Order matters: the conditional shutdown sees the flag before this signal sets it.
            signal_hook::flag::register_conditional_shutdown(sig, 130, flag.0.clone())
                .map_err(err)?;
            signal_hook::flag::register(sig, flag.0.clone()).map_err(err)?;
        }
        Ok(flag)
    }

    /// Requests a stop.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once a stop was requested.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

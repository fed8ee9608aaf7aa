//! Graceful stop on SIGTERM/SIGUSR1 (SPEC §11.1.6): the handler only sets a flag; trainers poll it at every step
//! boundary, stop without writing partial-epoch state and exit with [`EXIT_TEMPFAIL`] (75), which the Slurm
//! templates requeue.
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `EX_TEMPFAIL`: the exit code of a run stopped by a signal.
pub const EXIT_TEMPFAIL: i32 = 75;

/// A shared stop flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag {
    flag: Arc<AtomicBool>,
}

impl StopFlag {
    /// A flag not connected to any signal (tests, or callers that manage signals themselves).
    pub fn new() -> Self {
        Self::default()
    }
    /// A flag set by SIGTERM and SIGUSR1 (Unix; elsewhere an unconnected flag).
    pub fn install() -> Result<Self> {
        let f = StopFlag::new();
        #[cfg(unix)]
        {
            use signal_hook::consts::{SIGTERM, SIGUSR1};
            for sig in [SIGTERM, SIGUSR1] {
                signal_hook::flag::register(sig, Arc::clone(&f.flag))
                    .map_err(|e| Error::msg(format!("cannot install the handler for signal {sig}: {e}")))?;
            }
        }
        Ok(f)
    }
    /// True once a stop was requested.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Requests a stop (as a signal would).
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

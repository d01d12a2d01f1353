//! Wall-clock time as the credentials see it (Unix seconds), replaceable in tests.
//!
//! Only credential expiry uses this clock. Waiting, backoff and negative caching use
//! `tokio::time`, which tests control with a paused runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's clock.
    #[default]
    System,
    /// A clock a test moves by hand.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock starting at `unix_secs`.
    pub fn manual(unix_secs: u64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(unix_secs)))
    }

    /// Unix seconds now.
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, secs: u64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(secs, Ordering::SeqCst);
        }
    }
}

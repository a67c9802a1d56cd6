//! The engine's counters since start (the demo's summary, `--once`'s exit code, metrics)
//! and the loop's heartbeat for the liveness check.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters since start: the demo's summary, `--once`'s exit code, and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub rotated: AtomicU64,
    pub transient: AtomicU64,
    pub config_errors: AtomicU64,
    /// Accounts newly flagged `needs_reauth` or `expiring` by refreshes.
    pub flagged: AtomicU64,
    pub superseded: AtomicU64,
    pub deferred: AtomicU64,
    pub record_errors: AtomicU64,
    pub released: AtomicU64,
    /// Unix seconds of the loop's last completed look at the store (liveness).
    pub heartbeat: AtomicI64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub rotated: u64,
    pub transient: u64,
    pub config_errors: u64,
    pub flagged: u64,
    pub superseded: u64,
    pub deferred: u64,
    pub record_errors: u64,
    pub released: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            rotated: g(&self.rotated),
            transient: g(&self.transient),
            config_errors: g(&self.config_errors),
            flagged: g(&self.flagged),
            superseded: g(&self.superseded),
            deferred: g(&self.deferred),
            record_errors: g(&self.record_errors),
            released: g(&self.released),
        }
    }
}

//! Telling systemd where the daemon is: READY, STATUS, STOPPING, and the watchdog's pings
//! while the refresh loop makes progress. Outside systemd (no `NOTIFY_SOCKET`) nothing is
//! sent.

use crate::engine::{Engine, Settings};
use crate::store::{Checks, Store};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(super) fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(false, states)
    {
        tracing::warn!(event = "sd_notify_failed", error = %e, "cannot notify systemd");
    }
}

/// Pings the systemd watchdog while the engine loop makes progress, or waits for the
/// store's start-up checks; a stuck loop stops the pings and systemd restarts the service.
pub(super) fn spawn_watchdog(
    engine: Engine,
    store: Store,
    settings: watch::Receiver<Arc<Settings>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut usec = 0u64;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    tokio::spawn(async move {
        if !enabled || usec == 0 {
            return;
        }
        let every = Duration::from_micros(usec / 2);
        let stats = engine.stats();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            let max_idle = settings.borrow().config.refresh.max_idle.as_secs() as i64;
            let beat = stats.heartbeat.load(Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let checking = store.checks() == Checks::Pending;
            if checking || now - beat <= 2 * max_idle + 30 {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    event = "engine_stalled",
                    last_heartbeat_secs_ago = now - beat,
                    "the refresh loop has not looked at the store for too long; not pinging the watchdog"
                );
            }
        }
    })
}

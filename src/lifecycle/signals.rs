//! The process's signals: SIGTERM and SIGINT cancel the shutdown token (the drain), SIGHUP
//! asks for a reload.

use super::DaemonError;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Installs SIGTERM/SIGINT (cancel `shutdown`) and SIGHUP (send a reload request).
pub fn install_signals(shutdown: CancellationToken) -> Result<mpsc::Receiver<()>, DaemonError> {
    let (tx, rx) = mpsc::channel(4);
    watch_signals(shutdown, Some(tx))?;
    Ok(rx)
}

/// Installs SIGTERM/SIGINT only (cancel `shutdown`), for programs that reload nothing (the
/// sandbox): SIGHUP keeps its default.
pub fn install_stop_signals(shutdown: CancellationToken) -> Result<(), DaemonError> {
    watch_signals(shutdown, None)
}

/// The one signal path of the process (signal-hook): SIGTERM and SIGINT cancel `shutdown`;
/// with `reload`, SIGHUP sends it a request.
fn watch_signals(
    shutdown: CancellationToken,
    reload: Option<mpsc::Sender<()>>,
) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let wanted: &[i32] = if reload.is_some() {
        &[SIGTERM, SIGINT, SIGHUP]
    } else {
        &[SIGTERM, SIGINT]
    };
    let mut signals = signal_hook_tokio::Signals::new(wanted).map_err(DaemonError::Signals)?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            match (sig, &reload) {
                (SIGHUP, Some(tx)) => {
                    tracing::info!(event = "signal", signal = "SIGHUP", "reloading the config");
                    let _ = tx.try_send(());
                }
                (s, _) => {
                    let name = if s == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    if shutdown.is_cancelled() {
                        tracing::warn!(
                            event = "signal",
                            signal = name,
                            "already stopping; waiting for in-flight refreshes (grace period)"
                        );
                    } else {
                        tracing::info!(event = "signal", signal = name, "stopping");
                        shutdown.cancel();
                    }
                }
            }
        }
    });
    Ok(())
}

//! Serving the ops router so that hostile clients cannot starve the daemon: every
//! connection must send its request head within `server.header_read_timeout`, a request gets
//! `server.request_timeout`, at most `server.max_concurrent_requests` run at once, and open
//! connections are capped below the file-descriptor limit, leaving `server.fd_reserve` files
//! for the providers and the store. At the cap the server stops accepting: further clients
//! wait in the kernel's backlog, holding no descriptor of ours.

use axum::Router;
use axum::http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// At most this many connections unless `server.max_connections` says otherwise: an ops
/// port needs few, and each costs memory as well as a descriptor.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Fewest connections served whatever the limit (health probes must get through).
const MIN_CONNECTIONS: usize = 8;

/// The limits every listener of one server shares.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// One permit per open connection, shared by the TCP and the Unix listener.
    pub connections: Arc<Semaphore>,
}

/// The connection cap: `configured`, else the soft descriptor limit minus `reserve` (at
/// most [`DEFAULT_MAX_CONNECTIONS`]); never more than the limit leaves after the reserve,
/// never fewer than a handful. `fd_limit` None: unlimited.
pub fn connection_cap(configured: Option<usize>, reserve: usize, fd_limit: Option<u64>) -> usize {
    let room = fd_limit
        .map(|l| {
            usize::try_from(l)
                .unwrap_or(usize::MAX)
                .saturating_sub(reserve)
        })
        .unwrap_or(usize::MAX);
    configured
        .unwrap_or(DEFAULT_MAX_CONNECTIONS)
        .min(room)
        .max(MIN_CONNECTIONS)
}

/// Serves `app` on `listener` until `stop`; then waits up to the header-read timeout for
/// requests in progress.
pub fn serve_on<L>(
    mut listener: L,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(ConcurrencyLimitLayer::new(limits.max_concurrent_requests))
        .service(app);
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut at_cap_since: Option<tokio::time::Instant> = None;
        loop {
            // A permit first: at the cap nothing more is accepted (no descriptor spent).
            let permit = match limits.connections.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if at_cap_since.is_none() {
                        tracing::warn!(
                            event = "server_connections_capped",
                            listener = what,
                            "the ops server holds its maximum of open connections (server.max_connections); new ones wait until slow clients time out"
                        );
                        at_cap_since = Some(tokio::time::Instant::now());
                    }
                    tokio::select! {
                        p = limits.connections.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        _ = stop.cancelled() => break,
                    }
                }
            };
            if at_cap_since.take().is_some() {
                tracing::info!(
                    event = "server_connections_below_cap",
                    listener = what,
                    "the ops server accepts connections again"
                );
            }
            let (io, _addr) = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => break,
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn =
                http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service.clone()));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                // Errors are the client's (a timeout, a reset, a malformed request).
                let _ = conn.await;
                drop(permit);
            });
        }
        drop(listener);
        if tokio::time::timeout(limits.header_read_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                event = "server_shutdown_cut",
                listener = what,
                "ops server connections still open at shutdown were closed"
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_to_refreshes() {
        // A service's usual soft limit: 1024 files, 256 kept back.
        assert_eq!(connection_cap(None, 256, Some(1024)), 768);
        assert_eq!(
            connection_cap(None, 256, Some(65_536)),
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(connection_cap(None, 256, None), DEFAULT_MAX_CONNECTIONS);
        // A configured cap cannot eat into the reserve.
        assert_eq!(connection_cap(Some(5000), 256, Some(4096)), 3840);
        assert_eq!(connection_cap(Some(100), 256, Some(4096)), 100);
        // A limit below the reserve still serves health probes.
        assert_eq!(connection_cap(None, 256, Some(200)), MIN_CONNECTIONS);
    }
}

//! The ops HTTP server (axum): `/healthz`, `/readyz`, `/metrics`, the token API for the app
//! the daemon serves, the token proxy (`/proxy/...`), the web connect endpoints and the admin
//! page. Served on `server.listen` and/or `server.unix_socket`; off when neither is set.

mod admin;
mod connect_web;
mod proxy;
mod serve;
mod signed_redirect;
mod token_api;

pub use serve::connection_cap;

use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Engine, Settings};
use crate::store::{Checks, Store};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen on {addr} (server.listen): {source}; pick a free port or stop the other process"
    )]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve on the Unix socket {path} (server.unix_socket): {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub clock: Clock,
    pub engine: Engine,
    pub settings: watch::Receiver<Arc<Settings>>,
    /// False once the engine loop has ended (or the daemon is draining).
    pub engine_running: Arc<AtomicBool>,
    /// When the engine loop was started (unix seconds): before its first pass completes (a
    /// slow first claim on a busy machine or a remote database) it is starting, not stalled.
    pub started_at: i64,
}

impl AppState {
    fn config(&self) -> Config {
        self.settings.borrow().config.clone()
    }

    /// Seconds since the engine loop last completed a look at the store (or started); 0
    /// while the store's start-up checks run (the loop's first claim waits for them).
    fn heartbeat_age(&self) -> i64 {
        if self.store.checks() == Checks::Pending {
            return 0;
        }
        let beat = self.engine.stats().heartbeat.load(Ordering::Relaxed);
        self.clock.now() - beat.max(self.started_at)
    }
}

/// A running server; dropping it does not stop it, `shutdown` (the token given to `spawn`)
/// does.
pub struct ServerHandle {
    pub local_addr: Option<std::net::SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl ServerHandle {
    /// Waits for the listeners to stop (after the shutdown token was cancelled) and removes
    /// the Unix socket file.
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(p) = self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The router: health and metrics always; the token API only with a configured secret;
/// connect only when `connect.enabled`; the admin page only when `server.admin_page`.
pub fn router(state: AppState, config: &Config) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if config.server.api_token.is_some() {
        app = app.merge(token_api::routes());
        if config.proxy.enabled {
            app = app.merge(proxy::routes(config));
        }
    }
    if config.server.admin_page && config.server.api_token.is_some() {
        app = app.merge(admin::routes());
    }
    if config.connect.enabled {
        app = app.merge(connect_web::routes());
    }
    app.with_state(state)
}

/// Starts the server on `server.listen` and/or `server.unix_socket`; None when neither is set.
pub async fn spawn(
    state: AppState,
    config: &Config,
    shutdown: CancellationToken,
) -> Result<Option<ServerHandle>, ServerError> {
    let sv = &config.server;
    if sv.listen.is_none() && sv.unix_socket.is_none() {
        return Ok(None);
    }
    let app = router(state, config);
    let fd_limit = crate::hardening::raise_fd_limit();
    let cap = connection_cap(sv.max_connections, sv.fd_reserve, fd_limit);
    tracing::info!(event = "server_limits", max_connections = cap, fd_limit = ?fd_limit,
        fd_reserve = sv.fd_reserve, header_read_timeout = ?sv.header_read_timeout,
        request_timeout = ?sv.request_timeout, max_concurrent_requests = sv.max_concurrent_requests,
        "ops server limits");
    if fd_limit.is_some_and(|l| l < (sv.fd_reserve + cap) as u64) {
        tracing::warn!(event = "fd_limit_low", fd_limit = ?fd_limit, fd_reserve = sv.fd_reserve,
            "the open-files limit leaves refreshes fewer than server.fd_reserve descriptors: raise it (LimitNOFILE= in the unit, ulimit -n)");
    }
    let limits = serve::Limits {
        header_read_timeout: sv.header_read_timeout,
        request_timeout: sv.request_timeout,
        max_concurrent_requests: sv.max_concurrent_requests,
        connections: Arc::new(tokio::sync::Semaphore::new(cap)),
    };
    let mut handle = ServerHandle {
        local_addr: None,
        tasks: Vec::new(),
        socket: None,
    };
    if let Some(addr) = sv.listen_addr() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        handle.local_addr = Some(local);
        handle.tasks.push(serve::serve_on(
            listener,
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            "TCP",
        ));
        tracing::info!(event = "server_listening", addr = %local, api = config.server.api_token.is_some(),
            connect = config.connect.enabled, "ops server listening");
        if !local.ip().is_loopback() {
            tracing::warn!(event = "server_not_on_loopback", addr = %local,
                "the ops server speaks plain HTTP off loopback (server.allow_non_loopback = true): TLS must be in front of it");
        }
    }
    if let Some(path) = &sv.unix_socket {
        let err = |source| ServerError::Socket {
            path: path.clone(),
            source,
        };
        // A socket left by a killed process would make bind fail; anything else is refused.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(err)?;
            } else {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        }
        handle.socket = Some(path.clone());
        handle.tasks.push(serve::serve_on(
            listener,
            app,
            limits,
            shutdown.clone(),
            "Unix socket",
        ));
        tracing::info!(event = "server_listening", socket = %path.display(), "ops server listening on a Unix socket");
    }
    Ok(Some(handle))
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Alive: the engine loop runs and has looked at the store within twice `stall_after`
/// (a stricter limit is readiness'; liveness failing means restart).
async fn healthz(State(s): State<AppState>) -> Response {
    let stall = s.config().server.stall_after.as_secs() as i64;
    let age = s.heartbeat_age();
    if !s.engine_running.load(Ordering::Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not alive: the refresh loop is not running\n".into(),
        );
    }
    if age > 2 * stall {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not alive: the refresh loop last completed a pass {age}s ago\n"),
        );
    }
    text(StatusCode::OK, "ok\n".into())
}

/// Ready: the store answers and is migrated (tokens can be read), the engine runs, and it
/// is not stalled. The store's start-up checks may still be running (writes wait for
/// them); once they failed, not ready.
async fn readyz(State(s): State<AppState>) -> Response {
    let stall = s.config().server.stall_after.as_secs() as i64;
    let mut problems = Vec::new();
    if !s.engine_running.load(Ordering::Relaxed) {
        problems.push("the refresh loop is not running (stopped or draining)".to_string());
    }
    let age = s.heartbeat_age();
    if age > stall {
        problems.push(format!(
            "the refresh loop last completed a pass {age}s ago (server.stall_after = {stall}s)"
        ));
    }
    if let crate::store::Checks::Failed(_) = s.store.checks() {
        // The reason names the file: it goes to the log, as below.
        problems.push(
            "the store failed its start-up checks (quick_check or the sealing keys); the daemon is stopping (its log says why)"
                .into(),
        );
    }
    match s.store.schema_current().await {
        Ok(true) => {}
        Ok(false) => problems.push("the store's schema is not migrated".into()),
        // The error may name paths or hosts: it goes to the log, the unauthenticated page
        // gets a fixed reason.
        Err(e) => {
            tracing::warn!(event = "readiness_store_failed", error = %e, "/readyz: the store does not answer");
            problems.push("the store does not answer (the daemon's log says why)".into());
        }
    }
    if problems.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n", problems.join("\n- ")),
        )
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let beat = s.engine.stats().heartbeat.load(Ordering::Relaxed);
    match s
        .engine
        .metrics()
        .render(&s.store, s.clock.now(), beat)
        .await
    {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(event = "metrics_store_failed", error = %e, "/metrics: cannot read the store");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the store for metrics (the daemon's log says why)\n".into(),
            )
        }
    }
}

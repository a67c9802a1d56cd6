//! A fake TikTok Login Kit v2 token endpoint on loopback, for `refreshd demo`, integration
//! tests and benchmarks.
//!
//! This module owns the whole fake provider: the HTTP server (`POST /v2/oauth/token/`, and
//! `GET /v2/auth/authorize/`, which answers at once as [`Sandbox::set_consent`] says), the
//! grant book-keeping (which refresh token is current, which were rotated away, when each
//! grant's refresh token dies), fault injection, and the counters tests read back to prove
//! behaviour (above all: that no refresh token was ever presented twice).
//!
//! It mimics the parts of TikTok that matter to a refresher:
//! - refresh tokens rotate, and a rotated-away token is rejected with `invalid_grant`;
//! - the refresh token's expiry is fixed at the first grant, so `refresh_expires_in` counts
//!   down instead of being renewed (or, with `sliding_refresh`, starts again at each refresh);
//! - errors are JSON `{"error","error_description","log_id"}`, and sometimes arrive with
//!   HTTP 200 (`error_in_200`).
//!
//! Every expiry is computed with the injected [`Clock`], so a manual clock can make days pass
//! in a test.
//!
//! `api.rs` adds a small API (`/v2/user/info/`, `/v2/echo/`) that checks access tokens, for
//! the token proxy.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::clock::Clock;

mod api;
pub use api::{ECHO_PATH, RESEARCH_PATH, USER_INFO_PATH};

/// Path of the token endpoint, as on `open.tiktokapis.com`.
pub const TOKEN_PATH: &str = "/v2/oauth/token/";
/// Path of the revocation endpoint, as on `open.tiktokapis.com`.
pub const REVOKE_PATH: &str = "/v2/oauth/revoke/";
/// Path of the authorization page, as on `www.tiktok.com`.
pub const AUTHORIZE_PATH: &str = "/v2/auth/authorize/";
/// Path of the counters ([`SandboxStats`] as JSON), for a sandbox run as its own process.
pub const STATS_PATH: &str = "/sandbox/stats";
/// How long an authorization code can be exchanged (TikTok does not document it).
const CODE_TTL: i64 = 600;

/// What the sandbox's authorization page answers, as if a user clicked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Consent {
    /// Log in as `open_id` and approve. `grant_scopes` replaces the requested scopes
    /// (comma-separated) when the user unticks some; None grants what was asked.
    Approve {
        open_id: String,
        grant_scopes: Option<String>,
    },
    /// The user pressed "cancel": `error=access_denied`.
    Deny,
}

impl Default for Consent {
    fn default() -> Self {
        Consent::Approve {
            open_id: "sandbox-user".to_owned(),
            grant_scopes: None,
        }
    }
}

/// How long `shutdown` waits for open connections to finish before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the sandbox behaves. `Default` gives TikTok's lifetimes and no faults.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub client_key: String,
    pub client_secret: String,
    /// Lifetime of each access token (TikTok: 24h; default here 2h to exercise refreshes).
    pub access_ttl: Duration,
    /// Lifetime of a grant's refresh token, fixed at the first grant (TikTok: 365 days).
    pub refresh_ttl: Duration,
    /// When true the refresh token's lifetime starts again at each refresh (a sliding
    /// lifetime, as providers that revoke unused refresh tokens have); false: fixed.
    pub sliding_refresh: bool,
    /// When false the refresh token never changes and refresh responses omit it.
    pub rotate: bool,
    /// Benchmarks: a refresh token never seen before of the form `rft.adopt.<open_id>` is
    /// taken as the refresh token of a grant of `<open_id>` issued at that moment (then
    /// rotated as usual), so a store seeded with a million accounts needs no grant per
    /// account here first. Off by default: unknown tokens are `invalid_grant`.
    pub adopt: bool,
    /// When a rotated-away refresh token comes back, revoke the whole grant (as providers
    /// that detect token theft do): the account's current token dies too.
    pub revoke_on_reuse: bool,
    pub faults: Faults,
}

/// The prefix of refresh tokens the sandbox adopts when [`SandboxConfig::adopt`] is on.
pub const ADOPT_PREFIX: &str = "rft.adopt.";

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            client_key: "sandbox-client-key".to_owned(),
            client_secret: "sandbox-client-secret".to_owned(),
            access_ttl: Duration::from_secs(2 * 3600),
            refresh_ttl: Duration::from_secs(180 * 86_400),
            sliding_refresh: false,
            rotate: true,
            adopt: false,
            revoke_on_reuse: false,
            faults: Faults::default(),
        }
    }
}

/// Per-request fault probabilities (0.0 = never, 1.0 = always). Each is drawn independently,
/// in field order, before the request is handled; the first that fires decides the answer.
/// A faulted request never touches the grant, so its refresh token stays usable.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// HTTP 503 `temporarily_unavailable` or HTTP 500 `server_error` (chosen at random).
    pub server_error: f64,
    /// HTTP 429 with `Retry-After: retry_after_secs`.
    pub rate_limited: f64,
    pub retry_after_secs: u64,
    /// HTTP 200 whose body is an error, as TikTok sometimes answers.
    pub error_in_200: f64,
    /// Waits `slow_delay`, then answers normally.
    pub slow: f64,
    pub slow_delay: Duration,
    /// Performs the refresh (the token rotates), then answers HTTP 200 with a body of an odd
    /// shape that still carries the new refresh token as a string: no or a numeric access
    /// token, a lifetime that is text or negative, a strange token_type, a broken
    /// refresh_expires_in or open_id.
    pub odd_answer: f64,
}

/// Counters of what the endpoint has done since start.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct SandboxStats {
    /// Every request to the token endpoint, faulted or not.
    pub requests: u64,
    /// Successful refreshes.
    pub refreshed: u64,
    /// A rotated-away refresh token was presented again: the double-refresh signal.
    pub reuse_rejected: u64,
    pub expired_rejected: u64,
    pub revoked_rejected: u64,
    pub unknown_rejected: u64,
    pub client_rejected: u64,
    /// Authorization codes issued by the authorization page.
    pub codes_issued: u64,
    /// Codes exchanged for tokens.
    pub codes_exchanged: u64,
    /// Code exchanges refused (unknown, reused, expired code, wrong redirect_uri or verifier).
    pub codes_rejected: u64,
    /// Faults of every kind, `slow` included.
    pub faults_injected: u64,
    /// Refresh tokens taken as new grants (`SandboxConfig::adopt`).
    pub adopted: u64,
    /// Refreshes answered with an odd shape (`Faults::odd_answer`).
    pub odd_answers: u64,
    /// Grants revoked because a used refresh token came back
    /// (`SandboxConfig::revoke_on_reuse`).
    pub reuse_revoked: u64,
    /// Requests to the API (`/v2/user/info/`, `/v2/echo/`), refused or not.
    pub api_calls: u64,
    /// API requests answered 401 (no, an unknown, expired, revoked or refused token).
    pub api_unauthorized: u64,
    /// Client access tokens issued (`grant_type=client_credentials`: app tokens).
    pub client_tokens_issued: u64,
}

/// A running sandbox. Dropping it stops the server too; `shutdown` also waits for it.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start(config: SandboxConfig, clock: Clock) -> std::io::Result<Sandbox> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config, clock).await
    }

    /// Binds `addr` and serves on the current tokio runtime.
    pub async fn start_on(
        addr: SocketAddr,
        config: SandboxConfig,
        clock: Clock,
    ) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            clock,
            log_seq: AtomicU64::new(0),
            state: Mutex::new(Book {
                config,
                grants: HashMap::new(),
                current: HashMap::new(),
                used: HashMap::new(),
                client_tokens: HashMap::new(),
                last_client_token: None,
                codes: HashMap::new(),
                consent: Consent::default(),
                stats: SandboxStats::default(),
                api_refusals: api::ApiRefusals::default(),
            }),
        });
        let app = Router::new()
            .route(TOKEN_PATH, post(token_endpoint))
            .route(REVOKE_PATH, post(revoke_endpoint))
            .route(AUTHORIZE_PATH, get(authorize_endpoint))
            .route(STATS_PATH, get(stats_endpoint))
            .merge(api::routes())
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender means the `Sandbox` is gone: stop as well.
                    let _ = stopped.await;
                })
                .await;
            if let Err(err) = served {
                tracing::warn!(%err, "sandbox server stopped with an error");
            }
        });
        tracing::debug!(%addr, "sandbox token endpoint listening");
        Ok(Sandbox {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Full URL of the token endpoint, e.g. `http://127.0.0.1:PORT/v2/oauth/token/`.
    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.addr, TOKEN_PATH)
    }

    /// Full URL of the revocation endpoint, e.g. `http://127.0.0.1:PORT/v2/oauth/revoke/`.
    pub fn revoke_url(&self) -> String {
        format!("http://{}{}", self.addr, REVOKE_PATH)
    }

    /// Full URL of the authorization page, e.g. `http://127.0.0.1:PORT/v2/auth/authorize/`.
    pub fn authorize_url(&self) -> String {
        format!("http://{}{}", self.addr, AUTHORIZE_PATH)
    }

    /// What the authorization page answers from the next request on.
    pub fn set_consent(&self, consent: Consent) {
        self.shared.lock().consent = consent;
    }

    /// Creates a grant as if `open_id` had just logged in, and returns the token response
    /// exactly as TikTok's code exchange does. `refresh_ttl` overrides the configured one for
    /// this grant. Granting an `open_id` again replaces its grant (a re-authorization): the
    /// previous refresh token becomes unknown and a revocation is lifted.
    pub fn grant(&self, open_id: &str, scope: &str, refresh_ttl: Option<Duration>) -> Value {
        let now = self.shared.clock.now();
        self.shared.lock().grant(now, open_id, scope, refresh_ttl)
    }

    /// Revokes `open_id`'s grant: every token of it now answers `invalid_grant`.
    pub fn revoke(&self, open_id: &str) {
        if let Some(grant) = self.shared.lock().grants.get_mut(open_id) {
            grant.revoked = true;
        }
    }

    /// Replaces the fault probabilities; takes effect from the next request.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().config.faults = faults;
    }

    pub fn stats(&self) -> SandboxStats {
        self.shared.lock().stats.clone()
    }

    /// A reader of the counters that can move into a task (a test's sampler).
    pub fn stats_handle(&self) -> impl Fn() -> SandboxStats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.lock().stats.clone()
    }

    /// Is `access_token` the latest access token of `open_id`, unexpired and unrevoked?
    pub fn access_token_valid(&self, open_id: &str, access_token: &str) -> bool {
        let now = self.shared.clock.now();
        self.shared.lock().grants.get(open_id).is_some_and(|g| {
            !g.revoked && &*g.access_token == access_token && now < g.access_expires_at
        })
    }

    /// Is `token` a client access token (app token) this sandbox issued, still unexpired?
    pub fn client_token_valid(&self, token: &str) -> bool {
        let now = self.shared.clock.now();
        self.shared
            .lock()
            .client_tokens
            .get(token)
            .is_some_and(|expires_at| now < *expires_at)
    }

    /// The latest client access token issued (app tokens), if any.
    pub fn last_client_token(&self) -> Option<String> {
        self.shared
            .lock()
            .last_client_token
            .as_deref()
            .map(str::to_string)
    }

    /// The latest refresh token issued to `open_id`, whether or not it still works
    /// (it may be expired or revoked).
    pub fn current_refresh_token(&self, open_id: &str) -> Option<String> {
        self.shared
            .lock()
            .grants
            .get(open_id)
            .map(|g| g.refresh_token.to_string())
    }

    /// Stops accepting connections and waits (briefly) for in-flight requests to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Without an explicit shutdown, still stop serving; the task ends on its own.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Book {
    /// See [`Sandbox::grant`].
    fn grant(
        &mut self,
        now: i64,
        open_id: &str,
        scope: &str,
        refresh_ttl: Option<Duration>,
    ) -> Value {
        let access_ttl = secs(self.config.access_ttl);
        let refresh_ttl = secs(refresh_ttl.unwrap_or(self.config.refresh_ttl));
        let open_id: Arc<str> = Arc::from(open_id);
        let grant = Grant {
            scope: scope.into(),
            access_token: new_token("act."),
            access_expires_at: now.saturating_add(access_ttl),
            refresh_token: new_token("rft."),
            refresh_expires_at: now.saturating_add(refresh_ttl),
            refresh_ttl,
            revoked: false,
        };
        self.current
            .insert(grant.refresh_token.clone(), open_id.clone());
        let body = token_body(&open_id, &grant, now, true);
        if let Some(old) = self.grants.insert(open_id, grant) {
            self.current.remove(&old.refresh_token);
        }
        body
    }
}

/// An authorization code waiting to be exchanged.
struct PendingCode {
    open_id: String,
    scope: String,
    redirect_uri: String,
    /// The PKCE S256 challenge sent to the authorization page, if any.
    challenge: Option<String>,
    expires_at: i64,
}

/// What the server task shares with the `Sandbox` handle.
struct Shared {
    clock: Clock,
    log_seq: AtomicU64,
    state: Mutex<Book>,
}

/// All mutable state, behind one mutex that is never held across an await.
struct Book {
    config: SandboxConfig,
    /// open_id → its grant.
    grants: HashMap<Arc<str>, Grant>,
    /// Current refresh token → open_id.
    current: HashMap<Box<str>, Arc<str>>,
    /// Refresh tokens rotated away (-> their open_id), kept to tell reuse apart from garbage.
    used: HashMap<Box<str>, Arc<str>>,
    /// Authorization code → what it grants; removed when presented (single use).
    codes: HashMap<Box<str>, PendingCode>,
    /// Client access tokens (app tokens) → when each expires; expired ones are dropped
    /// when the next is issued.
    client_tokens: HashMap<Box<str>, i64>,
    /// The latest client access token issued.
    last_client_token: Option<Box<str>>,
    consent: Consent,
    stats: SandboxStats,
    /// Valid tokens the API refuses anyway (tests of the proxy's retry).
    api_refusals: api::ApiRefusals,
}

struct Grant {
    scope: Box<str>,
    access_token: Box<str>,
    access_expires_at: i64,
    refresh_token: Box<str>,
    /// Set at grant time; moved by a refresh only with `SandboxConfig::sliding_refresh`.
    refresh_expires_at: i64,
    /// The grant's refresh-token lifetime (seconds), for a sliding renewal.
    refresh_ttl: i64,
    revoked: bool,
}

/// A fault picked for one request.
enum Fault {
    None,
    ServerError,
    RateLimited(u64),
    ErrorIn200,
    Slow(Duration),
    OddAnswer,
}

/// Why a request failed, with everything needed to answer it.
struct Reject {
    status: StatusCode,
    error: &'static str,
    description: &'static str,
}

impl Reject {
    fn new(status: StatusCode, error: &'static str, description: &'static str) -> Self {
        Reject {
            status,
            error,
            description,
        }
    }

    fn invalid_request(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Book> {
        // A panic elsewhere must not take the sandbox down with it; the book stays consistent
        // because every update is completed before the guard drops.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the request and draws the faults for it.
    fn pick_fault(&self) -> Fault {
        let mut book = self.lock();
        book.stats.requests += 1;
        let f = &book.config.faults;
        let mut rng = rand::rng();
        // `random::<f64>()` is in [0, 1): p = 1.0 always fires, p = 0.0 (or NaN) never does.
        let mut fires = |p: f64| rng.random::<f64>() < p;
        let fault = if fires(f.server_error) {
            Fault::ServerError
        } else if fires(f.rate_limited) {
            Fault::RateLimited(f.retry_after_secs)
        } else if fires(f.error_in_200) {
            Fault::ErrorIn200
        } else if fires(f.slow) {
            Fault::Slow(f.slow_delay)
        } else if fires(f.odd_answer) {
            Fault::OddAnswer
        } else {
            Fault::None
        };
        if !matches!(fault, Fault::None) {
            book.stats.faults_injected += 1;
        }
        fault
    }

    /// A unique log id shaped like TikTok's: `YYYYMMDDHHMMSS` + `SANDBOX` + sequence.
    fn log_id(&self) -> String {
        let seq = self.log_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.clock.now();
        let stamp = time::OffsetDateTime::from_unix_timestamp(now)
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!(
                    "[year][month][day][hour][minute][second]"
                ))
                .ok()
            })
            .unwrap_or_else(|| now.to_string());
        format!("{stamp}SANDBOX{seq:04}")
    }

    fn error_response(&self, reject: Reject) -> Response {
        let body = json!({
            "error": reject.error,
            "error_description": reject.description,
            "log_id": self.log_id(),
        });
        json_response(reject.status, body)
    }

    /// Validates the form and performs the refresh, all under one lock so concurrent
    /// presentations of the same token cannot both succeed.
    fn refresh(&self, form: &HashMap<String, String>) -> Result<Value, Reject> {
        let now = self.clock.now();
        let mut guard = self.lock();
        // Reborrow once so the maps and counters can be borrowed separately.
        let book = &mut *guard;
        let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());

        let client_ok = field("client_key") == Some(book.config.client_key.as_str())
            && field("client_secret") == Some(book.config.client_secret.as_str());
        if !client_ok {
            book.stats.client_rejected += 1;
            return Err(Reject::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Client key or secret is invalid.",
            ));
        }
        match field("grant_type") {
            None => return Err(Reject::invalid_request("grant_type is required.")),
            Some("refresh_token") => {}
            Some("authorization_code") => return exchange_code(book, now, &field),
            Some("client_credentials") => return Ok(client_token(book, now)),
            Some(_) => {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "Only grant_type=refresh_token, authorization_code and client_credentials are supported by the sandbox.",
                ));
            }
        }
        let Some(token) = field("refresh_token") else {
            return Err(Reject::invalid_request("refresh_token is required."));
        };

        if let Some(open_id) = book.used.get(token).cloned() {
            book.stats.reuse_rejected += 1;
            if book.config.revoke_on_reuse
                && let Some(grant) = book.grants.get_mut(&open_id)
                && !grant.revoked
            {
                grant.revoked = true;
                book.stats.reuse_revoked += 1;
            }
            return Err(Reject::invalid_grant(
                "Refresh token has already been used.",
            ));
        }
        if book.config.adopt
            && !book.current.contains_key(token)
            && let Some(open_id) = token.strip_prefix(ADOPT_PREFIX).filter(|o| !o.is_empty())
        {
            let scope = "user.info.basic";
            book.grant(now, open_id, scope, None);
            // The grant made its own token: present the adopted one in its place.
            let grant = book.grants.get_mut(open_id).expect("just granted");
            let made = std::mem::replace(&mut grant.refresh_token, token.into());
            book.current.remove(&made);
            book.current.insert(token.into(), Arc::from(open_id));
            book.stats.adopted += 1;
        }
        let Some(open_id) = book.current.get(token).cloned() else {
            book.stats.unknown_rejected += 1;
            return Err(Reject::invalid_grant("Refresh token is invalid."));
        };
        let rotate = book.config.rotate;
        let sliding = book.config.sliding_refresh;
        let access_ttl = secs(book.config.access_ttl);
        let Some(grant) = book.grants.get_mut(&open_id) else {
            // Unreachable while the maps are kept in step; answer as for a stranger.
            book.stats.unknown_rejected += 1;
            return Err(Reject::invalid_grant("Refresh token is invalid."));
        };
        if grant.revoked {
            book.stats.revoked_rejected += 1;
            return Err(Reject::invalid_grant("Authorization has been revoked."));
        }
        if now >= grant.refresh_expires_at {
            book.stats.expired_rejected += 1;
            return Err(Reject::invalid_grant("Refresh token has expired."));
        }

        grant.access_token = new_token("act.");
        grant.access_expires_at = now.saturating_add(access_ttl);
        if sliding {
            grant.refresh_expires_at = now.saturating_add(grant.refresh_ttl);
        }
        let rotated = rotate.then(|| {
            let new: Box<str> = new_token("rft.");
            std::mem::replace(&mut grant.refresh_token, new.clone())
        });
        let body = token_body(&open_id, grant, now, rotate);
        if let Some(old) = rotated {
            let new = grant.refresh_token.clone();
            book.current.remove(&old);
            book.used.insert(old, open_id.clone());
            book.current.insert(new, open_id);
        }
        book.stats.refreshed += 1;
        Ok(body)
    }
}

/// `grant_type=client_credentials` (TikTok's client access token, for the Research and
/// Commercial Content APIs): a new token of `access_ttl`, no refresh token, no user. The
/// client credentials were checked by the caller.
fn client_token(book: &mut Book, now: i64) -> Value {
    let ttl = secs(book.config.access_ttl);
    book.client_tokens.retain(|_, expires_at| now < *expires_at);
    let token = new_token("clt.");
    book.client_tokens
        .insert(token.clone(), now.saturating_add(ttl));
    book.last_client_token = Some(token.clone());
    book.stats.client_tokens_issued += 1;
    json!({
        "access_token": &*token,
        "expires_in": ttl,
        "token_type": "Bearer",
    })
}

/// `grant_type=authorization_code`: the code is single use, bound to its redirect_uri and,
/// when the authorization sent one, its PKCE challenge.
fn exchange_code<'f>(
    book: &mut Book,
    now: i64,
    field: &impl Fn(&str) -> Option<&'f str>,
) -> Result<Value, Reject> {
    let Some(code) = field("code") else {
        return Err(Reject::invalid_request("code is required."));
    };
    let Some(redirect_uri) = field("redirect_uri") else {
        return Err(Reject::invalid_request("redirect_uri is required."));
    };
    let Some(pending) = book.codes.remove(code) else {
        book.stats.codes_rejected += 1;
        return Err(Reject::invalid_grant(
            "Authorization code is invalid or has already been used.",
        ));
    };
    if now >= pending.expires_at {
        book.stats.codes_rejected += 1;
        return Err(Reject::invalid_grant("Authorization code has expired."));
    }
    if pending.redirect_uri != redirect_uri {
        book.stats.codes_rejected += 1;
        return Err(Reject::invalid_grant(
            "redirect_uri does not match the one of the authorization request.",
        ));
    }
    if let Some(challenge) = &pending.challenge {
        let ok =
            field("code_verifier").is_some_and(|v| crate::connect::s256_challenge(v) == *challenge);
        if !ok {
            book.stats.codes_rejected += 1;
            return Err(Reject::invalid_grant(
                "code_verifier is missing or does not match the code_challenge.",
            ));
        }
    }
    book.stats.codes_exchanged += 1;
    Ok(book.grant(now, &pending.open_id, &pending.scope, None))
}

/// `GET /v2/auth/authorize/`: answers at once as the configured [`Consent`] says, by
/// redirecting (302) to `redirect_uri` with `code`, `scopes`, `state`, or with `error`.
async fn authorize_endpoint(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let field = |name: &str| q.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let bad = |m: &'static str| (StatusCode::BAD_REQUEST, m).into_response();
    let now = shared.clock.now();
    let mut book = shared.lock();
    if field("client_key") != Some(book.config.client_key.as_str()) {
        return bad("client_key is missing or unknown.");
    }
    let Some(redirect_uri) = field("redirect_uri") else {
        return bad("redirect_uri is required.");
    };
    let Ok(mut target) = url::Url::parse(redirect_uri) else {
        return bad("redirect_uri must be an absolute URL.");
    };
    if field("response_type") != Some("code") {
        return bad("response_type must be code.");
    }
    let challenge = match (field("code_challenge"), field("code_challenge_method")) {
        (None, _) => None,
        (Some(c), Some("S256")) => Some(c.to_owned()),
        (Some(_), _) => return bad("code_challenge_method must be S256."),
    };
    {
        let mut pairs = target.query_pairs_mut();
        match book.consent.clone() {
            Consent::Deny => {
                pairs
                    .append_pair("error", "access_denied")
                    .append_pair("error_description", "The user denied the authorization.");
            }
            Consent::Approve {
                open_id,
                grant_scopes,
            } => {
                let scope = grant_scopes.unwrap_or_else(|| field("scope").unwrap_or("").to_owned());
                let code = new_token("code.");
                pairs
                    .append_pair("code", &code)
                    .append_pair("scopes", &scope);
                book.codes.insert(
                    code,
                    PendingCode {
                        open_id,
                        scope,
                        redirect_uri: redirect_uri.to_owned(),
                        challenge,
                        expires_at: now.saturating_add(CODE_TTL),
                    },
                );
                book.stats.codes_issued += 1;
            }
        }
        if let Some(state) = field("state") {
            pairs.append_pair("state", state);
        }
    }
    drop(book);
    let mut response = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(target.as_str()) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let fault = shared.pick_fault();
    match fault {
        Fault::None => {}
        Fault::ServerError => {
            let reject = if rand::rng().random_bool(0.5) {
                Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "The service is temporarily unavailable (sandbox fault).",
                )
            } else {
                Reject::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "Internal server error (sandbox fault).",
                )
            };
            return shared.error_response(reject);
        }
        Fault::RateLimited(retry_after) => {
            let mut response = shared.error_response(Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "Too many requests (sandbox fault).",
            ));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return response;
        }
        Fault::ErrorIn200 => {
            return shared.error_response(Reject::new(
                StatusCode::OK,
                "server_error",
                "Something went wrong, please retry (sandbox fault).",
            ));
        }
        Fault::Slow(delay) => tokio::time::sleep(delay).await,
        Fault::OddAnswer => {}
    }
    let odd = matches!(fault, Fault::OddAnswer);

    let Form(form) = match form {
        Ok(form) => form,
        Err(rejection) => {
            tracing::debug!(%rejection, "sandbox: unreadable token request");
            return shared.error_response(Reject::invalid_request(
                "Body must be application/x-www-form-urlencoded.",
            ));
        }
    };
    match shared.refresh(&form) {
        Ok(body) if odd && body.get("refresh_token").is_some() => {
            shared.lock().stats.odd_answers += 1;
            json_response(StatusCode::OK, odd_shape(body))
        }
        Ok(body) => json_response(StatusCode::OK, body),
        Err(reject) => shared.error_response(reject),
    }
}

/// TikTok's revocation: form `client_key`, `client_secret`, `token` (an access or refresh
/// token of a grant). A known token revokes its whole grant; an unknown one is answered
/// as revoked too (RFC 7009 §2.2). Success is an empty JSON object.
async fn revoke_endpoint(
    State(shared): State<Arc<Shared>>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return shared.error_response(Reject::invalid_request(
            "Body must be application/x-www-form-urlencoded.",
        ));
    };
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let mut book = shared.lock();
    if field("client_key") != Some(book.config.client_key.as_str())
        || field("client_secret") != Some(book.config.client_secret.as_str())
    {
        book.stats.client_rejected += 1;
        drop(book);
        return shared.error_response(Reject::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client key or secret is invalid.",
        ));
    }
    let Some(token) = field("token") else {
        drop(book);
        return shared.error_response(Reject::invalid_request("token is required."));
    };
    let owner = book.current.get(token).map(|o| o.to_string()).or_else(|| {
        book.grants
            .iter()
            .find(|(_, g)| &*g.access_token == token)
            .map(|(o, _)| o.to_string())
    });
    if let Some(grant) = owner.and_then(|o| book.grants.get_mut(o.as_str())) {
        grant.revoked = true;
    }
    json_response(StatusCode::OK, json!({}))
}

async fn stats_endpoint(State(shared): State<Arc<Shared>>) -> Response {
    let stats = shared.lock().stats.clone();
    (StatusCode::OK, axum::Json(stats)).into_response()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    // RFC 6749 §5.1: token responses must not be cached.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The success body. Lifetimes are what remains at `now`.
fn token_body(open_id: &str, grant: &Grant, now: i64, with_refresh_token: bool) -> Value {
    let mut body = json!({
        "access_token": &*grant.access_token,
        "expires_in": grant.access_expires_at.saturating_sub(now).max(0),
        "refresh_expires_in": grant.refresh_expires_at.saturating_sub(now).max(0),
        "open_id": open_id,
        "scope": &*grant.scope,
        "token_type": "Bearer",
    });
    if with_refresh_token {
        body["refresh_token"] = Value::from(&*grant.refresh_token);
    }
    body
}

/// The success body bent into one of the odd shapes of [`Faults::odd_answer`], picked at
/// random; the new refresh token stays a string.
fn odd_shape(mut body: Value) -> Value {
    let shapes: [(&str, Option<Value>); 8] = [
        ("access_token", None),
        ("access_token", Some(json!(12345))),
        ("access_token", Some(json!(""))),
        ("expires_in", Some(json!("soon"))),
        ("expires_in", Some(json!(-5))),
        ("token_type", Some(json!("MAC"))),
        ("refresh_expires_in", Some(json!([1]))),
        ("open_id", Some(json!({"id": 1}))),
    ];
    let (field, value) = shapes[rand::rng().random_range(0..shapes.len())].clone();
    match value {
        None => drop(body.as_object_mut().map(|o| o.remove(field))),
        Some(v) => body[field] = v,
    }
    body
}

/// A random, unguessable token: `prefix` + 32 alphanumerics from the thread CSPRNG.
fn new_token(prefix: &str) -> Box<str> {
    let mut token = String::with_capacity(prefix.len() + 32);
    token.push_str(prefix);
    token.extend(
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from),
    );
    token.into_boxed_str()
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const START: i64 = 1_764_063_000; // 2025-11-25T09:30:00Z

    async fn sandbox(config: SandboxConfig) -> (Sandbox, Clock) {
        let clock = Clock::manual(START);
        let sb = Sandbox::start(config, clock.clone()).await.unwrap();
        (sb, clock)
    }

    fn refresh_form(token: &str) -> Vec<(&'static str, String)> {
        vec![
            ("client_key", "sandbox-client-key".to_owned()),
            ("client_secret", "sandbox-client-secret".to_owned()),
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", token.to_owned()),
        ]
    }

    /// A client that ignores proxy settings in the environment: the sandbox is on loopback.
    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    /// POSTs a refresh and returns (status, Retry-After, body).
    async fn refresh(sb: &Sandbox, token: &str) -> (u16, Option<String>, Value) {
        post_form(sb, &refresh_form(token)).await
    }

    async fn post_form(sb: &Sandbox, form: &[(&str, String)]) -> (u16, Option<String>, Value) {
        let resp = client()
            .post(sb.token_url())
            .form(form)
            .send()
            .await
            .unwrap();
        split(resp).await
    }

    async fn split(resp: reqwest::Response) -> (u16, Option<String>, Value) {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, retry_after, resp.json().await.unwrap())
    }

    fn str_field<'a>(body: &'a Value, name: &str) -> &'a str {
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} missing in {body}"))
    }

    fn assert_error(body: &Value, error: &str) {
        assert_eq!(body["error"], error, "{body}");
        assert!(body["error_description"].is_string(), "{body}");
        let log_id = str_field(body, "log_id");
        assert!(log_id.contains("SANDBOX"), "{log_id}");
    }

    fn assert_token(token: &str, prefix: &str) {
        assert!(token.starts_with(prefix), "{token}");
        assert_eq!(token.len(), prefix.len() + 32);
        assert!(
            token[prefix.len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[tokio::test]
    async fn reuse_revokes_the_whole_grant_when_asked() {
        let (sb, _) = sandbox(SandboxConfig {
            revoke_on_reuse: true,
            ..SandboxConfig::default()
        })
        .await;
        let g = sb.grant("thief", "user.info.basic", None);
        let first = str_field(&g, "refresh_token").to_owned();
        let (_, _, body) = refresh(&sb, &first).await;
        let second = str_field(&body, "refresh_token").to_owned();
        let (status, _, body) = refresh(&sb, &first).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        // The current token died with the grant.
        let (_, _, body) = refresh(&sb, &second).await;
        assert_error(&body, "invalid_grant");
        let s = sb.stats();
        assert_eq!(
            (s.reuse_rejected, s.reuse_revoked, s.revoked_rejected),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn odd_answers_rotate_and_keep_the_new_refresh_token_a_string() {
        let (sb, _) = sandbox(SandboxConfig {
            faults: Faults {
                odd_answer: 1.0,
                ..Faults::default()
            },
            ..SandboxConfig::default()
        })
        .await;
        let g = sb.grant("odd", "user.info.basic", None);
        let mut token = str_field(&g, "refresh_token").to_owned();
        for _ in 0..20 {
            let (status, _, body) = refresh(&sb, &token).await;
            assert_eq!(status, 200, "{body}");
            token = str_field(&body, "refresh_token").to_owned();
            assert_eq!(
                sb.current_refresh_token("odd").as_deref(),
                Some(token.as_str())
            );
        }
        assert_eq!(sb.stats().odd_answers, 20);
    }

    #[tokio::test]
    async fn grant_and_refresh_have_tiktok_shape() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        assert_eq!(
            sb.token_url(),
            format!("http://127.0.0.1:{}/v2/oauth/token/", sb.addr().port())
        );
        let g = sb.grant("user-1", "user.info.basic,video.list", None);
        assert_token(str_field(&g, "access_token"), "act.");
        assert_token(str_field(&g, "refresh_token"), "rft.");
        assert_eq!(g["expires_in"], 7200);
        assert_eq!(g["refresh_expires_in"], 180 * 86_400);
        assert_eq!(g["open_id"], "user-1");
        assert_eq!(g["scope"], "user.info.basic,video.list");
        assert_eq!(g["token_type"], "Bearer");
        let first_access = str_field(&g, "access_token").to_owned();
        assert!(sb.access_token_valid("user-1", &first_access));

        let (status, _, body) = refresh(&sb, str_field(&g, "refresh_token")).await;
        assert_eq!(status, 200, "{body}");
        let obj = body.as_object().unwrap();
        for key in [
            "access_token",
            "refresh_token",
            "open_id",
            "scope",
            "token_type",
        ] {
            assert!(obj[key].is_string(), "{key} in {body}");
        }
        for key in ["expires_in", "refresh_expires_in"] {
            assert!(obj[key].is_u64(), "{key} in {body}");
        }
        assert_eq!(obj.len(), 7, "{body}");
        assert_eq!(body["expires_in"], 7200);
        assert_eq!(body["open_id"], "user-1");
        assert_eq!(body["scope"], "user.info.basic,video.list");
        assert_eq!(body["token_type"], "Bearer");
        let new_access = str_field(&body, "access_token");
        assert_token(new_access, "act.");
        assert_ne!(new_access, first_access);
        assert!(sb.access_token_valid("user-1", new_access));
        assert!(!sb.access_token_valid("user-1", &first_access));
        assert!(!sb.access_token_valid("someone-else", new_access));
        let stats = sb.stats();
        assert_eq!((stats.requests, stats.refreshed), (1, 1));
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn rotation_rejects_the_old_token_and_counts_reuse() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", None);
        let old = str_field(&g, "refresh_token").to_owned();

        let (status, _, body) = refresh(&sb, &old).await;
        assert_eq!(status, 200);
        let new = str_field(&body, "refresh_token").to_owned();
        assert_token(&new, "rft.");
        assert_ne!(new, old);
        assert_eq!(sb.current_refresh_token("u").as_deref(), Some(new.as_str()));

        let (status, _, body) = refresh(&sb, &old).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().reuse_rejected, 1);

        // The new token is unaffected by the reuse attempt.
        let (status, _, _) = refresh(&sb, &new).await;
        assert_eq!(status, 200);
        let stats = sb.stats();
        assert_eq!((stats.refreshed, stats.reuse_rejected), (2, 1));
    }

    #[tokio::test]
    async fn adopted_tokens_become_grants_and_rotate_like_any_other() {
        // Off by default: an unknown token is refused.
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let (status, _, body) = refresh(&sb, "rft.adopt.u1").await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");

        let (sb, _) = sandbox(SandboxConfig {
            adopt: true,
            ..SandboxConfig::default()
        })
        .await;
        let (status, _, body) = refresh(&sb, "rft.adopt.u1").await;
        assert_eq!(status, 200);
        assert_eq!(str_field(&body, "open_id"), "u1");
        let new = str_field(&body, "refresh_token").to_owned();
        assert_token(&new, "rft.");
        // The adopted token is now rotated away like any other, and not adopted again.
        let (status, _, body) = refresh(&sb, "rft.adopt.u1").await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        let (status, _, _) = refresh(&sb, &new).await;
        assert_eq!(status, 200);
        let (status, _, _) = refresh(&sb, "rft.unknown").await;
        assert_eq!(status, 400);
        let stats = sb.stats();
        assert_eq!(
            (
                stats.adopted,
                stats.refreshed,
                stats.reuse_rejected,
                stats.unknown_rejected
            ),
            (1, 2, 1, 1)
        );
        // The counters are served for a sandbox run as its own process.
        let served: Value = client()
            .get(format!("http://{}{STATS_PATH}", sb.addr()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(served["adopted"], 1);
        assert_eq!(served["refreshed"], 2);
    }

    #[tokio::test]
    async fn concurrent_presentations_of_one_token_refresh_once() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", None);
        let token = str_field(&g, "refresh_token").to_owned();
        let sb = Arc::new(sb);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (sb, token) = (sb.clone(), token.clone());
                tokio::spawn(async move { refresh(&sb, &token).await.0 })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            if task.await.unwrap() == 200 {
                ok += 1;
            }
        }
        assert_eq!(ok, 1);
        let stats = sb.stats();
        assert_eq!((stats.refreshed, stats.reuse_rejected), (1, 15));
    }

    #[tokio::test]
    async fn without_rotation_the_refresh_token_is_omitted_and_stays_valid() {
        let config = SandboxConfig {
            rotate: false,
            ..SandboxConfig::default()
        };
        let (sb, _) = sandbox(config).await;
        let g = sb.grant("u", "s", None);
        let token = str_field(&g, "refresh_token").to_owned();
        for _ in 0..3 {
            let (status, _, body) = refresh(&sb, &token).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.get("refresh_token").is_none(), "{body}");
            assert!(body["refresh_expires_in"].is_u64());
            assert!(sb.access_token_valid("u", str_field(&body, "access_token")));
        }
        assert_eq!(
            sb.current_refresh_token("u").as_deref(),
            Some(token.as_str())
        );
        let stats = sb.stats();
        assert_eq!((stats.refreshed, stats.reuse_rejected), (3, 0));
    }

    #[tokio::test]
    async fn sliding_refresh_expiry_starts_again_at_each_refresh() {
        let (sb, clock) = sandbox(SandboxConfig {
            sliding_refresh: true,
            ..SandboxConfig::default()
        })
        .await;
        let g = sb.grant("u", "s", Some(Duration::from_secs(10 * 86_400)));
        let mut token = str_field(&g, "refresh_token").to_owned();
        // Each refresh inside the lifetime renews it: 3 x 9 days outlive the first 10.
        for _ in 0..3 {
            clock.advance(Duration::from_secs(9 * 86_400));
            let (status, _, body) = refresh(&sb, &token).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["refresh_expires_in"], 10 * 86_400);
            token = str_field(&body, "refresh_token").to_owned();
        }
        // Left unused for its whole lifetime, it ends.
        clock.advance(Duration::from_secs(10 * 86_400));
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().expired_rejected, 1);
    }

    #[tokio::test]
    async fn refresh_expiry_counts_down_from_the_first_grant() {
        let (sb, clock) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", Some(Duration::from_secs(10 * 86_400)));
        assert_eq!(g["refresh_expires_in"], 10 * 86_400);
        let mut token = str_field(&g, "refresh_token").to_owned();

        clock.advance(Duration::from_secs(3 * 86_400));
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 200);
        assert_eq!(body["refresh_expires_in"], 7 * 86_400);
        assert_eq!(
            body["expires_in"], 7200,
            "access tokens still get a full life"
        );
        token = str_field(&body, "refresh_token").to_owned();

        clock.advance(Duration::from_secs(6 * 86_400 + 3600));
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 200);
        assert_eq!(body["refresh_expires_in"], 86_400 - 3600);
        token = str_field(&body, "refresh_token").to_owned();

        // Access tokens die with the clock too.
        let access = str_field(&body, "access_token").to_owned();
        assert!(sb.access_token_valid("u", &access));
        clock.advance(Duration::from_secs(7200));
        assert!(!sb.access_token_valid("u", &access));

        clock.advance(Duration::from_secs(86_400));
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().expired_rejected, 1);
    }

    #[tokio::test]
    async fn revoked_grants_answer_invalid_grant_until_granted_again() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", None);
        let token = str_field(&g, "refresh_token").to_owned();
        let other = sb.grant("v", "s", None);
        sb.revoke("u");
        sb.revoke("nobody"); // no-op
        assert!(!sb.access_token_valid("u", str_field(&g, "access_token")));

        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().revoked_rejected, 1);
        // Other users are unaffected.
        let (status, _, _) = refresh(&sb, str_field(&other, "refresh_token")).await;
        assert_eq!(status, 200);

        // Re-authorization: a fresh grant works, the pre-revocation token is now unknown.
        let again = sb.grant("u", "s", None);
        let (status, _, _) = refresh(&sb, str_field(&again, "refresh_token")).await;
        assert_eq!(status, 200);
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().unknown_rejected, 1);
    }

    #[tokio::test]
    async fn client_credentials_issue_app_tokens_without_a_refresh_token() {
        let (sb, clock) = sandbox(SandboxConfig::default()).await;
        let form = |secret: &str| {
            vec![
                ("client_key", "sandbox-client-key".to_owned()),
                ("client_secret", secret.to_owned()),
                ("grant_type", "client_credentials".to_owned()),
            ]
        };
        let (status, _, body) = post_form(&sb, &form("sandbox-client-secret")).await;
        assert_eq!(status, 200, "{body}");
        let first = str_field(&body, "access_token").to_owned();
        assert_token(&first, "clt.");
        assert_eq!(body["expires_in"], 7200);
        assert!(body.get("refresh_token").is_none(), "{body}");
        assert!(sb.client_token_valid(&first));
        clock.advance(Duration::from_secs(7200));
        assert!(!sb.client_token_valid(&first), "expired after 2 hours");
        let (_, _, body) = post_form(&sb, &form("sandbox-client-secret")).await;
        let second = str_field(&body, "access_token");
        assert_ne!(second, first);
        assert_eq!(sb.last_client_token().as_deref(), Some(second));
        let (status, _, body) = post_form(&sb, &form("wrong")).await;
        assert_eq!(status, 401);
        assert_error(&body, "invalid_client");
        let stats = sb.stats();
        assert_eq!((stats.client_tokens_issued, stats.client_rejected), (2, 1));
    }

    #[tokio::test]
    async fn wrong_client_credentials_are_invalid_client() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", None);
        let token = str_field(&g, "refresh_token").to_owned();
        for (field, value) in [("client_secret", "wrong"), ("client_key", "wrong")] {
            let mut form = refresh_form(&token);
            form.retain(|(k, _)| *k != field);
            form.push((field, value.to_owned()));
            let (status, _, body) = post_form(&sb, &form).await;
            assert_eq!(status, 401);
            assert_error(&body, "invalid_client");
        }
        assert_eq!(sb.stats().client_rejected, 2);
        assert_eq!(
            sb.current_refresh_token("u").as_deref(),
            Some(token.as_str())
        );
        assert_eq!(refresh(&sb, &token).await.0, 200);
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors_and_never_panic() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let g = sb.grant("u", "s", None);
        let token = str_field(&g, "refresh_token").to_owned();
        let client = client();

        // Not a form at all.
        let resp = client
            .post(sb.token_url())
            .header("content-type", "application/json")
            .body(r#"{"refresh_token":"x"}"#)
            .send()
            .await
            .unwrap();
        let (status, _, body) = split(resp).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_request");

        // No body, no content type.
        let resp = client.post(sb.token_url()).send().await.unwrap();
        let (status, _, body) = split(resp).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_request");

        let without = |name: &str| {
            let mut form = refresh_form(&token);
            form.retain(|(k, _)| *k != name);
            form
        };
        let (status, _, body) = post_form(&sb, &without("grant_type")).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_request");
        let (status, _, body) = post_form(&sb, &without("refresh_token")).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_request");

        let mut form = without("grant_type");
        form.push(("grant_type", "password".to_owned()));
        let (status, _, body) = post_form(&sb, &form).await;
        assert_eq!(status, 400);
        assert_error(&body, "unsupported_grant_type");

        let (status, _, body) = refresh(&sb, "rft.never-issued").await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        assert_eq!(sb.stats().unknown_rejected, 1);

        // None of that touched the grant.
        assert_eq!(refresh(&sb, &token).await.0, 200);
        assert_eq!(sb.stats().requests, 7);
    }

    #[tokio::test]
    async fn log_ids_are_unique_and_timestamped() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let (_, _, body) = refresh(&sb, "rft.unknown").await;
            let log_id = str_field(&body, "log_id").to_owned();
            assert!(log_id.starts_with("20251125093000SANDBOX"), "{log_id}");
            assert!(seen.insert(log_id));
        }
    }

    /// Asserts the token survived a faulted request: still current, still refreshable.
    async fn assert_not_consumed(sb: &Sandbox, token: &str) {
        assert_eq!(sb.current_refresh_token("u").as_deref(), Some(token));
        sb.set_faults(Faults::default());
        let (status, _, body) = refresh(sb, token).await;
        assert_eq!(status, 200, "{body}");
        let stats = sb.stats();
        assert_eq!((stats.refreshed, stats.reuse_rejected), (1, 0));
    }

    #[tokio::test]
    async fn server_error_fault() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let token = str_field(&sb.grant("u", "s", None), "refresh_token").to_owned();
        sb.set_faults(Faults {
            server_error: 1.0,
            ..Faults::default()
        });
        for _ in 0..4 {
            let (status, _, body) = refresh(&sb, &token).await;
            match status {
                503 => assert_error(&body, "temporarily_unavailable"),
                500 => assert_error(&body, "server_error"),
                other => panic!("unexpected status {other}: {body}"),
            }
        }
        assert_eq!(sb.stats().faults_injected, 4);
        assert_not_consumed(&sb, &token).await;
    }

    #[tokio::test]
    async fn rate_limited_fault() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let token = str_field(&sb.grant("u", "s", None), "refresh_token").to_owned();
        sb.set_faults(Faults {
            rate_limited: 1.0,
            retry_after_secs: 42,
            ..Faults::default()
        });
        let (status, retry_after, body) = refresh(&sb, &token).await;
        assert_eq!(status, 429);
        assert_eq!(retry_after.as_deref(), Some("42"));
        assert_error(&body, "rate_limit_exceeded");
        assert_eq!(sb.stats().faults_injected, 1);
        assert_not_consumed(&sb, &token).await;
    }

    #[tokio::test]
    async fn error_in_200_fault() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let token = str_field(&sb.grant("u", "s", None), "refresh_token").to_owned();
        sb.set_faults(Faults {
            error_in_200: 1.0,
            ..Faults::default()
        });
        let (status, _, body) = refresh(&sb, &token).await;
        assert_eq!(status, 200);
        assert_error(&body, "server_error");
        assert!(body.get("access_token").is_none(), "{body}");
        assert_eq!(sb.stats().faults_injected, 1);
        assert_not_consumed(&sb, &token).await;
    }

    #[tokio::test]
    async fn slow_fault_delays_then_answers_normally() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let token = str_field(&sb.grant("u", "s", None), "refresh_token").to_owned();
        sb.set_faults(Faults {
            slow: 1.0,
            slow_delay: Duration::from_millis(50),
            ..Faults::default()
        });
        let started = Instant::now();
        let (status, _, body) = refresh(&sb, &token).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(status, 200, "{body}");
        assert_token(str_field(&body, "refresh_token"), "rft.");
        let stats = sb.stats();
        assert_eq!((stats.faults_injected, stats.refreshed), (1, 1));
    }

    #[tokio::test]
    async fn zero_probability_faults_never_fire() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        sb.set_faults(Faults {
            retry_after_secs: 1,
            slow_delay: Duration::from_secs(3600),
            ..Faults::default()
        });
        for _ in 0..5 {
            assert_eq!(refresh(&sb, "rft.x").await.0, 400);
        }
        assert_eq!(sb.stats().faults_injected, 0);
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let url = sb.token_url();
        assert_eq!(refresh(&sb, "rft.x").await.0, 400);
        sb.shutdown().await;
        let result = client()
            .post(&url)
            .form(&[("grant_type", "refresh_token")])
            .send()
            .await;
        assert!(result.is_err(), "server still answering after shutdown");
    }

    const CB: &str = "http://127.0.0.1:8788/callback";

    /// Opens the authorization page without following the redirect; returns (status,
    /// Location query pairs).
    async fn authorize(sb: &Sandbox, extra: &[(&str, &str)]) -> (u16, HashMap<String, String>) {
        let mut q = vec![
            ("client_key", "sandbox-client-key"),
            ("response_type", "code"),
            ("scope", "user.info.basic,video.list"),
            ("redirect_uri", CB),
            ("state", "st8"),
        ];
        for (k, v) in extra {
            q.retain(|(n, _)| n != k);
            if !v.is_empty() {
                q.push((k, v));
            }
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut url = url::Url::parse(&sb.authorize_url()).unwrap();
        url.query_pairs_mut().extend_pairs(&q);
        let resp = client.get(url).send().await.unwrap();
        let status = resp.status().as_u16();
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned());
        let loc: Option<String> = loc;
        let loc: Option<String> = loc;
        let pairs = loc
            .map(|l| {
                let u = url::Url::parse(&l).unwrap();
                assert!(l.starts_with(CB), "{l}");
                u.query_pairs().into_owned().collect()
            })
            .unwrap_or_default();
        (status, pairs)
    }

    fn code_form(
        code: &str,
        redirect_uri: &str,
        verifier: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("client_key", "sandbox-client-key".to_owned()),
            ("client_secret", "sandbox-client-secret".to_owned()),
            ("code", code.to_owned()),
            ("grant_type", "authorization_code".to_owned()),
            ("redirect_uri", redirect_uri.to_owned()),
        ];
        if let Some(v) = verifier {
            f.push(("code_verifier", v.to_owned()));
        }
        f
    }

    #[tokio::test]
    async fn authorize_approves_with_single_use_code_bound_to_redirect_uri() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        sb.set_consent(Consent::Approve {
            open_id: "u-7".into(),
            grant_scopes: None,
        });
        let (status, q) = authorize(&sb, &[]).await;
        assert_eq!(status, 302);
        assert_eq!(q["state"], "st8");
        assert_eq!(q["scopes"], "user.info.basic,video.list");
        let code = q["code"].clone();

        // Wrong redirect_uri: refused, and the code is spent.
        let (status, _, body) =
            post_form(&sb, &code_form(&code, "http://127.0.0.1:1/other", None)).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        let (status, _, body) = post_form(&sb, &code_form(&code, CB, None)).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");

        let (_, q) = authorize(&sb, &[]).await;
        let (status, _, body) = post_form(&sb, &code_form(&q["code"], CB, None)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(str_field(&body, "open_id"), "u-7");
        assert_eq!(str_field(&body, "scope"), "user.info.basic,video.list");
        let rt = str_field(&body, "refresh_token").to_owned();
        assert_eq!(
            sb.current_refresh_token("u-7").as_deref(),
            Some(rt.as_str())
        );
        // Single use.
        let (status, _, body) = post_form(&sb, &code_form(&q["code"], CB, None)).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
        let stats = sb.stats();
        assert_eq!(
            (
                stats.codes_issued,
                stats.codes_exchanged,
                stats.codes_rejected
            ),
            (2, 1, 3)
        );
    }

    #[tokio::test]
    async fn authorize_grants_fewer_scopes_or_denies() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        sb.set_consent(Consent::Approve {
            open_id: "u".into(),
            grant_scopes: Some("user.info.basic".into()),
        });
        let (_, q) = authorize(&sb, &[]).await;
        assert_eq!(q["scopes"], "user.info.basic");
        sb.set_consent(Consent::Deny);
        let (status, q) = authorize(&sb, &[]).await;
        assert_eq!(status, 302);
        assert_eq!(q["error"], "access_denied");
        assert!(q.contains_key("error_description"));
        assert_eq!(q["state"], "st8");
        assert!(!q.contains_key("code"));
    }

    #[tokio::test]
    async fn authorize_validates_client_key_and_redirect_uri() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        assert_eq!(authorize(&sb, &[("client_key", "")]).await.0, 400);
        assert_eq!(authorize(&sb, &[("client_key", "other")]).await.0, 400);
        assert_eq!(authorize(&sb, &[("redirect_uri", "")]).await.0, 400);
        assert_eq!(
            authorize(&sb, &[("redirect_uri", "/relative")]).await.0,
            400
        );
        assert_eq!(sb.stats().codes_issued, 0);
    }

    #[tokio::test]
    async fn pkce_binds_the_code_to_its_verifier() {
        let (sb, _) = sandbox(SandboxConfig::default()).await;
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = crate::connect::s256_challenge(verifier);
        let pkce = [
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        for bad in [None, Some("wrong-verifier")] {
            let (_, q) = authorize(&sb, &pkce).await;
            let (status, _, body) = post_form(&sb, &code_form(&q["code"], CB, bad)).await;
            assert_eq!(status, 400, "{bad:?}");
            assert_error(&body, "invalid_grant");
        }
        let (_, q) = authorize(&sb, &pkce).await;
        let (status, _, _) = post_form(&sb, &code_form(&q["code"], CB, Some(verifier))).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn expired_code_is_refused() {
        let (sb, clock) = sandbox(SandboxConfig::default()).await;
        let (_, q) = authorize(&sb, &[]).await;
        clock.advance(Duration::from_secs(601));
        let (status, _, body) = post_form(&sb, &code_form(&q["code"], CB, None)).await;
        assert_eq!(status, 400);
        assert_error(&body, "invalid_grant");
    }
}

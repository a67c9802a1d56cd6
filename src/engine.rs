//! The refresh loop: claim due accounts (with a lease) -> refresh each under a global
//! concurrency cap and its provider's rate limit -> record the outcome (group-committed)
//! -> sleep until the next due time, a wake-up, or shutdown.
//!
//! Cancellation is checked only at safe points: before a request is sent. Once a provider
//! has been asked, the answer is always recorded, because a rotated refresh token that is
//! not stored is an account lost.

use crate::clock::{Clock, rfc3339};
use crate::config::Config;
use crate::model::{Account, ReauthReason};
use crate::policy::{self, RefreshTokenState};
use crate::provider::{FailureClass, Providers};
use crate::store::{Outcome, Recorded, Store, StoreError};
use crate::telemetry;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What the engine runs with; replaced as a whole on reload (SIGHUP).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub providers: Providers,
}

impl Settings {
    pub fn new(config: Config) -> Result<Settings, crate::provider::ProviderError> {
        let providers = Providers::from_config(&config)?;
        Ok(Settings { config, providers })
    }
}

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

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A unique lease owner for this process: host, pid and a random part.
pub fn lease_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into());
    format!(
        "{}:{}:{:08x}",
        host.trim(),
        std::process::id(),
        rand::random::<u32>()
    )
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    clock: Clock,
    settings: watch::Receiver<Arc<Settings>>,
    owner: Arc<str>,
    wake: Arc<Notify>,
    stats: Arc<Stats>,
}

impl Engine {
    pub fn new(store: Store, clock: Clock, settings: watch::Receiver<Arc<Settings>>) -> Engine {
        Engine {
            store,
            clock,
            settings,
            owner: lease_owner().into(),
            wake: Arc::new(Notify::new()),
            stats: Arc::new(Stats::default()),
        }
    }

    /// Wakes the loop early (an import, a `refresh` request, a reload).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs until `shutdown` is cancelled, then drains in-flight refreshes within the grace
    /// period.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), EngineError> {
        self.run_loop(shutdown, false).await
    }

    /// Refreshes everything due now, waits until every outcome is recorded, and returns.
    pub async fn run_due(&self, shutdown: CancellationToken) -> Result<(), EngineError> {
        self.run_loop(shutdown, true).await
    }

    async fn run_loop(&self, shutdown: CancellationToken, once: bool) -> Result<(), EngineError> {
        let tracker = TaskTracker::new();
        let mut settings_rx = self.settings.clone();
        let mut settings = settings_rx.borrow_and_update().clone();
        let mut permits = Arc::new(Semaphore::new(settings.config.refresh.concurrency));
        let mut store_failures: u32 = 0;
        // --once refreshes what was due when it started, each account once.
        let started_at = self.clock.now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Compared by pointer: the idle wait's `changed()` marks a new value as seen.
            if !Arc::ptr_eq(&settings, &settings_rx.borrow()) {
                settings = settings_rx.borrow_and_update().clone();
                // In-flight refreshes keep their permits of the old semaphore.
                permits = Arc::new(Semaphore::new(settings.config.refresh.concurrency));
            }
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let cfg = &settings.config;
            let want = (1 + permits.available_permits()).min(cfg.refresh.batch);
            let now = if once { started_at } else { self.clock.now() };
            let claimed = match self
                .store
                .claim_due(&self.owner, now, cfg.store.lease, want)
                .await
            {
                Ok(c) => {
                    store_failures = 0;
                    c
                }
                Err(e) => {
                    store_failures += 1;
                    let wait = policy::backoff(
                        store_failures,
                        Duration::from_secs(1),
                        Duration::from_secs(60),
                        None,
                        &mut rand::rng(),
                    );
                    tracing::error!(event = "claim_failed", error = %e, retry_in_ms = wait.as_millis() as u64, "cannot claim due accounts");
                    drop(first);
                    if once {
                        tracker.close();
                        tracker.wait().await;
                        return Err(e.into());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            self.stats.heartbeat.store(now, Ordering::Relaxed);
            if claimed.is_empty() {
                drop(first);
                if once {
                    // Wait for in-flight work: a transient failure may make an account due
                    // again, but --once refreshes each due account once only.
                    break;
                }
                let next = self.store.next_due(now).await.unwrap_or(None);
                let idle_until = self.clock.now_millis() + cfg.refresh.max_idle.as_millis() as i64;
                let deadline = next
                    .map(|t| (t * 1000).min(idle_until))
                    .unwrap_or(idle_until);
                tracing::trace!(event = "idle", next_due = next.map(rfc3339), "nothing due");
                tokio::select! {
                    _ = self.clock.sleep_until_millis(deadline) => {}
                    _ = self.wake.notified() => {}
                    _ = async { if settings_rx.changed().await.is_err() { std::future::pending::<()>().await } } => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let mut first = Some(first);
            for account in claimed {
                let permit = match first.take() {
                    Some(p) => p,
                    None => permits
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore is never closed"),
                };
                let this = self.clone();
                let settings = settings.clone();
                let shutdown = shutdown.clone();
                let lease_until = now + cfg.store.lease.as_secs() as i64;
                let span = tracing::info_span!("refresh", account = account.id, provider = %account.provider);
                tracker.spawn(
                    async move {
                        this.refresh_one(&settings, account, lease_until, &shutdown)
                            .await;
                        drop(permit);
                        this.wake.notify_one();
                    }
                    .instrument(span),
                );
            }
        }
        tracker.close();
        if once {
            tracker.wait().await;
            return Ok(());
        }
        let grace = settings.config.shutdown.grace;
        tracing::info!(
            event = "draining",
            in_flight = tracker.len(),
            grace_ms = grace.as_millis() as u64,
            "stopped claiming; finishing in-flight refreshes"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            // What is left was already sent: its answer may carry a rotated refresh token,
            // so it is still awaited (each request is bounded by refresh.request_timeout).
            tracing::warn!(
                event = "drain_timeout",
                in_flight = tracker.len(),
                "grace period over; still waiting for requests already sent to the provider"
            );
            tracker.wait().await;
        }
        Ok(())
    }

    /// One account: refresh, decide, record, log. Never returns an error: every way it can
    /// end is recorded or logged.
    async fn refresh_one(
        &self,
        settings: &Settings,
        account: Account,
        lease_until: i64,
        shutdown: &CancellationToken,
    ) {
        let cfg = &settings.config;
        let owner = self.owner.to_string();
        let now = self.clock.now();
        // A refresh token past its end cannot work: flag without asking the provider.
        if policy::refresh_token_state(now, account.refresh_expires_at, cfg.reauth.window)
            == RefreshTokenState::Expired
        {
            let outcome = Outcome::Rejected {
                account_id: account.id,
                generation: account.generation,
                reason: ReauthReason::RefreshTokenExpired,
                at: now,
                error: format!(
                    "refresh token expired at {}",
                    rfc3339(account.refresh_expires_at.unwrap_or(now))
                ),
                http_status: None,
                duration_ms: 0,
            };
            self.finish(&account, outcome, 0).await;
            return;
        }
        let Some(provider) = settings.providers.get(&account.provider) else {
            let outcome = Outcome::ConfigError {
                account_id: account.id,
                owner,
                at: now,
                next_refresh_at: now + cfg.refresh.config_error_retry.as_secs() as i64,
                error: format!(
                    "provider {:?} is not configured or disabled: add [providers.{}] to the config",
                    account.provider, account.provider
                ),
                http_status: None,
                duration_ms: 0,
            };
            self.finish(&account, outcome, 0).await;
            return;
        };
        // Safe point: nothing has been sent yet, so shutdown may still give the lease back.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let outcome = Outcome::Released { account_id: account.id, owner };
                self.finish(&account, outcome, 0).await;
                return;
            }
            _ = provider.ready() => {}
        }
        // The rate limit may have kept us waiting: never send with a lease that could expire
        // before the answer is stored, or another process could refresh the account too.
        let needed =
            (cfg.refresh.request_timeout + std::time::Duration::from_secs(5)).as_secs() as i64;
        if self.clock.now() + needed > lease_until {
            tracing::debug!(
                event = "lease_too_short",
                account = account.id,
                "lease would expire during the request; giving it back"
            );
            let outcome = Outcome::Released {
                account_id: account.id,
                owner,
            };
            self.finish(&account, outcome, 0).await;
            return;
        }
        let started = Instant::now();
        let result = provider.refresh(&account.refresh_token).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let now = self.clock.now();
        let outcome = match result {
            Ok((tokens, status)) => {
                match &tokens.subject {
                    Some(s) if s != &account.subject => Outcome::Rejected {
                        account_id: account.id,
                        generation: account.generation,
                        reason: ReauthReason::SubjectMismatch,
                        at: now,
                        error: format!(
                            "the provider returned tokens for user {:?}, not this account's {:?}; nothing stored",
                            // Provider-chosen: bounded before it reaches the log and the store.
                            s.chars().take(64).collect::<String>(),
                            account.subject
                        ),
                        http_status: Some(status),
                        duration_ms,
                    },
                    _ => {
                        let access_expires_at = now + tokens.expires_in;
                        let next = policy::next_refresh_at(
                            &cfg.refresh.timing(),
                            access_expires_at,
                            tokens.expires_in,
                            Some(now),
                            &mut rand::rng(),
                        );
                        let refresh_expires_at = tokens
                            .refresh_expires_in
                            .map(|s| now + s)
                            .or(account.refresh_expires_at);
                        let (status_after, reason) = policy::status_for(
                            policy::refresh_token_state(now, refresh_expires_at, cfg.reauth.window),
                        );
                        Outcome::Rotated {
                            account_id: account.id,
                            generation: account.generation,
                            tokens,
                            at: now,
                            next_refresh_at: next,
                            status: status_after,
                            reauth_reason: reason,
                            http_status: Some(status),
                            duration_ms,
                        }
                    }
                }
            }
            Err(f) => match f.class {
                FailureClass::Transient => {
                    let failures = (account.failures + 1).clamp(1, u32::MAX as i64) as u32;
                    let delay = policy::backoff(
                        failures,
                        cfg.refresh.backoff_base,
                        cfg.refresh.backoff_max,
                        f.retry_after,
                        &mut rand::rng(),
                    );
                    Outcome::Transient {
                        account_id: account.id,
                        owner,
                        at: now,
                        next_refresh_at: now + delay.as_secs().max(1) as i64,
                        error: f.message,
                        http_status: f.http_status,
                        duration_ms,
                    }
                }
                FailureClass::Config => Outcome::ConfigError {
                    account_id: account.id,
                    owner,
                    at: now,
                    next_refresh_at: now + cfg.refresh.config_error_retry.as_secs() as i64,
                    error: f.message,
                    http_status: f.http_status,
                    duration_ms,
                },
                FailureClass::Rejected(reason) => Outcome::Rejected {
                    account_id: account.id,
                    generation: account.generation,
                    reason,
                    at: now,
                    error: f.message,
                    http_status: f.http_status,
                    duration_ms,
                },
            },
        };
        self.finish(&account, outcome, duration_ms).await;
    }

    /// Records an outcome, then (only once it is durable) logs it.
    async fn finish(&self, account: &Account, outcome: Outcome, duration_ms: i64) {
        let id = account.id;
        let provider = account.provider.as_str();
        // Progress for the watchdog, also while the loop itself waits for permits.
        self.stats
            .heartbeat
            .store(self.clock.now(), Ordering::Relaxed);
        let recorded = self.store.record(outcome.clone()).await;
        let s = &self.stats;
        let inc = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let recorded = match recorded {
            Ok(r) => r,
            Err(e) => {
                inc(&s.record_errors);
                tracing::error!(event = "record_failed", account = id, provider, error = %e,
                    "could not store the outcome of a refresh");
                return;
            }
        };
        match (&outcome, recorded) {
            (Outcome::Rotated { .. }, Recorded::Superseded)
            | (Outcome::Rejected { .. }, Recorded::Superseded) => {
                inc(&s.superseded);
                tracing::info!(
                    event = "refresh",
                    account = id,
                    provider,
                    outcome = "superseded",
                    duration_ms,
                    "another refresh had already rotated this account; nothing changed"
                );
            }
            (
                Outcome::Rotated {
                    next_refresh_at,
                    status,
                    reauth_reason,
                    tokens,
                    ..
                },
                r,
            ) => {
                inc(&s.rotated);
                if r == Recorded::Deferred {
                    inc(&s.deferred);
                }
                tracing::info!(event = "refresh", account = id, provider, outcome = "rotated",
                    duration_ms, new_refresh_token = tokens.refresh_token.is_some(),
                    commit = if r == Recorded::Deferred { "deferred" } else { "committed" },
                    next_refresh_at = %rfc3339(*next_refresh_at), "refreshed");
                if *status != account.status {
                    if let Some(reason) = reauth_reason {
                        inc(&s.flagged);
                        let refresh_expires_at = tokens
                            .refresh_expires_in
                            .map(|x| self.clock.now() + x)
                            .or(account.refresh_expires_at);
                        telemetry::reauth_required(
                            id,
                            provider,
                            &account.subject,
                            account.label.as_deref(),
                            reason.as_str(),
                            refresh_expires_at,
                        );
                    } else {
                        tracing::info!(
                            event = "reauth_cleared",
                            account = id,
                            provider,
                            "refresh token lifetime renewed: no re-authorization needed any more"
                        );
                    }
                }
            }
            (
                Outcome::Transient {
                    next_refresh_at,
                    error,
                    http_status,
                    ..
                },
                _,
            ) => {
                inc(&s.transient);
                tracing::warn!(event = "refresh", account = id, provider, outcome = "transient", duration_ms,
                    http_status, failures = account.failures + 1, error = %error,
                    retry_at = %rfc3339(*next_refresh_at), "refresh failed, will retry");
            }
            (
                Outcome::ConfigError {
                    next_refresh_at,
                    error,
                    http_status,
                    ..
                },
                _,
            ) => {
                inc(&s.config_errors);
                tracing::error!(event = "provider_config_error", account = id, provider, outcome = "config_error",
                    duration_ms, http_status, error = %error, retry_at = %rfc3339(*next_refresh_at),
                    "the provider rejected our client configuration; check [providers.{provider}]");
            }
            (
                Outcome::Rejected {
                    reason,
                    error,
                    http_status,
                    ..
                },
                _,
            ) => {
                inc(&s.flagged);
                tracing::info!(event = "refresh", account = id, provider, outcome = "rejected", duration_ms,
                    http_status, error = %error, "refresh rejected for good");
                telemetry::reauth_required(
                    id,
                    provider,
                    &account.subject,
                    account.label.as_deref(),
                    reason.as_str(),
                    account.refresh_expires_at,
                );
            }
            (Outcome::Released { .. }, _) => {
                inc(&s.released);
                tracing::debug!(
                    event = "lease_released",
                    account = id,
                    provider,
                    "not started before shutdown"
                );
            }
        }
    }
}

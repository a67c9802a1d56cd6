//! The refresh loop: claim due accounts (with a lease) -> refresh each under a global
//! concurrency cap and its provider's rate limit -> record the outcome (group-committed)
//! -> sleep until the next due time, a wake-up, or shutdown.
//!
//! Cancellation is checked only at safe points: before a request is sent. Once a provider
//! has been asked, the answer is always recorded, because a rotated refresh token that is
//! not stored is an account lost.

use crate::circuit::{self, Circuit, Permit};
use crate::clock::{Clock, rfc3339};
use crate::config::Config;
use crate::events::{Event, Events};
use crate::model::TokenSet;
use crate::model::{Account, ReauthReason};
use crate::policy::{self, RefreshTokenState};
use crate::provider::profile::Credential;
use crate::provider::response::{Answer, Granted};
use crate::provider::{FailureClass, Providers};
use crate::provider_state::{Change, ConfigState};
use crate::store::{Outcome, Recorded, Store, StoreError};
use crate::telemetry;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
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

/// How often the loop looks again while backpressure holds new claims back.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(100);

/// What a refresh task holds or must still get before it may send its request.
struct Gate {
    /// This provider's claim slot, when one was free at claim time.
    slot: Option<OwnedSemaphorePermit>,
    /// The global concurrency cap (refresh.concurrency).
    permits: Arc<Semaphore>,
    /// Unix time the claim's lease ends.
    lease_until: i64,
    /// The lease owner of this claim: the process's owner plus the claim's number, so the
    /// record of one attempt can never give back (or keep) the lease of a later claim of
    /// the same account by this process.
    owner: String,
}

/// A unique lease owner for this process: host, pid and a random part.
pub fn lease_owner() -> String {
    crate::store::instance::new_owner()
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    clock: Clock,
    settings: watch::Receiver<Arc<Settings>>,
    owner: Arc<str>,
    wake: Arc<Notify>,
    stats: Arc<Stats>,
    events: Events,
    metrics: Arc<crate::metrics::Metrics>,
    /// Per provider: does it refuse our configuration? `ProviderRejected` is announced once
    /// per outage, not once per account, and one account's odd answer is not the provider's.
    provider_states: Arc<std::sync::Mutex<std::collections::HashMap<String, ConfigState>>>,
    /// Per provider: its circuit breaker (`circuit`).
    circuits: Arc<std::sync::Mutex<std::collections::HashMap<String, Circuit>>>,
}

impl Engine {
    pub fn new(store: Store, clock: Clock, settings: watch::Receiver<Arc<Settings>>) -> Engine {
        // The store's owner names its instance lock: others tell our leases alive by it.
        let owner: Arc<str> = store.owner().into();
        Engine {
            store,
            clock,
            settings,
            owner,
            wake: Arc::new(Notify::new()),
            stats: Arc::new(Stats::default()),
            events: Events::default(),
            metrics: Arc::default(),
            provider_states: Arc::default(),
            circuits: Arc::default(),
        }
    }

    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// State changes of the accounts this engine refreshes.
    pub fn events(&self) -> Events {
        self.events.clone()
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
        self.metrics.providers_known(settings.providers.names());
        let mut permits = Arc::new(Semaphore::new(settings.config.refresh.concurrency));
        let mut store_failures: u32 = 0;
        let mut claims: u64 = 0;
        // --once refreshes what was due when it started, each account once.
        let started_at = self.clock.now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Compared by pointer: the idle wait's `changed()` marks a new value as seen.
            if !Arc::ptr_eq(&settings, &settings_rx.borrow()) {
                settings = settings_rx.borrow_and_update().clone();
                self.metrics.providers_known(settings.providers.names());
                // In-flight refreshes keep their permits of the old semaphore.
                permits = Arc::new(Semaphore::new(settings.config.refresh.concurrency));
            }
            let cfg = &settings.config;
            // Claims are bounded by each provider's slots, not by the global permits: a
            // provider that is throttled or stalled holds its own slots only, and its
            // accounts are not claimed until one frees up.
            let mut skip = settings.providers.saturated();
            skip.extend(self.held_providers());
            let free = settings.providers.free_slots();
            if free == 0 && !settings.providers.is_empty() {
                if once && tracker.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(cfg.refresh.max_idle) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            if !self.durability_allows(cfg) {
                if once && tracker.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(BACKPRESSURE_POLL) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let want = free.clamp(1, cfg.refresh.batch);
            let now = if once { started_at } else { self.clock.now() };
            claims += 1;
            let claim_owner = format!("{}:{claims}", self.owner);
            let claimed = match self
                .store
                .claim_due_except(&claim_owner, now, cfg.store.lease, want, skip.clone())
                .await
            {
                Ok(c) => {
                    store_failures = 0;
                    c
                }
                Err(e) => {
                    store_failures += 1;
                    // At least a second: a failing store is not asked again at once.
                    let wait = policy::backoff(
                        store_failures,
                        Duration::from_secs(1),
                        Duration::from_secs(60),
                        None,
                        &mut rand::rng(),
                    )
                    .max(Duration::from_secs(1));
                    tracing::error!(event = "claim_failed", error = %e, retry_in_ms = wait.as_millis() as u64, "cannot claim due accounts");
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
                if once {
                    // Accounts of saturated providers are claimed once their refreshes
                    // finish; anything else due was taken. Wait for in-flight work: a
                    // transient failure may make an account due again, but --once
                    // refreshes each due account once only.
                    if skip.is_empty() || tracker.is_empty() {
                        break;
                    }
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
                let next = self
                    .store
                    .next_due_except(now, skip.clone())
                    .await
                    .unwrap_or(None);
                let idle_until = self.clock.now_millis() + cfg.refresh.max_idle.as_millis() as i64;
                let deadline = next
                    .map(|t| (t * 1000).min(idle_until))
                    .unwrap_or(idle_until)
                    .min(self.next_probe().unwrap_or(i64::MAX));
                tracing::trace!(event = "idle", next_due = next.map(rfc3339), "nothing due");
                tokio::select! {
                    _ = self.clock.sleep_until_millis(deadline) => {}
                    _ = self.wake.notified() => {}
                    _ = async { if settings_rx.changed().await.is_err() { std::future::pending::<()>().await } } => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            for account in claimed {
                // A slot now if one is free; otherwise the task waits for one (holding no
                // global permit) and the provider counts as saturated meanwhile.
                let slot = settings
                    .providers
                    .get(&account.provider)
                    .and_then(|p| p.try_slot());
                let this = self.clone();
                let settings = settings.clone();
                let shutdown = shutdown.clone();
                let permits = permits.clone();
                let lease_until = now + cfg.store.lease.as_secs() as i64;
                let owner = claim_owner.clone();
                let span = tracing::info_span!("refresh", account = account.id, provider = %account.provider);
                tracker.spawn(
                    async move {
                        let gate = Gate {
                            slot,
                            permits,
                            lease_until,
                            owner,
                        };
                        this.refresh_one(&settings, account, gate, &shutdown).await;
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

    /// Backpressure: no new claims while answers wait for durability beyond
    /// `refresh.concurrency`, or while neither the database nor the recovery file can take
    /// a rotated token (a full disk, a stalled database, a vanished store file).
    fn durability_allows(&self, cfg: &Config) -> bool {
        let ok = self.store.may_refresh(cfg.refresh.concurrency);
        if !ok {
            tracing::debug!(
                event = "backpressure",
                "not claiming: earlier rotated tokens are not durable yet"
            );
        }
        ok
    }

    /// One account: refresh, decide, record, log. Never returns an error: every way it can
    /// end is recorded or logged.
    async fn refresh_one(
        &self,
        settings: &Settings,
        account: Account,
        gate: Gate,
        shutdown: &CancellationToken,
    ) {
        let Gate {
            slot,
            permits,
            lease_until,
            owner,
        } = gate;
        let cfg = &settings.config;
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
            let error = format!("provider {:?} is not configured", account.provider);
            self.finish(&account, outcome, 0).await;
            self.provider_state(&account.provider, Some(&error), ConfigState::config_error);
            return;
        };
        let profile = provider.profile();
        // Long-lived access tokens (Instagram, Facebook, Threads) are extended with
        // themselves: once expired, only a new login helps.
        if profile.credential == Credential::AccessToken && account.access_expires_at <= now {
            let outcome = Outcome::Rejected {
                account_id: account.id,
                generation: account.generation,
                reason: ReauthReason::RefreshTokenExpired,
                at: now,
                error: format!(
                    "the long-lived access token expired at {}: it cannot be extended any more",
                    rfc3339(account.access_expires_at)
                ),
                http_status: None,
                duration_ms: 0,
            };
            self.finish(&account, outcome, 0).await;
            return;
        }
        // Instagram and Threads refuse to extend a token younger than 24 hours. The age is
        // counted from our last refresh, else from when the account was stored (a token is
        // never younger than that); a token that would expire first is tried anyway.
        let issued_at = account.last_refreshed_at.unwrap_or(account.created_at);
        let old_enough_at = issued_at + profile.min_token_age.as_secs() as i64;
        if now < old_enough_at && old_enough_at < account.access_expires_at - 60 {
            let outcome = Outcome::Transient {
                account_id: account.id,
                owner,
                at: now,
                next_refresh_at: old_enough_at
                    .min(account.access_expires_at - 1)
                    .max(now + 1),
                error: format!(
                    "the token is younger than providers.{}.min_token_age ({}); refreshing it at {}",
                    account.provider,
                    humantime::format_duration(profile.min_token_age),
                    rfc3339(old_enough_at)
                ),
                http_status: None,
                duration_ms: 0,
                answer_lost: false,
            };
            self.finish(&account, outcome, 0).await;
            return;
        }
        // Safe points: nothing has been sent yet, so shutdown may still give the lease back.
        // Order: this provider's slot, its rate limit, then a global permit, so waiting on
        // one provider never holds a permit another provider's refresh could use.
        let released = |owner: String| Outcome::Released {
            account_id: account.id,
            owner,
        };
        // The waits may be long (a throttled provider): never send with a lease that could
        // expire before the answer is stored, or another claim could refresh the account
        // too. A wait that reaches that point gives the lease back at once, rather than
        // letting it lapse, which the next claim would take for a crashed attempt.
        let needed =
            (cfg.refresh.request_timeout + std::time::Duration::from_secs(5)).as_secs() as i64;
        let give_up_at = lease_until.saturating_sub(needed).saturating_mul(1000);
        let _slot = match slot {
            Some(s) => s,
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.finish(&account, released(owner), 0).await;
                    return;
                }
                s = provider.slot() => s,
                _ = self.clock.sleep_until_millis(give_up_at) => {
                    self.finish(&account, released(owner), 0).await;
                    return;
                }
            },
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                self.finish(&account, released(owner), 0).await;
                return;
            }
            _ = provider.ready() => {}
            _ = self.clock.sleep_until_millis(give_up_at) => {
                self.finish(&account, released(owner), 0).await;
                return;
            }
        }
        let _permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                self.finish(&account, released(owner), 0).await;
                return;
            }
            p = permits.acquire_owned() => p.expect("semaphore is never closed"),
            _ = self.clock.sleep_until_millis(give_up_at) => {
                self.finish(&account, released(owner), 0).await;
                return;
            }
        };
        if self.clock.now() + needed > lease_until {
            tracing::debug!(
                event = "lease_too_short",
                account = account.id,
                "lease would expire during the request; giving it back"
            );
            self.finish(&account, released(owner), 0).await;
            return;
        }
        if !self.circuit_admits(&account) {
            self.finish(&account, released(owner), 0).await;
            return;
        }
        self.metrics
            .lateness(self.clock.now_millis() as f64 / 1000.0 - account.next_refresh_at as f64);
        let started = Instant::now();
        let result = provider
            .refresh(provider.credential_of(&account), self.clock.now())
            .await;
        // At least 1: 0 means "nothing was sent", and a loopback answer can take under 1 ms.
        let duration_ms = (started.elapsed().as_millis() as i64).max(1);
        let now = self.clock.now();
        let mut report = None;
        let class = result.as_ref().err().map(|f| (f.class, f.message.clone()));
        let outcome = match result {
            Ok((answer, status)) => {
                let outcome = self.answered(cfg, profile, &account, &answer, status, duration_ms);
                report = Some(answer);
                outcome
            }
            Err(f) => match f.class {
                FailureClass::Transient => {
                    let failures = (account.failures + 1).clamp(1, u32::MAX as i64) as u32;
                    let delay = match self.circuit_failure(&account, f.retry_after) {
                        // The circuit holds the provider's accounts back and lets them go
                        // together when it closes: no backoff of their own on top.
                        true => f
                            .retry_after
                            .unwrap_or_default()
                            .max(circuit::PROBE_INTERVAL),
                        false => policy::backoff(
                            failures,
                            cfg.refresh.backoff_base,
                            cfg.refresh.backoff_max,
                            f.retry_after,
                            &mut rand::rng(),
                        ),
                    };
                    let retry_at = now + delay.as_secs().max(1) as i64;
                    let mut error = f.message;
                    // Parked past the access token's expiry: said in the account's status
                    // (its last error), the log and a metric, never silently.
                    if retry_at > account.access_expires_at {
                        self.metrics.parked_past_expiry(&account.provider);
                        tracing::warn!(event = "parked_past_expiry", account = account.id, provider = %account.provider,
                            access_expires_at = %rfc3339(account.access_expires_at), retry_at = %rfc3339(retry_at),
                            "the provider is failing: this account's access token expires before its next refresh");
                        error.push_str(&format!(
                            "; parked past expiry: the access token expires at {}, the retry is at {}",
                            rfc3339(account.access_expires_at),
                            rfc3339(retry_at)
                        ));
                    }
                    Outcome::Transient {
                        account_id: account.id,
                        owner,
                        at: now,
                        next_refresh_at: retry_at,
                        error,
                        http_status: f.http_status,
                        duration_ms,
                        answer_lost: f.answer_lost,
                    }
                }
                FailureClass::Config | FailureClass::Unexpected => Outcome::ConfigError {
                    account_id: account.id,
                    owner,
                    at: now,
                    next_refresh_at: now + cfg.refresh.config_error_retry.as_secs() as i64,
                    error: f.message,
                    http_status: f.http_status,
                    duration_ms,
                },
                FailureClass::Rejected(reason) => {
                    let (reason, error) = match (reason, account.interrupted_at) {
                        (ReauthReason::InvalidGrant, Some(window_end)) => (
                            ReauthReason::RefreshInterrupted,
                            format!(
                                "{}; an earlier refresh of this account was cut off (its lease, ending {}, was never given back: the process died, the provider's answer was lost on the way, or the outcome could not be stored), so the provider most likely rotated the token in an answer that was lost",
                                f.message,
                                rfc3339(window_end)
                            ),
                        ),
                        (r, _) => (r, f.message),
                    };
                    Outcome::Rejected {
                        account_id: account.id,
                        generation: account.generation,
                        reason,
                        at: now,
                        error,
                        http_status: f.http_status,
                        duration_ms,
                    }
                }
            },
        };
        if !matches!(class, Some((FailureClass::Transient, _))) {
            self.circuit_answered(&account.provider);
        }
        let stored = matches!(outcome, Outcome::Rotated { .. });
        // What the answer says about the provider is known now: the provider accepts our
        // client (or not) whether or not the outcome can be stored.
        let name = account.provider.as_str();
        match class {
            None => self.provider_state(name, None, ConfigState::success),
            Some((FailureClass::Config, error)) => {
                self.provider_state(name, Some(&error), ConfigState::config_error)
            }
            Some((FailureClass::Unexpected, error)) => {
                self.provider_state(name, Some(&error), |s| s.unexpected(account.id))
            }
            Some((FailureClass::Rejected(_), _)) => self.provider_state(name, None, |s| {
                s.answered();
                None
            }),
            Some((FailureClass::Transient, _)) => {}
        }
        let recorded = self.finish(&account, outcome, duration_ms).await;
        if let Some(answer) = report {
            let stored = stored && matches!(recorded, Some(Recorded::Applied | Recorded::Deferred));
            report_answer(&account, &answer, stored);
        }
    }

    /// The outcome of a 2xx answer: its tokens (or its new refresh token alone, with the
    /// stored access token kept and asked for again soon), unless they are another user's.
    fn answered(
        &self,
        cfg: &Config,
        profile: &crate::provider::profile::Profile,
        account: &Account,
        answer: &Answer,
        status: u16,
        duration_ms: i64,
    ) -> Outcome {
        let now = self.clock.now();
        let subject = match &answer.granted {
            Granted::Tokens(t) => t.subject.as_ref(),
            Granted::RefreshTokenOnly { subject, .. } => subject.as_ref(),
        };
        if let Some(s) = subject
            && !crate::subject::same(&account.subject, s)
        {
            return Outcome::Rejected {
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
            };
        }
        let (mut tokens, access) = match &answer.granted {
            Granted::Tokens(tokens) => (
                tokens.clone(),
                policy::Access::Issued {
                    expires_in: tokens.expires_in,
                },
            ),
            Granted::RefreshTokenOnly {
                refresh_token,
                refresh_expires_in,
                ..
            } => {
                // The stored access token stays, with its own expiry (possibly past); the
                // account asks for a new one after a first backoff step.
                let tokens = TokenSet {
                    access_token: account.access_token.clone(),
                    refresh_token: Some(refresh_token.clone()),
                    expires_in: account.access_expires_at - now,
                    refresh_expires_in: *refresh_expires_in,
                    subject: None,
                    scope: None,
                    token_type: account.token_type.clone(),
                };
                let retry_in = policy::backoff(
                    1,
                    cfg.refresh.backoff_base,
                    cfg.refresh.backoff_max,
                    None,
                    &mut rand::rng(),
                );
                (tokens, policy::Access::Kept { retry_in })
            }
        };
        let schedule = policy::schedule(
            &policy::Fresh {
                obtained_at: now,
                access,
                refresh_expires_in: tokens.refresh_expires_in,
                origin: policy::Origin::Refresh {
                    stored_refresh_expires_at: account.refresh_expires_at,
                    ttl: profile.refresh_ttl,
                    min_token_age: profile.min_token_age,
                },
            },
            &cfg.refresh.timing(),
            cfg.reauth.window,
            now,
            &mut rand::rng(),
        );
        // What is stored is what the profile's TTL rule allows.
        tokens.refresh_expires_in = schedule.refresh_expires_at.map(|t| t - now);
        Outcome::Rotated {
            account_id: account.id,
            generation: account.generation,
            tokens,
            at: now,
            next_refresh_at: schedule.next_refresh_at,
            status: schedule.status,
            reauth_reason: schedule.reauth_reason,
            http_status: Some(status),
            duration_ms,
        }
    }

    /// Records an outcome, then (only once it is durable) logs it. Returns how it was
    /// recorded, or None when it could not be.
    async fn finish(
        &self,
        account: &Account,
        outcome: Outcome,
        duration_ms: i64,
    ) -> Option<Recorded> {
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
        let sent = (duration_ms > 0).then(|| duration_ms as f64 / 1000.0);
        let metric = |outcome: &str| self.metrics.refresh(provider, outcome, sent);
        let recorded = match recorded {
            Ok(r) => r,
            Err(e) => {
                metric("record_failed");
                inc(&s.record_errors);
                tracing::error!(event = "record_failed", account = id, provider, error = %e,
                    "could not store the outcome of a refresh");
                return None;
            }
        };
        match (&outcome, recorded) {
            (Outcome::Rotated { .. }, Recorded::Superseded)
            | (Outcome::Rejected { .. }, Recorded::Superseded) => {
                metric("superseded");
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
                metric("rotated");
                inc(&s.rotated);
                if r == Recorded::Deferred {
                    inc(&s.deferred);
                }
                tracing::info!(event = "refresh", account = id, provider, outcome = "rotated",
                    duration_ms, new_refresh_token = tokens.refresh_token.is_some(),
                    commit = if r == Recorded::Deferred { "deferred" } else { "committed" },
                    next_refresh_at = %rfc3339(*next_refresh_at), "refreshed");
                self.events.emit(Event::TokensChanged {
                    account_id: id,
                    provider: provider.to_string(),
                    subject: account.subject.clone(),
                });
                if *status != account.status {
                    if let Some(reason) = reauth_reason {
                        inc(&s.flagged);
                        let refresh_expires_at = tokens
                            .refresh_expires_in
                            .map(|x| self.clock.now() + x)
                            .or(account.refresh_expires_at);
                        self.reauth_required(account, reason.as_str(), refresh_expires_at);
                    } else {
                        self.events.emit(Event::Recovered {
                            account_id: id,
                            provider: provider.to_string(),
                            subject: account.subject.clone(),
                        });
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
                metric("transient");
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
                metric("config_error");
                inc(&s.config_errors);
                tracing::warn!(event = "refresh", account = id, provider, outcome = "config_error",
                    duration_ms, http_status, error = %error, retry_at = %rfc3339(*next_refresh_at),
                    "refresh refused for a configuration reason (see provider_config_error for the provider's state); will retry");
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
                metric("rejected");
                inc(&s.flagged);
                tracing::info!(event = "refresh", account = id, provider, outcome = "rejected", duration_ms,
                    http_status, error = %error, "refresh rejected for good");
                self.reauth_required(account, reason.as_str(), account.refresh_expires_at);
            }
            (Outcome::Released { .. }, _) => {
                metric("released");
                inc(&s.released);
                tracing::debug!(
                    event = "lease_released",
                    account = id,
                    provider,
                    "not started: shutdown, or the lease would have ended while waiting"
                );
            }
        }
        Some(recorded)
    }

    fn reauth_required(&self, account: &Account, reason: &str, refresh_expires_at: Option<i64>) {
        telemetry::reauth_required(
            account.id,
            &account.provider,
            &account.subject,
            account.label.as_deref(),
            reason,
            refresh_expires_at,
            crate::connect::web_reconnect_url(
                &self.settings.borrow().config,
                &account.provider,
                account.id,
            )
            .as_deref(),
        );
        self.events.emit(Event::ReauthRequired {
            account_id: account.id,
            provider: account.provider.clone(),
            subject: account.subject.clone(),
            label: account.label.clone(),
            reason: reason.to_string(),
            refresh_expires_at,
        });
    }

    /// Providers whose circuit holds their accounts back now: not claimed.
    fn held_providers(&self) -> Vec<String> {
        let now = self.clock.now_millis();
        let circuits = self.circuits.lock().expect("not poisoned");
        circuits
            .iter()
            .filter(|(_, c)| c.holding(now))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The earliest probe time of an open circuit (clock ms).
    fn next_probe(&self) -> Option<i64> {
        let circuits = self.circuits.lock().expect("not poisoned");
        circuits.values().filter_map(Circuit::probe_at).min()
    }

    /// Asks the account's provider circuit whether its request may be sent now.
    fn circuit_admits(&self, account: &Account) -> bool {
        let now = self.clock.now_millis();
        let mut circuits = self.circuits.lock().expect("not poisoned");
        let circuit = circuits.entry(account.provider.clone()).or_default();
        match circuit.permit(now) {
            Permit::Send => true,
            Permit::Probe => {
                tracing::info!(event = "provider_circuit_probe", account = account.id, provider = %account.provider,
                    "the provider's circuit is open: this refresh is the probe");
                true
            }
            Permit::Wait { .. } => false,
        }
    }

    /// Reports a transient failure to the account's provider circuit; true while it is open.
    fn circuit_failure(&self, account: &Account, retry_after: Option<Duration>) -> bool {
        let now = self.clock.now_millis();
        let mut circuits = self.circuits.lock().expect("not poisoned");
        let circuit = circuits.entry(account.provider.clone()).or_default();
        if circuit.failure(now, retry_after) == Some(circuit::Change::Opened) {
            self.metrics.circuit_open(&account.provider, true);
            tracing::warn!(event = "provider_circuit_open", provider = %account.provider,
                failures = circuit::THRESHOLD, probe_every_ms = circuit::PROBE_INTERVAL.as_millis() as u64,
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                "the provider keeps failing: its accounts wait while one probe request per interval checks it");
        }
        circuit.is_open()
    }

    /// Reports a proper answer of `provider`: its circuit closes.
    fn circuit_answered(&self, provider: &str) {
        let closed = {
            let mut circuits = self.circuits.lock().expect("not poisoned");
            circuits.entry(provider.to_string()).or_default().answered()
        };
        if closed == Some(circuit::Change::Closed) {
            self.metrics.circuit_open(provider, false);
            tracing::info!(
                event = "provider_circuit_closed",
                provider,
                "the provider answers again: its waiting accounts are refreshed within its rate limit"
            );
            self.wake.notify_one();
        }
    }

    /// Feeds one answer of `provider` to its configuration state and announces a change.
    fn provider_state(
        &self,
        provider: &str,
        error: Option<&str>,
        feed: impl FnOnce(&mut ConfigState) -> Option<Change>,
    ) {
        let change = {
            let mut states = self.provider_states.lock().expect("not poisoned");
            feed(states.entry(provider.to_string()).or_default())
        };
        match change {
            Some(Change::Rejecting) => {
                self.metrics.provider_rejecting(provider, true);
                let error = error.unwrap_or_default().to_string();
                tracing::error!(event = "provider_config_error", provider, error = %error,
                    "the provider rejects our client configuration; check [providers.{provider}]");
                self.events.emit(Event::ProviderRejected {
                    provider: provider.to_string(),
                    error,
                });
            }
            Some(Change::Recovered) => {
                self.metrics.provider_rejecting(provider, false);
                tracing::info!(
                    event = "provider_recovered",
                    provider,
                    "the provider accepts our client configuration again"
                );
                self.events.emit(Event::ProviderRecovered {
                    provider: provider.to_string(),
                });
            }
            None => {}
        }
    }
}

/// Reports what was wrong with an answer, naming the account, once it is known whether its
/// new credential was stored.
fn report_answer(account: &Account, answer: &Answer, stored: bool) {
    let (id, provider) = (account.id, account.provider.as_str());
    let refresh_only = matches!(answer.granted, Granted::RefreshTokenOnly { .. });
    for problem in &answer.problems {
        match (stored, refresh_only) {
            (true, true) => {
                tracing::warn!(event = "malformed_token_response", account = id, provider, problem = %problem,
                "the answer has no usable access token; its new refresh token was stored and the access token is asked for again soon")
            }
            (true, false) => {
                tracing::warn!(event = "malformed_token_response", account = id, provider, problem = %problem,
                "the answer has a broken field; its new token was stored anyway and the account is refreshed again soon")
            }
            (false, _) => {
                tracing::warn!(event = "malformed_token_response", account = id, provider, problem = %problem,
                "the answer has a broken field; nothing of it was stored")
            }
        }
    }
    if answer.rotation_missing {
        tracing::warn!(
            event = "rotation_missing",
            account = id,
            provider,
            "the provider rotates refresh tokens but returned none; keeping the stored one"
        );
    }
}

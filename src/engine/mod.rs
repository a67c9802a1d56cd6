//! The refresh loop: claim due accounts (with a lease) -> refresh each under a global
//! concurrency cap and its provider's rate limit -> record the outcome (group-committed)
//! -> sleep until the next due time (less the claim lead, `policy::CLAIM_LEAD_MS`), a
//! wake-up, or shutdown.
//!
//! One refresh (`refresh_one`) is a short sequence: decide before the request
//! (`decide::before_request`) -> wait for its turn -> send -> decide after the answer
//! (`decide::after_answer`) -> record -> announce (`announce`). The decisions are pure and
//! unit-tested in `decide`; this file holds the waiting and the sending.
//!
//! Cancellation is checked only at safe points: before a request is sent. Once a provider
//! has been asked, the answer is always recorded, because a rotated refresh token that is
//! not stored is an account lost.

mod announce;
mod circuits;
pub mod decide;
mod in_flight;
mod settings;
mod stats;

pub use circuits::ProviderHealth;
pub use settings::Settings;
pub use stats::{Stats, StatsSnapshot};

use crate::circuit::Circuit;
use crate::clock::{Clock, rfc3339};
use crate::config::Config;
use crate::events::Events;
use crate::model::Account;
use crate::permits::{Bound, Permit};
use crate::policy;
use crate::provider::{FailureClass, Provider};
use crate::provider_state::ConfigState;
use crate::store::{Outcome, Recorded, Store, StoreError};
use announce::report_answer;
use decide::Before;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often the loop looks again while backpressure holds new claims back.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(100);
/// How often `--once` looks again while it waits for in-flight refreshes. A finished
/// refresh wakes the loop just before it leaves the tracker, so the loop can see it still
/// running and wait for a wake that never comes: `--once` must not hang on that.
const ONCE_POLL: Duration = Duration::from_millis(20);

/// What a refresh task holds or must still get before it may send its request.
struct Gate {
    /// Its room among this provider's claims, when there was some at claim time.
    claimed: Option<Permit>,
    /// The global concurrency cap (refresh.concurrency).
    permits: Bound,
    /// Unix time the claim's lease ends.
    lease_until: i64,
    /// The lease owner of this claim: the process's owner plus the claim's number, so the
    /// record of one attempt can never give back (or keep) the lease of a later claim of
    /// the same account by this process.
    owner: String,
}

/// What a request holds until its answer is in: its claim's room, its provider's slot and
/// a global permit.
type Turn = (Permit, Permit, Permit);

/// Why a refresh stopped waiting for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Shutdown,
    /// Its lease would end before an answer sent now could be stored.
    Deadline,
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    clock: Clock,
    settings: watch::Receiver<Arc<Settings>>,
    owner: Arc<str>,
    wake: Arc<Notify>,
    /// The refreshes under way; each one ending wakes the loop apart from `wake`.
    in_flight: Arc<in_flight::InFlight>,
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
            in_flight: Arc::default(),
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
        let permits = Bound::new(settings.config.refresh.concurrency);
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
                // One bound, resized: the refreshes in flight still count against a new
                // size.
                permits.resize(settings.config.refresh.concurrency);
            }
            let cfg = &settings.config;
            // Claims are bounded by each provider's room (its slots and as many claimed
            // ahead, `policy::claim_depth`), not by the global permits: a provider that is
            // throttled or stalled holds its own room only, and its accounts are not claimed
            // until some frees up.
            let mut skip = settings.providers.saturated();
            skip.extend(self.held_providers());
            let free = settings.providers.claim_room(&skip);
            // While refreshes are in flight, claim only once there is room for a quarter of
            // a provider's slots (see `worth_claiming`); each one that ends wakes the loop.
            let wait_for_slots = !tracker.is_empty() && !settings.providers.worth_claiming(&skip);
            if (free == 0 || wait_for_slots) && !settings.providers.is_empty() {
                if once && tracker.is_empty() {
                    break;
                }
                let wait = if once {
                    ONCE_POLL
                } else {
                    cfg.refresh.max_idle
                };
                // A held provider's room does not count: its circuit's next probe is a
                // time to look again (one already due is not: waiting on it would spin).
                let next_probe = self.next_probe().filter(|&at| at > self.clock.now_millis());
                let probe = async {
                    match next_probe {
                        Some(at) => self.clock.sleep_until_millis(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = self.in_flight.one_ended() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = probe => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            if !self.durability_allows(cfg) {
                if once && tracker.is_empty() {
                    break;
                }
                // Each stored outcome wakes the loop: it looks again as soon as one is.
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = self.in_flight.one_ended() => {}
                    _ = tokio::time::sleep(BACKPRESSURE_POLL) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let want = free.clamp(1, cfg.refresh.batch);
            // The continuous loop claims what falls due within the claim lead, so a
            // second's accounts are sent as it begins. Leases are judged and set by the
            // real now in both modes: a --once run that outlasts a lease taken at its start
            // would otherwise claim accounts past their send deadline, give them back
            // (still due) and claim them again without end.
            let now_ms = self.clock.now_millis();
            let now = now_ms.div_euclid(1000);
            let due_by = if once {
                started_at
            } else {
                policy::due_by(now_ms)
            };
            // Refreshes that end from here on may have made something due unseen.
            self.in_flight.looking();
            claims += 1;
            let claim_owner = format!("{}:{claims}", self.owner);
            let claimed = match self
                .store
                .claim_due_except(
                    &claim_owner,
                    now,
                    due_by,
                    cfg.store.lease,
                    want,
                    skip.clone(),
                )
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
                        _ = self.in_flight.one_ended() => {}
                        _ = tokio::time::sleep(ONCE_POLL) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
                if self
                    .idle(now, now_ms, cfg, &skip, &mut settings_rx, &shutdown)
                    .await
                {
                    break;
                }
                continue;
            }
            // A claim that came back short took everything due and unleased: claiming again
            // at once would only walk past the accounts it just leased (in the claim, then
            // in the next-due query) to find nothing, so the loop waits as after an empty
            // claim.
            let drained = !once && skip.is_empty() && claimed.len() < want;
            for account in claimed {
                // Room now if there is some; otherwise the task waits for it (holding no
                // global permit) and the provider counts as saturated meanwhile.
                let claimed = settings
                    .providers
                    .get(&account.provider)
                    .and_then(|p| p.try_claim());
                let this = self.clone();
                let settings = settings.clone();
                let shutdown = shutdown.clone();
                let permits = permits.clone();
                let lease_until = now + cfg.store.lease.as_secs() as i64;
                let owner = claim_owner.clone();
                // Every event of a refresh names its account and provider itself, so the
                // span only helps at debug level (store jobs' lines); disabled, it costs
                // nothing, where an enabled one was formatted into every line.
                let span = tracing::debug_span!("refresh", account = account.id, provider = %account.provider);
                let running = self.in_flight.start();
                tracker.spawn(
                    async move {
                        let gate = Gate {
                            claimed,
                            permits,
                            lease_until,
                            owner,
                        };
                        let due_again = this.refresh_one(&settings, account, gate, &shutdown).await;
                        running.ended(due_again);
                    }
                    .instrument(span),
                );
            }
            if drained
                && self
                    .idle(now, now_ms, cfg, &skip, &mut settings_rx, &shutdown)
                    .await
            {
                break;
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

    /// Nothing (more) due now: waits until the next due account's wake-up (less the claim
    /// lead), `refresh.max_idle`, a circuit's next probe, a wake-up, a new configuration, or
    /// a refresh that ends making its account due before then. Returns true on shutdown.
    async fn idle(
        &self,
        now: i64,
        now_ms: i64,
        cfg: &Config,
        skip: &[String],
        settings_rx: &mut watch::Receiver<Arc<Settings>>,
        shutdown: &CancellationToken,
    ) -> bool {
        let next = self
            .store
            .next_due_except(now, skip.to_vec())
            .await
            .unwrap_or(None);
        let idle_until = self.clock.now_millis() + cfg.refresh.max_idle.as_millis() as i64;
        let deadline = next
            .map(|t| policy::wake_for_due(t, now_ms).min(idle_until))
            .unwrap_or(idle_until)
            .min(self.next_probe().unwrap_or(i64::MAX));
        tracing::trace!(event = "idle", next_due = next.map(rfc3339), "nothing due");
        // Nothing due: a refresh that ends makes the loop look again only if its account
        // is due before this wake-up (a retry, an account given back) or its next due time
        // is unknown, not after each rotation (`in_flight.rs`); while a provider has no
        // room for claims, its accounts wait for the first refresh of it to end.
        let skipped = !skip.is_empty();
        let refreshes_end = async {
            match skipped {
                true => self.in_flight.one_ended().await,
                false => {
                    let wake_for = |t| policy::wake_for_due(t, now_ms);
                    self.in_flight.due_before(deadline, wake_for).await
                }
            }
        };
        tokio::select! {
            _ = self.clock.sleep_until_millis(deadline) => false,
            _ = self.wake.notified() => false,
            _ = refreshes_end => false,
            _ = async { if settings_rx.changed().await.is_err() { std::future::pending::<()>().await } } => false,
            _ = shutdown.cancelled() => true,
        }
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

    /// One account: decide, wait for its turn, send, decide, record, announce. Never returns
    /// an error: every way it can end is recorded or logged. Returns when the account is
    /// due again, where its outcome was stored and says so (None: the loop looks again).
    async fn refresh_one(
        &self,
        settings: &Settings,
        account: Account,
        gate: Gate,
        shutdown: &CancellationToken,
    ) -> Option<i64> {
        let Gate {
            claimed,
            permits,
            lease_until,
            owner,
        } = gate;
        let cfg = &settings.config;
        let rules = &settings.rules;
        let provider = settings.providers.get(&account.provider);
        let provider = provider.map(|p| (p, decide::ProfileRules::of(p.profile())));
        let now_ms = self.clock.now_millis();
        let (provider, profile, credential, not_before) =
            match decide::before_request(&account, provider, rules, &owner, now_ms) {
                Before::Send {
                    provider,
                    profile,
                    credential,
                    not_before,
                } => (provider, profile, credential, not_before),
                Before::Record {
                    outcome,
                    provider_error,
                } => {
                    self.finish(&account, outcome, 0, None).await;
                    if let Some(error) = provider_error {
                        let name = &account.provider;
                        let id = account.id;
                        self.provider_state(name, id, Some(&error), ConfigState::config_error);
                    }
                    return None;
                }
            };
        // Safe points: nothing has been sent yet, so shutdown may still give the lease back.
        if let Some(at) = not_before {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.release(&account, owner).await;
                    return None;
                }
                _ = self.clock.sleep_until_millis(at) => {}
            }
        }
        let last_send_at = decide::last_send_at(lease_until, cfg.refresh.request_timeout);
        let waited = self
            .wait_turn(provider, claimed, permits, last_send_at, shutdown)
            .await;
        let lease_too_short = || {
            tracing::debug!(
                event = "lease_too_short",
                account = account.id,
                "lease would expire during the request; giving it back"
            );
        };
        let turn = match waited {
            Ok(turn) => turn,
            Err(stop) => {
                if stop == Stop::Deadline {
                    lease_too_short();
                }
                self.release(&account, owner).await;
                return None;
            }
        };
        // Checked again now, not only at the claim: the account may have waited for a
        // slot since. The circuit last, since it may make this request its probe.
        let send = if self.clock.now() > last_send_at {
            lease_too_short();
            false
        } else if !self.store.may_send() {
            tracing::debug!(
                event = "send_withheld",
                account = account.id,
                "the store cannot hold this lease or a rotated token now; giving it back"
            );
            false
        } else {
            self.circuit_admits(&account)
        };
        if !send {
            // Giving back waits for a commit: the slot and the permit go first.
            drop(turn);
            self.release(&account, owner).await;
            return None;
        }
        self.metrics
            .lateness(self.clock.now_millis() as f64 / 1000.0 - account.next_refresh_at as f64);
        let started = Instant::now();
        let result = provider.renew(credential, self.clock.now()).await;
        // The answer is in: the provider's slot and the global permit bound requests in
        // flight, so they go back now, with the claim's room, rather than after the durable
        // commit (which waits for a group and its fsync). The lease stays until the
        // outcome is recorded, and `durability_allows` bounds the answers still waiting to
        // be stored.
        drop(turn);
        // At least 1: 0 means "nothing was sent", and a loopback answer can take under 1 ms.
        let duration_ms = (started.elapsed().as_millis() as i64).max(1);
        let circuit_open = match &result {
            Err(f) if matches!(f.class, FailureClass::Transient) => {
                self.circuit_failure(&account, f.retry_after)
            }
            _ => false,
        };
        let attempt = decide::Attempt {
            owner: &owner,
            duration_ms,
            circuit_open,
            now: self.clock.now(),
        };
        let answer = result.as_ref().map(|(answer, status)| (answer, *status));
        let after =
            decide::after_answer(&account, profile, rules, answer, attempt, &mut rand::rng());
        self.announce_answer(&account, &after);
        let rotated = matches!(after.outcome, Outcome::Rotated { .. });
        let due_again = match &after.outcome {
            Outcome::Rotated {
                next_refresh_at, ..
            }
            | Outcome::Transient {
                next_refresh_at, ..
            } => Some(*next_refresh_at),
            _ => None,
        };
        let recorded = self
            .finish(&account, after.outcome, duration_ms, Some(lease_until))
            .await;
        if let Ok((answer, _)) = &result {
            let stored =
                rotated && matches!(recorded, Some(Recorded::Applied | Recorded::Deferred));
            report_answer(&account, answer, stored);
        }
        due_again.filter(|_| recorded == Some(Recorded::Applied))
    }

    /// Waits for the provider's claim room, one of its slots, its rate limit, then a global
    /// permit, in that order, so waiting on one provider never holds a permit another
    /// provider's refresh could use. Stops when shutdown comes first, or when the waits (a
    /// throttled provider) reach `last_send_at`: a request must never be sent with a lease
    /// that could end before its answer is stored, or another claim could refresh the
    /// account too.
    async fn wait_turn(
        &self,
        provider: &Provider,
        claimed: Option<Permit>,
        permits: Bound,
        last_send_at: i64,
        shutdown: &CancellationToken,
    ) -> Result<Turn, Stop> {
        let give_up_at = last_send_at.saturating_mul(1000);
        let claimed = match claimed {
            Some(c) => c,
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                c = provider.claim() => c,
                _ = self.clock.sleep_until_millis(give_up_at) => return Err(Stop::Deadline),
            },
        };
        // Claimed ahead: the account waits here for a request of this provider to end.
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
            s = provider.slot() => s,
            _ = self.clock.sleep_until_millis(give_up_at) => return Err(Stop::Deadline),
        };
        // The rate limit of the settings of now: a reload since the claim may have given the
        // provider a new one. (Its claims and slots are the same semaphores across reloads,
        // resized: `Providers::carry_over`.)
        let current = self
            .settings
            .borrow()
            .providers
            .get(&provider.name)
            .cloned();
        let pacer = current.as_deref().unwrap_or(provider);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
            _ = pacer.ready() => {}
            _ = self.clock.sleep_until_millis(give_up_at) => return Err(Stop::Deadline),
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
            p = permits.acquire() => p,
            _ = self.clock.sleep_until_millis(give_up_at) => return Err(Stop::Deadline),
        };
        Ok((claimed, slot, permit))
    }

    /// Gives the lease back at once, rather than letting it lapse, which the next claim
    /// would take for a crashed attempt.
    async fn release(&self, account: &Account, owner: String) {
        let outcome = Outcome::Released {
            account_id: account.id,
            owner,
        };
        self.finish(account, outcome, 0, None).await;
    }
}

//! What the engine says about a refresh once it is decided: the outcome recorded (then,
//! only once durable, logged, counted and emitted as events: a new flag once, a failing
//! account's recovery), the provider's configuration state, an account parked past its
//! expiry, and what was wrong with an answer.

use super::Engine;
use super::circuits::entry_of;
use super::decide::{self, After, ProviderSignal, Recovery};
use crate::clock::Rfc3339;
use crate::config::RefreshLines;
use crate::events::Event;
use crate::model::{Account, ReauthReason, Status};
use crate::provider::response::{Answer, Granted};
use crate::provider_state::{Change, ConfigState};
use crate::store::{Outcome, Recorded};
use crate::telemetry;
use std::sync::atomic::{AtomicU64, Ordering};

impl Engine {
    /// The level of a successful refresh's line (`log.refreshes`), as configured now.
    fn refresh_lines(&self) -> RefreshLines {
        self.settings.borrow().config.log.refreshes
    }

    /// Records an outcome, then (only once it is durable) logs it. Returns how it was
    /// recorded, or None when it could not be. `lease_until`: the attempt's lease, if it
    /// sent a request (a superseded answer says whether it outlived it).
    pub(super) async fn finish(
        &self,
        account: &Account,
        outcome: Outcome,
        duration_ms: i64,
        lease_until: Option<i64>,
    ) -> Option<Recorded> {
        let id = account.id;
        let provider = account.provider.as_str();
        // Progress for the watchdog, also while the loop itself waits for permits.
        self.stats
            .heartbeat
            .store(self.clock.now(), Ordering::Relaxed);
        // What is announced is taken before the outcome moves into the store, so its
        // tokens are never copied.
        let said = Said::of(&outcome);
        let recorded = self.store.record(outcome).await;
        let s = &self.stats;
        let inc = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let sent = (duration_ms > 0).then(|| duration_ms as f64 / 1000.0);
        let metric = |outcome: &'static str| {
            self.metrics
                .refresh(provider, outcome, sent, self.clock.now())
        };
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
        match (said, recorded) {
            (Said::Rotated { .. }, Recorded::Superseded)
            | (Said::Rejected { .. }, Recorded::Superseded) => {
                metric("superseded");
                inc(&s.superseded);
                // Its lease had ended: another claim could take the account over meanwhile
                // (the only way two refreshes of one account run at once).
                let lease_ended = lease_until.is_some_and(|until| self.clock.now() >= until);
                tracing::info!(
                    event = "refresh",
                    account = id,
                    provider,
                    outcome = "superseded",
                    lease_ended,
                    duration_ms,
                    "another refresh had already rotated this account, or took it over; nothing changed"
                );
            }
            (
                Said::Rotated {
                    at,
                    next_refresh_at,
                    status,
                    reauth_reason,
                    new_refresh_token,
                    refresh_expires_in,
                },
                r,
            ) => {
                metric("rotated");
                inc(&s.rotated);
                if r == Recorded::Deferred {
                    inc(&s.deferred);
                }
                let commit = if r == Recorded::Deferred {
                    "deferred"
                } else {
                    "committed"
                };
                let next_refresh_at = Rfc3339(next_refresh_at);
                // `log.refreshes`: the macro's level is fixed, so one call per level.
                match self.refresh_lines() {
                    RefreshLines::Info => tracing::info!(event = "refresh", account = id,
                        provider, outcome = "rotated", duration_ms, new_refresh_token, commit,
                        next_refresh_at = %next_refresh_at, "refreshed"),
                    RefreshLines::Debug => tracing::debug!(event = "refresh", account = id,
                        provider, outcome = "rotated", duration_ms, new_refresh_token, commit,
                        next_refresh_at = %next_refresh_at, "refreshed"),
                }
                self.events.emit_with(|| Event::TokensChanged {
                    account_id: id,
                    provider: provider.to_string(),
                    subject: account.subject.clone(),
                });
                if status != account.status
                    && let Some(reason) = reauth_reason
                {
                    inc(&s.flagged);
                    let refresh_expires_at = refresh_expires_in
                        .map(|x| self.clock.now() + x)
                        .or(account.refresh_expires_at);
                    self.reauth_required(account, reason.as_str(), refresh_expires_at);
                }
                if account.status.needs_human() && !status.needs_human() {
                    tracing::info!(
                        event = "reauth_cleared",
                        account = id,
                        provider,
                        "refresh token lifetime renewed: no re-authorization needed any more"
                    );
                }
                if let Some(from) = decide::recovery(account, status.needs_human(), at) {
                    self.recovered(account, from);
                }
            }
            (
                Said::Transient {
                    next_refresh_at,
                    error,
                    http_status,
                },
                _,
            ) => {
                metric("transient");
                inc(&s.transient);
                tracing::warn!(event = "refresh", account = id, provider, outcome = "transient", duration_ms,
                    http_status, failures = account.failures + 1, error = %error,
                    retry_at = %Rfc3339(next_refresh_at), "refresh failed, will retry");
            }
            (
                Said::ConfigError {
                    next_refresh_at,
                    error,
                    http_status,
                },
                _,
            ) => {
                metric("config_error");
                inc(&s.config_errors);
                tracing::warn!(event = "refresh", account = id, provider, outcome = "config_error",
                    duration_ms, http_status, error = %error, retry_at = %Rfc3339(next_refresh_at),
                    "refresh refused for a configuration reason (see provider_config_error for the provider's state); will retry");
            }
            (
                Said::Rejected {
                    reason,
                    error,
                    http_status,
                },
                _,
            ) => {
                metric("rejected");
                inc(&s.flagged);
                tracing::info!(event = "refresh", account = id, provider, outcome = "rejected", duration_ms,
                    http_status, error = %error, "refresh rejected for good");
                if decide::flag_already_announced(account) {
                    tracing::info!(
                        event = "reauth_still_required",
                        account = id,
                        provider,
                        reason = reason.as_str(),
                        "a forced refresh was rejected again: still flagged, not announced a second time"
                    );
                } else {
                    self.reauth_required(account, reason.as_str(), account.refresh_expires_at);
                }
            }
            (Said::Released, _) => {
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

    /// Announces a failing account that refreshes fine again: the `account_recovered` log
    /// event and the event (and webhook) of the same name.
    fn recovered(&self, account: &Account, from: Recovery) {
        let (failures, reason) = match from {
            Recovery::Failures(n) => (n, None),
            Recovery::Flag(r) => (account.failures, Some(r.as_str())),
        };
        telemetry::account_recovered(
            account.id,
            &account.provider,
            &account.subject,
            failures,
            reason,
        );
        self.events.emit(Event::Recovered {
            account_id: account.id,
            provider: account.provider.clone(),
            subject: account.subject.clone(),
        });
    }

    /// Tells the provider's circuit and configuration state what an answer said, and
    /// announces a retry parked past the access token's expiry. Runs before the outcome is
    /// recorded: what the answer says about the provider holds whether or not it is stored.
    pub(super) fn announce_answer(&self, account: &Account, after: &After) {
        if after.parked_past_expiry
            && let Outcome::Transient {
                next_refresh_at, ..
            } = &after.outcome
        {
            self.metrics.parked_past_expiry(&account.provider);
            tracing::warn!(event = "parked_past_expiry", account = account.id, provider = %account.provider,
                access_expires_at = %Rfc3339(account.access_expires_at), retry_at = %Rfc3339(*next_refresh_at),
                "the provider is failing: this account's access token expires before its next refresh");
        }
        if after.circuit_answered() {
            self.circuit_answered(&account.provider);
        }
        let name = account.provider.as_str();
        match &after.provider {
            ProviderSignal::Accepted => {
                self.provider_state(name, account.id, None, ConfigState::success)
            }
            ProviderSignal::ConfigError(error) => {
                self.provider_state(name, account.id, Some(error), ConfigState::config_error)
            }
            ProviderSignal::Unexpected(error) => {
                self.provider_state(name, account.id, Some(error), |s| s.unexpected(account.id))
            }
            ProviderSignal::Answered => self.provider_state(name, account.id, None, |s| {
                s.answered();
                None
            }),
            ProviderSignal::Nothing => {}
        }
    }

    /// Feeds one answer of `provider` (to a refresh of `account`) to its configuration state
    /// and announces a change.
    pub(super) fn provider_state(
        &self,
        provider: &str,
        account: i64,
        error: Option<&str>,
        feed: impl FnOnce(&mut ConfigState) -> Option<Change>,
    ) {
        let change = {
            let mut states = self.provider_states.lock().expect("not poisoned");
            feed(entry_of(&mut states, provider))
        };
        match change {
            Some(Change::Rejecting) => {
                self.metrics.provider_rejecting(provider, true);
                let error = error.unwrap_or_default().to_string();
                tracing::error!(event = "provider_config_error", account, provider, error = %error,
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

/// What `finish` announces of an outcome once it is recorded: the outcome less its
/// tokens (only whether a new refresh token came). The failures' error texts are copied:
/// they are rare, a rotation is the common case.
enum Said {
    Rotated {
        at: i64,
        next_refresh_at: i64,
        status: Status,
        reauth_reason: Option<ReauthReason>,
        new_refresh_token: bool,
        refresh_expires_in: Option<i64>,
    },
    Transient {
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
    },
    ConfigError {
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
    },
    Rejected {
        reason: ReauthReason,
        error: String,
        http_status: Option<u16>,
    },
    Released,
}

impl Said {
    fn of(outcome: &Outcome) -> Said {
        match outcome {
            Outcome::Rotated {
                at,
                next_refresh_at,
                status,
                reauth_reason,
                tokens,
                ..
            } => Said::Rotated {
                at: *at,
                next_refresh_at: *next_refresh_at,
                status: *status,
                reauth_reason: *reauth_reason,
                new_refresh_token: tokens.refresh_token.is_some(),
                refresh_expires_in: tokens.refresh_expires_in,
            },
            Outcome::Transient {
                next_refresh_at,
                error,
                http_status,
                ..
            } => Said::Transient {
                next_refresh_at: *next_refresh_at,
                error: error.clone(),
                http_status: *http_status,
            },
            Outcome::ConfigError {
                next_refresh_at,
                error,
                http_status,
                ..
            } => Said::ConfigError {
                next_refresh_at: *next_refresh_at,
                error: error.clone(),
                http_status: *http_status,
            },
            Outcome::Rejected {
                reason,
                error,
                http_status,
                ..
            } => Said::Rejected {
                reason: *reason,
                error: error.clone(),
                http_status: *http_status,
            },
            Outcome::Released { .. } => Said::Released,
        }
    }
}

/// Reports what was wrong with an answer, naming the account, once it is known whether its
/// new credential was stored.
pub(super) fn report_answer(account: &Account, answer: &Answer, stored: bool) {
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

//! The engine's decisions about one account, as pure functions: before the request (send
//! which credential, or record an outcome without asking the provider) and after the answer
//! (what to record, what the provider's configuration state hears, when the account is
//! due again). No I/O: the time, the random draw and what the provider's circuit said are
//! passed in; `Engine::refresh_one` sends, records and announces what these decide.

use crate::clock::rfc3339;
use crate::config::Config;
use crate::model::{Account, Grant, ReauthReason, Status, TokenSet};
use crate::policy::{self, RefreshTiming, RefreshTokenState};
use crate::provider::profile::{Credential, Presented, Profile, RefreshTtl};
use crate::provider::response::{Answer, Granted};
use crate::provider::{FailureClass, ProviderFailure};
use crate::store::Outcome;
use rand::Rng;
use std::time::Duration;

/// The settings the decisions read, from `[refresh]` and `[reauth]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub timing: RefreshTiming,
    pub reauth_window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub config_error_retry: Duration,
}

impl Rules {
    pub fn from_config(config: &Config) -> Rules {
        Rules {
            timing: config.refresh.timing(),
            reauth_window: config.reauth.window,
            backoff_base: config.refresh.backoff_base,
            backoff_max: config.refresh.backoff_max,
            config_error_retry: config.refresh.config_error_retry,
        }
    }

    /// The retry time after a configuration error at `now`.
    fn config_error_retry_at(&self, now: i64) -> i64 {
        now + self.config_error_retry.as_secs() as i64
    }
}

/// What the decisions read of the account's provider profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProfileRules {
    /// What is presented for new tokens.
    pub credential: Credential,
    /// The provider refuses to refresh a younger token.
    pub min_token_age: Duration,
    /// How the refresh token's end moves.
    pub refresh_ttl: RefreshTtl,
    /// The keep-alive: refresh at least this often.
    pub refresh_at_least_every: Option<Duration>,
}

impl ProfileRules {
    pub fn of(profile: &Profile) -> ProfileRules {
        ProfileRules {
            credential: profile.credential,
            min_token_age: profile.min_token_age,
            refresh_ttl: profile.refresh_ttl,
            refresh_at_least_every: profile.refresh_at_least_every,
        }
    }

    /// The rules for an account renewed with `grant`. An app token has no refresh token:
    /// no refresh-token end to follow, no minimum age, no keep-alive.
    fn for_grant(self, grant: Grant) -> ProfileRules {
        match grant {
            Grant::RefreshToken => self,
            Grant::ClientCredentials => ProfileRules {
                refresh_ttl: RefreshTtl::None,
                min_token_age: Duration::ZERO,
                refresh_at_least_every: None,
                ..self
            },
        }
    }
}

/// Before the request, for an account of provider `P`.
#[derive(Debug)]
pub enum Before<'a, P> {
    /// Ask this provider, presenting this credential of the account (or, for an app
    /// token, the client credentials).
    Send {
        provider: &'a P,
        profile: ProfileRules,
        credential: Presented<'a>,
        /// Not before this moment (unix ms): a token claimed within the claim lead of
        /// becoming old enough (`min_token_age`) waits for it rather than failing.
        not_before: Option<i64>,
    },
    /// Record this without asking the provider. With `provider_error`, the account's
    /// provider is not configured: its configuration state hears that error.
    Record {
        outcome: Outcome,
        provider_error: Option<String>,
    },
}

/// Whether to ask the account's `provider` (None: not configured) for `account` (claimed by
/// lease `owner`) at `now_ms` (unix ms), and with what.
pub fn before_request<'a, P>(
    account: &'a Account,
    provider: Option<(&'a P, ProfileRules)>,
    rules: &Rules,
    owner: &str,
    now_ms: i64,
) -> Before<'a, P> {
    let now = now_ms.div_euclid(1000);
    let record = |outcome| Before::Record {
        outcome,
        provider_error: None,
    };
    // A refresh token past its end cannot work: flag without asking the provider.
    if policy::refresh_token_state(now, account.refresh_expires_at, rules.reauth_window)
        == RefreshTokenState::Expired
    {
        let error = format!(
            "refresh token expired at {}",
            rfc3339(account.refresh_expires_at.unwrap_or(now))
        );
        let reason = ReauthReason::RefreshTokenExpired;
        return record(rejected(account, owner, reason, error, None, now, 0));
    }
    let Some((provider, profile)) = provider else {
        return Before::Record {
            outcome: Outcome::ConfigError {
                account_id: account.id,
                owner: owner.to_string(),
                at: now,
                next_refresh_at: rules.config_error_retry_at(now),
                error: format!(
                    "provider {:?} is not configured or disabled: add [providers.{}] to the config",
                    account.provider, account.provider
                ),
                http_status: None,
                duration_ms: 0,
            },
            provider_error: Some(format!("provider {:?} is not configured", account.provider)),
        };
    };
    let profile = profile.for_grant(account.grant);
    let credential = match (account.grant, profile.credential) {
        (Grant::ClientCredentials, _) => Presented::ClientCredentials {
            scope: &account.scope,
        },
        (Grant::RefreshToken, Credential::RefreshToken) => {
            Presented::Credential(&account.refresh_token)
        }
        (Grant::RefreshToken, Credential::AccessToken) => {
            Presented::Credential(&account.access_token)
        }
    };
    // Long-lived access tokens (Instagram, Facebook, Threads) are extended with
    // themselves: once expired, only a new login helps.
    let extends_access_token =
        account.grant == Grant::RefreshToken && profile.credential == Credential::AccessToken;
    if extends_access_token && account.access_expires_at <= now {
        let error = format!(
            "the long-lived access token expired at {}: it cannot be extended any more",
            rfc3339(account.access_expires_at)
        );
        let reason = ReauthReason::RefreshTokenExpired;
        return record(rejected(account, owner, reason, error, None, now, 0));
    }
    // Instagram and Threads refuse to extend a token younger than 24 hours. The age is
    // counted from our last refresh, else from when the account was stored (a token is
    // never younger than that); a token that would expire first is tried anyway.
    let issued_at = account.last_refreshed_at.unwrap_or(account.created_at);
    let old_enough_at = issued_at + profile.min_token_age.as_secs() as i64;
    let too_young = now < old_enough_at && old_enough_at < account.access_expires_at - 60;
    // Claimed within the claim lead of being old enough (it was deferred to that second):
    // sent as that second begins, not deferred again.
    let not_before = too_young && policy::due_by(now_ms) >= old_enough_at;
    if too_young && !not_before {
        return record(Outcome::Transient {
            account_id: account.id,
            owner: owner.to_string(),
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
        });
    }
    Before::Send {
        provider,
        profile,
        credential,
        not_before: not_before.then(|| old_enough_at.saturating_mul(1000)),
    }
}

/// The last moment (unix seconds) a request may be sent under a lease ending at
/// `lease_until` (`policy::answer_margin`).
pub fn last_send_at(lease_until: i64, request_timeout: Duration) -> i64 {
    let needed = policy::answer_margin(request_timeout).as_secs() as i64;
    lease_until.saturating_sub(needed)
}

/// What the provider's configuration state (`provider_state`) hears from one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderSignal {
    /// Tokens: the provider accepts our client.
    Accepted,
    /// It refuses our client configuration.
    ConfigError(String),
    /// An answer that fits no rule: this account's, until several in a row get one.
    Unexpected(String),
    /// A proper refusal of this account: our client is fine.
    Answered,
    /// A transient failure says nothing about our configuration (its circuit heard it).
    Nothing,
}

/// After the answer: what to record and what the provider's state hears.
#[derive(Debug)]
pub struct After {
    pub outcome: Outcome,
    pub provider: ProviderSignal,
    /// A transient failure retried after the access token's expiry: announced, never silent.
    pub parked_past_expiry: bool,
}

impl After {
    fn of(outcome: Outcome, provider: ProviderSignal) -> After {
        After {
            outcome,
            provider,
            parked_past_expiry: false,
        }
    }

    /// Every answer but a transient failure is a proper one: the provider's circuit closes.
    pub fn circuit_answered(&self) -> bool {
        self.provider != ProviderSignal::Nothing
    }
}

/// What was sent and how it went, as `after_answer` reads it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// The lease owner of the claim.
    pub owner: &'a str,
    /// How long the request took, at least 1 (0 means nothing was sent).
    pub duration_ms: i64,
    /// The provider's circuit is open after this (transient) failure: its accounts wait
    /// for the circuit, not for a backoff of their own.
    pub circuit_open: bool,
    /// When the answer came (unix seconds).
    pub now: i64,
}

/// What to record for the provider's `result` (a 2xx answer with its HTTP status, or a
/// failure) of a refresh of `account`.
pub fn after_answer(
    account: &Account,
    profile: ProfileRules,
    rules: &Rules,
    result: Result<(&Answer, u16), &ProviderFailure>,
    attempt: Attempt<'_>,
    rng: &mut impl Rng,
) -> After {
    let profile = profile.for_grant(account.grant);
    let f = match result {
        Ok((answer, status)) => {
            let outcome = rotated(account, profile, rules, answer, status, attempt, rng);
            return After::of(outcome, ProviderSignal::Accepted);
        }
        Err(f) => f,
    };
    let config_error = |error: String| Outcome::ConfigError {
        account_id: account.id,
        owner: attempt.owner.to_string(),
        at: attempt.now,
        next_refresh_at: rules.config_error_retry_at(attempt.now),
        error,
        http_status: f.http_status,
        duration_ms: attempt.duration_ms,
    };
    match f.class {
        FailureClass::Transient => transient(account, rules, f, attempt, rng),
        // No person can log in again for an app token: a refusal of its grant is our
        // client's configuration (credentials, the scope asked for), never a flag.
        FailureClass::Config | FailureClass::Rejected(_)
            if account.grant == Grant::ClientCredentials =>
        {
            let message = format!(
                "{}: the provider refused the client credentials grant of app token {:?}; check providers.{}.client_key, client_secret and the app's scope",
                f.message, account.subject, account.provider
            );
            // Our client refused (invalid_client) is the whole provider's configuration; a
            // refusal of this one app (its scope, its access) is this app's alone, so the
            // provider is not announced as rejecting us at each retry.
            let signal = match f.class {
                FailureClass::Config => ProviderSignal::ConfigError(message.clone()),
                _ => ProviderSignal::Unexpected(message.clone()),
            };
            After::of(config_error(message), signal)
        }
        FailureClass::Config => After::of(
            config_error(f.message.clone()),
            ProviderSignal::ConfigError(f.message.clone()),
        ),
        FailureClass::Unexpected => After::of(
            config_error(f.message.clone()),
            ProviderSignal::Unexpected(f.message.clone()),
        ),
        FailureClass::Rejected(reason) => After::of(
            rejected_by_provider(account, reason, f, attempt),
            ProviderSignal::Answered,
        ),
    }
}

/// The provider refused the refresh for good. An `invalid_grant` right after an earlier
/// refresh of the account was cut off is read as the loss of a rotated token.
fn rejected_by_provider(
    account: &Account,
    reason: ReauthReason,
    f: &ProviderFailure,
    attempt: Attempt<'_>,
) -> Outcome {
    let (reason, error) = match (reason, account.interrupted_at) {
        (ReauthReason::InvalidGrant, Some(window_end)) => (
            ReauthReason::RefreshInterrupted,
            format!(
                "{}; an earlier refresh of this account was cut off (its lease, ending {}, was never given back: the process died, the provider's answer was lost on the way, or the outcome could not be stored), so the provider most likely rotated the token in an answer that was lost",
                f.message,
                rfc3339(window_end)
            ),
        ),
        (r, _) => (r, f.message.clone()),
    };
    rejected(
        account,
        attempt.owner,
        reason,
        error,
        f.http_status,
        attempt.now,
        attempt.duration_ms,
    )
}

/// A transient failure: retried after a backoff (or with the circuit), never flagged; the
/// provider's configuration state hears nothing (its circuit did).
fn transient(
    account: &Account,
    rules: &Rules,
    f: &ProviderFailure,
    attempt: Attempt<'_>,
    rng: &mut impl Rng,
) -> After {
    let now = attempt.now;
    let failures = (account.failures + 1).clamp(1, u32::MAX as i64) as u32;
    let delay = if attempt.circuit_open {
        // The circuit holds the provider's accounts back and lets them go together when it
        // closes: no backoff of their own on top.
        f.retry_after
            .unwrap_or_default()
            .max(crate::circuit::PROBE_INTERVAL)
    } else {
        policy::backoff(
            failures,
            rules.backoff_base,
            rules.backoff_max,
            f.retry_after,
            rng,
        )
    };
    let retry_at = now + delay.as_secs().max(1) as i64;
    let mut error = f.message.clone();
    // Parked past the access token's expiry: said in the account's status (its last
    // error), and announced by the engine, never silently.
    let parked = retry_at > account.access_expires_at;
    if parked {
        error.push_str(&format!(
            "; parked past expiry: the access token expires at {}, the retry is at {}",
            rfc3339(account.access_expires_at),
            rfc3339(retry_at)
        ));
    }
    let outcome = Outcome::Transient {
        account_id: account.id,
        owner: attempt.owner.to_string(),
        at: now,
        next_refresh_at: retry_at,
        error,
        http_status: f.http_status,
        duration_ms: attempt.duration_ms,
        answer_lost: f.answer_lost,
    };
    After {
        outcome,
        provider: ProviderSignal::Nothing,
        parked_past_expiry: parked,
    }
}

/// The outcome of a 2xx answer: its tokens (or its new refresh token alone, with the stored
/// access token kept and asked for again soon), unless they are another user's.
fn rotated(
    account: &Account,
    profile: ProfileRules,
    rules: &Rules,
    answer: &Answer,
    status: u16,
    attempt: Attempt<'_>,
    rng: &mut impl Rng,
) -> Outcome {
    let (now, duration_ms) = (attempt.now, attempt.duration_ms);
    let subject = match &answer.granted {
        // An app token is nobody's: whatever user id its answer names is not compared.
        _ if account.grant == Grant::ClientCredentials => None,
        Granted::Tokens(t) => t.subject.as_ref(),
        Granted::RefreshTokenOnly { subject, .. } => subject.as_ref(),
    };
    if let Some(s) = subject
        && !crate::subject::same(&account.subject, s)
    {
        let error = format!(
            "the provider returned tokens for user {:?}, not this account's {:?}; nothing stored",
            // Provider-chosen: bounded before it reaches the log and the store.
            s.chars().take(64).collect::<String>(),
            account.subject
        );
        let reason = ReauthReason::SubjectMismatch;
        return rejected(
            account,
            attempt.owner,
            reason,
            error,
            Some(status),
            now,
            duration_ms,
        );
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
            let retry_in = policy::backoff(1, rules.backoff_base, rules.backoff_max, None, rng);
            (tokens, policy::Access::Kept { retry_in })
        }
    };
    if account.grant == Grant::ClientCredentials {
        // A refresh token sent with an app token is never used: not stored, no end to
        // follow. Its scope column keeps what the app asks for, not what an answer says.
        tokens.refresh_token = None;
        tokens.refresh_expires_in = None;
        tokens.scope = None;
    }
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
            keep_alive: profile.refresh_at_least_every,
        },
        &rules.timing,
        rules.reauth_window,
        now,
        rng,
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

/// A refusal for good: flag the account, unless its generation moved meanwhile or the
/// claim `owner` lost its lease to another claim.
fn rejected(
    account: &Account,
    owner: &str,
    reason: ReauthReason,
    error: String,
    http_status: Option<u16>,
    now: i64,
    duration_ms: i64,
) -> Outcome {
    Outcome::Rejected {
        account_id: account.id,
        owner: Some(owner.to_string()),
        generation: account.generation,
        reason,
        at: now,
        error,
        http_status,
        duration_ms,
    }
}

/// Why a refresh that stored new tokens closes a failing stretch, announced as
/// `account_recovered`; None when the account was not failing or is still flagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Transient failures in a row (also a retry parked past the access token's end).
    Failures(i64),
    /// A flag that this refresh lifted: a renewed refresh-token lifetime, or a forced
    /// refresh (`accounts refresh --force`) of an account flagged for this reason.
    Flag(ReauthReason),
}

/// Transient failures in a row after which an account counts as failing, so that its
/// recovery is announced even though its access token never ran out.
pub const FAILING_STREAK: i64 = 3;

/// Whether a rotation of `account` at `now` that leaves it `flagged_after` (still needing a
/// human) is a recovery worth announcing, and from what. Only a stretch an app could have
/// noticed counts: a lifted flag, [`FAILING_STREAK`] failures in a row, or failures that
/// outlasted the access token (the app held an expired token). A retried blip is not
/// announced, so a short provider hiccup does not flood the webhooks.
pub fn recovery(account: &Account, flagged_after: bool, now: i64) -> Option<Recovery> {
    if flagged_after {
        return None;
    }
    if let Some(reason) = account.reauth_reason {
        return Some(Recovery::Flag(reason));
    }
    let failing = account.failures >= FAILING_STREAK
        || (account.failures > 0 && account.access_expires_at <= now);
    failing.then_some(Recovery::Failures(account.failures))
}

/// Whether `account` was flagged and announced before and is only being tried again (a
/// forced refresh keeps the status `active` and the flag's reason): a rejection then
/// re-flags it without a second `reauth_required`.
pub fn flag_already_announced(account: &Account) -> bool {
    account.status == Status::Active && account.reauth_reason.is_some()
}

#[cfg(test)]
mod tests;

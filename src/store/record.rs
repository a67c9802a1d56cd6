//! What writing one refresh outcome means, the same on both backends: which guarded update
//! runs (and with which values, tokens sealed), and, depending on whether its guard matched
//! a row, how the write ended and which refresh-log row it leaves. Each backend's
//! `writes::record` only runs the update's SQL and appends the log row.

use super::types::{NewAccount, Outcome, Recorded};
use crate::crypto::{Column, Keyring};
use crate::model::TokenSet;
use secrecy::ExposeSecret;

/// The guarded update of one outcome. Rows are matched by id and by `generation` (a rotation:
/// another refresh may have replaced the tokens meanwhile), by both `generation` and the
/// lease `owner` (a rejection: a takeover's refresh may be what made the token invalid), or
/// by the lease `owner` (a failure: the lease may have been taken over).
pub(crate) enum Update<'a> {
    Rotate {
        account_id: i64,
        generation: i64,
        /// Sealed as stored.
        access_token: String,
        /// Sealed as stored; None keeps the stored one (the provider did not rotate it).
        refresh_token: Option<String>,
        scope: Option<&'a str>,
        token_type: &'a str,
        access_expires_at: i64,
        refresh_expires_at: Option<i64>,
        next_refresh_at: i64,
        status: &'static str,
        reauth_reason: Option<&'static str>,
        at: i64,
    },
    /// Counts a failure. With `keep_lease` (the answer may have been lost), or after a cut-off
    /// attempt (`interrupted_at` set), the lease runs until the retry instead of being given
    /// back: the next claim then finds it not given back and keeps the crash window on record.
    Fail {
        account_id: i64,
        owner: &'a str,
        error: &'a str,
        next_refresh_at: i64,
        at: i64,
        keep_lease: bool,
    },
    /// The provider refused our client configuration: no failure counted, lease given back
    /// (as `Release` does).
    Postpone {
        account_id: i64,
        owner: &'a str,
        error: &'a str,
        next_refresh_at: i64,
        at: i64,
    },
    /// Flags `needs_reauth`; with an `owner`, only while that claim holds the lease.
    Flag {
        account_id: i64,
        owner: Option<&'a str>,
        generation: i64,
        reason: &'static str,
        at: i64,
        error: &'a str,
    },
    /// Gives the lease back. A claim that took over a cut-off attempt (`interrupted_at` set)
    /// gives it back ended at that attempt's window instead of unnamed: the account is free
    /// at once, and the next claim still finds a lease not given back and keeps the window
    /// on record (nothing was sent that could have settled the token).
    Release { account_id: i64, owner: &'a str },
}

/// The SET clause of a write that gives its lease back unsent (`Release`, `Postpone`), the
/// same text on both backends: unnamed, unless the claim took over a cut-off attempt
/// (`interrupted_at`); then still named and ended at that window, so the next claim records
/// the same window.
macro_rules! give_back_lease {
    () => {
        "lease_owner = CASE WHEN interrupted_at IS NOT NULL THEN lease_owner END,
            lease_expires_at = CASE WHEN interrupted_at IS NOT NULL THEN interrupted_at END"
    };
}
pub(crate) use give_back_lease;

/// A `refresh_log` row.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LogRow {
    pub account_id: i64,
    pub at: i64,
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

/// One outcome's write: the update, then `ended` with whether it changed a row.
pub(crate) struct Write<'a> {
    pub update: Update<'a>,
    o: &'a Outcome,
}

/// A rotated token set as stored for `account_id` (in the database and the recovery file):
/// sealed under the primary key, or clear without one; no refresh token when the provider
/// did not rotate it.
pub(crate) fn sealed_tokens(
    keys: &Keyring,
    account_id: i64,
    tokens: &TokenSet,
) -> (String, Option<String>) {
    let access = keys.seal(
        account_id,
        Column::AccessToken,
        tokens.access_token.expose_secret(),
    );
    let refresh = tokens
        .refresh_token
        .as_ref()
        .map(|t| keys.seal(account_id, Column::RefreshToken, t.expose_secret()));
    (access, refresh)
}

/// The outcome's write; tokens are sealed here, for the account and column they belong to.
pub(crate) fn plan<'a>(keys: &Keyring, o: &'a Outcome) -> Write<'a> {
    let update = match o {
        Outcome::Rotated {
            account_id,
            generation,
            tokens,
            at,
            next_refresh_at,
            status,
            reauth_reason,
            ..
        } => {
            let (access_token, refresh_token) = sealed_tokens(keys, *account_id, tokens);
            Update::Rotate {
                account_id: *account_id,
                generation: *generation,
                access_token,
                refresh_token,
                scope: tokens.scope.as_deref(),
                token_type: &tokens.token_type,
                access_expires_at: at + tokens.expires_in,
                refresh_expires_at: tokens.refresh_expires_in.map(|s| at + s),
                next_refresh_at: *next_refresh_at,
                status: status.as_str(),
                reauth_reason: reauth_reason.map(|r| r.as_str()),
                at: *at,
            }
        }
        Outcome::Transient {
            account_id,
            owner,
            at,
            next_refresh_at,
            error,
            answer_lost,
            ..
        } => Update::Fail {
            account_id: *account_id,
            owner,
            error,
            next_refresh_at: *next_refresh_at,
            at: *at,
            keep_lease: *answer_lost,
        },
        Outcome::ConfigError {
            account_id,
            owner,
            at,
            next_refresh_at,
            error,
            ..
        } => Update::Postpone {
            account_id: *account_id,
            owner,
            error,
            next_refresh_at: *next_refresh_at,
            at: *at,
        },
        Outcome::Rejected {
            account_id,
            owner,
            generation,
            reason,
            at,
            error,
            ..
        } => Update::Flag {
            account_id: *account_id,
            owner: owner.as_deref(),
            generation: *generation,
            reason: reason.as_str(),
            at: *at,
            error,
        },
        Outcome::Released { account_id, owner } => Update::Release {
            account_id: *account_id,
            owner,
        },
    };
    Write { update, o }
}

impl Write<'_> {
    /// How the write ended, given whether the update's guard matched the row, and the log
    /// row it leaves.
    pub fn ended(&self, changed: bool) -> (Recorded, Option<LogRow>) {
        let log = |account_id, at, outcome, http_status, error: Option<String>, duration_ms| {
            Some(LogRow {
                account_id,
                at,
                outcome,
                http_status,
                error,
                duration_ms: Some(duration_ms),
            })
        };
        // A failure is logged even when the lease was taken over; the row is left alone.
        let lease_guarded = if changed {
            Recorded::Applied
        } else {
            Recorded::LeaseLost
        };
        match *self.o {
            Outcome::Rotated {
                account_id,
                at,
                http_status,
                duration_ms,
                ..
            } => {
                if changed {
                    let row = log(account_id, at, "rotated", http_status, None, duration_ms);
                    (Recorded::Applied, row)
                } else {
                    let error =
                        "another refresh rotated this account first; these tokens were not stored";
                    let row = log(
                        account_id,
                        at,
                        "superseded",
                        http_status,
                        Some(error.into()),
                        duration_ms,
                    );
                    (Recorded::Superseded, row)
                }
            }
            Outcome::Transient {
                account_id,
                at,
                ref error,
                http_status,
                duration_ms,
                ..
            } => (
                lease_guarded,
                log(
                    account_id,
                    at,
                    "transient",
                    http_status,
                    Some(error.clone()),
                    duration_ms,
                ),
            ),
            Outcome::ConfigError {
                account_id,
                at,
                ref error,
                http_status,
                duration_ms,
                ..
            } => (
                lease_guarded,
                log(
                    account_id,
                    at,
                    "config_error",
                    http_status,
                    Some(error.clone()),
                    duration_ms,
                ),
            ),
            // Guarded by generation and lease: if another process rotated the account
            // meanwhile, or took it over to do so, the rejection was of a token that is (or
            // is being) replaced, and nothing is wrong.
            Outcome::Rejected {
                account_id,
                at,
                ref error,
                http_status,
                duration_ms,
                ..
            } => {
                if changed {
                    let row = log(
                        account_id,
                        at,
                        "reauth_required",
                        http_status,
                        Some(error.clone()),
                        duration_ms,
                    );
                    (Recorded::Applied, row)
                } else {
                    let error = format!(
                        "rejected, but another refresh had rotated it or taken its lease over: not flagged ({error})"
                    );
                    let row = log(
                        account_id,
                        at,
                        "superseded",
                        http_status,
                        Some(error),
                        duration_ms,
                    );
                    (Recorded::Superseded, row)
                }
            }
            Outcome::Released { .. } => (Recorded::Applied, None),
        }
    }
}

/// What an imported (or connected) account's row is written with, the same on both
/// backends: expiries counted from when its tokens were obtained, its flag, and its tokens
/// sealed for its id.
pub(crate) struct Imported<'a> {
    a: &'a NewAccount,
    pub access_expires_at: i64,
    pub refresh_expires_at: Option<i64>,
    pub scope: String,
    pub reauth_reason: Option<&'static str>,
    pub reauth_flagged_at: Option<i64>,
}

pub(crate) fn imported(a: &NewAccount, now: i64) -> Imported<'_> {
    Imported {
        a,
        access_expires_at: a.obtained_at + a.tokens.expires_in,
        refresh_expires_at: a.tokens.refresh_expires_in.map(|s| a.obtained_at + s),
        scope: a.tokens.scope.clone().unwrap_or_default(),
        reauth_reason: a.reauth_reason.map(|r| r.as_str()),
        reauth_flagged_at: a.reauth_reason.map(|_| now),
    }
}

impl Imported<'_> {
    fn refresh_clear(&self) -> &str {
        self.a
            .tokens
            .refresh_token
            .as_ref()
            .map_or("", |t| t.expose_secret())
    }

    pub fn access_token(&self, keys: &Keyring, id: i64) -> String {
        let clear = self.a.tokens.access_token.expose_secret();
        keys.seal(id, Column::AccessToken, clear)
    }

    /// '' means "no refresh token given": the stored one is kept. Accounts of profiles that
    /// extend the access token itself (Instagram, Facebook, Threads) have none.
    pub fn refresh_token(&self, keys: &Keyring, id: i64) -> String {
        match self.refresh_clear() {
            "" => String::new(),
            clear => keys.seal(id, Column::RefreshToken, clear),
        }
    }

    /// The tokens an INSERT writes. A sealed value's associated data holds the account id,
    /// known only after the insert: with a key, the insert writes '' and a second statement
    /// the sealed tokens (`sealed_after_insert`).
    pub fn inserted_tokens(&self, keys: &Keyring) -> (String, String) {
        if keys.seals() {
            (String::new(), String::new())
        } else {
            let access = self.a.tokens.access_token.expose_secret();
            (access.to_string(), self.refresh_clear().to_string())
        }
    }

    /// Whether the tokens are written by a second statement after the insert.
    pub fn sealed_after_insert(keys: &Keyring) -> bool {
        keys.seals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ReauthReason, Status, TokenSet};
    use secrecy::SecretString;

    fn rotated(refresh: Option<&str>) -> Outcome {
        Outcome::Rotated {
            account_id: 5,
            generation: 2,
            tokens: TokenSet {
                access_token: SecretString::from("at"),
                refresh_token: refresh.map(SecretString::from),
                expires_in: 100,
                refresh_expires_in: Some(1000),
                subject: None,
                scope: None,
                token_type: "Bearer".into(),
            },
            at: 10,
            next_refresh_at: 60,
            status: Status::Active,
            reauth_reason: None,
            http_status: Some(200),
            duration_ms: 7,
        }
    }

    #[test]
    fn a_rotation_stores_expiries_from_its_time_and_keeps_an_unrotated_refresh_token() {
        let o = rotated(None);
        let w = plan(&Keyring::default(), &o);
        let Update::Rotate {
            access_token,
            refresh_token,
            access_expires_at,
            refresh_expires_at,
            ..
        } = &w.update
        else {
            panic!("not a rotation");
        };
        assert_eq!(access_token, "at");
        assert_eq!(*refresh_token, None);
        assert_eq!((*access_expires_at, *refresh_expires_at), (110, Some(1010)));
    }

    #[test]
    fn a_rotation_whose_generation_moved_is_superseded_and_logged_so() {
        let o = rotated(Some("rt"));
        let w = plan(&Keyring::default(), &o);
        let (r, log) = w.ended(true);
        assert_eq!((r, log.unwrap().outcome), (Recorded::Applied, "rotated"));
        let (r, log) = w.ended(false);
        assert_eq!(
            (r, log.unwrap().outcome),
            (Recorded::Superseded, "superseded")
        );
    }

    #[test]
    fn a_failure_without_the_lease_is_logged_but_reported_lease_lost() {
        let o = Outcome::Transient {
            account_id: 5,
            owner: "me".into(),
            at: 10,
            next_refresh_at: 70,
            error: "503".into(),
            http_status: Some(503),
            duration_ms: 3,
            answer_lost: true,
        };
        let w = plan(&Keyring::default(), &o);
        assert!(matches!(
            w.update,
            Update::Fail {
                keep_lease: true,
                ..
            }
        ));
        let (r, log) = w.ended(false);
        let log = log.unwrap();
        assert_eq!(r, Recorded::LeaseLost);
        assert_eq!(
            (log.outcome, log.error.as_deref()),
            ("transient", Some("503"))
        );
    }

    #[test]
    fn a_rejection_after_a_rotation_elsewhere_is_superseded_not_flagged() {
        let o = Outcome::Rejected {
            account_id: 5,
            owner: Some("me:1".into()),
            generation: 2,
            reason: ReauthReason::InvalidGrant,
            at: 10,
            error: "invalid_grant".into(),
            http_status: Some(400),
            duration_ms: 3,
        };
        let w = plan(&Keyring::default(), &o);
        let (r, log) = w.ended(false);
        assert_eq!(r, Recorded::Superseded);
        assert!(
            log.unwrap()
                .error
                .unwrap()
                .contains("not flagged (invalid_grant)")
        );
        assert_eq!(w.ended(true).1.unwrap().outcome, "reauth_required");
    }

    #[test]
    fn an_import_counts_expiries_from_when_its_tokens_were_obtained() {
        let a = NewAccount {
            provider: "tiktok".into(),
            subject: "u1".into(),
            label: None,
            tokens: TokenSet {
                access_token: SecretString::from("at"),
                refresh_token: None,
                expires_in: 100,
                refresh_expires_in: Some(1000),
                subject: None,
                scope: None,
                token_type: "Bearer".into(),
            },
            obtained_at: 50,
            next_refresh_at: 90,
            status: Status::Expiring,
            reauth_reason: Some(ReauthReason::RefreshTokenExpiring),
        };
        let row = imported(&a, 60);
        assert_eq!(
            (row.access_expires_at, row.refresh_expires_at),
            (150, Some(1050))
        );
        assert_eq!((row.reauth_flagged_at, row.scope.as_str()), (Some(60), ""));
        let keys = Keyring::default();
        assert_eq!(
            row.refresh_token(&keys, 1),
            "",
            "none given: the stored one is kept"
        );
        assert_eq!(
            row.inserted_tokens(&keys),
            ("at".to_string(), String::new())
        );
    }

    #[test]
    fn a_release_logs_nothing() {
        let o = Outcome::Released {
            account_id: 5,
            owner: "me".into(),
        };
        assert_eq!(
            plan(&Keyring::default(), &o).ended(false),
            (Recorded::Applied, None)
        );
    }
}

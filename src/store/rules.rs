//! The store's pure decisions, the same on both backends: whether an import may replace an
//! account's tokens, whether `accounts refresh` may make an account due, which status
//! `accounts disable` / `enable` leave an account in, how a web
//! connect's stored state is judged when its callback comes back, and which stored values
//! a rekey still has to re-seal. No I/O here; unit-tested below.

use super::error::Refusal;
use super::error::StoreError;
use super::types::{AppAdded, NewAccount, NewApp, PendingConnect, StateProblem};
use crate::crypto::{Column, Keyring};
use crate::model::{Account, Grant, ReauthReason, Status, app_subject};
use secrecy::ExposeSecret;

/// What adding `app` finds when its (provider, subject) row `id` exists, of `grant` and
/// asking for `stored_scope`: kept (rescoped when the scope asked for changed), or refused
/// when the row is a user's account.
pub(crate) fn existing_app(
    id: i64,
    grant: &str,
    stored_scope: &str,
    app: &NewApp,
) -> Result<AppAdded, StoreError> {
    if grant != Grant::ClientCredentials.as_str() {
        return Err(Refusal::NotAnApp {
            id,
            provider: app.provider.clone(),
            subject: app_subject(&app.name),
        }
        .into());
    }
    Ok(AppAdded::Kept {
        id,
        rescoped: stored_scope != app.scope,
    })
}

/// Whether an import or connection may replace an existing account's tokens.
pub(crate) fn check_upsert(
    id: i64,
    a: &NewAccount,
    lease_expires_at: Option<i64>,
    last_refreshed_at: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    // Replacing tokens under a refresh in flight would make that refresh's rotation
    // "superseded" and drop it: the provider may already have retired our token.
    if lease_expires_at.is_some_and(|t| t > now) {
        return Err(Refusal::UpsertUnderLease {
            id,
            provider: a.provider.clone(),
            subject: a.subject.clone(),
        }
        .into());
    }
    // An old export must not overwrite tokens refreshd rotated since.
    if last_refreshed_at.is_some_and(|t| t > a.obtained_at) {
        return Err(Refusal::UpsertOlderTokens {
            id,
            provider: a.provider.clone(),
            subject: a.subject.clone(),
        }
        .into());
    }
    Ok(())
}

/// Whether `accounts refresh` may make an account in `status` due.
pub(crate) fn check_mark_due(id: i64, status: Status, force: bool) -> Result<(), StoreError> {
    let refreshable = matches!(status, Status::Active | Status::Expiring);
    if status == Status::Disabled {
        return Err(Refusal::MarkDueDisabled { id }.into());
    }
    if !refreshable && !force {
        return Err(Refusal::MarkDueFlagged { id, status }.into());
    }
    Ok(())
}

/// The status `accounts disable` (`disable`) or `accounts enable` leaves an account in, or
/// `None` when it already is there. Enabling goes back to what the account's flag says: a
/// flag set before (or while) it was disabled still needs a human.
pub(crate) fn toggled_status(
    status: Status,
    reauth_reason: Option<ReauthReason>,
    disable: bool,
) -> Option<Status> {
    match (disable, status) {
        (true, Status::Disabled)
        | (false, Status::Active | Status::Expiring | Status::NeedsReauth) => None,
        (true, _) => Some(Status::Disabled),
        (false, Status::Disabled) => Some(match reauth_reason {
            None => Status::Active,
            Some(ReauthReason::RefreshTokenExpiring) => Status::Expiring,
            Some(_) => Status::NeedsReauth,
        }),
    }
}

/// Used and expired connect states are kept this long after expiry, so a replay is reported
/// as a replay rather than as an unknown state.
pub(crate) const CONNECT_REMEMBER: i64 = 3600;

/// A connect's PKCE verifier as stored: sealed like a token (account 0: none exists yet).
pub(crate) fn seal_verifier(keys: &Keyring, p: &PendingConnect) -> Option<String> {
    p.verifier
        .as_ref()
        .map(|v| keys.seal(0, Column::PkceVerifier, v.expose_secret()))
}

/// A `connect_states` row as read by either backend, before it is judged.
pub(crate) struct StateRow {
    pub provider: String,
    pub verifier: Option<String>,
    pub label: Option<String>,
    pub account: Option<i64>,
    pub scopes: String,
    pub expires_at: i64,
    pub used: bool,
}

impl StateRow {
    /// The state's one use: spent even when refused (a refused state is never retried).
    pub fn judge(
        self,
        keys: &Keyring,
        provider: &str,
        now: i64,
    ) -> Result<Result<PendingConnect, StateProblem>, StoreError> {
        if self.used {
            return Ok(Err(StateProblem::Replayed));
        }
        if self.expires_at < now {
            return Ok(Err(StateProblem::Expired));
        }
        if self.provider != provider {
            return Ok(Err(StateProblem::WrongProvider));
        }
        let verifier = self
            .verifier
            .map(|v| keys.open(0, Column::PkceVerifier, &v))
            .transpose()?;
        Ok(Ok(PendingConnect {
            provider: self.provider,
            verifier,
            label: self.label,
            account: self.account,
            scopes: self
                .scopes
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            expires_at: self.expires_at,
        }))
    }
}

/// A connect for an existing account (`expect_id`, read as `existing`) must be of that
/// account's provider and subject: else the stored (id, provider, subject), and nothing is
/// written.
#[allow(clippy::type_complexity)]
pub(crate) fn connected_mismatch(
    expect_id: Option<i64>,
    existing: Option<Option<Account>>,
    row: &NewAccount,
) -> Result<Option<(i64, String, String)>, StoreError> {
    let Some(id) = expect_id else {
        return Ok(None);
    };
    let existing = existing.flatten().ok_or(StoreError::NotFound(id))?;
    if existing.provider != row.provider || existing.subject != row.subject {
        return Ok(Some((id, existing.provider, existing.subject)));
    }
    Ok(None)
}

/// `LIKE` pattern of values sealed under `key_id`; key ids are hex, so nothing to escape.
pub(crate) fn sealed_pattern(key_id: &str) -> String {
    format!("{}{key_id}:%", crate::crypto::PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TokenSet;
    use secrecy::SecretString;

    fn app(scope: &str) -> NewApp {
        NewApp {
            provider: "tiktok".into(),
            name: "research".into(),
            scope: scope.into(),
            label: None,
        }
    }

    #[test]
    fn an_existing_app_is_kept_rescoped_when_its_scope_changed() {
        let same = existing_app(
            7,
            "client_credentials",
            "research.data.basic",
            &app("research.data.basic"),
        );
        assert_eq!(
            same.unwrap(),
            AppAdded::Kept {
                id: 7,
                rescoped: false
            }
        );
        let other = existing_app(7, "client_credentials", "", &app("research.data.basic"));
        assert_eq!(
            other.unwrap(),
            AppAdded::Kept {
                id: 7,
                rescoped: true
            }
        );
    }

    #[test]
    fn a_users_account_is_never_taken_for_an_app() {
        let e = existing_app(7, "refresh_token", "", &app("")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("tiktok/app:research") && text.contains("not an app token"),
            "{text}"
        );
    }

    fn account(obtained_at: i64) -> NewAccount {
        NewAccount {
            provider: "tiktok".into(),
            subject: "u1".into(),
            label: None,
            tokens: TokenSet {
                access_token: SecretString::from("at"),
                refresh_token: Some(SecretString::from("rt")),
                expires_in: 3600,
                refresh_expires_in: None,
                subject: None,
                scope: None,
                token_type: "Bearer".into(),
            },
            obtained_at,
            next_refresh_at: obtained_at,
            status: Status::Active,
            reauth_reason: None,
        }
    }

    fn refusal(e: &StoreError) -> &Refusal {
        match e {
            StoreError::Refused(r) => r,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    fn row(used: bool, expires_at: i64, provider: &str) -> StateRow {
        StateRow {
            provider: provider.into(),
            verifier: None,
            label: Some("shop".into()),
            account: Some(7),
            scopes: "a  b".into(),
            expires_at,
            used,
        }
    }

    #[test]
    fn an_upsert_under_a_live_lease_is_refused_naming_the_account() {
        let err = check_upsert(3, &account(100), Some(101), None, 100).unwrap_err();
        assert!(matches!(
            refusal(&err),
            Refusal::UpsertUnderLease { id: 3, .. }
        ));
        assert!(
            err.to_string()
                .contains("account 3 (tiktok/u1) is being refreshed"),
            "{err}"
        );
        // An expired lease belongs to nobody.
        check_upsert(3, &account(100), Some(100), None, 100).unwrap();
    }

    #[test]
    fn an_upsert_older_than_the_last_refresh_is_refused() {
        let err = check_upsert(3, &account(100), None, Some(101), 100).unwrap_err();
        assert!(matches!(refusal(&err), Refusal::UpsertOlderTokens { .. }));
        assert!(err.to_string().contains("drop that line"), "{err}");
        check_upsert(3, &account(100), None, Some(100), 100).unwrap();
    }

    #[test]
    fn disable_and_enable_change_only_what_is_not_there_yet_and_enable_keeps_the_flag() {
        use ReauthReason::*;
        assert_eq!(toggled_status(Status::Disabled, None, true), None);
        for s in [Status::Active, Status::Expiring, Status::NeedsReauth] {
            assert_eq!(toggled_status(s, None, true), Some(Status::Disabled));
            assert_eq!(toggled_status(s, None, false), None);
        }
        let enabled = |r| toggled_status(Status::Disabled, r, false);
        assert_eq!(enabled(None), Some(Status::Active));
        assert_eq!(enabled(Some(RefreshTokenExpiring)), Some(Status::Expiring));
        assert_eq!(enabled(Some(InvalidGrant)), Some(Status::NeedsReauth));
        assert_eq!(
            enabled(Some(RefreshTokenExpired)),
            Some(Status::NeedsReauth)
        );
    }

    #[test]
    fn mark_due_refuses_disabled_always_and_flagged_without_force() {
        for force in [false, true] {
            let err = check_mark_due(4, Status::Disabled, force).unwrap_err();
            assert!(matches!(refusal(&err), Refusal::MarkDueDisabled { id: 4 }));
        }
        let err = check_mark_due(4, Status::NeedsReauth, false).unwrap_err();
        assert!(err.to_string().contains("pass --force"), "{err}");
        check_mark_due(4, Status::NeedsReauth, true).unwrap();
        check_mark_due(4, Status::Active, false).unwrap();
        check_mark_due(4, Status::Expiring, false).unwrap();
    }

    #[test]
    fn a_connect_state_is_judged_replayed_then_expired_then_by_provider() {
        let keys = Keyring::default();
        let judge = |r: StateRow, p: &str| r.judge(&keys, p, 50).unwrap().map(|_| ());
        assert_eq!(
            judge(row(true, 10, "x"), "tiktok"),
            Err(StateProblem::Replayed)
        );
        assert_eq!(
            judge(row(false, 49, "tiktok"), "tiktok"),
            Err(StateProblem::Expired)
        );
        assert_eq!(
            judge(row(false, 50, "x"), "tiktok"),
            Err(StateProblem::WrongProvider)
        );
        let ok = row(false, 50, "tiktok")
            .judge(&keys, "tiktok", 50)
            .unwrap()
            .unwrap();
        assert_eq!(ok.scopes, vec!["a".to_string(), "b".to_string()]);
        assert_eq!((ok.account, ok.label.as_deref()), (Some(7), Some("shop")));
    }

    #[test]
    fn a_sealed_verifier_is_opened_by_the_judgement() {
        let keys = Keyring::default();
        let pending = PendingConnect {
            provider: "tiktok".into(),
            verifier: Some(SecretString::from("v3rifier")),
            label: None,
            account: None,
            scopes: Vec::new(),
            expires_at: 50,
        };
        let mut r = row(false, 50, "tiktok");
        r.verifier = seal_verifier(&keys, &pending);
        let ok = r.judge(&keys, "tiktok", 50).unwrap().unwrap();
        assert_eq!(ok.verifier.unwrap().expose_secret(), "v3rifier");
    }

    #[test]
    fn the_sealed_pattern_matches_values_under_that_key_only() {
        assert_eq!(sealed_pattern("00ff"), "enc:v1:00ff:%");
    }
}

//! Plain data: accounts, token sets, statuses and re-authorization reasons. No I/O.

use secrecy::SecretString;
use std::fmt;
use std::str::FromStr;

/// Where an account stands. See docs/src/operating.md "Account statuses".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Refreshed automatically.
    Active,
    /// Still refreshed automatically, but the refresh token ends within the reauth window.
    Expiring,
    /// Cannot be refreshed any more: a person must log in again.
    NeedsReauth,
    /// Switched off by an admin.
    Disabled,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Active,
        Status::Expiring,
        Status::NeedsReauth,
        Status::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Expiring => "expiring",
            Status::NeedsReauth => "needs_reauth",
            Status::Disabled => "disabled",
        }
    }

    /// `expiring` and `needs_reauth` are the statuses that need a human.
    pub fn needs_human(self) -> bool {
        matches!(self, Status::Expiring | Status::NeedsReauth)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}: expected one of active, expiring, needs_reauth, disabled")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// How an account's access token is renewed: which OAuth grant refreshd asks with.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// A user's account, connected once: renewed by presenting its refresh token (or, for
    /// long-lived tokens, the access token itself).
    #[default]
    RefreshToken,
    /// An app token: asked for again with the client credentials alone (no user, no
    /// refresh token, nothing a person could log in to fix).
    ClientCredentials,
}

impl Grant {
    pub const ALL: [Grant; 2] = [Grant::RefreshToken, Grant::ClientCredentials];

    /// As stored in the `grant_type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// The subject of the app token named `name` (`app:research`): apps share the accounts'
/// table, keyed by (provider, subject) like them.
pub fn app_subject(name: &str) -> String {
    format!("{APP_SUBJECT_PREFIX}{name}")
}

/// Whether `name` may name an app token: 1 to 64 letters, digits, `.`, `_` or `-`.
pub fn check_app_name(name: &str) -> Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err("must be 1 to 64 letters, digits, `.`, `_` or `-`");
    }
    Ok(())
}

/// What every app token's subject starts with.
pub const APP_SUBJECT_PREFIX: &str = "app:";

/// Why an account needs a person to log in again. Stable strings: admins alert on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReauthReason {
    /// The refresh token ends within the reauth window; refreshing cannot extend it.
    RefreshTokenExpiring,
    /// The refresh token's lifetime is over.
    RefreshTokenExpired,
    /// The provider rejected the refresh token (`invalid_grant`: invalid, expired or revoked).
    InvalidGrant,
    /// The provider withdrew a scope the account had.
    ScopeWithdrawn,
    /// The provider returned tokens for a different user than the account's.
    SubjectMismatch,
    /// `invalid_grant` right after an earlier refresh of the account was cut off (process
    /// killed, or its outcome lost): the provider had most likely rotated the token.
    RefreshInterrupted,
}

impl ReauthReason {
    pub const ALL: [ReauthReason; 6] = [
        ReauthReason::RefreshTokenExpiring,
        ReauthReason::RefreshTokenExpired,
        ReauthReason::InvalidGrant,
        ReauthReason::ScopeWithdrawn,
        ReauthReason::SubjectMismatch,
        ReauthReason::RefreshInterrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReauthReason::RefreshTokenExpiring => "refresh_token_expiring",
            ReauthReason::RefreshTokenExpired => "refresh_token_expired",
            ReauthReason::InvalidGrant => "invalid_grant",
            ReauthReason::ScopeWithdrawn => "scope_withdrawn",
            ReauthReason::SubjectMismatch => "subject_mismatch",
            ReauthReason::RefreshInterrupted => "refresh_interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for ReauthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored account, as read from the store. Tokens redact themselves in `Debug`.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: i64,
    pub provider: String,
    /// The provider's user id (TikTok's `open_id`).
    pub subject: String,
    pub label: Option<String>,
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub scope: String,
    pub token_type: String,
    pub access_expires_at: i64,
    /// None when the provider gives no refresh-token lifetime.
    pub refresh_expires_at: Option<i64>,
    pub next_refresh_at: i64,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
    pub reauth_flagged_at: Option<i64>,
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_refreshed_at: Option<i64>,
    pub generation: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// Set by a claim that found an earlier attempt's lease never given back: that lease's
    /// end (the earlier refresh may have rotated the token in an answer that was lost).
    pub interrupted_at: Option<i64>,
    /// How its access token is renewed (an app token: `ClientCredentials`).
    pub grant: Grant,
}

/// A validated token response: what a provider returned on a code exchange or a refresh.
#[derive(Clone, Debug)]
pub struct TokenSet {
    pub access_token: SecretString,
    /// None when the provider did not return one (keep the stored one).
    pub refresh_token: Option<SecretString>,
    /// Remaining lifetime of the access token, seconds.
    pub expires_in: i64,
    /// Remaining lifetime of the refresh token, seconds; None when the provider gives none.
    pub refresh_expires_in: Option<i64>,
    /// The provider's user id, when the response carries one.
    pub subject: Option<String>,
    pub scope: Option<String>,
    pub token_type: String,
}

impl Account {
    /// What the app gets (token API, sink files): the access token and what it is for.
    /// Holds the token: only for the routes and files meant to hand it out.
    pub fn token_document(&self) -> serde_json::Value {
        use secrecy::ExposeSecret;
        serde_json::json!({
            "account_id": self.id,
            "provider": self.provider,
            "subject": self.subject,
            "access_token": self.access_token.expose_secret(),
            "token_type": self.token_type,
            "expires_at": crate::clock::rfc3339(self.access_expires_at),
            "scope": self.scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_rejects_unknown() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
        let err = "broken".parse::<Status>().unwrap_err();
        assert!(err.to_string().contains("broken"));
        assert!(err.to_string().contains("needs_reauth"));
    }

    #[test]
    fn reasons_round_trip() {
        for r in ReauthReason::ALL {
            assert_eq!(ReauthReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(ReauthReason::parse("nope"), None);
    }

    #[test]
    fn grants_round_trip() {
        for g in Grant::ALL {
            assert_eq!(Grant::parse(g.as_str()), Some(g));
        }
        assert_eq!(Grant::parse("password"), None);
        assert_eq!(app_subject("research"), "app:research");
        assert!(check_app_name("research-2.b_c").is_ok());
        for bad in ["", "a b", "app:x", &"x".repeat(65)] {
            assert!(check_app_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn account_debug_redacts_tokens() {
        let a = Account {
            id: 1,
            provider: "tiktok".into(),
            subject: "u".into(),
            label: None,
            access_token: SecretString::from("act.SECRET-A"),
            refresh_token: SecretString::from("rft.SECRET-R"),
            scope: String::new(),
            token_type: "Bearer".into(),
            access_expires_at: 0,
            refresh_expires_at: None,
            next_refresh_at: 0,
            status: Status::Active,
            reauth_reason: None,
            reauth_flagged_at: None,
            failures: 0,
            last_error: None,
            last_refreshed_at: None,
            generation: 0,
            created_at: 0,
            updated_at: 0,
            interrupted_at: None,
            grant: Grant::RefreshToken,
        };
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
    }
}

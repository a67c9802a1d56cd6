//! The columns of the store's tables, listed once for both backends and `store copy`, and
//! how a row becomes an `Account` or an `AccountSummary` (each backend only says how to
//! read one value of its rows, `RowRead`).
//!
//! A new column of `accounts` touches: its migration in `sqlite/schema.rs` and in
//! `postgres/schema.rs` (the same version number), `ACCOUNTS` below (which `store copy`
//! copies), and, when an `Account` carries it, `model::Account`, `ACCOUNT_COLUMNS` and
//! `account_from` here. Nothing in the backends' queries.

use crate::crypto::{Column, Keyring};
use crate::model::{Account, Grant, ReauthReason, Status};
use secrecy::{ExposeSecret, SecretString};

use super::error::StoreError;
use super::types::AccountSummary;

/// How a value is held, for binding it on PostgreSQL (SQLite takes any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Int,
    /// INTEGER (32 bits) on PostgreSQL.
    Int4,
    Text,
}

/// Every column of `accounts`, in table order.
pub(crate) const ACCOUNTS: &[(&str, Kind)] = &[
    ("id", Kind::Int),
    ("provider", Kind::Text),
    ("subject", Kind::Text),
    ("label", Kind::Text),
    ("access_token", Kind::Text),
    ("refresh_token", Kind::Text),
    ("scope", Kind::Text),
    ("token_type", Kind::Text),
    ("access_expires_at", Kind::Int),
    ("refresh_expires_at", Kind::Int),
    ("next_refresh_at", Kind::Int),
    ("status", Kind::Text),
    ("reauth_reason", Kind::Text),
    ("reauth_flagged_at", Kind::Int),
    ("failures", Kind::Int),
    ("last_error", Kind::Text),
    ("last_refreshed_at", Kind::Int),
    ("lease_owner", Kind::Text),
    ("lease_expires_at", Kind::Int),
    ("generation", Kind::Int),
    ("created_at", Kind::Int),
    ("updated_at", Kind::Int),
    ("interrupted_at", Kind::Int),
    ("grant_type", Kind::Text),
];

/// Every column of `refresh_log`, in table order.
pub(crate) const REFRESH_LOG: &[(&str, Kind)] = &[
    ("id", Kind::Int),
    ("account_id", Kind::Int),
    ("at", Kind::Int),
    ("outcome", Kind::Text),
    ("http_status", Kind::Int4),
    ("error", Kind::Text),
    ("duration_ms", Kind::Int),
];

/// `audit_log`'s columns, in table order (kept by `store copy` like the other two tables).
pub(crate) const AUDIT_LOG: &[(&str, Kind)] = &[
    ("id", Kind::Int),
    ("at", Kind::Int),
    ("account_id", Kind::Int),
    ("provider", Kind::Text),
    ("subject", Kind::Text),
    ("action", Kind::Text),
    ("actor", Kind::Text),
    ("via", Kind::Text),
    ("detail", Kind::Text),
];

/// What an `Account` is read from: `ACCOUNTS` without the lease, in `account_from`'s order
/// (a unit test holds the two together).
pub(crate) const ACCOUNT_COLUMNS: &str = "id, provider, subject, label, access_token, \
    refresh_token, scope, token_type, access_expires_at, refresh_expires_at, next_refresh_at, \
    status, reauth_reason, reauth_flagged_at, failures, last_error, last_refreshed_at, \
    generation, created_at, updated_at, interrupted_at, grant_type";

/// What an `AccountSummary` is read from, in `summary_from`'s order.
pub(crate) const SUMMARY_COLUMNS: &str = "id, provider, subject, label, status, reauth_reason, \
    access_expires_at, refresh_expires_at, next_refresh_at, failures, last_error, \
    last_refreshed_at, reauth_flagged_at, scope, grant_type";

/// One value of a backend's result row, by position.
pub(crate) trait RowRead {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    /// A stored status this build does not know.
    fn bad_status(value: String, e: String) -> Self::Error;
}

fn status_at<R: RowRead>(r: &R, i: usize) -> Result<Status, R::Error> {
    let s = r.text(i)?;
    s.parse::<Status>()
        .map_err(|e| R::bad_status(s, e.to_string()))
}

fn reason_at<R: RowRead>(r: &R, i: usize) -> Result<Option<ReauthReason>, R::Error> {
    Ok(r.opt_text(i)?.and_then(|s| ReauthReason::parse(&s)))
}

fn grant_at<R: RowRead>(r: &R, i: usize) -> Result<Grant, R::Error> {
    let s = r.text(i)?;
    Grant::parse(&s).ok_or_else(|| {
        R::bad_status(
            s,
            "unknown grant_type: expected refresh_token or client_credentials".into(),
        )
    })
}

/// A row of `ACCOUNT_COLUMNS`, tokens still as stored (see `open_tokens`).
pub(crate) fn account_from<R: RowRead>(r: &R) -> Result<Account, R::Error> {
    Ok(Account {
        id: r.int(0)?,
        provider: r.text(1)?,
        subject: r.text(2)?,
        label: r.opt_text(3)?,
        access_token: SecretString::from(r.text(4)?),
        refresh_token: SecretString::from(r.text(5)?),
        scope: r.text(6)?,
        token_type: r.text(7)?,
        access_expires_at: r.int(8)?,
        refresh_expires_at: r.opt_int(9)?,
        next_refresh_at: r.int(10)?,
        status: status_at(r, 11)?,
        reauth_reason: reason_at(r, 12)?,
        reauth_flagged_at: r.opt_int(13)?,
        failures: r.int(14)?,
        last_error: r.opt_text(15)?,
        last_refreshed_at: r.opt_int(16)?,
        generation: r.int(17)?,
        created_at: r.int(18)?,
        updated_at: r.int(19)?,
        interrupted_at: r.opt_int(20)?,
        grant: grant_at(r, 21)?,
    })
}

/// A row of `SUMMARY_COLUMNS`.
pub(crate) fn summary_from<R: RowRead>(r: &R) -> Result<AccountSummary, R::Error> {
    Ok(AccountSummary {
        id: r.int(0)?,
        provider: r.text(1)?,
        subject: r.text(2)?,
        label: r.opt_text(3)?,
        status: status_at(r, 4)?,
        reauth_reason: reason_at(r, 5)?,
        access_expires_at: r.int(6)?,
        refresh_expires_at: r.opt_int(7)?,
        next_refresh_at: r.int(8)?,
        failures: r.int(9)?,
        last_error: r.opt_text(10)?,
        last_refreshed_at: r.opt_int(11)?,
        reauth_flagged_at: r.opt_int(12)?,
        scope: r.text(13)?,
        grant: grant_at(r, 14)?,
    })
}

/// Opens the sealed tokens of a row read by `account_from` (clear values pass through).
pub(crate) fn open_tokens(keys: &Keyring, mut a: Account) -> Result<Account, StoreError> {
    a.access_token = keys.open(a.id, Column::AccessToken, a.access_token.expose_secret())?;
    a.refresh_token = keys.open(a.id, Column::RefreshToken, a.refresh_token.expose_secret())?;
    Ok(a)
}

/// Opens claimed rows, in due order. A row that does not open (altered, or its key is
/// missing) must not stop the others: it is logged and left leased, so it comes back only
/// after the lease ends.
pub(crate) fn open_claimed(keys: &Keyring, sealed: Vec<Account>) -> Vec<Account> {
    let mut out = Vec::with_capacity(sealed.len());
    for a in sealed {
        let id = a.id;
        match open_tokens(keys, a) {
            Ok(a) => out.push(a),
            Err(e) => {
                tracing::error!(event = "token_unreadable", account = id, error = %e,
                    "cannot open this account's stored tokens; it is skipped until its lease ends")
            }
        }
    }
    out.sort_by_key(|a| a.next_refresh_at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_columns_are_the_table_without_the_lease_in_table_order() {
        let from_table: Vec<&str> = ACCOUNTS
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| !c.starts_with("lease_"))
            .collect();
        let listed: Vec<&str> = ACCOUNT_COLUMNS.split(", ").collect();
        assert_eq!(listed, from_table);
    }

    #[test]
    fn summary_columns_are_all_columns_of_the_table() {
        for c in SUMMARY_COLUMNS.split(", ") {
            assert!(ACCOUNTS.iter().any(|(name, _)| *name == c), "{c}");
        }
    }
}

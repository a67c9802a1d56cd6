//! The plain data the store takes and gives: accounts to write, refresh outcomes and how
//! their write ended, summaries, gauges, connect states, rekey progress and the options a
//! store is opened with. No I/O here.

use crate::crypto::Keyring;
use crate::model::{Grant, ReauthReason, Status, TokenSet};
use secrecy::SecretString;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::oneshot;

use super::error::StoreError;

/// An account to insert or update by (provider, subject): from an import or a code exchange.
#[derive(Clone, Debug)]
pub struct NewAccount {
    pub provider: String,
    pub subject: String,
    pub label: Option<String>,
    pub tokens: TokenSet,
    /// When the token response was issued (unix seconds): lifetimes count from here.
    pub obtained_at: i64,
    pub next_refresh_at: i64,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
}

/// An app token to keep (`refreshd apps add`, or a provider's `apps` in the config): a row
/// of grant `client_credentials`, subject `app:NAME`, due at once, with no token yet.
#[derive(Clone, Debug)]
pub struct NewApp {
    pub provider: String,
    /// The app's name (`research`); its subject is `model::app_subject(name)`.
    pub name: String,
    /// The scope asked for ('' for the provider's default).
    pub scope: String,
    /// Where it came from (the config's apps are labelled so a reload can tell them apart).
    pub label: Option<String>,
}

/// What `Store::add_app` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppAdded {
    /// A new row, due now.
    Created(i64),
    /// Already kept; with `rescoped`, its scope changed and it is due now.
    Kept { id: i64, rescoped: bool },
}

impl AppAdded {
    pub fn id(self) -> i64 {
        match self {
            AppAdded::Created(id) | AppAdded::Kept { id, .. } => id,
        }
    }
}

/// A web connect in progress: what the callback needs besides the code.
#[derive(Clone, Debug)]
pub struct PendingConnect {
    pub provider: String,
    pub verifier: Option<SecretString>,
    pub label: Option<String>,
    pub account: Option<i64>,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}

/// Why a callback's `state` was refused (a CSRF or replay attempt, or a slow user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateProblem {
    Missing,
    Unknown,
    Replayed,
    Expired,
    WrongProvider,
}

impl StateProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            StateProblem::Missing => "missing",
            StateProblem::Unknown => "unknown",
            StateProblem::Replayed => "replayed",
            StateProblem::Expired => "expired",
            StateProblem::WrongProvider => "wrong_provider",
        }
    }
}

/// What happened to one claimed account, to be written by `Store::record`.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// New tokens: stored only if `generation` is still the one that was claimed.
    Rotated {
        account_id: i64,
        generation: i64,
        tokens: TokenSet,
        at: i64,
        next_refresh_at: i64,
        status: Status,
        reauth_reason: Option<ReauthReason>,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Retry later; never flags. With `answer_lost` (the provider may have rotated in an
    /// answer we never read), the lease is not given back but runs until the retry, so the
    /// next claim records the crash window as for a process that died.
    Transient {
        account_id: i64,
        owner: String,
        at: i64,
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
        answer_lost: bool,
    },
    /// The provider rejected our client credentials: accounts untouched, retried slowly.
    ConfigError {
        account_id: i64,
        owner: String,
        at: i64,
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Permanent rejection: flag `needs_reauth`, unless `generation` moved meanwhile or the
    /// claim `owner` no longer holds the lease: another claim took the account over and
    /// may have rotated the token this attempt sent (a stale `invalid_grant`); its own
    /// answer decides. `None`: not from a claim (a tool or test flagging an account).
    Rejected {
        account_id: i64,
        owner: Option<String>,
        generation: i64,
        reason: ReauthReason,
        at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Never started (shutdown, or the lease would end before an answer could be stored):
    /// give the lease back.
    Released { account_id: i64, owner: String },
}

impl Outcome {
    pub fn account_id(&self) -> i64 {
        match self {
            Outcome::Rotated { account_id, .. }
            | Outcome::Transient { account_id, .. }
            | Outcome::ConfigError { account_id, .. }
            | Outcome::Rejected { account_id, .. }
            | Outcome::Released { account_id, .. } => *account_id,
        }
    }
}

/// How `record` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Applied,
    /// The account's generation moved: another refresh got there first; nothing written.
    Superseded,
    /// Our lease was taken over; the failure was logged but the row left to its new owner.
    LeaseLost,
    /// The commit failed; the rotated tokens are fsynced in the recovery file and retried.
    Deferred,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AccountSummary {
    pub id: i64,
    pub provider: String,
    pub subject: String,
    pub label: Option<String>,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
    pub access_expires_at: i64,
    pub refresh_expires_at: Option<i64>,
    pub next_refresh_at: i64,
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_refreshed_at: Option<i64>,
    pub reauth_flagged_at: Option<i64>,
    pub scope: String,
    /// How its token is renewed: `client_credentials` for an app token.
    pub grant: Grant,
}

#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub provider: Option<String>,
    pub status: Option<Status>,
    pub needs_reauth: bool,
    /// Only accounts renewed with this grant (`refreshd apps list`: app tokens).
    pub grant: Option<Grant>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LogEntry {
    pub at: i64,
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

/// One row of the refresh log with the account it was for, for the admin page's latest
/// outcomes. `provider` and `subject` are None when the account was removed since.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecentOutcome {
    pub account_id: i64,
    pub provider: Option<String>,
    pub subject: Option<String>,
    pub entry: LogEntry,
}

/// Who changed an account by hand, and through what: the OS user running the CLI and the
/// command (`accounts remove --revoke`), or an API caller's identity and its route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub who: String,
    pub via: String,
}

/// What an admin did to an account, as the audit trail names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditAction {
    Removed,
    Disabled,
    Enabled,
    /// The provider revoked the grant (the detail holds its answer).
    Revoked,
    /// The provider did not revoke it (refused, unreachable, no revoke_url).
    RevokeFailed,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Removed => "removed",
            AuditAction::Disabled => "disabled",
            AuditAction::Enabled => "enabled",
            AuditAction::Revoked => "revoked",
            AuditAction::RevokeFailed => "revoke_failed",
        }
    }
}

/// One row of the audit trail; kept after the account is removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    pub account_id: i64,
    pub provider: String,
    pub subject: String,
    /// [`AuditAction::as_str`].
    pub action: String,
    pub who: String,
    pub via: String,
    pub detail: Option<String>,
}

/// What `accounts plan` reads (see `plan.rs`): refreshes coming due, counted per provider
/// and minute, and the soonest refresh-token ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanRows {
    /// Refreshable accounts due before the window's end, by provider and minute, in that
    /// order. Accounts already due before the window's first minute count in the minute
    /// before it (the backlog).
    pub due: Vec<DueMinute>,
    /// Refreshable accounts whose refresh token ends, soonest first.
    pub refresh_ends: Vec<RefreshEnd>,
}

/// How many accounts of `provider` come due in the minute starting at `minute * 60`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueMinute {
    pub provider: String,
    pub minute: i64,
    pub count: i64,
}

/// One account's refresh-token end.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RefreshEnd {
    pub account_id: i64,
    pub provider: String,
    pub subject: String,
    pub status: Status,
    pub refresh_expires_at: i64,
}

/// What the plan asks for: the window `[start, end)` (whole minutes), one provider or all,
/// and how many refresh-token ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanQuery {
    pub start: i64,
    pub end: i64,
    pub provider: Option<String>,
    pub soonest: usize,
}

/// Counts over all accounts, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub by_status: Vec<(String, Status, i64)>,
    /// (provider, reason, count) of accounts `needs_reauth` or `expiring`.
    pub flagged: Vec<(String, String, i64)>,
    /// (provider, count) of refreshable accounts whose access token has already expired.
    pub access_expired: Vec<(String, i64)>,
    /// (provider, soonest refresh-token end) over refreshable accounts that have one.
    pub soonest_refresh_expiry: Vec<(String, i64)>,
}

/// Accounts whose state the reauth sweep changed.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub expiring: Vec<AccountSummary>,
    pub expired: Vec<AccountSummary>,
}

/// Settings the store needs; a subset of `[store]`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The SQLite file; with `postgres`, only where the recovery file goes (beside it).
    pub path: PathBuf,
    pub busy_timeout: Duration,
    /// Seals tokens on write, opens them on read. The default keyring stores them clear.
    pub keyring: Keyring,
    /// Use PostgreSQL at this URL instead of the SQLite file.
    pub postgres: Option<PgOptions>,
}

#[derive(Clone, Debug)]
pub struct PgOptions {
    pub url: SecretString,
    /// Most connections this process holds.
    pub pool_size: usize,
}

/// What one `rekey_batch` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyBatch {
    /// The highest account id looked at; the next batch starts after it. None: no more rows.
    pub last_id: Option<i64>,
    pub resealed: usize,
}

/// What `rekey` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyReport {
    pub resealed: u64,
    /// Accounts still not under the primary key at the end: written meanwhile by a process
    /// that seals with another key (a daemon not restarted with the new config).
    pub remaining: u64,
}

/// A reply channel of `Store::record`.
pub(crate) type Reply = oneshot::Sender<Result<Recorded, StoreError>>;

//! How a refresh failed: the class that decides what happens to the account, and the
//! failure (class, message, status, retry hint) a token request ends in. Plain data.

use crate::model::ReauthReason;
use std::time::Duration;

/// How a failed refresh is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// For good: flag the account (after checking its generation did not move).
    Rejected(ReauthReason),
    /// Our client credentials or request are wrong: log loudly, leave accounts, retry slowly.
    Config,
    /// 429, 5xx, timeouts, broken answers: back off and retry; never flags.
    Transient,
    /// An answer that fits no rule (a redirect, an error without an OAuth body): this
    /// account's, retried slowly, until several accounts in a row get one (then the
    /// provider's configuration; see `provider_state`).
    Unexpected,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Rejected(_) => "rejected",
            FailureClass::Config => "config_error",
            FailureClass::Transient => "transient",
            FailureClass::Unexpected => "unexpected_answer",
        }
    }
}

/// A refresh that did not produce tokens. `message` never contains a secret.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderFailure {
    pub class: FailureClass,
    pub message: String,
    pub http_status: Option<u16>,
    pub retry_after: Option<Duration>,
    /// The request may have reached the provider and its answer was not read (a timeout, a
    /// connection cut after sending, a 2xx body cut off or unreadable): the provider may
    /// have rotated the refresh token in an answer that is lost.
    pub answer_lost: bool,
}

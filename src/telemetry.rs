//! Logging: tracing-subscriber in JSON (machines) or pretty (people) on stderr, a level that
//! SIGHUP can change, and the stable events admins alert on.
//!
//! Logs go to stderr so that stdout carries only command output (`--json` stays parseable).
//! `json_line.rs` writes the JSON lines; `capture.rs` keeps log output for unit tests.

#[cfg(test)]
pub(crate) mod capture;
mod json_line;

use crate::clock::rfc3339;
use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// Changes the log filter at run time (SIGHUP).
#[derive(Clone)]
pub struct LogHandle(Option<reload::Handle<EnvFilter, Registry>>);

impl LogHandle {
    /// A handle that changes nothing (tests, when logging was set up elsewhere).
    pub fn none() -> Self {
        LogHandle(None)
    }

    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(()); // RUST_LOG wins over the config, also on reload
        }
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        match &self.0 {
            Some(h) => h.reload(filter).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `log.level`.
pub fn init(cfg: &LogConfig) -> LogHandle {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let res = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(json_line::JsonLine::new())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if res.is_err() {
        return LogHandle::none();
    }
    LogHandle(Some(handle))
}

/// The one WARN event per account per flagging that admins grep and alert on.
pub fn reauth_required(
    account: i64,
    provider: &str,
    subject: &str,
    label: Option<&str>,
    reason: &str,
    refresh_expires_at: Option<i64>,
    reconnect_url: Option<&str>,
) {
    tracing::warn!(
        event = "reauth_required",
        account,
        provider,
        subject,
        label = label.unwrap_or(""),
        reason,
        refresh_expires_at = refresh_expires_at.map(rfc3339).unwrap_or_default(),
        reconnect = %reconnect_command(provider, account),
        reconnect_url = reconnect_url.unwrap_or(""),
        "account {account} ({provider}/{subject}) needs re-authorization: {reason}"
    );
}

/// The INFO event of a failing account that works again: `failures` transient failures in
/// a row before, or a flag (`reason`) that a refresh or a reconnect lifted.
pub fn account_recovered(
    account: i64,
    provider: &str,
    subject: &str,
    failures: i64,
    reason: Option<&str>,
) {
    tracing::info!(
        event = "account_recovered",
        account,
        provider,
        subject,
        failures,
        reason = reason.unwrap_or(""),
        "account {account} ({provider}/{subject}) works again"
    );
}

/// The command an admin runs (with the user at the browser) to re-authorize an account.
pub fn reconnect_command(provider: &str, account: i64) -> String {
    format!("refreshd connect {provider} --account {account}")
}

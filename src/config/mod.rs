//! Configuration: the settings as the user wrote them, validated into typed settings.
//! Built-in defaults < TOML file < `REFRESHD_*` environment (`__` nests).
//!
//! - `types.rs`: one type per section, with its defaults.
//! - `load.rs`: reading the sources with figment.
//! - `validate.rs`: every rule on the values, one function per section.
//! - `profile.rs`: a configured provider's effective profile.
//! - `secret_file.rs`: secrets and keys read from the files the config names.
//! - `errors.rs`: errors that name the key, its source (file and line, or the environment
//!   variable) and what is allowed.

mod errors;
mod load;
mod profile;
mod secret_file;
#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests;
mod types;
mod validate;

pub use errors::ConfigError;
pub use secret_file::expand_credentials_path;
pub use types::{
    AppConfig, ConnectConfig, FilePolicy, LogConfig, LogFormat, NotifyConfig, ProviderConfig,
    ProxyConfig, ReauthConfig, RefreshConfig, RefreshLines, ServerConfig, ShutdownConfig,
    SinkConfig, SinkFormat, StoreConfig, WebhookConfig, redact_url,
};
pub use validate::{
    check_api_base, check_endpoint_url, check_redirect_uri, postgres_url as validate_postgres_url,
    validate_cron,
};

use crate::provider::profile::Credential;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Environment prefix; `REFRESHD_REFRESH__LEAD=5m` sets `refresh.lead`.
pub const ENV_PREFIX: &str = "REFRESHD_";
/// The config file read when `--config` is not given and this file exists.
pub const DEFAULT_CONFIG_FILE: &str = "refreshd.toml";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub refresh: RefreshConfig,
    pub reauth: ReauthConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub server: ServerConfig,
    pub connect: ConnectConfig,
    /// `[proxy]`: the token proxy (see `server/proxy`).
    pub proxy: ProxyConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[[sink]]`: token files kept up to date for an app (see `sink.rs`).
    pub sink: Vec<SinkConfig>,
    /// `[notify]`: state-change notifications (see `notify.rs`).
    pub notify: NotifyConfig,
    /// The file this config was read from, if any (not a key).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Config {
    /// What a configured provider refreshes with; None when it is not configured.
    pub fn credential_of(&self, name: &str) -> Option<Credential> {
        let p = self.providers.get(name)?;
        Some(
            p.profile(name)
                .map(|prof| prof.credential)
                .unwrap_or(Credential::RefreshToken),
        )
    }

    /// A configured provider's keep-alive (`refresh_at_least_every`); None when off or
    /// not configured.
    pub fn keep_alive_of(&self, name: &str) -> Option<std::time::Duration> {
        let p = self.providers.get(name)?;
        p.profile(name).ok()?.refresh_at_least_every
    }
}

//! Configuration: built-in defaults < TOML file < `REFRESHD_*` environment (`__` nests).
//! Owns loading, validation into typed settings, and errors that name the key and its source.

use crate::policy::RefreshTiming;
use crate::provider::profile::{
    ClientAuth, Credential, Method, ParamsIn, Profile, RefreshTtl, Rotation,
};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The production TikTok authorization page.
pub const TIKTOK_AUTHORIZE_URL: &str = "https://www.tiktok.com/v2/auth/authorize/";
/// The production TikTok token endpoint.
pub const TIKTOK_TOKEN_URL: &str = "https://open.tiktokapis.com/v2/oauth/token/";
/// Environment prefix; `REFRESHD_REFRESH__LEAD=5m` sets `refresh.lead`.
pub const ENV_PREFIX: &str = "REFRESHD_";
/// The config file read when `--config` is not given and this file exists.
pub const DEFAULT_CONFIG_FILE: &str = "refreshd.toml";

/// A configuration error that names the key, where its value came from, and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config key `{key}` ({source_desc}): {message}")]
    Invalid {
        key: String,
        source_desc: String,
        message: String,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{count} configuration errors:\n  {joined}")]
    Many { count: usize, joined: String },
}

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
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[[sink]]`: token files kept up to date for an app (see `sink.rs`).
    pub sink: Vec<SinkConfig>,
    /// `[notify]`: state-change notifications (see `notify.rs`).
    pub notify: NotifyConfig,
    /// The file this config was read from, if any (not a key).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite database file; created (mode 0600) when missing.
    pub path: PathBuf,
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// How long a claim protects an account from other processes.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// refresh_log rows older than this are pruned.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    /// Cron expression (with seconds) for pruning refresh_log.
    pub prune_cron: String,
    /// Key that seals tokens at rest (`refreshd keygen`); None stores them in the clear.
    pub encryption_key_file: Option<PathBuf>,
    /// Older keys: they only open values, for a key rotation (`refreshd rekey`).
    pub decryption_key_files: Vec<PathBuf>,
    /// What start-up does when a store or key file is readable by group or others.
    pub permissions: FilePolicy,
    /// PostgreSQL instead of SQLite: `postgres://user:password@host/db` (a secret: it may
    /// carry the password). `path` then only places the recovery file.
    pub url: Option<SecretString>,
    /// The same URL read from a file (Kubernetes secret, systemd credential).
    pub url_file: Option<PathBuf>,
    /// Most PostgreSQL connections one process holds.
    pub pool_size: usize,
    /// `run` may create a missing SQLite database (logged at WARN); else it refuses.
    pub create: bool,
    /// Where a stop with rotated tokens nowhere durable writes them for the operator.
    pub handoff_dir: Option<PathBuf>,
    /// Also (or, without `handoff_dir`, only) print such tokens to stdout, sealed as stored.
    pub handoff_stdout: bool,
    /// The keys read from the files above (not a key).
    #[serde(skip)]
    pub keyring: crate::crypto::Keyring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilePolicy {
    /// Log a warning and go on.
    Warn,
    /// Refuse to start.
    Refuse,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    #[serde(with = "humantime_serde")]
    pub lead: Duration,
    pub lead_fraction: f64,
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Most accounts claimed by one statement.
    pub batch: usize,
    /// Most refreshes in flight at once, all providers together.
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Retry delay after the provider rejected our client credentials.
    #[serde(with = "humantime_serde")]
    pub config_error_retry: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer (a stalled server is dropped early).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    pub max_response_bytes: usize,
    /// Longest sleep between looks at the store (notices work added by other processes).
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReauthConfig {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub sweep_cron: String,
    pub digest_cron: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `refreshd=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// The ops HTTP server: health, metrics, the token API, web connect. Off unless `listen` or
/// `unix_socket` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `host:port`, e.g. "127.0.0.1:8787".
    pub listen: Option<String>,
    /// A Unix socket serving the same routes (mode 0660), for sidecars sharing a volume.
    pub unix_socket: Option<PathBuf>,
    /// The bearer secret of the token API; without it the token routes do not exist.
    pub api_token_file: Option<PathBuf>,
    /// Read from `api_token_file` at load (not a key).
    #[serde(skip)]
    pub api_token: Option<SecretString>,
    /// `/readyz` fails when the refresh loop has not completed a pass for this long.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// The server speaks plain HTTP: a `listen` address off loopback is refused unless this
    /// says TLS (a proxy, a mesh) is in front.
    pub allow_non_loopback: bool,
    /// A connection must send its whole request head within this (slow and idle clients
    /// are closed).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a request may take (a token request that refreshes first included).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most open connections (TCP and Unix socket together); default: the open-files limit
    /// minus `fd_reserve`, at most 1024.
    pub max_connections: Option<usize>,
    /// File descriptors kept for the providers, the store, sinks and webhooks: the ops
    /// server's connections never use them.
    pub fd_reserve: usize,
    /// Most requests handled at once; more wait for a slot (within `request_timeout`).
    pub max_concurrent_requests: usize,
}

/// The web connect endpoints `/connect/{provider}/start` and `/connect/{provider}/callback`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    pub enabled: bool,
    /// How long a started authorization may take before its `state` is refused.
    #[serde(with = "humantime_serde")]
    pub state_ttl: Duration,
    /// Redirect here with `?account_id=ID&ref=..&ts=..&sig=..` after a connection (else a
    /// small HTML page); the app verifies `sig` before trusting `account_id`.
    pub success_url: Option<String>,
    /// Redirect here with `?error=CODE` after a failure (else a small HTML page).
    pub failure_url: Option<String>,
    /// The HMAC-SHA256 key signing those redirects (`ref`, `account_id`, outcome, time), so
    /// the app can tell them from a forged link. Needed with `success_url` or `failure_url`.
    pub redirect_secret: Option<SecretString>,
    /// The same key read from a file (systemd credentials, Kubernetes secrets).
    pub redirect_secret_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: None,
            unix_socket: None,
            api_token_file: None,
            api_token: None,
            stall_after: Duration::from_secs(300),
            allow_non_loopback: false,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            max_connections: None,
            fd_reserve: 256,
            max_concurrent_requests: 64,
        }
    }
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            enabled: false,
            state_ttl: Duration::from_secs(600),
            success_url: None,
            failure_url: None,
            redirect_secret: None,
            redirect_secret_file: None,
        }
    }
}

impl ServerConfig {
    /// The parsed `listen` address (validated at load).
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|l| l.parse().ok())
    }
}

/// One provider's credentials, limits and profile overrides. The table name is the
/// provider's name in the store. Every profile key is optional: a built-in kind supplies it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A built-in profile, or "generic"; defaults to the table name when that is built in.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(alias = "client_id")]
    pub client_key: String,
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// Read the secret from this file instead (systemd credentials, Kubernetes secrets).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub token_url: Option<String>,
    /// Token requests per minute to this provider.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Most refreshes of this provider claimed or in flight at once (default: 3/4 of
    /// refresh.concurrency when several providers are enabled, so a stalled one leaves
    /// room for the others; all of it when this is the only one).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// The provider's authorization page (`refreshd connect`, `authorize-url`).
    #[serde(default)]
    pub authorize_url: Option<String>,
    /// The redirect URI registered with the provider, used exactly as written.
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// Scopes requested by default when connecting an account.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Send a PKCE S256 challenge (TikTok requires it for desktop and mobile apps only).
    #[serde(default)]
    pub pkce: Option<bool>,
    // Profile overrides (see provider::profile::Profile).
    #[serde(default)]
    pub refresh_url: Option<String>,
    #[serde(default)]
    pub revoke_url: Option<String>,
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default)]
    pub params_in: Option<ParamsIn>,
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    #[serde(default)]
    pub send_client_id: Option<bool>,
    #[serde(default)]
    pub client_id_param: Option<String>,
    #[serde(default)]
    pub client_secret_param: Option<String>,
    #[serde(default)]
    pub credential: Option<Credential>,
    #[serde(default)]
    pub credential_param: Option<String>,
    #[serde(default)]
    pub grant_type: Option<String>,
    #[serde(default)]
    pub refresh_params: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub authorize_params: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub scope_separator: Option<String>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub expires_in_field: Option<String>,
    #[serde(default)]
    pub expires_at_field: Option<String>,
    #[serde(default)]
    pub refresh_expires_in_field: Option<String>,
    #[serde(default)]
    pub refresh_expires_at_field: Option<String>,
    #[serde(default)]
    pub subject_field: Option<String>,
    #[serde(default)]
    pub userinfo_url: Option<String>,
    #[serde(default)]
    pub userinfo_subject_field: Option<String>,
    /// Where a code exchange's short-lived token is traded for a long-lived one
    /// (`GET ?grant_type=..&client_secret=..&access_token=..`), and that grant type.
    #[serde(default)]
    pub upgrade_url: Option<String>,
    #[serde(default)]
    pub upgrade_grant_type: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub min_token_age: Option<Duration>,
    #[serde(default)]
    pub rotation: Option<Rotation>,
    #[serde(default)]
    pub refresh_ttl: Option<RefreshTtl>,
    /// The refresh token's lifetime when the token answer does not say (most OpenID Connect
    /// servers): counted from the first grant (`refresh_ttl = "fixed"`) or from each
    /// refresh (`"sliding"`).
    #[serde(default, with = "humantime_serde")]
    pub refresh_token_lifetime: Option<Duration>,
    #[serde(default)]
    pub reauth_errors: Option<Vec<String>>,
    #[serde(default)]
    pub reauth_messages: Option<Vec<String>>,
    #[serde(default)]
    pub config_errors: Option<Vec<String>>,
    #[serde(default)]
    pub transient_errors: Option<Vec<String>>,
}

/// What a sink file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// `{account_id, provider, subject, access_token, token_type, expires_at, scope}`.
    #[default]
    Json,
    /// The bare access token, no trailing newline.
    Token,
}

/// One `[[sink]]`: a file rewritten atomically with one account's current access token.
/// The account is chosen by `account` (its id), or by `provider` + `subject`; given both,
/// the provider and subject must match the account's or nothing is written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(default)]
    pub account: Option<i64>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    pub path: PathBuf,
    #[serde(default)]
    pub format: SinkFormat,
    /// File mode, e.g. `"0640"` (octal string) or `0o640`; default 0600.
    #[serde(default = "default_sink_mode", deserialize_with = "de_mode")]
    pub mode: u32,
}

fn default_sink_mode() -> u32 {
    0o600
}

/// A file mode as an octal string (`"0640"`) or a TOML integer (`0o640`).
fn de_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u32),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(m) => Ok(m),
        Raw::Str(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
            serde::de::Error::custom(format!(
                "not an octal file mode: {s:?}; e.g. \"0600\" or \"0640\""
            ))
        }),
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Off unless configured.
    pub webhook: Option<WebhookConfig>,
}

/// `[notify.webhook]`: a signed JSON POST on every state change (never a token).
/// `Debug` shows only the URL's scheme and host: a webhook URL's path is often a secret.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// https:// (plain http only on loopback).
    pub url: String,
    /// The HMAC-SHA256 key: inline, or better from a file.
    #[serde(default)]
    pub secret: Option<SecretString>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// One delivery attempt, connecting included.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts after a failed one (5xx, 408, 429, timeouts, connection errors).
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
    #[serde(default = "default_webhook_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(default = "default_webhook_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Events waiting for delivery; when full, new events are dropped with an error log.
    #[serde(default = "default_webhook_queue")]
    pub queue: usize,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret)
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("queue", &self.queue)
            .finish()
    }
}

/// `scheme://host[:port]/…`: enough to tell which receiver, without a secret path or query.
pub fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("");
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{host}{port}/…", url.scheme())
        }
        Err(_) => "(not a URL)".into(),
    }
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_webhook_retries() -> u32 {
    8
}
fn default_webhook_backoff_base() -> Duration {
    Duration::from_secs(1)
}
fn default_webhook_backoff_max() -> Duration {
    Duration::from_secs(300)
}
fn default_webhook_queue() -> usize {
    1000
}

fn yes() -> bool {
    true
}
fn default_rate_limit() -> u32 {
    600
}
fn default_burst() -> u32 {
    20
}

const DAY: u64 = 86_400;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("refreshd.db"),
            busy_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(300),
            log_retention: Duration::from_secs(30 * DAY),
            prune_cron: "0 17 3 * * *".into(),
            encryption_key_file: None,
            decryption_key_files: Vec::new(),
            permissions: FilePolicy::Warn,
            url: None,
            url_file: None,
            pool_size: 8,
            create: false,
            handoff_dir: None,
            handoff_stdout: false,
            keyring: crate::crypto::Keyring::default(),
        }
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            lead: Duration::from_secs(600),
            lead_fraction: 0.1,
            jitter: Duration::from_secs(120),
            min_interval: Duration::from_secs(60),
            batch: 256,
            concurrency: 32,
            backoff_base: Duration::from_secs(30),
            backoff_max: Duration::from_secs(1800),
            config_error_retry: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
            max_idle: Duration::from_secs(60),
        }
    }
}

impl Default for ReauthConfig {
    fn default() -> Self {
        ReauthConfig {
            window: Duration::from_secs(7 * DAY),
            sweep_cron: "0 */15 * * * *".into(),
            digest_cron: "0 0 9 * * *".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
        }
    }
}

impl RefreshConfig {
    pub fn timing(&self) -> RefreshTiming {
        RefreshTiming {
            lead: self.lead,
            lead_fraction: self.lead_fraction,
            jitter: self.jitter,
            min_interval: self.min_interval,
        }
    }
}

impl ProviderConfig {
    /// The profile this provider uses.
    pub fn kind<'a>(&'a self, name: &'a str) -> &'a str {
        self.kind.as_deref().unwrap_or(name)
    }

    /// The resolved profile. Validated at load, so this fails only on a hand-built config.
    pub fn profile(&self, name: &str) -> Result<Profile, String> {
        Profile::resolve(name, self).map_err(|errs| {
            errs.into_iter()
                .map(|(k, m)| format!("providers.{name}.{k}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// The built-in provider kinds this build knows.
pub const KNOWN_KINDS: &[&str] = crate::provider::profile::BUILT_IN;

impl Config {
    /// Loads defaults < `file` (or `./refreshd.toml` when `file` is None and it exists) < env.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, Env::prefixed(ENV_PREFIX))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let path = match file {
            Some(p) => {
                if !p.is_file() {
                    return Err(ConfigError::File {
                        path: p.to_path_buf(),
                        message: "not found or not a file (check --config / REFRESHD_CONFIG)"
                            .into(),
                    });
                }
                Some(p.to_path_buf())
            }
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
        };
        let mut figment = Figment::new();
        if let Some(p) = &path {
            figment = figment.merge(Toml::file_exact(p));
        }
        // REFRESHD_CONFIG selects the file; REFRESHD_TEST_* belong to the test suite.
        let env = env
            .split("__")
            .ignore(&["config"])
            .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("test_"));
        let figment = figment.merge(env);
        let mut config: Config = figment
            .extract()
            .map_err(|e| from_figment(e, path.as_deref()))?;
        config.file = path.clone();
        config
            .validate()
            .map_err(|errs| Self::describe(errs, &figment, path.as_deref()))?;
        Ok(config)
    }

    /// Loads from a TOML string (tests, the demo). No environment.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        let figment = Figment::from(Toml::string(toml));
        let mut config: Config = figment.extract().map_err(|e| from_figment(e, None))?;
        config.file = None;
        config
            .validate()
            .map_err(|errs| Self::describe(errs, &figment, None))?;
        Ok(config)
    }

    fn describe(
        errs: Vec<(String, String)>,
        figment: &Figment,
        file: Option<&Path>,
    ) -> ConfigError {
        let mut out: Vec<ConfigError> = errs
            .into_iter()
            .map(|(key, message)| ConfigError::Invalid {
                source_desc: source_of(figment, &key, file),
                key,
                message,
            })
            .collect();
        if out.len() == 1 {
            out.pop().expect("one error")
        } else {
            ConfigError::Many {
                count: out.len(),
                joined: out
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n  "),
            }
        }
    }

    /// Checks every value and resolves `*_file` secrets. Returns (key, problem) pairs.
    fn validate(&mut self) -> Result<(), Vec<(String, String)>> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut bad = |k: &str, m: String| errs.push((k.to_string(), m));
        let r = &self.refresh;
        if !(0.0..=0.9).contains(&r.lead_fraction) {
            bad(
                "refresh.lead_fraction",
                format!("must be between 0.0 and 0.9, got {}", r.lead_fraction),
            );
        }
        if r.batch == 0 || r.batch > 10_000 {
            bad(
                "refresh.batch",
                format!("must be 1..=10000, got {}", r.batch),
            );
        }
        if r.concurrency == 0 || r.concurrency > 10_000 {
            bad(
                "refresh.concurrency",
                format!("must be 1..=10000, got {}", r.concurrency),
            );
        }
        if r.backoff_base.is_zero() {
            bad("refresh.backoff_base", "must be more than 0s".into());
        }
        if r.backoff_max < r.backoff_base {
            bad(
                "refresh.backoff_max",
                format!(
                    "must be at least refresh.backoff_base ({})",
                    humantime::format_duration(r.backoff_base)
                ),
            );
        }
        if r.request_timeout.is_zero() {
            bad("refresh.request_timeout", "must be more than 0s".into());
        }
        if r.connect_timeout.is_zero() {
            bad("refresh.connect_timeout", "must be more than 0s".into());
        }
        if r.read_timeout.is_zero() {
            bad("refresh.read_timeout", "must be more than 0s".into());
        }
        if r.max_response_bytes < 1024 {
            bad(
                "refresh.max_response_bytes",
                format!("must be at least 1024, got {}", r.max_response_bytes),
            );
        }
        if r.max_idle.is_zero() {
            bad("refresh.max_idle", "must be more than 0s".into());
        }
        if r.config_error_retry.is_zero() {
            bad("refresh.config_error_retry", "must be more than 0s".into());
        }
        // A lease shorter than one request could let a second process claim an account
        // whose refresh is still in flight.
        if self.store.lease < r.request_timeout * 2 + Duration::from_secs(5) {
            bad(
                "store.lease",
                format!(
                    "must be at least twice refresh.request_timeout plus 5s ({}), got {}",
                    humantime::format_duration(r.request_timeout * 2 + Duration::from_secs(5)),
                    humantime::format_duration(self.store.lease)
                ),
            );
        }
        // A refresh still in flight when the grace ends would be answered after the store
        // closed: the provider's rotation would be lost.
        if self.shutdown.grace < r.request_timeout + Duration::from_secs(5) {
            bad(
                "shutdown.grace",
                format!(
                    "must be at least refresh.request_timeout plus 5s ({}), got {}",
                    humantime::format_duration(r.request_timeout + Duration::from_secs(5)),
                    humantime::format_duration(self.shutdown.grace)
                ),
            );
        }
        let sv = &mut self.server;
        if let Some(l) = &sv.listen {
            match l.parse::<std::net::SocketAddr>() {
                Err(_) => bad(
                    "server.listen",
                    format!("not a host:port address: {l:?}; e.g. \"127.0.0.1:8787\""),
                ),
                Ok(a) if !a.ip().is_loopback() && !sv.allow_non_loopback => bad(
                    "server.listen",
                    format!(
                        "{l:?} is not a loopback address, and the ops server speaks plain HTTP: the bearer secret, tokens and connect traffic would cross the network in clear. Listen on 127.0.0.1 behind a TLS proxy, or set server.allow_non_loopback = true once TLS is in front (see docs/src/web-connect-security.md)"
                    ),
                ),
                Ok(_) => {}
            }
        }
        for (key, d) in [
            ("server.header_read_timeout", sv.header_read_timeout),
            ("server.request_timeout", sv.request_timeout),
        ] {
            if d.is_zero() {
                bad(key, "must be more than 0s".into());
            }
        }
        if sv.max_connections == Some(0) {
            bad("server.max_connections", "must be at least 1".into());
        }
        if sv.max_concurrent_requests == 0 || sv.max_concurrent_requests > 10_000 {
            bad(
                "server.max_concurrent_requests",
                format!("must be 1..=10000, got {}", sv.max_concurrent_requests),
            );
        }
        if sv.stall_after <= r.max_idle {
            bad(
                "server.stall_after",
                format!(
                    "must be longer than refresh.max_idle ({}), or an idle loop looks stalled",
                    humantime::format_duration(r.max_idle)
                ),
            );
        }
        if let Some(path) = &sv.api_token_file {
            match read_secret_file(path) {
                Ok(s) if secrecy::ExposeSecret::expose_secret(&s).len() < 16 => bad(
                    "server.api_token_file",
                    format!(
                        "the secret in {} is shorter than 16 characters; generate one, e.g. `openssl rand -hex 32`",
                        path.display()
                    ),
                ),
                Ok(s) => sv.api_token = Some(s),
                Err(m) => bad("server.api_token_file", m),
            }
        }
        let c = &self.connect;
        if c.enabled && sv.listen.is_none() && sv.unix_socket.is_none() {
            bad(
                "connect.enabled",
                "the web connect endpoints are served by the ops server: set server.listen too"
                    .into(),
            );
        }
        if c.state_ttl < Duration::from_secs(30) {
            bad(
                "connect.state_ttl",
                "must be at least 30s: a person has to log in and consent in that time".into(),
            );
        }
        for (key, u) in [
            ("connect.success_url", &c.success_url),
            ("connect.failure_url", &c.failure_url),
        ] {
            if let Some(u) = u
                && let Err(m) = check_redirect_uri(u)
            {
                bad(key, m);
            }
        }
        let c = &mut self.connect;
        match (&c.redirect_secret, &c.redirect_secret_file) {
            (Some(_), Some(_)) => bad(
                "connect.redirect_secret_file",
                "give either redirect_secret or redirect_secret_file, not both".into(),
            ),
            (None, Some(path)) => match read_secret_file(path) {
                Ok(s) => c.redirect_secret = Some(s),
                Err(m) => bad("connect.redirect_secret_file", m),
            },
            _ => {}
        }
        match &c.redirect_secret {
            Some(s) if secrecy::ExposeSecret::expose_secret(s).len() < 16 => bad(
                "connect.redirect_secret",
                "shorter than 16 characters; generate one, e.g. `openssl rand -hex 32`".into(),
            ),
            None if c.success_url.is_some() || c.failure_url.is_some() => bad(
                "connect.redirect_secret_file",
                "missing: success_url and failure_url redirects are signed so the app can tell them from forged links; set redirect_secret_file (e.g. `openssl rand -hex 32 > FILE`), see docs/src/web-connect-security.md".into(),
            ),
            _ => {}
        }
        if self.store.path.as_os_str().is_empty() {
            bad("store.path", "must not be empty".into());
        }
        match (&self.store.url, &self.store.url_file) {
            (Some(_), Some(_)) => bad(
                "store.url_file",
                "give either store.url or store.url_file, not both".into(),
            ),
            (None, Some(f)) => match read_secret_file(f) {
                Ok(u) => self.store.url = Some(u),
                Err(m) => bad("store.url_file", m),
            },
            _ => {}
        }
        if let Some(u) = &self.store.url
            && let Err(m) =
                crate::store::postgres::validate_url(secrecy::ExposeSecret::expose_secret(u))
        {
            bad("store.url", m);
        }
        if !(1..=1000).contains(&self.store.pool_size) {
            bad("store.pool_size", "must be 1 to 1000".into());
        }
        // Older keys alone would open sealed tokens but write rotations in the clear: an
        // encrypted store would quietly decay. Refuse instead of guessing that was meant.
        if self.store.encryption_key_file.is_none() && !self.store.decryption_key_files.is_empty() {
            bad(
                "store.decryption_key_files",
                "older keys need store.encryption_key_file too (the key new tokens are sealed with)"
                    .into(),
            );
        }
        // Hand-off lines are sealed as in the database: plaintext without a key, and stdout
        // under systemd is the journal.
        if self.store.handoff_stdout && self.store.encryption_key_file.is_none() {
            bad(
                "store.handoff_stdout",
                "printing hand-off tokens needs store.encryption_key_file (without it they would be plaintext, e.g. in the journal); set a key or use store.handoff_dir".into(),
            );
        }
        // Key files are read here, like secrets, so a bad one is named as a config error.
        let primary = self
            .store
            .encryption_key_file
            .as_deref()
            .map(expand_credentials_path);
        let older: Result<Vec<PathBuf>, String> = self
            .store
            .decryption_key_files
            .iter()
            .map(|p| expand_credentials_path(p))
            .collect();
        match (primary.transpose(), older) {
            (Err(m), _) => bad("store.encryption_key_file", m),
            (_, Err(m)) => bad("store.decryption_key_files", m),
            (Ok(primary), Ok(older)) => {
                match crate::crypto::Keyring::load(primary.as_deref(), &older) {
                    Ok(ring) => self.store.keyring = ring,
                    Err(e) => {
                        let key = match &e {
                            crate::crypto::CryptoError::KeyFile { path, .. }
                                if Some(path) != primary.as_ref() =>
                            {
                                "store.decryption_key_files"
                            }
                            _ => "store.encryption_key_file",
                        };
                        bad(key, e.to_string())
                    }
                }
            }
        }
        for (key, expr) in [
            ("reauth.sweep_cron", &self.reauth.sweep_cron),
            ("reauth.digest_cron", &self.reauth.digest_cron),
            ("store.prune_cron", &self.store.prune_cron),
        ] {
            if let Err(m) = crate::jobs::validate_cron(expr) {
                bad(key, m);
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log.level",
                format!("not a valid filter ({e}); use e.g. \"info\" or \"refreshd=debug,warn\""),
            );
        }
        for (name, p) in self.providers.iter_mut() {
            let key = |k: &str| format!("providers.{name}.{k}");
            let profile = match Profile::resolve(name, p) {
                Ok(prof) => Some(prof),
                Err(pe) => {
                    for (k, m) in pe {
                        bad(&key(&k), m);
                    }
                    None
                }
            };
            if p.client_key.trim().is_empty() {
                bad(&key("client_key"), "must not be empty".into());
            }
            match (&p.client_secret, &p.client_secret_file) {
                (Some(_), Some(_)) => bad(
                    &key("client_secret_file"),
                    "give either client_secret or client_secret_file, not both".into(),
                ),
                // Instagram and Threads refresh without client credentials.
                (None, None) if profile.as_ref().is_some_and(|p| !p.needs_secret()) => {}
                (None, None) => bad(
                    &key("client_secret"),
                    "missing: set client_secret or client_secret_file".into(),
                ),
                (None, Some(path)) => match read_secret_file(path) {
                    Ok(s) => p.client_secret = Some(s),
                    Err(m) => bad(&key("client_secret_file"), m),
                },
                (Some(_), None) => {}
            }
            if let Some(u) = &p.token_url
                && let Err(m) = check_endpoint_url(u)
            {
                bad(&key("token_url"), m);
            }
            for (k, u) in [
                ("authorize_url", &p.authorize_url),
                ("refresh_url", &p.refresh_url),
                ("revoke_url", &p.revoke_url),
                ("userinfo_url", &p.userinfo_url),
                ("upgrade_url", &p.upgrade_url),
            ] {
                if let Some(u) = u.as_ref().filter(|u| !u.is_empty())
                    && let Err(m) = check_endpoint_url(u)
                {
                    bad(&key(k), m);
                }
            }
            if p.concurrency == Some(0) {
                bad(&key("concurrency"), "must be at least 1".into());
            }
            if let Some(u) = &p.redirect_uri
                && let Err(m) = check_redirect_uri(u)
            {
                bad(&key("redirect_uri"), m);
            }
            if let Some(s) = p
                .scopes
                .iter()
                .find(|s| s.trim().is_empty() || s.contains([',', ' ']))
            {
                bad(
                    &key("scopes"),
                    format!(
                        "each scope must be one non-empty name without commas or spaces, got {s:?}"
                    ),
                );
            }
            if p.rate_limit == 0 {
                bad(
                    &key("rate_limit"),
                    "must be at least 1 request per minute".into(),
                );
            }
            if p.burst == 0 {
                bad(&key("burst"), "must be at least 1".into());
            }
        }
        self.validate_ops(&mut errs);
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// What a configured provider refreshes with; None when it is not configured.
    pub fn credential_of(&self, name: &str) -> Option<Credential> {
        let p = self.providers.get(name)?;
        Some(
            p.profile(name)
                .map(|prof| prof.credential)
                .unwrap_or(Credential::RefreshToken),
        )
    }

    /// `[[sink]]` and `[notify]`; resolves `notify.webhook.secret_file`.
    fn validate_ops(&mut self, errs: &mut Vec<(String, String)>) {
        let mut bad = |k: String, m: String| errs.push((k, m));
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.sink.iter().enumerate() {
            let key = |k: &str| format!("sink[{i}].{k}");
            match (s.account, &s.provider, &s.subject) {
                (Some(_), None, None) | (_, Some(_), Some(_)) => {}
                (None, None, None) => bad(
                    key("account"),
                    "missing: choose the account by `account = ID` or by `provider` and `subject`"
                        .into(),
                ),
                _ => bad(
                    key("subject"),
                    "give `provider` and `subject` together (or only `account`)".into(),
                ),
            }
            if s.path.file_name().is_none() {
                bad(
                    key("path"),
                    format!("must name a file: {}", s.path.display()),
                );
            } else if !seen.insert(s.path.clone()) {
                bad(
                    key("path"),
                    format!("{} is used by another sink", s.path.display()),
                );
            }
            if s.mode > 0o777 || s.mode & 0o400 == 0 || s.mode & 0o002 != 0 {
                bad(
                    key("mode"),
                    format!(
                        "{:#o}: must be at most 0777, readable by its owner and not world-writable",
                        s.mode
                    ),
                );
            }
        }
        if let Some(w) = self.notify.webhook.as_mut() {
            let key = |k: &str| format!("notify.webhook.{k}");
            // The message names the URL without its path: that may be a secret.
            if let Err(m) = check_endpoint_url(&w.url) {
                bad(
                    key("url"),
                    m.replace(&format!("{:?}", w.url), &redact_url(&w.url)),
                );
            }
            match (&w.secret, &w.secret_file) {
                (Some(_), Some(_)) => bad(
                    key("secret_file"),
                    "give either secret or secret_file, not both".into(),
                ),
                (None, None) => bad(
                    key("secret"),
                    "missing: set secret_file (or secret), the HMAC key receivers verify with"
                        .into(),
                ),
                (None, Some(path)) => match read_secret_file(path) {
                    Ok(s) => w.secret = Some(s),
                    Err(m) => bad(key("secret_file"), m),
                },
                (Some(_), None) => {}
            }
            if w.timeout.is_zero() {
                bad(key("timeout"), "must be more than 0s".into());
            }
            if w.backoff_base.is_zero() {
                bad(key("backoff_base"), "must be more than 0s".into());
            }
            if w.backoff_max < w.backoff_base {
                bad(
                    key("backoff_max"),
                    "must be at least notify.webhook.backoff_base".into(),
                );
            }
            if w.queue == 0 || w.queue > 1_000_000 {
                bad(
                    key("queue"),
                    format!("must be 1..=1000000, got {}", w.queue),
                );
            }
        }
    }

    /// The authorization page of a provider: configured, or its profile's.
    pub fn authorize_url(name: &str, p: &ProviderConfig) -> Option<String> {
        p.profile(name).ok().and_then(|prof| prof.authorize_url)
    }

    /// The token endpoint of a provider: configured, or its profile's.
    pub fn token_url(name: &str, p: &ProviderConfig) -> String {
        p.profile(name)
            .map(|prof| prof.token_url)
            .unwrap_or_default()
    }
}

/// A redirect URI must be an absolute http(s) URL without a fragment.
pub fn check_redirect_uri(u: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(u).map_err(|e| {
        format!("not an absolute URL ({e}): {u:?}; e.g. \"http://127.0.0.1:8788/callback\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "must be an http:// or https:// URL with a host: {u:?}"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!("must not contain a #fragment: {u:?}"));
    }
    Ok(url)
}

/// Token endpoints must be https, except on loopback (tests, the sandbox).
pub fn check_endpoint_url(u: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(u).map_err(|e| format!("not a URL ({e}): {u:?}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback {
                Ok(url)
            } else {
                Err(format!(
                    "must be https:// (plain http is allowed only on loopback): {u:?}"
                ))
            }
        }
        other => Err(format!("scheme {other:?} not allowed, use https://: {u:?}")),
    }
}

/// Expands `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) in a file path.
pub fn expand_credentials_path(path: &Path) -> Result<PathBuf, String> {
    let raw = path.to_string_lossy();
    if raw.contains("$CREDENTIALS_DIRECTORY") || raw.contains("${CREDENTIALS_DIRECTORY}") {
        let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
            format!("{raw} uses $CREDENTIALS_DIRECTORY, which is not set (only systemd sets it)")
        })?;
        Ok(PathBuf::from(
            raw.replace("${CREDENTIALS_DIRECTORY}", &dir)
                .replace("$CREDENTIALS_DIRECTORY", &dir),
        ))
    } else {
        Ok(path.to_path_buf())
    }
}

/// Expands `$CREDENTIALS_DIRECTORY` and reads a secret file.
fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let expanded = expand_credentials_path(path)?;
    let text = std::fs::read_to_string(&expanded)
        .map_err(|e| format!("cannot read secret file {}: {e}", expanded.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret file {} is empty", expanded.display()));
    }
    Ok(SecretString::from(secret.to_string()))
}

fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

/// Says where the value of `key` came from: `file:line`, the env var, or the default.
fn source_of(figment: &Figment, key: &str, file: Option<&Path>) -> String {
    // Array entries (`sink[0].path`) are found through their array's key.
    let md = figment
        .find_metadata(key)
        .or_else(|| figment.find_metadata(key.split('[').next().unwrap_or(key)));
    match md {
        Some(md) => describe_metadata(md, key, file),
        None => "built-in default".to_string(),
    }
}

fn describe_metadata(md: &figment::Metadata, key: &str, file: Option<&Path>) -> String {
    match &md.source {
        Some(figment::Source::File(p)) => match find_line(p, key) {
            Some(line) => format!("{}:{line}", p.display()),
            None => p.display().to_string(),
        },
        _ if md.name.to_lowercase().contains("environment") => {
            format!("environment variable {}", env_var_name(key))
        }
        _ => match file {
            Some(p) if md.name.contains("TOML") => p.display().to_string(),
            _ => md.name.to_string(),
        },
    }
}

/// Best-effort line of `key` (dotted) in a TOML file: figment keeps the file, not the line.
fn find_line(path: &Path, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None; // a syntax error: its message carries the line
    }
    let text = std::fs::read_to_string(path).ok()?;
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) => (t, l),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim().trim_matches('"');
            let full = if current.is_empty() {
                k.to_string()
            } else {
                format!("{current}.{k}")
            };
            if full == key || (current == table && k == leaf) {
                return Some(i + 1);
            }
        }
    }
    // The key is absent (a missing value): point at its table.
    text.lines()
        .position(|l| l.trim().trim_matches(|c| c == '[' || c == ']').trim() == table)
        .map(|i| i + 1)
}

fn is_secret_key(leaf: &str) -> bool {
    leaf == "client_secret" || leaf == "secret" || leaf == "redirect_secret"
}

/// figment's message, without echoing a secret value or the file's text (TOML syntax errors
/// quote the offending line, which may hold a secret).
fn error_message(kind: &figment::error::Kind, secret: bool) -> String {
    use figment::error::{Actual, Kind};
    let kind_of = |a: &Actual| match a {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "a value of another type",
    };
    match kind {
        Kind::InvalidType(a, exp) if secret => {
            format!("invalid type: found {}, expected {exp}", kind_of(a))
        }
        Kind::InvalidValue(a, exp) if secret => {
            format!("invalid value: found {}, expected {exp}", kind_of(a))
        }
        Kind::Message(m) => m
            .lines()
            .filter(|l| {
                let rest = l
                    .trim_start()
                    .trim_start_matches(|c: char| c.is_ascii_digit());
                !l.trim().is_empty() && !rest.trim_start().starts_with('|')
            })
            .collect::<Vec<_>>()
            .join(": "),
        other => other.to_string(),
    }
}

fn from_figment(err: figment::Error, file: Option<&Path>) -> ConfigError {
    let mut out = Vec::new();
    for e in err {
        let key = e.path.join(".");
        let source_desc = match &e.metadata {
            Some(md) => describe_metadata(md, &key, file),
            None => "built-in default".into(),
        };
        let message = match &e.kind {
            figment::error::Kind::UnknownField(f, expected) => {
                // figment puts the unknown field at the end of the path already.
                let key_full = if key.is_empty() {
                    f.clone()
                } else if e.path.last() == Some(f) {
                    key.clone()
                } else {
                    format!("{key}.{f}")
                };
                let src = match &e.metadata {
                    Some(md) => describe_metadata(md, &key_full, file),
                    None => source_desc.clone(),
                };
                out.push(ConfigError::Invalid {
                    key: key_full,
                    source_desc: src,
                    message: format!("unknown key; expected one of: {}", expected.join(", ")),
                });
                continue;
            }
            figment::error::Kind::MissingField(f) => {
                let key_full = if key.is_empty() {
                    f.to_string()
                } else if e.path.last().map(String::as_str) == Some(f.as_ref()) {
                    key.clone()
                } else {
                    format!("{key}.{f}")
                };
                out.push(ConfigError::Invalid {
                    key: key_full,
                    source_desc,
                    message: "missing: this key is required".into(),
                });
                continue;
            }
            other => error_message(other, e.path.last().is_some_and(|k| is_secret_key(k))),
        };
        out.push(ConfigError::Invalid {
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key
            },
            source_desc,
            message,
        });
    }
    if out.len() == 1 {
        out.pop().expect("one error")
    } else {
        ConfigError::Many {
            count: out.len(),
            joined: out
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Auto => "auto",
            LogFormat::Json => "json",
            LogFormat::Pretty => "pretty",
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    const GOOD: &str = r#"
[store]
path = "x.db"

[refresh]
lead = "5m"

[providers.tiktok]
client_key = "ck"
client_secret = "cs-SECRET"
token_url = "http://127.0.0.1:9/v2/oauth/token/"
"#;

    #[test]
    fn defaults_then_file_then_env() {
        Jail::expect_with(|jail| {
            jail.create_file("refreshd.toml", GOOD)?;
            jail.set_env("REFRESHD_REFRESH__JITTER", "3m");
            jail.set_env("REFRESHD_REFRESH__LEAD", "7m");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.store.path, PathBuf::from("x.db"));
            assert_eq!(c.refresh.lead, Duration::from_secs(420)); // env beats file
            assert_eq!(c.refresh.jitter, Duration::from_secs(180));
            assert_eq!(c.refresh.batch, 256); // default
            assert_eq!(c.reauth.window, Duration::from_secs(7 * DAY));
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        Jail::expect_with(|jail| {
            jail.create_file("r.toml", "[refresh]\nlead = \"5m\"\nleed = \"5m\"\n")?;
            let err = Config::load(Some(Path::new("r.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("refresh.leed"), "{err}");
            assert!(err.contains("r.toml:3"), "{err}");
            assert!(err.contains("unknown key"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_duration_names_key_and_env_var() {
        Jail::expect_with(|_jail| {
            _jail.set_env("REFRESHD_REFRESH__LEAD", "ten minutes");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("refresh.lead"), "{err}");
            assert!(err.contains("REFRESHD_REFRESH__LEAD"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn validation_names_key_source_and_allowed_range() {
        Jail::expect_with(|jail| {
            jail.create_file("r.toml", "[refresh]\n\nlead_fraction = 1.5\n")?;
            let err = Config::load(Some(Path::new("r.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("refresh.lead_fraction"), "{err}");
            assert!(err.contains("r.toml:3"), "{err}");
            assert!(err.contains("between 0.0 and 0.9"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secret_from_file_and_never_in_debug() {
        Jail::expect_with(|jail| {
            jail.create_file("secret", "from-file-SECRET\n")?;
            jail.create_file(
                "r.toml",
                "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret_file = \"secret\"\n",
            )?;
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            let p = &c.providers["tiktok"];
            use secrecy::ExposeSecret;
            assert_eq!(
                p.client_secret.as_ref().unwrap().expose_secret(),
                "from-file-SECRET"
            );
            assert!(!format!("{c:?}").contains("SECRET"));
            Ok(())
        });
    }

    #[test]
    fn missing_secret_file_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "r.toml",
                "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret_file = \"/nope/secret\"\n",
            )?;
            let err = Config::load(Some(Path::new("r.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("providers.tiktok.client_secret_file"), "{err}");
            assert!(err.contains("/nope/secret"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn plain_http_token_url_refused_off_loopback() {
        let err = Config::from_toml_str(
            "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\ntoken_url = \"http://example.com/t\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("providers.tiktok.token_url"), "{err}");
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn bad_cron_is_named() {
        let err = Config::from_toml_str("[reauth]\nsweep_cron = \"every tuesday\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reauth.sweep_cron"), "{err}");
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(Some(Path::new("/definitely/not/here.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/definitely/not/here.toml"), "{err}");
    }

    #[test]
    fn example_config_documents_every_provider_key_and_they_parse() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml"),
        )
        .unwrap();
        // serde lists every accepted key when it meets an unknown one.
        let err = Config::from_toml_str(
            "[providers.tiktok]
client_key = \"k\"\nzzz = 1\n",
        )
        .unwrap_err()
        .to_string();
        let keys = err.split("expected one of: ").nth(1).expect(&err);
        for key in keys
            .split(", ")
            .map(|k| k.trim_matches(|c: char| c == '`' || c.is_whitespace()))
        {
            let documented = text.contains(&format!("{key} = "));
            assert!(
                documented || key == "client_id",
                "providers key {key} is not in config/refreshd.toml"
            );
        }
        // The commented profile keys are valid as written.
        let start = text.find("# Profile keys.").unwrap();
        let end = text[start..]
            .find("# ---- ")
            .map_or(text.len(), |i| start + i);
        let uncommented: String = text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::from_toml_str(&format!(
            "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n{uncommented}"
        ))
        .unwrap();
        let p = c.providers["tiktok"].profile("tiktok").unwrap();
        let builtin = Profile::built_in("tiktok").unwrap();
        assert_eq!(p.client_id_param, builtin.client_id_param);
        assert_eq!(p.rotation, builtin.rotation);
        assert_eq!(p.refresh_ttl, builtin.refresh_ttl);
    }

    #[test]
    fn key_files_are_read_with_credentials_directory_and_bad_ones_named() {
        Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            crate::crypto::generate_key_file(&dir.join("token-key")).unwrap();
            crate::crypto::generate_key_file(&dir.join("old-key")).unwrap();
            jail.set_env("CREDENTIALS_DIRECTORY", dir.display());
            jail.create_file(
                "r.toml",
                "[store]\nencryption_key_file = \"$CREDENTIALS_DIRECTORY/token-key\"\ndecryption_key_files = [\"old-key\"]\n",
            )?;
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            assert!(c.store.keyring.seals());
            assert_eq!(c.store.keyring.files().count(), 2);

            jail.create_file("short", "c2hvcnQ=\n")?;
            jail.create_file(
                "bad.toml",
                "[store]\nencryption_key_file = \"token-key\"\ndecryption_key_files = [\"short\"]\n",
            )?;
            let e = Config::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("store.decryption_key_files") && e.contains("short"),
                "{e}"
            );
            jail.create_file(
                "older.toml",
                "[store]\ndecryption_key_files = [\"old-key\"]\n",
            )?;
            let e = Config::load(Some(Path::new("older.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("need store.encryption_key_file"), "{e}");
            jail.create_file("stdout.toml", "[store]\nhandoff_stdout = true\n")?;
            let e = Config::load(Some(Path::new("stdout.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("store.handoff_stdout") && e.contains("store.encryption_key_file"),
                "{e}"
            );
            jail.create_file(
                "sealed-stdout.toml",
                "[store]\nencryption_key_file = \"token-key\"\nhandoff_stdout = true\n",
            )?;
            Config::load(Some(Path::new("sealed-stdout.toml"))).map_err(|e| e.to_string())?;
            jail.create_file("missing.toml", "[store]\nencryption_key_file = \"nope\"\n")?;
            let e = Config::load(Some(Path::new("missing.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("store.encryption_key_file") && e.contains("nope"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_non_loopback_listen_address_needs_allow_non_loopback() {
        for addr in ["0.0.0.0:8787", "192.0.2.7:8787", "[::]:8787"] {
            let e = Config::from_toml_str(&format!("[server]\nlisten = {addr:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("server.listen")
                    && e.contains("not a loopback address")
                    && e.contains("allow_non_loopback"),
                "{addr}: {e}"
            );
            let c = Config::from_toml_str(&format!(
                "[server]\nlisten = {addr:?}\nallow_non_loopback = true\n"
            ))
            .unwrap();
            assert!(c.server.allow_non_loopback);
        }
        for addr in ["127.0.0.1:8787", "[::1]:0"] {
            Config::from_toml_str(&format!("[server]\nlisten = {addr:?}\n")).unwrap();
        }
    }

    #[test]
    fn redirects_to_the_app_need_a_signing_secret() {
        let base = "[server]\nlisten = \"127.0.0.1:0\"\n[connect]\nenabled = true\nsuccess_url = \"https://app.example/ok\"\n";
        let e = Config::from_toml_str(base).unwrap_err().to_string();
        assert!(
            e.contains("connect.redirect_secret_file") && e.contains("signed"),
            "{e}"
        );
        let e = Config::from_toml_str(&format!("{base}redirect_secret = \"short\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("connect.redirect_secret") && !e.contains("short\""),
            "{e}"
        );
        Jail::expect_with(|jail| {
            jail.create_file("redirect-secret", "from-file-0123456789abcdef\n")?;
            jail.create_file(
                "r.toml",
                &format!("{base}redirect_secret_file = \"redirect-secret\"\n"),
            )?;
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                secrecy::ExposeSecret::expose_secret(c.connect.redirect_secret.as_ref().unwrap()),
                "from-file-0123456789abcdef"
            );
            assert!(!format!("{c:?}").contains("from-file"));
            Ok(())
        });
    }

    #[test]
    fn test_suite_variables_are_not_config_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("REFRESHD_TEST_POSTGRES_URL", "postgres://x@127.0.0.1/y");
            Config::load(None).map_err(|e| e.to_string())?;
            jail.set_env("REFRESHD_TSET_TYPO", "1");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("REFRESHD_TSET_TYPO"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn example_config_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml");
        Jail::expect_with(|jail| {
            jail.create_file("client_secret", "s")?;
            let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
            let d = Config::default();
            // the example documents the defaults: its values must match them
            assert_eq!(c.refresh.lead, d.refresh.lead);
            assert_eq!(c.refresh.batch, d.refresh.batch);
            assert_eq!(c.reauth.window, d.reauth.window);
            assert_eq!(c.store.lease, d.store.lease);
            assert_eq!(c.store.encryption_key_file, d.store.encryption_key_file);
            assert_eq!(c.store.decryption_key_files, d.store.decryption_key_files);
            assert_eq!(c.store.permissions, d.store.permissions);
            assert_eq!(c.store.pool_size, d.store.pool_size);
            assert_eq!(c.store.create, d.store.create);
            assert_eq!(c.store.handoff_dir, d.store.handoff_dir);
            assert_eq!(c.store.handoff_stdout, d.store.handoff_stdout);
            assert!(c.store.url.is_none() && c.store.url_file.is_none());
            assert_eq!(c.refresh.read_timeout, d.refresh.read_timeout);
            assert_eq!(c.refresh.request_timeout, d.refresh.request_timeout);
            assert_eq!(c.refresh.connect_timeout, d.refresh.connect_timeout);
            assert_eq!(c.server.allow_non_loopback, d.server.allow_non_loopback);
            assert_eq!(c.server.header_read_timeout, d.server.header_read_timeout);
            assert_eq!(c.server.request_timeout, d.server.request_timeout);
            assert_eq!(c.server.max_connections, d.server.max_connections);
            assert_eq!(c.server.fd_reserve, d.server.fd_reserve);
            assert_eq!(
                c.server.max_concurrent_requests,
                d.server.max_concurrent_requests
            );
            Ok(())
        });
    }

    #[test]
    fn sinks_and_webhook_parse_and_validate() {
        Jail::expect_with(|jail| {
            jail.create_file("hook-secret", "hook-SECRET\n")?;
            jail.create_file(
                "r.toml",
                r#"
[[sink]]
account = 42
path = "/run/app/token.json"

[[sink]]
provider = "tiktok"
subject = "-000abc"
path = "/run/app/token"
format = "token"
mode = "0640"

[notify.webhook]
url = "https://hooks.example.com/refreshd"
secret_file = "hook-secret"
retries = 2
"#,
            )?;
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.sink.len(), 2);
            assert_eq!(c.sink[0].account, Some(42));
            assert_eq!(c.sink[0].format, SinkFormat::Json);
            assert_eq!(c.sink[0].mode, 0o600);
            assert_eq!(c.sink[1].format, SinkFormat::Token);
            assert_eq!(c.sink[1].mode, 0o640);
            let w = c.notify.webhook.as_ref().unwrap();
            use secrecy::ExposeSecret;
            assert_eq!(w.secret.as_ref().unwrap().expose_secret(), "hook-SECRET");
            assert_eq!(w.retries, 2);
            assert_eq!(w.timeout, Duration::from_secs(10));
            assert!(!format!("{c:?}").contains("SECRET"));
            Ok(())
        });
    }

    #[test]
    fn bad_sinks_and_webhooks_are_named() {
        let cases = [
            ("[[sink]]\npath = \"/t\"\n", "sink[0].account"),
            (
                "[[sink]]\nprovider = \"tiktok\"\npath = \"/t\"\n",
                "sink[0].subject",
            ),
            (
                "[[sink]]\naccount = 1\npath = \"/t\"\n[[sink]]\naccount = 2\npath = \"/t\"\n",
                "sink[1].path",
            ),
            (
                "[[sink]]\naccount = 1\npath = \"/t\"\nmode = \"0666\"\n",
                "sink[0].mode",
            ),
            (
                "[[sink]]\naccount = 1\npath = \"/t\"\nmode = \"rw\"\n",
                "not an octal file mode",
            ),
            (
                "[[sink]]\naccount = 1\npath = \"/t\"\nformat = \"yaml\"\n",
                "sink",
            ),
            (
                "[notify.webhook]\nurl = \"http://hooks.example.com/x\"\nsecret = \"s\"\n",
                "notify.webhook.url",
            ),
            (
                "[notify.webhook]\nurl = \"https://hooks.example.com/x\"\n",
                "notify.webhook.secret",
            ),
        ];
        for (toml, want) in cases {
            let err = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml}: {err}");
        }
        // A secret in a bad place is not echoed.
        let err = Config::from_toml_str("[notify.webhook]\nurl = 5\nsecret = 7\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains('7'), "{err}");
        // A webhook URL's path is often its secret: neither errors nor Debug show it.
        let err = Config::from_toml_str(
            "[notify.webhook]\nurl = \"http://hooks.example.com/T0/B0/PATH-SECRET\"\nsecret = \"s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("http://hooks.example.com/…"), "{err}");
        assert!(!err.contains("PATH-SECRET"), "{err}");
        let c = Config::from_toml_str(
            "[notify.webhook]\nurl = \"https://hooks.example.com/T0/B0/PATH-SECRET\"\nsecret = \"s\"\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("PATH-SECRET"));
    }

    #[test]
    fn example_config_sink_and_webhook_examples_load_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# ---- Token files").expect("sink section");
        let (head, tail) = text.split_at(start);
        let uncommented: String = tail
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("/etc/refreshd/webhook-secret", "webhook-secret");
        Jail::expect_with(|jail| {
            jail.create_file("client_secret", "s")?;
            jail.create_file("webhook-secret", "w")?;
            jail.create_file("r.toml", &format!("{head}{uncommented}"))?;
            let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.sink.len(), 2);
            assert_eq!(c.sink[1].format, SinkFormat::Token);
            let w = c.notify.webhook.expect("webhook");
            let d = Config::from_toml_str(
                "[notify.webhook]\nurl = \"https://h.example.com/\"\nsecret = \"w\"\n",
            )
            .unwrap()
            .notify
            .webhook
            .unwrap();
            // the example documents the defaults
            assert_eq!(
                (w.timeout, w.retries, w.backoff_base, w.backoff_max, w.queue),
                (d.timeout, d.retries, d.backoff_base, d.backoff_max, d.queue)
            );
            assert_eq!(c.sink[0].mode, 0o600);
            Ok(())
        });
    }
}

//! The sections of the configuration as the user writes them: one type per table, with
//! its built-in defaults and the serde rules that read it (unknown keys are refused).

use crate::policy::RefreshTiming;
use crate::provider::profile::{ClientAuth, Credential, Method, ParamsIn, RefreshTtl, Rotation};
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Most PostgreSQL connections one process pools (at least 2; one more for its lock).
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
    /// The level of the one line each successful refresh logs.
    pub refreshes: RefreshLines,
}

/// `log.refreshes`: the level of the `refresh` line of a rotation (failures keep theirs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshLines {
    /// One line per refresh at `info`.
    Info,
    /// At `debug`: at `log.level = "info"` a successful refresh logs nothing.
    Debug,
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
    /// Serve the read-only admin page `GET /admin` (with the token API's bearer secret).
    pub admin_page: bool,
}

/// `[proxy]`: the token proxy `/proxy/{account}/...` on the ops server, served with the
/// token API (same bearer secret) unless switched off here.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub enabled: bool,
    /// Largest request body forwarded (buffered, so a retry after a 401 can resend it);
    /// larger ones get 413.
    pub max_request_bytes: usize,
    /// Largest answer passed back (streamed); a larger one gets 502, or is cut.
    pub max_response_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the API's response head.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait for the next bytes of the API's answer body.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            max_request_bytes: 10 << 20,
            max_response_bytes: 100 << 20,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
        }
    }
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
            admin_page: false,
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
    /// Most requests of this provider in flight at once, with up to as many again claimed
    /// ahead (`policy::claim_depth`) (default: 3/4 of refresh.concurrency when several
    /// providers are enabled, so a stalled one leaves room for the others; all of it when
    /// this is the only one).
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
    /// The provider's API base the token proxy forwards to (`https://`, no query).
    #[serde(default)]
    pub api_base: Option<String>,
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
    /// Keep-alive: refresh every account of this provider at least this often, even when
    /// its access token lives longer (providers that revoke unused refresh tokens).
    #[serde(default, with = "humantime_serde")]
    pub refresh_at_least_every: Option<Duration>,
    #[serde(default)]
    pub reauth_errors: Option<Vec<String>>,
    #[serde(default)]
    pub reauth_messages: Option<Vec<String>>,
    #[serde(default)]
    pub config_errors: Option<Vec<String>>,
    #[serde(default)]
    pub transient_errors: Option<Vec<String>>,
    /// App tokens (client-credentials grant) kept for this provider, by app name: added
    /// at start and on reload (`lifecycle::sync_apps`).
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
}

/// `[providers.NAME.apps.APP]`: one app token the daemon keeps (as `refreshd apps add`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The scope asked for, as the provider writes it; none by default.
    #[serde(default)]
    pub scope: String,
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
            refreshes: RefreshLines::Info,
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

//! Configuration: built-in defaults < TOML file < `REFRESHD_*` environment (`__` nests).
//! Owns loading, validation into typed settings, and errors that name the key and its source.

use crate::policy::RefreshTiming;
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
    pub providers: BTreeMap<String, ProviderConfig>,
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

/// One provider's credentials and limits. The table name is the provider's name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Which built-in profile: defaults to the table name.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
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
    pub pkce: bool,
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
}

/// The built-in provider kinds this build knows.
pub const KNOWN_KINDS: &[&str] = &["tiktok"];

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
            .filter(|k| !k.as_str().starts_with("test_"));
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
        if self.store.path.as_os_str().is_empty() {
            bad("store.path", "must not be empty".into());
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
            let kind = p.kind(name).to_string();
            if !KNOWN_KINDS.contains(&kind.as_str()) {
                bad(
                    &key("kind"),
                    format!(
                        "unknown provider kind {kind:?}; built-in kinds: {}",
                        KNOWN_KINDS.join(", ")
                    ),
                );
            }
            if p.client_key.trim().is_empty() {
                bad(&key("client_key"), "must not be empty".into());
            }
            match (&p.client_secret, &p.client_secret_file) {
                (Some(_), Some(_)) => bad(
                    &key("client_secret_file"),
                    "give either client_secret or client_secret_file, not both".into(),
                ),
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
            if let Some(u) = &p.authorize_url
                && let Err(m) = check_endpoint_url(u)
            {
                bad(&key("authorize_url"), m);
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
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// The authorization page of a provider: configured, or the built-in default.
    pub fn authorize_url(name: &str, p: &ProviderConfig) -> String {
        let _ = name;
        p.authorize_url
            .clone()
            .unwrap_or_else(|| TIKTOK_AUTHORIZE_URL.to_string())
    }

    /// The token endpoint of a provider: configured, or the built-in default.
    pub fn token_url(name: &str, p: &ProviderConfig) -> String {
        // Only TikTok is built in so far; other kinds bring their own URL.
        let _ = name;
        p.token_url
            .clone()
            .unwrap_or_else(|| TIKTOK_TOKEN_URL.to_string())
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
    match figment.find_metadata(key) {
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
    leaf == "client_secret"
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
            assert_eq!(c.refresh.read_timeout, d.refresh.read_timeout);
            assert_eq!(c.refresh.request_timeout, d.refresh.request_timeout);
            assert_eq!(c.refresh.connect_timeout, d.refresh.connect_timeout);
            Ok(())
        });
    }
}

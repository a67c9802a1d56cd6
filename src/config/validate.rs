//! Validation of a loaded `Config`: one function per section, each rule written once. Reads
//! what the config names (`*_file` secrets, key files) so a bad file is a config error.
//! Problems are (key, message) pairs; `errors.rs` adds where each value came from.

use super::secret_file::{expand_credentials_path, read_secret_file};
use super::types::{
    ConnectConfig, LogConfig, ProviderConfig, ProxyConfig, ReauthConfig, RefreshConfig,
    ServerConfig, ShutdownConfig, SinkConfig, StoreConfig, WebhookConfig, redact_url,
};
use super::{Config, profile};
use crate::provider::profile::{Profile, RefreshTtl};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Shortest bearer or signing secret accepted.
const MIN_SECRET_LEN: usize = 16;

impl Config {
    /// Checks every value and resolves `*_file` secrets. Returns (key, problem) pairs.
    pub(super) fn validate(&mut self) -> Result<(), Vec<(String, String)>> {
        let mut p = Problems::default();
        refresh(&mut p, &self.refresh);
        in_flight_bounds(&mut p, &self.refresh, &self.store, &self.shutdown);
        server(&mut p, &mut self.server, &self.refresh);
        connect(&mut p, &mut self.connect, &self.server);
        proxy(&mut p, &self.proxy);
        store(&mut p, &mut self.store);
        crons(&mut p, &self.reauth, &self.store);
        log(&mut p, &self.log);
        for (name, provider_config) in self.providers.iter_mut() {
            if let Some(profile) = provider(&mut p, name, provider_config) {
                keep_alive(&mut p, name, &profile, &self.refresh, &self.reauth);
            }
        }
        sinks(&mut p, &self.sink);
        if let Some(w) = self.notify.webhook.as_mut() {
            webhook(&mut p, w);
        }
        if p.0.is_empty() { Ok(()) } else { Err(p.0) }
    }
}

/// The problems found, in the order the rules ran.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn bad(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push((key.into(), message.into()));
    }

    /// A duration that must not be zero.
    fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.bad(key, "must be more than 0s");
        }
    }

    /// A count in `1..=max`.
    fn count(&mut self, key: &str, n: usize, max: usize) {
        if n == 0 || n > max {
            self.bad(key, format!("must be 1..={max}, got {n}"));
        }
    }

    /// A check of one value: its error message is the problem.
    fn check<T>(&mut self, key: &str, checked: Result<T, String>) {
        if let Err(m) = checked {
            self.bad(key, m);
        }
    }

    /// A secret given inline (`inline`) or read from `inline_file` (reported as `file_key`),
    /// not both; the file's content goes into `secret`. Whether it may be missing is the
    /// caller's rule.
    fn secret_or_file(
        &mut self,
        file_key: &str,
        inline: &str,
        secret: &mut Option<SecretString>,
        file: Option<&Path>,
    ) {
        match (secret.is_some(), file) {
            (true, Some(_)) => self.bad(
                file_key,
                format!("give either {inline} or {inline}_file, not both"),
            ),
            (false, Some(path)) => match read_secret_file(path) {
                Ok(s) => *secret = Some(s),
                Err(m) => self.bad(file_key, m),
            },
            _ => {}
        }
    }
}

fn too_short(secret: &SecretString) -> bool {
    secret.expose_secret().len() < MIN_SECRET_LEN
}

fn refresh(p: &mut Problems, r: &RefreshConfig) {
    if !(0.0..=0.9).contains(&r.lead_fraction) {
        p.bad(
            "refresh.lead_fraction",
            format!("must be between 0.0 and 0.9, got {}", r.lead_fraction),
        );
    }
    p.count("refresh.batch", r.batch, 10_000);
    p.count("refresh.concurrency", r.concurrency, 10_000);
    p.positive("refresh.backoff_base", r.backoff_base);
    if r.backoff_max < r.backoff_base {
        p.bad(
            "refresh.backoff_max",
            format!(
                "must be at least refresh.backoff_base ({})",
                humantime::format_duration(r.backoff_base)
            ),
        );
    }
    p.positive("refresh.request_timeout", r.request_timeout);
    p.positive("refresh.connect_timeout", r.connect_timeout);
    p.positive("refresh.read_timeout", r.read_timeout);
    if r.max_response_bytes < 1024 {
        p.bad(
            "refresh.max_response_bytes",
            format!("must be at least 1024, got {}", r.max_response_bytes),
        );
    }
    p.positive("refresh.max_idle", r.max_idle);
    p.positive("refresh.config_error_retry", r.config_error_retry);
}

/// The lease and the shutdown grace against the longest refresh request.
fn in_flight_bounds(
    p: &mut Problems,
    r: &RefreshConfig,
    store: &StoreConfig,
    shutdown: &ShutdownConfig,
) {
    let fmt = humantime::format_duration;
    // A lease shorter than one request could let a second process claim an account
    // whose refresh is still in flight.
    let lease_min = r.request_timeout * 2 + Duration::from_secs(5);
    if store.lease < lease_min {
        p.bad(
            "store.lease",
            format!(
                "must be at least twice refresh.request_timeout plus 5s ({}), got {}",
                fmt(lease_min),
                fmt(store.lease)
            ),
        );
    }
    // A refresh still in flight when the grace ends would be answered after the store
    // closed: the provider's rotation would be lost.
    let grace_min = r.request_timeout + Duration::from_secs(5);
    if shutdown.grace < grace_min {
        p.bad(
            "shutdown.grace",
            format!(
                "must be at least refresh.request_timeout plus 5s ({}), got {}",
                fmt(grace_min),
                fmt(shutdown.grace)
            ),
        );
    }
}

/// `[server]`; reads `api_token_file`.
fn server(p: &mut Problems, sv: &mut ServerConfig, r: &RefreshConfig) {
    if let Some(l) = &sv.listen {
        match l.parse::<std::net::SocketAddr>() {
            Err(_) => p.bad(
                "server.listen",
                format!("not a host:port address: {l:?}; e.g. \"127.0.0.1:8787\""),
            ),
            Ok(a) if !a.ip().is_loopback() && !sv.allow_non_loopback => p.bad(
                "server.listen",
                format!(
                    "{l:?} is not a loopback address, and the ops server speaks plain HTTP: the bearer secret, tokens and connect traffic would cross the network in clear. Listen on 127.0.0.1 behind a TLS proxy, or set server.allow_non_loopback = true once TLS is in front (see docs/src/web-connect-security.md)"
                ),
            ),
            Ok(_) => {}
        }
    }
    p.positive("server.header_read_timeout", sv.header_read_timeout);
    p.positive("server.request_timeout", sv.request_timeout);
    if sv.max_connections == Some(0) {
        p.bad("server.max_connections", "must be at least 1");
    }
    p.count(
        "server.max_concurrent_requests",
        sv.max_concurrent_requests,
        10_000,
    );
    if sv.stall_after <= r.max_idle {
        p.bad(
            "server.stall_after",
            format!(
                "must be longer than refresh.max_idle ({}), or an idle loop looks stalled",
                humantime::format_duration(r.max_idle)
            ),
        );
    }
    if let Some(path) = &sv.api_token_file {
        match read_secret_file(path) {
            Ok(s) if too_short(&s) => p.bad(
                "server.api_token_file",
                format!(
                    "the secret in {} is shorter than {MIN_SECRET_LEN} characters; generate one, e.g. `openssl rand -hex 32`",
                    path.display()
                ),
            ),
            Ok(s) => sv.api_token = Some(s),
            Err(m) => p.bad("server.api_token_file", m),
        }
    }
    if sv.admin_page
        && (sv.api_token_file.is_none() || (sv.listen.is_none() && sv.unix_socket.is_none()))
    {
        p.bad(
            "server.admin_page",
            "the admin page is served by the ops server with the token API's bearer secret: set server.listen (or server.unix_socket) and server.api_token_file too",
        );
    }
}

/// `[connect]`; reads `redirect_secret_file`.
fn connect(p: &mut Problems, c: &mut ConnectConfig, sv: &ServerConfig) {
    if c.enabled && sv.listen.is_none() && sv.unix_socket.is_none() {
        p.bad(
            "connect.enabled",
            "the web connect endpoints are served by the ops server: set server.listen too",
        );
    }
    if c.state_ttl < Duration::from_secs(30) {
        p.bad(
            "connect.state_ttl",
            "must be at least 30s: a person has to log in and consent in that time",
        );
    }
    for (key, u) in [
        ("connect.success_url", &c.success_url),
        ("connect.failure_url", &c.failure_url),
    ] {
        if let Some(u) = u {
            p.check(key, check_redirect_uri(u));
        }
    }
    p.secret_or_file(
        "connect.redirect_secret_file",
        "redirect_secret",
        &mut c.redirect_secret,
        c.redirect_secret_file.as_deref(),
    );
    match &c.redirect_secret {
        Some(s) if too_short(s) => p.bad(
            "connect.redirect_secret",
            format!("shorter than {MIN_SECRET_LEN} characters; generate one, e.g. `openssl rand -hex 32`"),
        ),
        None if c.success_url.is_some() || c.failure_url.is_some() => p.bad(
            "connect.redirect_secret_file",
            "missing: success_url and failure_url redirects are signed so the app can tell them from forged links; set redirect_secret_file (e.g. `openssl rand -hex 32 > FILE`), see docs/src/web-connect-security.md",
        ),
        _ => {}
    }
}

/// `[store]`; reads `url_file` and the key files into the keyring.
/// `[proxy]`.
fn proxy(p: &mut Problems, px: &ProxyConfig) {
    p.count("proxy.max_request_bytes", px.max_request_bytes, 1 << 30);
    if px.max_response_bytes == 0 {
        p.bad("proxy.max_response_bytes", "must be at least 1");
    }
    p.positive("proxy.connect_timeout", px.connect_timeout);
    p.positive("proxy.timeout", px.timeout);
    p.positive("proxy.read_timeout", px.read_timeout);
}

fn store(p: &mut Problems, s: &mut StoreConfig) {
    if s.path.as_os_str().is_empty() {
        p.bad("store.path", "must not be empty");
    }
    p.secret_or_file(
        "store.url_file",
        "store.url",
        &mut s.url,
        s.url_file.as_deref(),
    );
    if let Some(u) = &s.url {
        p.check("store.url", postgres_url(u.expose_secret()));
    }
    if !(1..=1000).contains(&s.pool_size) {
        p.bad("store.pool_size", "must be 1 to 1000");
    }
    // Older keys alone would open sealed tokens but write rotations in the clear: an
    // encrypted store would quietly decay. Refuse instead of guessing that was meant.
    if s.encryption_key_file.is_none() && !s.decryption_key_files.is_empty() {
        p.bad(
            "store.decryption_key_files",
            "older keys need store.encryption_key_file too (the key new tokens are sealed with)",
        );
    }
    // Hand-off lines are sealed as in the database: plaintext without a key, and stdout
    // under systemd is the journal.
    if s.handoff_stdout && s.encryption_key_file.is_none() {
        p.bad(
            "store.handoff_stdout",
            "printing hand-off tokens needs store.encryption_key_file (without it they would be plaintext, e.g. in the journal); set a key or use store.handoff_dir",
        );
    }
    keyring(p, s);
}

/// Reads the key files here, like secrets, so a bad one is named as a config error.
fn keyring(p: &mut Problems, s: &mut StoreConfig) {
    let primary = s
        .encryption_key_file
        .as_deref()
        .map(expand_credentials_path);
    let older: Result<Vec<PathBuf>, String> = s
        .decryption_key_files
        .iter()
        .map(|f| expand_credentials_path(f))
        .collect();
    match (primary.transpose(), older) {
        (Err(m), _) => p.bad("store.encryption_key_file", m),
        (_, Err(m)) => p.bad("store.decryption_key_files", m),
        (Ok(primary), Ok(older)) => {
            match crate::crypto::Keyring::load(primary.as_deref(), &older) {
                Ok(ring) => s.keyring = ring,
                Err(e) => {
                    let key = match &e {
                        crate::crypto::CryptoError::KeyFile { path, .. }
                            if Some(path) != primary.as_ref() =>
                        {
                            "store.decryption_key_files"
                        }
                        _ => "store.encryption_key_file",
                    };
                    p.bad(key, e.to_string())
                }
            }
        }
    }
}

fn crons(p: &mut Problems, reauth: &ReauthConfig, store: &StoreConfig) {
    p.check("reauth.sweep_cron", validate_cron(&reauth.sweep_cron));
    p.check("reauth.digest_cron", validate_cron(&reauth.digest_cron));
    p.check("store.prune_cron", validate_cron(&store.prune_cron));
}

fn log(p: &mut Problems, log: &LogConfig) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        p.bad(
            "log.level",
            format!("not a valid filter ({e}); use e.g. \"info\" or \"refreshd=debug,warn\""),
        );
    }
}

/// `[providers.NAME]`: its profile, credentials, endpoints and limits; reads
/// `client_secret_file`. Returns the resolved profile when it resolves.
fn provider(p: &mut Problems, name: &str, pc: &mut ProviderConfig) -> Option<Profile> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let profile = match profile::resolve(name, pc) {
        Ok(prof) => Some(prof),
        Err(problems) => {
            for (k, m) in problems {
                p.bad(key(&k), m);
            }
            None
        }
    };
    if pc.client_key.trim().is_empty() {
        p.bad(key("client_key"), "must not be empty");
    }
    p.secret_or_file(
        &key("client_secret_file"),
        "client_secret",
        &mut pc.client_secret,
        pc.client_secret_file.as_deref(),
    );
    // Instagram and Threads refresh without client credentials.
    let secret_optional = profile.as_ref().is_some_and(|prof| !prof.needs_secret());
    if pc.client_secret.is_none() && pc.client_secret_file.is_none() && !secret_optional {
        p.bad(
            key("client_secret"),
            "missing: set client_secret or client_secret_file",
        );
    }
    if let Some(u) = &pc.token_url {
        p.check(&key("token_url"), check_endpoint_url(u));
    }
    if let Some(u) = pc.api_base.as_ref().filter(|u| !u.is_empty()) {
        p.check(&key("api_base"), check_api_base(u));
    }
    for (k, u) in [
        ("authorize_url", &pc.authorize_url),
        ("refresh_url", &pc.refresh_url),
        ("revoke_url", &pc.revoke_url),
        ("userinfo_url", &pc.userinfo_url),
        ("upgrade_url", &pc.upgrade_url),
    ] {
        if let Some(u) = u.as_ref().filter(|u| !u.is_empty()) {
            p.check(&key(k), check_endpoint_url(u));
        }
    }
    if pc.concurrency == Some(0) {
        p.bad(key("concurrency"), "must be at least 1");
    }
    if let Some(u) = &pc.redirect_uri {
        p.check(&key("redirect_uri"), check_redirect_uri(u));
    }
    if let Some(s) = pc
        .scopes
        .iter()
        .find(|s| s.trim().is_empty() || s.contains([',', ' ']))
    {
        p.bad(
            key("scopes"),
            format!("each scope must be one non-empty name without commas or spaces, got {s:?}"),
        );
    }
    if pc.rate_limit == 0 {
        p.bad(key("rate_limit"), "must be at least 1 request per minute");
    }
    if pc.burst == 0 {
        p.bad(key("burst"), "must be at least 1");
    }
    for (app, ac) in &pc.apps {
        if let Err(problem) = crate::model::check_app_name(app) {
            p.bad(
                key(&format!("apps.{app}")),
                format!("app name {app:?} {problem}"),
            );
        }
        if ac.scope.chars().any(char::is_control) {
            p.bad(
                key(&format!("apps.{app}.scope")),
                "must not hold control characters",
            );
        }
    }
    profile
}

/// `providers.NAME.refresh_at_least_every` against the floors that would override it and
/// the refresh token's lifetime it is meant to stay within.
fn keep_alive(p: &mut Problems, name: &str, prof: &Profile, r: &RefreshConfig, re: &ReauthConfig) {
    let Some(every) = prof.refresh_at_least_every else {
        return;
    };
    let key = format!("providers.{name}.refresh_at_least_every");
    let fmt = humantime::format_duration;
    if every.is_zero() {
        return p.positive(&key, every);
    }
    let floors = [
        (
            r.min_interval,
            "refresh.min_interval",
            "no refresh comes sooner",
        ),
        (
            prof.min_token_age,
            "the provider's min_token_age",
            "it refuses to refresh a younger token",
        ),
    ];
    if let Some((floor, name, why)) = floors.into_iter().find(|(floor, ..)| every < *floor) {
        return p.bad(
            key,
            format!(
                "{} is shorter than {name} ({}): {why}; set it to at least that",
                fmt(every),
                fmt(floor)
            ),
        );
    }
    let Some(life) = prof.refresh_token_lifetime else {
        return;
    };
    // A sliding lifetime restarts at each refresh: refreshed sooner than its reauth window
    // opens, the account is never flagged. A fixed one only ends; refreshing it less often
    // than it lives does nothing.
    let (limit, why) = match prof.refresh_ttl {
        RefreshTtl::Sliding if life > re.window => (
            life - re.window,
            format!(
                "refresh_token_lifetime ({}) minus reauth.window ({}): an account refreshed less often is flagged expiring in between",
                fmt(life),
                fmt(re.window)
            ),
        ),
        _ => (life, format!("refresh_token_lifetime ({})", fmt(life))),
    };
    if every >= limit {
        p.bad(
            key,
            format!(
                "{} must be shorter than {why}; set it to less than {}",
                fmt(every),
                fmt(limit)
            ),
        );
    }
}

/// `[[sink]]`: each names one account and its own file.
fn sinks(p: &mut Problems, sinks: &[SinkConfig]) {
    let mut seen = HashSet::new();
    for (i, s) in sinks.iter().enumerate() {
        let key = |k: &str| format!("sink[{i}].{k}");
        match (s.account, &s.provider, &s.subject) {
            (Some(_), None, None) | (_, Some(_), Some(_)) => {}
            (None, None, None) => p.bad(
                key("account"),
                "missing: choose the account by `account = ID` or by `provider` and `subject`",
            ),
            _ => p.bad(
                key("subject"),
                "give `provider` and `subject` together (or only `account`)",
            ),
        }
        if s.path.file_name().is_none() {
            p.bad(
                key("path"),
                format!("must name a file: {}", s.path.display()),
            );
        } else if !seen.insert(s.path.clone()) {
            p.bad(
                key("path"),
                format!("{} is used by another sink", s.path.display()),
            );
        }
        if s.mode > 0o777 || s.mode & 0o400 == 0 || s.mode & 0o002 != 0 {
            p.bad(
                key("mode"),
                format!(
                    "{:#o}: must be at most 0777, readable by its owner and not world-writable",
                    s.mode
                ),
            );
        }
    }
}

/// `[notify.webhook]`; reads `secret_file`.
fn webhook(p: &mut Problems, w: &mut WebhookConfig) {
    let key = |k: &str| format!("notify.webhook.{k}");
    // The message names the URL without its path: that may be a secret.
    if let Err(m) = check_endpoint_url(&w.url) {
        p.bad(
            key("url"),
            m.replace(&format!("{:?}", w.url), &redact_url(&w.url)),
        );
    }
    p.secret_or_file(
        &key("secret_file"),
        "secret",
        &mut w.secret,
        w.secret_file.as_deref(),
    );
    if w.secret.is_none() && w.secret_file.is_none() {
        p.bad(
            key("secret"),
            "missing: set secret_file (or secret), the HMAC key receivers verify with",
        );
    }
    p.positive(&key("timeout"), w.timeout);
    p.positive(&key("backoff_base"), w.backoff_base);
    if w.backoff_max < w.backoff_base {
        p.bad(
            key("backoff_max"),
            "must be at least notify.webhook.backoff_base",
        );
    }
    p.count(&key("queue"), w.queue, 1_000_000);
}

/// Checks a cron expression (six fields: sec min hour day month weekday) with the same
/// parser the scheduler uses.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| {
            format!(
                "not a valid cron expression {expr:?} ({e:?}); six fields are needed: sec min hour day month weekday, e.g. \"0 */15 * * * *\""
            )
        })
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

/// An API base of the token proxy: an endpoint URL (above) that is only a base: no user
/// name, password, query or fragment, which a forwarded path could not keep apart.
pub fn check_api_base(u: &str) -> Result<url::Url, String> {
    let url = check_endpoint_url(u)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("must not carry a user name or password: {u:?}"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "must be a base without ?query or #fragment, e.g. \"https://open.tiktokapis.com\": {u:?}"
        ));
    }
    Ok(url)
}

/// Checks a `store.url` without connecting; the message never carries the password.
pub fn postgres_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must start with postgres:// or postgresql:// (leave it unset for SQLite at store.path)".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("is not a valid PostgreSQL URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_validation() {
        assert!(validate_cron("0 */15 * * * *").is_ok());
        assert!(validate_cron("0 0 9 * * *").is_ok());
        let e = validate_cron("every tuesday").unwrap_err();
        assert!(
            e.contains("every tuesday") && e.contains("six fields"),
            "{e}"
        );
        assert!(
            validate_cron("*/15 * * * *").is_err(),
            "five fields lack seconds"
        );
    }
}

//! SIGHUP's reload: re-reads the config, names the sections that changed, keeps (with a
//! warning) the settings that take effect on restart only, and builds the new settings the
//! running daemon switches to.

use crate::config::{Config, ConfigError};
use crate::engine::Settings;
use crate::provider::ProviderError;
use crate::telemetry::LogHandle;
use sha2::{Digest, Sha256};

/// Re-reads the config. Ok(None): nothing changed. Settings that need a restart are kept.
pub(super) fn reload_settings(
    old: &Settings,
    file: Option<&std::path::Path>,
    log: &LogHandle,
) -> Result<Option<Settings>, ReloadError> {
    let mut new = Config::load(file)?;
    let mut changed = changed_sections(&old.config, &new);
    if new.store.path != old.config.store.path {
        tracing::warn!(
            event = "reload_needs_restart",
            key = "store.path",
            "store.path changed; it takes effect on restart only"
        );
        new.store.path = old.config.store.path.clone();
    }
    // The open store seals with the keys it was opened with.
    if new.store.encryption_key_file != old.config.store.encryption_key_file
        || new.store.decryption_key_files != old.config.store.decryption_key_files
    {
        tracing::warn!(
            event = "reload_needs_restart",
            key = "store.encryption_key_file",
            "encryption keys changed; they take effect on restart only"
        );
        new.store.encryption_key_file = old.config.store.encryption_key_file.clone();
        new.store.decryption_key_files = old.config.store.decryption_key_files.clone();
        new.store.keyring = old.config.store.keyring.clone();
    }
    changed.retain(|c| {
        c != "store" || format!("{:?}", new.store) != format!("{:?}", old.config.store)
    });
    // Listeners, routes, sinks and webhooks are set up once; values read per request
    // (stall_after, the API secret, connect URLs) take effect now.
    let (o, n) = (&old.config, &new);
    for (key, differs) in [
        ("server.listen", o.server.listen != n.server.listen),
        (
            "server.unix_socket",
            o.server.unix_socket != n.server.unix_socket,
        ),
        (
            "server.api_token_file",
            o.server.api_token.is_some() != n.server.api_token.is_some(),
        ),
        (
            "server limits (allow_non_loopback, timeouts, connections)",
            (
                o.server.allow_non_loopback,
                o.server.header_read_timeout,
                o.server.request_timeout,
                o.server.max_connections,
                o.server.fd_reserve,
                o.server.max_concurrent_requests,
            ) != (
                n.server.allow_non_loopback,
                n.server.header_read_timeout,
                n.server.request_timeout,
                n.server.max_connections,
                n.server.fd_reserve,
                n.server.max_concurrent_requests,
            ),
        ),
        ("connect.enabled", o.connect.enabled != n.connect.enabled),
        ("sink", format!("{:?}", o.sink) != format!("{:?}", n.sink)),
        (
            "notify",
            format!("{:?}", o.notify) != format!("{:?}", n.notify),
        ),
    ] {
        if differs {
            tracing::warn!(
                event = "reload_needs_restart",
                key,
                "{key} changed; it takes effect on restart only"
            );
        }
    }
    if changed.is_empty() {
        tracing::info!(
            event = "config_reloaded",
            changed = "",
            "config reloaded: nothing changed"
        );
        return Ok(None);
    }
    log.set_level(&new.log.level).map_err(ReloadError::Log)?;
    let settings = Settings::reloaded(new, old)?;
    tracing::info!(event = "config_reloaded", changed = %changed.join(","), "config reloaded");
    Ok(Some(settings))
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("log.level: {0}")]
    Log(String),
}

/// Names of the config sections that differ. Compared through `Debug`, which redacts
/// secrets, so a secret's change shows through `client_secret_file` or not at all; the
/// providers are compared by their parts including the secret.
fn changed_sections(a: &Config, b: &Config) -> Vec<String> {
    use secrecy::ExposeSecret;
    let mut out = Vec::new();
    let mut cmp = |name: &str, x: String, y: String| {
        if x != y {
            out.push(name.to_string());
        }
    };
    cmp("store", format!("{:?}", a.store), format!("{:?}", b.store));
    cmp(
        "refresh",
        format!("{:?}", a.refresh),
        format!("{:?}", b.refresh),
    );
    cmp(
        "reauth",
        format!("{:?}", a.reauth),
        format!("{:?}", b.reauth),
    );
    cmp("log", format!("{:?}", a.log), format!("{:?}", b.log));
    cmp(
        "shutdown",
        format!("{:?}", a.shutdown),
        format!("{:?}", b.shutdown),
    );
    // The API secret is rotated by rewriting its file: compare its content too.
    let api = |c: &Config| {
        c.server
            .api_token
            .as_ref()
            .map(|s| s.expose_secret().to_string())
    };
    cmp(
        "server",
        format!("{:?} {:?}", a.server, api(a).map(Sha256::digest)),
        format!("{:?} {:?}", b.server, api(b).map(Sha256::digest)),
    );
    cmp(
        "connect",
        format!("{:?}", a.connect),
        format!("{:?}", b.connect),
    );
    let names: std::collections::BTreeSet<&String> =
        a.providers.keys().chain(b.providers.keys()).collect();
    for n in names {
        let (pa, pb) = (a.providers.get(n), b.providers.get(n));
        let same = match (pa, pb) {
            (Some(x), Some(y)) => {
                format!("{x:?}") == format!("{y:?}")
                    && x.client_secret
                        .as_ref()
                        .map(|s| s.expose_secret().to_string())
                        == y.client_secret
                            .as_ref()
                            .map(|s| s.expose_secret().to_string())
            }
            _ => false,
        };
        if !same {
            out.push(format!("providers.{n}"));
        }
    }
    out
}

//! Token file sinks (`[[sink]]`): files an app reads its current access token from, like a
//! Vault Agent sink. Each file is rewritten atomically (temp file in the same directory,
//! fsync, rename, fsync of the directory) at start-up and after every rotation of its
//! account, so a reader sees the old token or the new one, never a mix.
//!
//! A file is only ever written with the tokens of the account its sink selects: the account
//! read from the store must match the sink's id and, when given, its provider and subject.
//! An account that is missing, needs re-authorization or is disabled leaves the file as it
//! is, with a warning naming the sink path and the account.

use crate::clock::{Clock, rfc3339};
use crate::config::{SinkConfig, SinkFormat};
use crate::events::{Event, Events};
use crate::model::{Account, Status};
use crate::store::{Store, StoreError};
use secrecy::ExposeSecret;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "sink {path}: cannot write the token file: {source} (check that the directory exists and is writable by refreshd)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sink {path}: cannot read account {account} from the store: {source}")]
    Store {
        path: PathBuf,
        account: String,
        source: StoreError,
    },
}

/// What happened to one sink on one write attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// The file now holds the account's current token.
    Wrote { account_id: i64, generation: i64 },
    /// Left as it is (the reason was logged).
    Skipped,
}

/// The running sink task. `stop` writes what the last events asked for, then ends.
pub struct SinkHandle {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SinkHandle {
    /// Call after the engine has stopped (so its last rotations are in the files) and before
    /// the store closes.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Starts the sink task: subscribes to `events` now (so no rotation after this call is
/// missed), writes every sink once, then rewrites a sink after each rotation of its account.
/// Without sinks, nothing runs.
pub fn spawn(sinks: Vec<SinkConfig>, store: Store, events: &Events, clock: Clock) -> SinkHandle {
    let stop = CancellationToken::new();
    if sinks.is_empty() {
        return SinkHandle { stop, task: None };
    }
    let mut rx = events.subscribe();
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let sinks = Sinks {
            sinks,
            store,
            clock,
        };
        sinks.write_all().await;
        loop {
            let ev = tokio::select! {
                biased;
                ev = rx.recv() => ev,
                _ = stop2.cancelled() => break,
            };
            sinks.handle(ev).await;
        }
        // The engine has drained: write what its last rotations changed.
        loop {
            match rx.try_recv() {
                Ok(ev) => sinks.handle(Ok(ev)).await,
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    sinks.handle(Err(RecvError::Lagged(n))).await
                }
                Err(_) => break,
            }
        }
    });
    SinkHandle {
        stop,
        task: Some(task),
    }
}

struct Sinks {
    sinks: Vec<SinkConfig>,
    store: Store,
    clock: Clock,
}

impl Sinks {
    async fn handle(&self, ev: Result<Event, RecvError>) {
        match ev {
            Ok(Event::TokensChanged {
                account_id,
                provider,
                subject,
            }) => {
                for s in self
                    .sinks
                    .iter()
                    .filter(|s| selects(s, account_id, &provider, &subject))
                {
                    self.write_logged(s).await;
                }
            }
            Ok(Event::ReauthRequired {
                account_id,
                provider,
                subject,
                reason,
                ..
            }) => {
                for s in self
                    .sinks
                    .iter()
                    .filter(|s| selects(s, account_id, &provider, &subject))
                {
                    tracing::warn!(event = "sink_stale", path = %s.path.display(), account = account_id,
                        provider = %provider, subject = %subject, reason = %reason,
                        "the sink's account needs re-authorization: its token file will go stale until the user logs in again");
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    event = "sink_lagged",
                    missed = n,
                    "sink task fell behind the events; rewriting every sink from the store"
                );
                self.write_all().await;
            }
            Err(RecvError::Closed) => {}
        }
    }

    async fn write_all(&self) {
        for s in &self.sinks {
            self.write_logged(s).await;
        }
    }

    async fn write_logged(&self, s: &SinkConfig) {
        match write_sink(s, &self.store, self.clock.now()).await {
            Ok(Written::Wrote {
                account_id,
                generation,
            }) => tracing::debug!(event = "sink_written", path = %s.path.display(),
                account = account_id, generation, "token file written"),
            Ok(Written::Skipped) => {}
            Err(e) => tracing::error!(event = "sink_failed", error = %e, "token file not written"),
        }
    }
}

/// Whether sink `s` is about this account (by id, or by provider and subject).
fn selects(s: &SinkConfig, account_id: i64, provider: &str, subject: &str) -> bool {
    match s.account {
        Some(id) => id == account_id,
        None => s.provider.as_deref() == Some(provider) && s.subject.as_deref() == Some(subject),
    }
}

fn describe(s: &SinkConfig) -> String {
    match (s.account, &s.provider, &s.subject) {
        (Some(id), _, _) => id.to_string(),
        (None, Some(p), Some(sub)) => format!("{p}/{sub}"),
        _ => "(none)".into(),
    }
}

/// Reads the sink's account and writes its file, or says why not.
pub async fn write_sink(s: &SinkConfig, store: &Store, now: i64) -> Result<Written, SinkError> {
    let found = match (s.account, &s.provider, &s.subject) {
        (Some(id), _, _) => store.get(id).await,
        (None, Some(p), Some(sub)) => store.find(p, sub).await,
        _ => Ok(None),
    }
    .map_err(|source| SinkError::Store {
        path: s.path.clone(),
        account: describe(s),
        source,
    })?;
    let path = s.path.display();
    let Some(a) = found else {
        tracing::warn!(event = "sink_account_missing", path = %path, account = %describe(s),
            "the sink's account is not in the store; its token file is left as it is (check the sink's account selector)");
        return Ok(Written::Skipped);
    };
    // Belt and braces: never write another account's token into this file.
    if !selects(s, a.id, &a.provider, &a.subject)
        || s.provider.as_deref().is_some_and(|p| p != a.provider)
        || s.subject.as_deref().is_some_and(|sub| sub != a.subject)
    {
        tracing::warn!(event = "sink_account_mismatch", path = %path, account = a.id,
            provider = %a.provider, subject = %a.subject, selector = %describe(s),
            "the account found does not match the sink's provider and subject; its token file is left as it is");
        return Ok(Written::Skipped);
    }
    if matches!(a.status, Status::NeedsReauth | Status::Disabled) {
        tracing::warn!(event = "sink_stale", path = %path, account = a.id, provider = %a.provider,
            subject = %a.subject, status = %a.status,
            reason = a.reauth_reason.map(|r| r.as_str()).unwrap_or(""),
            "the sink's account cannot be refreshed; its token file is left as it is until the account is re-authorized or enabled");
        return Ok(Written::Skipped);
    }
    if a.access_expires_at <= now {
        tracing::warn!(event = "sink_token_expired", path = %path, account = a.id,
            "the sink's account holds an expired access token; writing it anyway (it is refreshed as soon as possible)");
    }
    let bytes = render(s.format, &a);
    let (p, mode) = (s.path.clone(), s.mode);
    tokio::task::spawn_blocking(move || write_atomic(&p, &bytes, mode))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        .map_err(|source| SinkError::Write {
            path: s.path.clone(),
            source,
        })?;
    Ok(Written::Wrote {
        account_id: a.id,
        generation: a.generation,
    })
}

/// The file's content. JSON ends with a newline; the bare token has none, so the whole file
/// is the token (`$(cat file)` and a plain read agree).
fn render(format: SinkFormat, a: &Account) -> Vec<u8> {
    match format {
        SinkFormat::Token => a.access_token.expose_secret().as_bytes().to_vec(),
        SinkFormat::Json => {
            let mut v = serde_json::to_vec(&serde_json::json!({
                "account_id": a.id,
                "provider": a.provider,
                "subject": a.subject,
                "access_token": a.access_token.expose_secret(),
                "token_type": a.token_type,
                "expires_at": rfc3339(a.access_expires_at),
                "scope": a.scope,
            }))
            .expect("a JSON object serializes");
            v.push(b'\n');
            v
        }
    }
}

/// Temp file in the target's directory, fsync, rename over the target, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Created 0600 by tempfile, so the token is never readable by others, even briefly.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // fchmod is not subject to the umask, so the configured mode is exact.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(account: Option<i64>, provider: Option<&str>, subject: Option<&str>) -> SinkConfig {
        SinkConfig {
            account,
            provider: provider.map(str::to_string),
            subject: subject.map(str::to_string),
            path: PathBuf::from("/x"),
            format: SinkFormat::Json,
            mode: 0o600,
        }
    }

    #[test]
    fn selection_by_id_or_provider_and_subject() {
        assert!(selects(&sink(Some(7), None, None), 7, "tiktok", "u"));
        assert!(!selects(&sink(Some(7), None, None), 8, "tiktok", "u"));
        let by_subject = sink(None, Some("tiktok"), Some("u"));
        assert!(selects(&by_subject, 99, "tiktok", "u"));
        assert!(!selects(&by_subject, 99, "tiktok", "v"));
        assert!(!selects(&by_subject, 99, "other", "u"));
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        write_atomic(&p, b"one", 0o600).unwrap();
        let first = std::fs::metadata(&p).unwrap();
        assert_eq!(first.permissions().mode() & 0o777, 0o600);
        write_atomic(&p, b"two", 0o640).unwrap();
        let second = std::fs::metadata(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(second.permissions().mode() & 0o777, 0o640);
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            first.ino(),
            second.ino(),
            "renamed over, not rewritten in place"
        );
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

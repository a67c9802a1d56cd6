//! Token file sinks (`[[sink]]`): files an app reads its current access token from, like a
//! Vault Agent sink. Each file is rewritten atomically (temp file in the same directory,
//! fsync, rename, fsync of the directory) at start-up and after every rotation of its
//! account, so a reader sees the old token or the new one, never a mix. Rotations in this
//! process arrive as events; a periodic look at the store catches the rest (imports, other
//! processes sharing the database).
//!
//! A file is only ever written with the tokens of the account its sink selects: the account
//! read from the store must match the sink's id and, when given, its provider and subject.
//! An account that is missing, needs re-authorization or is disabled leaves the file as it
//! is, with a warning naming the sink path and the account.

use crate::clock::Clock;
use crate::config::{SinkConfig, SinkFormat};
use crate::events::{Event, Events};
use crate::model::{Account, Status};
use crate::store::{Store, StoreError};
use secrecy::ExposeSecret;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
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
    /// The file already held this generation of the account's token.
    Unchanged,
    /// Left as it is, for this reason.
    Skipped(Skip),
}

/// Why a sink's file was left as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// No account matches the selector.
    Missing,
    /// The account with the sink's id has another provider or subject than the sink names.
    Mismatch { account_id: i64 },
    /// The account cannot be refreshed (needs_reauth or disabled).
    Unusable {
        account_id: i64,
        status: Status,
        reason: Option<String>,
    },
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

/// Writes every sink once, then starts the task that rewrites a sink after each rotation of
/// its account. Subscribes to `events` first, so no rotation is missed; returns once the
/// start-up writes are done, so the daemon reports ready with the files in place.
/// Every `check_every` the task also looks at the accounts in the store, which catches what no
/// event here announces: an import or rotation by another process sharing the database, an
/// account that appeared or was re-authorized. Without sinks, nothing runs.
pub async fn start(
    sinks: Vec<SinkConfig>,
    store: Store,
    events: &Events,
    clock: Clock,
    check_every: Duration,
) -> SinkHandle {
    let stop = CancellationToken::new();
    if sinks.is_empty() {
        return SinkHandle { stop, task: None };
    }
    let mut rx = events.subscribe();
    let stop2 = stop.clone();
    let mut sinks = Sinks {
        state: vec![None; sinks.len()],
        sinks,
        store,
        clock,
    };
    sinks.write_all(true).await;
    let task = tokio::spawn(async move {
        let mut check = tokio::time::interval(check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        loop {
            tokio::select! {
                biased;
                ev = rx.recv() => sinks.handle(ev).await,
                _ = check.tick() => sinks.write_all(false).await,
                _ = stop2.cancelled() => break,
            }
        }
        // The engine has drained: write what its last rotations changed.
        loop {
            match rx.try_recv() {
                Ok(ev) => sinks.handle(Ok(ev)).await,
                Err(TryRecvError::Lagged(n)) => sinks.handle(Err(RecvError::Lagged(n))).await,
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
    /// Per sink: the last result (None: not tried yet, or failed).
    state: Vec<Option<Written>>,
    store: Store,
    clock: Clock,
}

impl Sinks {
    async fn handle(&mut self, ev: Result<Event, RecvError>) {
        match ev {
            Ok(Event::TokensChanged {
                account_id,
                provider,
                subject,
            }) => {
                for i in 0..self.sinks.len() {
                    if selects(&self.sinks[i], account_id, &provider, &subject) {
                        self.write_logged(i, true).await;
                    }
                }
            }
            Ok(Event::ReauthRequired {
                account_id,
                provider,
                subject,
                ..
            }) => {
                // Logs the sink going stale once (`expiring` still has a working token).
                for i in 0..self.sinks.len() {
                    if selects(&self.sinks[i], account_id, &provider, &subject) {
                        self.write_logged(i, false).await;
                    }
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    event = "sink_lagged",
                    missed = n,
                    "sink task fell behind the events; rewriting every sink from the store"
                );
                self.write_all(true).await;
            }
            Err(RecvError::Closed) => {}
        }
    }

    /// `force`: write even when the file already holds this generation.
    async fn write_all(&mut self, force: bool) {
        for i in 0..self.sinks.len() {
            self.write_logged(i, force).await;
        }
    }

    async fn write_logged(&mut self, i: usize, force: bool) {
        let s = &self.sinks[i];
        let last = match &self.state[i] {
            Some(Written::Wrote { generation, .. }) if !force => Some(*generation),
            _ => None,
        };
        let path = s.path.display();
        let result = match write_sink(s, &self.store, self.clock.now(), last).await {
            Ok(Written::Unchanged) => return,
            Ok(w) => w,
            Err(e) => {
                tracing::error!(event = "sink_failed", error = %e, "token file not written");
                self.state[i] = None;
                return;
            }
        };
        // A skip is logged when it starts, not at every check.
        let repeated = self.state[i].as_ref() == Some(&result);
        match &result {
            Written::Wrote {
                account_id,
                generation,
            } => tracing::debug!(event = "sink_written", path = %path,
                account = account_id, generation, "token file written"),
            Written::Unchanged => {}
            Written::Skipped(_) if repeated => {}
            Written::Skipped(Skip::Missing) => {
                tracing::warn!(event = "sink_account_missing", path = %path,
                account = %describe(s),
                "the sink's account is not in the store; its token file is left as it is (check the sink's account selector)")
            }
            Written::Skipped(Skip::Mismatch { account_id }) => {
                tracing::warn!(event = "sink_account_mismatch",
                path = %path, account = account_id, selector = %describe(s),
                "the account with this id has another provider or subject than the sink names; its token file is left as it is")
            }
            Written::Skipped(Skip::Unusable {
                account_id,
                status,
                reason,
            }) => tracing::warn!(event = "sink_stale",
                path = %path, account = account_id, status = %status, reason = reason.as_deref().unwrap_or(""),
                "the sink's account cannot be refreshed; its token file is left as it is until the account is re-authorized or enabled"),
        }
        self.state[i] = Some(result);
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

/// Reads the sink's account and writes its file, unless the file already holds generation
/// `last` or the account must not or cannot be written.
pub async fn write_sink(
    s: &SinkConfig,
    store: &Store,
    now: i64,
    last: Option<i64>,
) -> Result<Written, SinkError> {
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
    let Some(a) = found else {
        return Ok(Written::Skipped(Skip::Missing));
    };
    // Belt and braces: never write another account's token into this file.
    if !selects(s, a.id, &a.provider, &a.subject)
        || s.provider.as_deref().is_some_and(|p| p != a.provider)
        || s.subject.as_deref().is_some_and(|sub| sub != a.subject)
    {
        return Ok(Written::Skipped(Skip::Mismatch { account_id: a.id }));
    }
    if matches!(a.status, Status::NeedsReauth | Status::Disabled) {
        return Ok(Written::Skipped(Skip::Unusable {
            account_id: a.id,
            status: a.status,
            reason: a.reauth_reason.map(|r| r.as_str().to_string()),
        }));
    }
    if last == Some(a.generation) {
        return Ok(Written::Unchanged);
    }
    if a.access_expires_at <= now {
        tracing::warn!(event = "sink_token_expired", path = %s.path.display(), account = a.id,
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

/// For `refreshd check`: one line per sink and whether its directory takes new files
/// (tried by creating and removing a temp file there).
pub fn check(sinks: &[SinkConfig]) -> Vec<(String, bool)> {
    sinks
        .iter()
        .map(|s| {
            let dir = parent_dir(&s.path);
            let format = match s.format {
                SinkFormat::Json => "json",
                SinkFormat::Token => "token",
            };
            match tempfile::Builder::new()
                .prefix(".refreshd-check.")
                .tempfile_in(dir)
            {
                Ok(_) => (
                    format!(
                        "sink {}: ok, account {}, format {format}, mode {:04o}",
                        s.path.display(),
                        describe(s),
                        s.mode
                    ),
                    true,
                ),
                Err(e) => (
                    format!(
                        "sink {}: FAILED\n  cannot create files in {}: {e} (create the directory, writable by refreshd)",
                        s.path.display(),
                        dir.display()
                    ),
                    false,
                ),
            }
        })
        .collect()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The file's content. JSON ends with a newline; the bare token has none, so the whole file
/// is the token (`$(cat file)` and a plain read agree).
fn render(format: SinkFormat, a: &Account) -> Vec<u8> {
    match format {
        SinkFormat::Token => a.access_token.expose_secret().as_bytes().to_vec(),
        SinkFormat::Json => {
            let mut v = serde_json::to_vec(&a.token_document()).expect("a JSON object serializes");
            v.push(b'\n');
            v
        }
    }
}

/// Temp file in the target's directory, fsync, rename over the target, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = parent_dir(path);
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

//! The recovery file: rotated tokens whose commit failed (disk full, database locked) are
//! appended here and fsynced before the refresh is called done, then committed as soon as
//! the database takes them. Start-up replays it before claiming anything, because the
//! provider has already invalidated the old refresh token: losing these would lose accounts.

use super::{Outcome, StoreError, sqlite};
use crate::crypto::{Column, Keyring};
use crate::model::{ReauthReason, Status, TokenSet};
use rusqlite::{Connection, TransactionBehavior};
use secrecy::ExposeSecret;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `<database>.recovery`, beside the database.
pub fn recovery_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".recovery");
    PathBuf::from(s)
}

/// One line of the file. Tokens are sealed exactly as in the database (clear without a key,
/// else under the primary key, bound to the account id and column): the file never holds
/// less protection than the database (mode 0600, same directory).
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    account_id: i64,
    generation: i64,
    access_token: String,
    refresh_token: Option<String>,
    expires_in: i64,
    refresh_expires_in: Option<i64>,
    scope: Option<String>,
    token_type: String,
    at: i64,
    next_refresh_at: i64,
    status: Status,
    reauth_reason: Option<ReauthReason>,
    duration_ms: i64,
}

fn to_entry(keys: &Keyring, o: &Outcome) -> Option<Entry> {
    match o {
        Outcome::Rotated {
            account_id,
            generation,
            tokens,
            at,
            next_refresh_at,
            status,
            reauth_reason,
            duration_ms,
            ..
        } => Some(Entry {
            account_id: *account_id,
            generation: *generation,
            access_token: keys.seal(
                *account_id,
                Column::AccessToken,
                tokens.access_token.expose_secret(),
            ),
            refresh_token: tokens
                .refresh_token
                .as_ref()
                .map(|t| keys.seal(*account_id, Column::RefreshToken, t.expose_secret())),
            expires_in: tokens.expires_in,
            refresh_expires_in: tokens.refresh_expires_in,
            scope: tokens.scope.clone(),
            token_type: tokens.token_type.clone(),
            at: *at,
            next_refresh_at: *next_refresh_at,
            status: *status,
            reauth_reason: *reauth_reason,
            duration_ms: *duration_ms,
        }),
        _ => None,
    }
}

fn from_entry(keys: &Keyring, e: Entry) -> Result<Outcome, crate::crypto::CryptoError> {
    let id = e.account_id;
    Ok(Outcome::Rotated {
        account_id: e.account_id,
        generation: e.generation,
        tokens: TokenSet {
            access_token: keys.open(id, Column::AccessToken, &e.access_token)?,
            refresh_token: e
                .refresh_token
                .map(|t| keys.open(id, Column::RefreshToken, &t))
                .transpose()?,
            expires_in: e.expires_in,
            refresh_expires_in: e.refresh_expires_in,
            subject: None,
            scope: e.scope,
            token_type: e.token_type,
        },
        at: e.at,
        next_refresh_at: e.next_refresh_at,
        status: e.status,
        reauth_reason: e.reauth_reason,
        http_status: None,
        duration_ms: e.duration_ms,
    })
}

/// Appends rotations and fsyncs the file (and, when it was created, its directory).
pub fn append(path: &Path, keys: &Keyring, outcomes: &[Outcome]) -> std::io::Result<()> {
    let created = !path.exists();
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    let before = f.metadata()?.len();
    let mut buf = Vec::new();
    for e in outcomes.iter().filter_map(|o| to_entry(keys, o)) {
        serde_json::to_writer(&mut buf, &e).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_all()) {
        // A partial line (disk full) would glue onto the next append and make the file
        // unreadable at start-up: cut it back to the last complete entry.
        let _ = f.set_len(before);
        return Err(e);
    }
    if created && let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `<database>.recovery.rejected`: rotations the database refused for good (not a passing
/// failure), kept for an operator instead of blocking every other rotation behind them.
pub fn quarantine_path(recovery: &Path) -> PathBuf {
    let mut s = recovery.as_os_str().to_owned();
    s.push(".rejected");
    PathBuf::from(s)
}

/// Moves rotations the database refused for good to the quarantine file, loudly.
pub fn quarantine(recovery: &Path, keys: &Keyring, refused: &[(Outcome, String)]) {
    if refused.is_empty() {
        return;
    }
    let path = quarantine_path(recovery);
    let outcomes: Vec<Outcome> = refused.iter().map(|(o, _)| o.clone()).collect();
    let saved = append(&path, keys, &outcomes);
    for (o, error) in refused {
        tracing::error!(event = "recovery_rejected", account = o.account_id(), path = %path.display(),
            saved = saved.is_ok(), error = %error,
            "the database refuses this account's rotated tokens for good; they are kept in the quarantine file for an operator, and the account will need re-authorization if they cannot be stored");
    }
}

/// Commits deferred rotations in one transaction, each under its own savepoint. A rotation
/// already in the database (the process died after committing but before removing the
/// file) is skipped. One the database refuses for good (not a passing failure) is returned
/// with its error instead of failing the others; a passing failure fails the whole call.
pub fn apply(
    conn: &mut Connection,
    keys: &Keyring,
    outcomes: &[Outcome],
) -> Result<(usize, Vec<(Outcome, String)>), StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|source| StoreError::Sqlite {
            context: "begin replay of recovery file",
            source,
        })?;
    let mut applied = 0;
    let mut refused = Vec::new();
    for o in outcomes {
        if let Outcome::Rotated {
            account_id,
            generation,
            tokens,
            ..
        } = o
            && let Some(current) = sqlite::get(&tx, keys, *account_id)?
            && current.generation == generation + 1
            && current.access_token.expose_secret() == tokens.access_token.expose_secret()
        {
            continue;
        }
        let sp = tx.savepoint().map_err(|source| StoreError::Sqlite {
            context: "replay one rotation",
            source,
        })?;
        match sqlite::record(&sp, keys, o) {
            Ok(r) => {
                sp.commit().map_err(|source| StoreError::Sqlite {
                    context: "replay one rotation",
                    source,
                })?;
                if r == super::Recorded::Applied {
                    applied += 1;
                }
            }
            Err(e) if !e.is_transient() => {
                drop(sp);
                refused.push((o.clone(), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().map_err(|source| StoreError::Sqlite {
        context: "commit replay of recovery file",
        source,
    })?;
    Ok((applied, refused))
}

pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The rotations a previous run left in the file; None when there is no file.
pub fn read(path: &Path, keys: &Keyring) -> Result<Option<Vec<Outcome>>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Recovery {
                path: path.to_path_buf(),
                message: format!("cannot read: {e}"),
            });
        }
    };
    let mut outcomes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(line) {
            Ok(e) => outcomes.push(from_entry(keys, e).map_err(|e| StoreError::Recovery {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })?),
            // A torn last line is a write the crash interrupted before its fsync returned:
            // that refresh was never reported done, so skipping it loses nothing committed.
            Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => {
                tracing::warn!(event = "recovery_torn_line", path = %path.display(), line = i + 1, "ignoring an incomplete last line");
            }
            Err(e) => {
                return Err(StoreError::Recovery {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {} is not a recovery entry ({e}); fix or move the file away, then start again",
                        i + 1
                    ),
                });
            }
        }
    }
    Ok(Some(outcomes))
}

/// Start-up: commit whatever a previous run could not, then remove the file.
pub fn replay(conn: &mut Connection, keys: &Keyring, path: &Path) -> Result<(), StoreError> {
    let Some(outcomes) = read(path, keys)? else {
        return Ok(());
    };
    let (applied, refused) = apply(conn, keys, &outcomes)?;
    quarantine(path, keys, &refused);
    remove(path).map_err(|e| StoreError::Recovery {
        path: path.to_path_buf(),
        message: format!("replayed but cannot remove: {e}"),
    })?;
    tracing::info!(event = "recovery_replayed", path = %path.display(), entries = outcomes.len(), applied, "replayed rotations a previous run could not commit");
    Ok(())
}

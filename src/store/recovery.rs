//! Recovery files: rotated tokens whose commit failed (disk full, database locked) are
//! appended to the writing process's own file `<db>.recovery.<owner>` and fsynced before
//! the refresh is called done, then committed as soon as the database takes them. Each
//! process only ever empties its own file; the files of dead processes (and an old single
//! `<db>.recovery`) are replayed under the store lock by whichever process looks next.
//! The own file keeps room reserved ahead, so an append does not meet a full disk.

use super::error::StoreError;
use super::record::sealed_tokens;
use super::types::Outcome;
use crate::crypto::{Column, Keyring};
use crate::model::{Account, ReauthReason, Status, TokenSet};
use secrecy::ExposeSecret;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `<database>.recovery`: the single file of older versions, still replayed.
pub fn recovery_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".recovery");
    PathBuf::from(s)
}

/// `<database>.recovery.<owner>`: one process's own recovery file.
pub fn owner_recovery_path(db: &Path, owner: &str) -> PathBuf {
    let mut s = recovery_path(db).into_os_string();
    s.push(format!(".{owner}"));
    PathBuf::from(s)
}

/// Recovery files beside `db` that hold (or may hold) rotations: the old single file and
/// every process's own file, with the owner (None for the old file).
pub fn files(db: &Path) -> Vec<(PathBuf, Option<String>)> {
    let legacy = recovery_path(db);
    let mut out = Vec::new();
    if legacy.exists() {
        out.push((legacy.clone(), None));
    }
    let (Some(name), Some(dir)) = (legacy.file_name(), db.parent()) else {
        return out;
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut own: Vec<(PathBuf, Option<String>)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let owner = n.strip_prefix(&prefix)?;
            // `<db>.recovery.rejected` is the old file's quarantine, not an owner's file.
            (owner != "rejected" && !owner.ends_with(".rejected"))
                .then(|| (e.path(), Some(owner.to_string())))
        })
        .collect();
    own.sort();
    out.extend(own);
    out
}

/// Recovery files that may hold rotations not committed yet (`store copy` refuses to
/// ignore them): the old single file whenever it exists (older versions removed it once
/// committed), a process's own file when it holds at least one byte.
pub fn pending_files(db: &Path) -> Vec<PathBuf> {
    files(db)
        .into_iter()
        .filter(|(p, owner)| owner.is_none() || std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .map(|(p, _)| p)
        .collect()
}

/// Room reserved ahead in the own file (about 2000 entries).
const RESERVE: u64 = 1 << 20;
/// With less reserved room than this left, the file counts as unable to take a write.
const RESERVE_LOW: u64 = 256 << 10;
/// Test seam: while the file named by this variable exists, writes to a process's own
/// recovery file fail as on a full disk (ENOSPC). See docs/src/durability.md.
pub const FAULT_ENV: &str = "REFRESHD_TEST_RECOVERY_FULL";

fn disk_full() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

/// One process's own recovery file, open for its whole life with room reserved ahead.
pub struct RecoveryLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Offset up to which blocks are reserved (`fallocate` keeping the size).
    reserved_end: u64,
    len: u64,
    /// The file system cannot reserve (no `fallocate`): appends are tried as they come.
    unreservable: bool,
    fault: Option<PathBuf>,
    /// A read-only store's: never creates or removes the file.
    inert: bool,
}

impl RecoveryLog {
    /// Creates (mode 0600) and reserves the file. A failure is not fatal here: the file
    /// then counts as unable to take a write until a later `reserve` works.
    pub fn open(path: PathBuf) -> RecoveryLog {
        let mut log = RecoveryLog {
            path,
            file: None,
            reserved_end: 0,
            len: 0,
            unreservable: false,
            fault: std::env::var_os(FAULT_ENV).map(PathBuf::from),
            inert: false,
        };
        log.reserve();
        log
    }

    /// A log that touches no file (read-only stores, and a worker that has stopped).
    pub fn unopened(path: PathBuf) -> RecoveryLog {
        RecoveryLog {
            path,
            file: None,
            reserved_end: 0,
            len: 0,
            unreservable: false,
            fault: None,
            inert: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn faulted(&self) -> bool {
        self.fault.as_ref().is_some_and(|f| f.exists())
    }

    fn open_file(&mut self) -> std::io::Result<&std::fs::File> {
        if self.inert {
            return Err(std::io::Error::other("the store is open read-only"));
        }
        if self.file.is_none() {
            let created = !self.path.exists();
            let mut opts = std::fs::OpenOptions::new();
            opts.append(true).create(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let f = opts.open(&self.path)?;
            if created {
                sync_dir(&self.path)?;
            }
            self.len = f.metadata()?.len();
            self.reserved_end = self.len;
            self.file = Some(f);
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Reserves `RESERVE` bytes past the end; true when the file can take a write.
    pub fn reserve(&mut self) -> bool {
        if self.reserved_end.saturating_sub(self.len) >= RESERVE_LOW {
            return true;
        }
        let faulted = self.faulted();
        let len = self.len;
        let result = self.open_file().and_then(|f| {
            if faulted {
                return Err(disk_full());
            }
            rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, len, RESERVE)
                .map_err(std::io::Error::from)?;
            f.sync_all()
        });
        match result {
            Ok(()) => {
                self.reserved_end = self.len + RESERVE;
                true
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
                if !self.unreservable {
                    tracing::warn!(event = "recovery_reserve_unsupported", path = %self.path.display(),
                        "this file system cannot reserve room ahead for the recovery file: on a full disk, deferred rotations may not be writable there");
                }
                self.unreservable = true;
                true
            }
            Err(e) => {
                tracing::warn!(event = "recovery_reserve_failed", path = %self.path.display(), error = %e,
                    "cannot reserve room for the recovery file; new refreshes wait while the database cannot take writes either");
                self.ready()
            }
        }
    }

    /// Whether an append can be expected to work now.
    pub fn ready(&self) -> bool {
        !self.inert
            && !self.faulted()
            && (self.unreservable || self.reserved_end.saturating_sub(self.len) >= RESERVE_LOW)
    }

    /// Appends rotations and fsyncs the file; keeps the reservation topped up.
    pub fn append(&mut self, keys: &Keyring, outcomes: &[Outcome]) -> std::io::Result<()> {
        if self.faulted() {
            return Err(disk_full());
        }
        let before = self.len;
        let buf = encode(keys, outcomes)?;
        let need = buf.len() as u64;
        let unreservable = self.unreservable;
        let reserved_end = self.reserved_end;
        let f = self.open_file()?;
        // A failed group can be far larger than the standing reservation (1024 sealed
        // entries of a few KB each): reserve the whole batch past the end first. If that
        // fails the write is still tried; only the fsync below makes it count.
        if !unreservable
            && reserved_end < before + need
            && rustix::fs::fallocate(
                f,
                rustix::fs::FallocateFlags::KEEP_SIZE,
                before,
                need + RESERVE,
            )
            .is_ok()
        {
            self.reserved_end = before + need + RESERVE;
        }
        let f = self.file.as_ref().expect("opened above");
        if let Err(e) = (&*f).write_all(&buf).and_then(|()| f.sync_all()) {
            // A partial line would glue onto the next append: cut it back.
            let _ = f.set_len(before);
            return Err(e);
        }
        self.len = before + buf.len() as u64;
        self.reserve();
        Ok(())
    }

    /// Everything in the file is committed: empty it (fsynced) and reserve again.
    pub fn clear(&mut self) -> std::io::Result<()> {
        let f = self.open_file()?;
        f.set_len(0)?;
        f.sync_all()?;
        self.len = 0;
        self.reserved_end = 0;
        self.reserve();
        Ok(())
    }

    /// A clean stop with nothing pending: the file goes.
    pub fn remove(mut self) {
        self.file = None;
        if self.inert {
            return;
        }
        let _ = remove(&self.path);
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn encode(keys: &Keyring, outcomes: &[Outcome]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for e in outcomes.iter().filter_map(|o| to_entry(keys, o)) {
        serde_json::to_writer(&mut buf, &e).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    Ok(buf)
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
        } => {
            let (access_token, refresh_token) = sealed_tokens(keys, *account_id, tokens);
            Some(Entry {
                account_id: *account_id,
                generation: *generation,
                access_token,
                refresh_token,
                expires_in: tokens.expires_in,
                refresh_expires_in: tokens.refresh_expires_in,
                scope: tokens.scope.clone(),
                token_type: tokens.token_type.clone(),
                at: *at,
                next_refresh_at: *next_refresh_at,
                status: *status,
                reauth_reason: *reauth_reason,
                duration_ms: *duration_ms,
            })
        }
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

/// Appends rotations to a file other than the own one (quarantine, hand-off) and fsyncs it
/// (and, when it was created, its directory).
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
    let buf = encode(keys, outcomes)?;
    if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_all()) {
        // A partial line (disk full) would glue onto the next append and make the file
        // unreadable at start-up: cut it back to the last complete entry.
        let _ = f.set_len(before);
        return Err(e);
    }
    if created {
        sync_dir(path)?;
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

/// Moves rotations the database refused for good to the quarantine file, loudly. On an
/// error the caller must keep its own copy: the quarantine file may be the only other one.
pub fn quarantine(
    recovery: &Path,
    keys: &Keyring,
    refused: &[(Outcome, String)],
) -> std::io::Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    let path = quarantine_path(recovery);
    let outcomes: Vec<Outcome> = refused.iter().map(|(o, _)| o.clone()).collect();
    let saved = append(&path, keys, &outcomes);
    for (o, error) in refused {
        tracing::error!(event = "recovery_rejected", account = o.account_id(), path = %path.display(),
            saved = saved.is_ok(), error = %error,
            "the database refuses this account's rotated tokens for good; they are kept in the quarantine file for an operator (or, if it cannot be written, in the recovery file), and the account will need re-authorization if they cannot be stored");
    }
    saved
}

/// Whether a rotation read back from a recovery file is already in the database: the
/// process died after committing but before emptying its file. Replays skip it.
pub fn already_committed(o: &Outcome, current: Option<&Account>) -> bool {
    match (o, current) {
        (
            Outcome::Rotated {
                generation, tokens, ..
            },
            Some(current),
        ) => {
            current.generation == generation + 1
                && current.access_token.expose_secret() == tokens.access_token.expose_secret()
        }
        _ => false,
    }
}

/// After a recovery file's rotations were committed (`applied` of them changed a row):
/// moves the `refused` ones to the quarantine file, then removes the file.
pub fn replayed(
    path: &Path,
    keys: &Keyring,
    entries: usize,
    applied: usize,
    refused: &[(Outcome, String)],
) -> Result<(), StoreError> {
    quarantine(path, keys, refused).map_err(|e| StoreError::Recovery {
        path: quarantine_path(path),
        message: format!(
            "cannot save refused rotations ({e}); {} is kept and replayed again: free disk space or make the directory writable",
            path.display()
        ),
    })?;
    remove(path).map_err(|e| StoreError::Recovery {
        path: path.to_path_buf(),
        message: format!("replayed but cannot remove: {e}"),
    })?;
    tracing::info!(event = "recovery_replayed", path = %path.display(), entries, applied, "replayed rotations a process could not commit before it stopped");
    Ok(())
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

/// Recovery files whose writer is dead (its instance lock is free), or the old single file:
/// the caller holds the store lock, commits each file's rotations, then removes the file.
pub fn orphans(db: &Path, own: &str) -> Vec<PathBuf> {
    files(db)
        .into_iter()
        .filter(|(_, owner)| {
            owner
                .as_deref()
                .is_none_or(|o| o != own && !super::instance::is_alive(db, o))
        })
        .map(|(p, _)| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A rotation of `account_id` to the given tokens, as the engine records one.
    fn rotated(account_id: i64, access: &str, refresh: &str) -> Outcome {
        Outcome::Rotated {
            account_id,
            generation: 0,
            tokens: TokenSet {
                access_token: access.to_string().into(),
                refresh_token: Some(refresh.to_string().into()),
                expires_in: 3600,
                refresh_expires_in: None,
                subject: None,
                scope: None,
                token_type: "Bearer".into(),
            },
            at: 1,
            next_refresh_at: 2,
            status: Status::Active,
            reauth_reason: None,
            http_status: None,
            duration_ms: 1,
        }
    }

    #[test]
    fn the_own_file_has_room_reserved_before_any_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_recovery_path(&dir.path().join("x.db"), "h:1:aa");
        let log = RecoveryLog::open(path.clone());
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 0, "reserved without growing the file");
        if log.unreservable {
            eprintln!("this file system cannot reserve: nothing to check");
            return;
        }
        assert!(m.blocks() * 512 >= RESERVE, "{} blocks", m.blocks());
        assert!(log.ready());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn clearing_keeps_the_file_and_its_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_recovery_path(&dir.path().join("x.db"), "h:1:bb");
        let mut log = RecoveryLog::open(path.clone());
        let o = rotated(1, "at", "rt");
        log.append(&Keyring::default(), std::slice::from_ref(&o))
            .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        log.clear().unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 0);
        assert!(log.unreservable || m.blocks() * 512 >= RESERVE);
        log.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_whole_failed_group_of_large_entries_appends_and_stays_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_recovery_path(&dir.path().join("x.db"), "h:1:dd");
        let mut log = RecoveryLog::open(path.clone());
        if log.unreservable {
            eprintln!("this file system cannot reserve: nothing to check");
            return;
        }
        let big = "t".repeat(4096);
        let outcomes: Vec<Outcome> = (0..1024).map(|i| rotated(i, &big, &big)).collect();
        log.append(&Keyring::default(), &outcomes).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len > RESERVE,
            "the batch ({len} bytes) outgrows the standing reservation"
        );
        assert!(
            log.reserved_end >= len + RESERVE_LOW,
            "room is still reserved past the batch"
        );
        assert!(log.ready());
    }

    #[test]
    fn the_old_files_quarantine_is_not_a_recovery_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let rejected = quarantine_path(&recovery_path(&db));
        std::fs::write(&rejected, b"x\n").unwrap();
        std::fs::write(owner_recovery_path(&db, "h:1:aa"), b"x\n").unwrap();
        let found: Vec<PathBuf> = files(&db).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found, vec![owner_recovery_path(&db, "h:1:aa")]);
        assert!(!pending_files(&db).contains(&rejected));
    }

    #[test]
    fn a_failed_quarantine_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_recovery_path(&dir.path().join("x.db"), "h:1:cc");
        std::fs::create_dir(quarantine_path(&path)).unwrap();
        let o = rotated(1, "at", "rt");
        let refused = vec![(o, "refused".to_string())];
        assert!(quarantine(&path, &Keyring::default(), &refused).is_err());
    }
}

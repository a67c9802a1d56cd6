//! Instance locks: each process using a store holds an exclusive `flock` on its own file
//! `<db>.instance.<owner>` for its whole life, so another process can tell a dead owner's
//! leases and recovery file (the lock is free, or the file is gone) from a live one's.
//! Files are created and removed only under the store-wide lock `<db>.lock`, so a file is
//! never taken for dead between its creation and its lock.

use super::error::StoreError;
use rustix::fs::{FlockOperation, flock};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

fn with_suffix(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `<db>.instance.<owner>`: the lock file of one process.
pub fn instance_path(db: &Path, owner: &str) -> PathBuf {
    with_suffix(db, &format!(".instance.{owner}"))
}

/// The prefix of every instance file's name, for listing them.
fn instance_prefix(db: &Path) -> Option<String> {
    db.file_name()
        .map(|n| format!("{}.instance.", n.to_string_lossy()))
}

fn open_private(path: &Path, create: bool) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(create);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

fn lock_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Recovery {
        path: path.to_path_buf(),
        message: format!(
            "cannot lock: {e} (the directory must be writable and on a local file system)"
        ),
    }
}

/// The store-wide lock `<db>.lock`, held while instance and recovery files of other
/// processes are looked at, replayed or removed. Released on drop.
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    pub fn acquire(db: &Path) -> Result<StoreLock, StoreError> {
        let path = with_suffix(db, ".lock");
        let file = open_private(&path, true).map_err(|e| lock_err(&path, e))?;
        flock(&file, FlockOperation::LockExclusive).map_err(|e| lock_err(&path, e))?;
        Ok(StoreLock { _file: file })
    }

    /// The lock if it is free now, `None` if another process holds it (or it cannot be
    /// opened): for periodic work that must not stall the store worker.
    pub fn try_acquire(db: &Path) -> Option<StoreLock> {
        let file = open_private(&with_suffix(db, ".lock"), true).ok()?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(StoreLock { _file: file })
    }
}

/// This process's instance lock. Dropping it (the process ending, even by `kill -9`)
/// frees the lock, which is how others learn the owner is dead.
#[derive(Debug)]
pub struct Instance {
    owner: String,
    path: PathBuf,
    _file: File,
}

impl Instance {
    /// Creates and locks `<db>.instance.<owner>`; call with the store lock held.
    pub fn acquire(db: &Path, owner: &str, _held: &StoreLock) -> Result<Instance, StoreError> {
        let path = instance_path(db, owner);
        let file = open_private(&path, true).map_err(|e| lock_err(&path, e))?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| lock_err(&path, e))?;
        Ok(Instance {
            owner: owner.to_string(),
            path,
            _file: file,
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Recreates and relocks the instance file if someone removed it (store lock held), so
    /// other processes never take this live process for dead.
    pub fn ensure(&mut self, _held: &StoreLock) -> Result<(), StoreError> {
        if self.path.exists() {
            return Ok(());
        }
        let file = open_private(&self.path, true).map_err(|e| lock_err(&self.path, e))?;
        flock(&file, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| lock_err(&self.path, e))?;
        self._file = file;
        Ok(())
    }

    /// Removes the file at a clean stop (the lock goes with the handle).
    pub fn release(self, _held: &StoreLock) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether the process `owner` is alive. It is dead only when its instance file is gone
/// (files are removed only under the store lock, at a clean stop or by `forget`) or when
/// the file opens and a lock on it is granted. Any other failure (EMFILE, EACCES, ...)
/// counts as alive: taking a live owner for dead would expire its leases and replay a
/// recovery file it still appends to.
pub fn is_alive(db: &Path, owner: &str) -> bool {
    let path = instance_path(db, owner);
    let file = match open_private(&path, false) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => {
            tracing::warn!(event = "instance_unreadable", path = %path.display(), error = %e,
                "cannot open another process's instance file: taking it for alive");
            return true;
        }
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = flock(&file, FlockOperation::Unlock);
            false
        }
        Err(rustix::io::Errno::WOULDBLOCK) => true,
        Err(e) => {
            tracing::warn!(event = "instance_unlockable", path = %path.display(), error = %e,
                "cannot test another process's instance lock: taking it for alive");
            true
        }
    }
}

/// A unique owner name for this process: host, pid and a random part (no `/`, so it can
/// name a file).
pub fn new_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into());
    format!(
        "{}:{}:{:08x}",
        host.trim().replace('/', "_"),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Owners whose instance file is here but unlocked: processes that died. The caller holds
/// the store lock and removes each file once it has taken the owner's work over.
pub fn dead_owners(db: &Path, own: &str, _held: &StoreLock) -> Vec<String> {
    let (Some(prefix), Some(dir)) = (instance_prefix(db), db.parent()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dead = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(owner) = name.strip_prefix(&prefix)
            && owner != own
            && !is_alive(db, owner)
        {
            dead.push(owner.to_string());
        }
    }
    dead
}

/// Removes a dead owner's instance file (store lock held).
pub fn forget(db: &Path, owner: &str, _held: &StoreLock) {
    let _ = std::fs::remove_file(instance_path(db, owner));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_instance_is_alive_and_a_dropped_one_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let lock = StoreLock::acquire(&db).unwrap();
        let a = Instance::acquire(&db, "h:1:aa", &lock).unwrap();
        assert!(is_alive(&db, "h:1:aa"));
        assert!(dead_owners(&db, "me", &lock).is_empty());
        drop(a);
        assert!(!is_alive(&db, "h:1:aa"));
        assert_eq!(dead_owners(&db, "me", &lock), vec!["h:1:aa".to_string()]);
        forget(&db, "h:1:aa", &lock);
        assert!(dead_owners(&db, "me", &lock).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn an_instance_file_that_cannot_be_opened_is_alive() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let path = instance_path(&db, "h:2:bb");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        // root opens any file: only meaningful when the open really fails.
        if File::open(&path).is_err() {
            assert!(is_alive(&db, "h:2:bb"));
        }
        // A directory in its place fails the read-write open with EISDIR, even for root.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(is_alive(&db, "h:2:bb"));
        assert!(!is_alive(&db, "h:3:cc"), "a missing file is a dead owner");
    }

    #[test]
    fn ensure_recreates_and_relocks_a_removed_instance_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let lock = StoreLock::acquire(&db).unwrap();
        let mut a = Instance::acquire(&db, "h:1:aa", &lock).unwrap();
        std::fs::remove_file(instance_path(&db, "h:1:aa")).unwrap();
        assert!(!is_alive(&db, "h:1:aa"));
        a.ensure(&lock).unwrap();
        assert!(is_alive(&db, "h:1:aa"));
    }

    #[test]
    fn try_acquire_does_not_wait_for_a_held_store_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let held = StoreLock::acquire(&db).unwrap();
        assert!(StoreLock::try_acquire(&db).is_none());
        drop(held);
        assert!(StoreLock::try_acquire(&db).is_some());
    }
}

//! Start-up checks of the process's surroundings: files holding tokens or keys must not be
//! readable by other users, running as root is worth a warning, and the open-files limit is
//! raised as far as allowed. refreshd creates its
//! own files 0600; these checks catch files created or copied by someone else (a restored
//! backup, `cp` without `-p`, a key written by hand).

use crate::config::{Config, FilePolicy};
use crate::store::recovery_path;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error(
    "{} readable by other users ({}); run `chmod 600` on {}, or set store.permissions = \"warn\" to start anyway",
    if files.len() == 1 { "a file holding tokens or keys is" } else { "files holding tokens or keys are" },
    files.iter().map(|(p, m)| format!("{} mode {m:03o}", p.display())).collect::<Vec<_>>().join(", "),
    if files.len() == 1 { "it" } else { "them" }
)]
pub struct ExposedFiles {
    pub files: Vec<(PathBuf, u32)>,
}

/// Every file refreshd keeps secrets in (or reads them from), whether or not it exists yet.
pub fn secret_files(config: &Config) -> Vec<PathBuf> {
    let db = &config.store.path;
    let with = |suffix: &str| {
        let mut s = db.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let mut files = vec![db.clone(), with("-wal"), with("-shm"), recovery_path(db)];
    // Recovery files of every process (and what they refused) that exist now.
    files.extend(
        crate::store::pending_recovery_files(db)
            .into_iter()
            .filter(|p| *p != recovery_path(db)),
    );
    files.extend(config.store.keyring.files().map(Path::to_path_buf));
    files.extend(
        config
            .providers
            .values()
            .filter_map(|p| p.client_secret_file.as_deref())
            .filter_map(|p| crate::config::expand_credentials_path(p).ok()),
    );
    let webhook = config.notify.webhook.as_ref();
    files.extend(
        [
            config.server.api_token_file.as_deref(),
            config.connect.redirect_secret_file.as_deref(),
            webhook.and_then(|w| w.secret_file.as_deref()),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| crate::config::expand_credentials_path(p).ok()),
    );
    // A config file with a secret written inline holds a secret too.
    let inline = config
        .providers
        .values()
        .any(|p| p.client_secret.is_some() && p.client_secret_file.is_none())
        || webhook.is_some_and(|w| w.secret.is_some() && w.secret_file.is_none())
        || config.connect.redirect_secret.is_some()
            && config.connect.redirect_secret_file.is_none();
    if inline && let Some(f) = &config.file {
        files.push(f.clone());
    }
    files
}

/// Existing files among `paths` that group or others may read or write, with their mode.
pub fn exposed(paths: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        paths
            .iter()
            .filter_map(|p| {
                let mode = std::fs::metadata(p).ok()?.permissions().mode() & 0o777;
                (mode & 0o077 != 0).then(|| (p.clone(), mode))
            })
            .collect()
    }
    #[cfg(not(unix))]
    {
        let _ = paths;
        Vec::new()
    }
}

/// Warns about (or, with `store.permissions = "refuse"`, refuses) exposed secret files.
pub fn check_files(config: &Config) -> Result<(), ExposedFiles> {
    let files = exposed(&secret_files(config));
    if files.is_empty() {
        return Ok(());
    }
    let err = ExposedFiles { files };
    match config.store.permissions {
        FilePolicy::Refuse => Err(err),
        FilePolicy::Warn => {
            for (path, mode) in &err.files {
                tracing::warn!(event = "file_readable_by_others", path = %path.display(),
                    mode = format!("{mode:03o}"),
                    "a file holding tokens or keys is readable by other users: chmod 600 it (store.permissions = \"refuse\" makes this fatal)");
            }
            Ok(())
        }
    }
}

/// Raises the soft open-files limit (RLIMIT_NOFILE) to the hard one, so that the ops
/// server's connection cap can leave room for refreshes; returns the soft limit now in force
/// (None: unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        match (limit.current, limit.maximum) {
            (Some(soft), hard) if hard.is_none_or(|h| h > soft) => {
                let raised = Rlimit {
                    current: hard,
                    maximum: hard,
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => {
                        tracing::debug!(event = "fd_limit_raised", from = soft, to = ?hard, "open-files limit raised to the hard limit");
                        hard
                    }
                    Err(e) => {
                        tracing::warn!(event = "fd_limit_not_raised", soft, hard = ?hard, error = %e, "cannot raise the open-files limit");
                        Some(soft)
                    }
                }
            }
            (soft, _) => soft,
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// True when the process runs with root's effective user id. A file we create is owned by
/// our effective uid: that answers the question without unsafe code or another dependency.
pub fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        tempfile::tempfile()
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// Root works, but a token store needs no privilege: say what is safer.
pub fn warn_if_root() {
    if running_as_root() {
        tracing::warn!(
            event = "running_as_root",
            "refreshd runs as root, which it does not need: run it as a dedicated user, e.g. systemd's DynamicUser=yes with StateDirectory=refreshd and LoadCredential= for secrets (see deploy/), or a `refreshd` system user owning only its database and key files"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_secret_and_webhook_secret_files_are_checked_too() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api-token");
        let hook = dir.path().join("webhook-secret");
        std::fs::write(&api, "0123456789abcdef0123").unwrap();
        std::fs::write(&hook, "hook-secret").unwrap();
        let c = Config::from_toml_str(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n[notify.webhook]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = {:?}\n",
            api.display().to_string(),
            hook.display().to_string()
        ))
        .unwrap();
        let files = secret_files(&c);
        assert!(files.contains(&api), "{files:?}");
        assert!(files.contains(&hook), "{files:?}");
    }

    #[cfg(unix)]
    #[test]
    fn exposed_files_warn_or_refuse() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("r.db");
        let key = dir.path().join("k");
        crate::crypto::generate_key_file(&key).unwrap();
        std::fs::write(&db, "").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config = Config::default();
        config.store.path = db.clone();
        config.store.keyring = crate::crypto::Keyring::load(Some(&key), &[]).unwrap();
        assert_eq!(exposed(&secret_files(&config)), vec![(db.clone(), 0o644)]);
        assert!(check_files(&config).is_ok(), "warn is the default");
        config.store.permissions = FilePolicy::Refuse;
        let e = check_files(&config).unwrap_err().to_string();
        assert!(
            e.contains(&db.display().to_string()) && e.contains("644"),
            "{e}"
        );
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_files(&config).unwrap_err().to_string();
        assert!(e.contains(&key.display().to_string()), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(check_files(&config).is_ok());
        // A client secret read from a file counts too.
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o604)).unwrap();
        let toml = format!(
            "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret_file = {:?}\n",
            secret.display().to_string()
        );
        let mut with_secret = Config::from_toml_str(&toml).unwrap();
        with_secret.store = config.store.clone();
        let e = check_files(&with_secret).unwrap_err().to_string();
        assert!(e.contains("client-secret mode 604"), "{e}");
    }
}

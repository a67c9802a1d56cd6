//! Files named by the config: `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) in their
//! paths, and secrets read from them (`*_file` keys).

use secrecy::SecretString;
use std::path::{Path, PathBuf};

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
pub(super) fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let expanded = expand_credentials_path(path)?;
    let text = std::fs::read_to_string(&expanded)
        .map_err(|e| format!("cannot read secret file {}: {e}", expanded.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret file {} is empty", expanded.display()));
    }
    Ok(SecretString::from(secret.to_string()))
}

//! Token encryption at rest: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`).
//!
//! A sealed value is stored in the same TEXT column the clear token used:
//! `enc:v1:<key id>:<base64url(nonce ‖ ciphertext)>`. Keeping the column means no migration
//! and lets one store hold clear and sealed rows side by side, which is exactly the state
//! `refreshd rekey` passes through while it encrypts a store in place; a clear TikTok token
//! never starts with `enc:v1:`. The associated data binds the value to its account id and
//! column, so a value copied into another row (or from access to refresh token) fails to
//! open instead of being used for the wrong account. The 24-byte random nonce makes nonce
//! reuse negligible without any counter state. The key id is derived from the key itself,
//! so a key file can never be paired with the wrong id.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Prefix of every sealed value.
pub const PREFIX: &str = "enc:v1:";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
/// Hex characters of a key id.
const KEY_ID_LEN: usize = 16;

/// Which column a value lives in: part of the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
    /// A web connect's PKCE verifier, kept until the callback (account id 0).
    PkceVerifier,
}

impl Column {
    pub fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
            Column::PkceVerifier => "pkce_verifier",
        }
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error(
        "account {account_id}: {column} is sealed with key {key_id}, which is not configured (configured: {configured}); add that key's file to store.decryption_key_files"
    )]
    UnknownKey {
        account_id: i64,
        column: Column,
        key_id: String,
        configured: String,
    },
    #[error(
        "account {account_id}: {column} does not open with key {key_id}: the value was altered or copied from another row; reconnect or re-import this account"
    )]
    Tampered {
        account_id: i64,
        column: Column,
        key_id: String,
    },
    #[error("account {account_id}: {column} is not a well-formed sealed value ({PREFIX}...)")]
    Malformed { account_id: i64, column: Column },
}

struct Key {
    id: String,
    file: PathBuf,
    cipher: XChaCha20Poly1305,
}

/// The configured keys: one primary that seals, older ones that only open. Without a
/// primary, values are written in the clear (and sealed ones still open with older keys).
#[derive(Clone, Default)]
pub struct Keyring {
    primary: Option<Arc<Key>>,
    /// Every key that opens, primary first.
    keys: Vec<Arc<Key>>,
}

impl fmt::Debug for Keyring {
    // Key ids and file names are not secret; the key bytes never leave `Key`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary_id())
            .field("keys", &self.describe())
            .finish()
    }
}

fn key_id(bytes: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"refreshd key id v1\0")
        .chain_update(bytes)
        .finalize();
    digest[..KEY_ID_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key_file_err(path: &Path, message: impl Into<String>) -> CryptoError {
    CryptoError::KeyFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn load_key(path: &Path) -> Result<Key, CryptoError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| key_file_err(path, format!("cannot read: {e}")))?;
    let bytes = SecretBytes(STANDARD.decode(text.trim()).map_err(|_| {
        key_file_err(
            path,
            "not a refreshd key (expected base64 text written by `refreshd keygen`)",
        )
    })?);
    if bytes.0.len() != KEY_LEN {
        return Err(key_file_err(
            path,
            format!(
                "holds {} bytes, a key has {KEY_LEN}: write one with `refreshd keygen`",
                bytes.0.len()
            ),
        ));
    }
    Ok(Key {
        id: key_id(&bytes.0),
        file: path.to_path_buf(),
        cipher: XChaCha20Poly1305::new_from_slice(&bytes.0).expect("32-byte key"),
    })
}

/// Key bytes, wiped from memory when dropped... as far as a plain Vec allows: overwritten.
struct SecretBytes(Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.0);
    }
}

impl Keyring {
    /// Loads the primary key (seals and opens) and older keys (open only).
    pub fn load(primary: Option<&Path>, older: &[PathBuf]) -> Result<Keyring, CryptoError> {
        let mut ring = Keyring::default();
        if let Some(p) = primary {
            let k = Arc::new(load_key(p)?);
            ring.primary = Some(k.clone());
            ring.keys.push(k);
        }
        for p in older {
            let k = load_key(p)?;
            if ring.keys.iter().any(|o| o.id == k.id) {
                continue; // the same key listed twice is harmless
            }
            ring.keys.push(Arc::new(k));
        }
        Ok(ring)
    }

    /// True when new values are sealed.
    pub fn seals(&self) -> bool {
        self.primary.is_some()
    }

    pub fn primary_id(&self) -> Option<&str> {
        self.primary.as_deref().map(|k| k.id.as_str())
    }

    pub fn knows(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// "id (file), ..." for error messages; "none" without keys.
    pub fn describe(&self) -> String {
        if self.keys.is_empty() {
            return "none".into();
        }
        self.keys
            .iter()
            .map(|k| format!("{} ({})", k.id, k.file.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every configured key file, primary first.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.keys.iter().map(|k| k.file.as_path())
    }

    /// The key file holding `id`, if configured.
    pub fn file_of(&self, id: &str) -> Option<&Path> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.file.as_path())
    }

    fn aad(account_id: i64, column: Column) -> String {
        format!("refreshd:v1:{account_id}:{column}")
    }

    /// The value to store: sealed under the primary key, or the clear text without one.
    pub fn seal(&self, account_id: i64, column: Column, clear: &str) -> String {
        let Some(key) = &self.primary else {
            return clear.to_string();
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = Self::aad(account_id, column);
        let ct = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: clear.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory sizes");
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("{PREFIX}{}:{}", key.id, URL_SAFE_NO_PAD.encode(blob))
    }

    /// The key id a stored value is sealed with; None for a clear value.
    pub fn sealed_with(stored: &str) -> Option<&str> {
        stored
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .map(|(id, _)| id)
    }

    /// Opens a stored value; a clear value is returned as it is.
    pub fn open(
        &self,
        account_id: i64,
        column: Column,
        stored: &str,
    ) -> Result<SecretString, CryptoError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(SecretString::from(stored.to_string()));
        };
        let malformed = || CryptoError::Malformed { account_id, column };
        let (id, b64) = rest.split_once(':').ok_or_else(malformed)?;
        let Some(key) = self.keys.iter().find(|k| k.id == id) else {
            return Err(CryptoError::UnknownKey {
                account_id,
                column,
                key_id: id.to_string(),
                configured: self.describe(),
            });
        };
        let blob = URL_SAFE_NO_PAD.decode(b64).map_err(|_| malformed())?;
        if blob.len() < NONCE_LEN {
            return Err(malformed());
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let aad = Self::aad(account_id, column);
        let clear = SecretBytes(
            key.cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| CryptoError::Tampered {
                    account_id,
                    column,
                    key_id: id.to_string(),
                })?,
        );
        let s = std::str::from_utf8(&clear.0).map_err(|_| malformed())?;
        Ok(SecretString::from(s.to_string()))
    }

    /// Opens then seals under the primary key (rekey). Values already under it are left as
    /// they are: re-sealing them would only churn the database.
    pub fn reseal(
        &self,
        account_id: i64,
        column: Column,
        stored: &str,
    ) -> Result<Option<String>, CryptoError> {
        if Self::sealed_with(stored).is_some() && Self::sealed_with(stored) == self.primary_id() {
            return Ok(None);
        }
        let clear = self.open(account_id, column, stored)?;
        Ok(Some(self.seal(account_id, column, clear.expose_secret())))
    }
}

/// Writes a new random key to `path` with mode 0600; never overwrites. Returns its id.
pub fn generate_key_file(path: &Path) -> Result<String, CryptoError> {
    let mut bytes = SecretBytes(vec![0u8; KEY_LEN]);
    rand::rng().fill_bytes(&mut bytes.0);
    let mut text = STANDARD.encode(&bytes.0);
    text.push('\n');
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            key_file_err(
                path,
                "already exists; refreshd keygen never overwrites a key (it may still open your tokens)",
            )
        } else {
            key_file_err(path, format!("cannot create: {e}"))
        }
    })?;
    use std::io::Write;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| key_file_err(path, format!("cannot write: {e}")))?;
    text.clear();
    Ok(key_id(&bytes.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(dir: &Path, name: &str) -> (Keyring, PathBuf) {
        let p = dir.join(name);
        generate_key_file(&p).unwrap();
        (Keyring::load(Some(&p), &[]).unwrap(), p)
    }

    #[test]
    fn round_trip_and_clear_values_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = ring(dir.path(), "k");
        let sealed = k.seal(7, Column::AccessToken, "act.SECRET");
        assert!(sealed.starts_with(PREFIX), "{sealed}");
        assert!(!sealed.contains("SECRET"));
        assert_eq!(Keyring::sealed_with(&sealed), k.primary_id());
        let opened = k.open(7, Column::AccessToken, &sealed).unwrap();
        assert_eq!(opened.expose_secret(), "act.SECRET");
        // Two seals of one value differ (random nonce).
        assert_ne!(sealed, k.seal(7, Column::AccessToken, "act.SECRET"));
        assert_eq!(
            k.open(7, Column::AccessToken, "act.clear")
                .unwrap()
                .expose_secret(),
            "act.clear"
        );
        // Without a primary key nothing is sealed.
        assert_eq!(Keyring::default().seal(1, Column::AccessToken, "x"), "x");
    }

    #[test]
    fn values_cannot_move_between_rows_or_columns() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = ring(dir.path(), "k");
        let sealed = k.seal(7, Column::RefreshToken, "rft.SECRET");
        let e = k.open(8, Column::RefreshToken, &sealed).unwrap_err();
        assert!(
            matches!(e, CryptoError::Tampered { account_id: 8, .. }),
            "{e}"
        );
        let e = k.open(7, Column::AccessToken, &sealed).unwrap_err();
        assert!(matches!(e, CryptoError::Tampered { .. }), "{e}");
        // A flipped bit is refused too.
        let mut bad = sealed.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let e = k.open(7, Column::RefreshToken, std::str::from_utf8(&bad).unwrap());
        assert!(e.is_err());
    }

    #[test]
    fn unknown_key_is_named_and_older_keys_open() {
        let dir = tempfile::tempdir().unwrap();
        let (old, old_path) = ring(dir.path(), "old");
        let (new, new_path) = ring(dir.path(), "new");
        let sealed = old.seal(1, Column::AccessToken, "t");
        let e = new
            .open(1, Column::AccessToken, &sealed)
            .unwrap_err()
            .to_string();
        assert!(e.contains(old.primary_id().unwrap()), "{e}");
        assert!(e.contains(&new_path.display().to_string()), "{e}");
        let both = Keyring::load(Some(&new_path), &[old_path]).unwrap();
        assert_eq!(
            both.open(1, Column::AccessToken, &sealed)
                .unwrap()
                .expose_secret(),
            "t"
        );
        let resealed = both
            .reseal(1, Column::AccessToken, &sealed)
            .unwrap()
            .unwrap();
        assert_eq!(Keyring::sealed_with(&resealed), new.primary_id());
        assert!(
            both.reseal(1, Column::AccessToken, &resealed)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn keygen_is_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let id = generate_key_file(&p).unwrap();
        assert_eq!(id.len(), KEY_ID_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let before = std::fs::read(&p).unwrap();
        let e = generate_key_file(&p).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
        assert_eq!(
            Keyring::load(Some(&p), &[]).unwrap().primary_id(),
            Some(id.as_str())
        );
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "c2hvcnQ=\n").unwrap();
        let e = Keyring::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("bytes"),
            "{e}"
        );
        std::fs::write(&p, "not base64 !!\n").unwrap();
        assert!(Keyring::load(Some(&p), &[]).is_err());
        let missing = dir.path().join("missing");
        let e = Keyring::load(Some(&missing), &[]).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn debug_shows_ids_not_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (k, p) = ring(dir.path(), "k");
        let file = std::fs::read_to_string(&p).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(k.primary_id().unwrap()));
        assert!(!dbg.contains(file.trim()), "{dbg}");
    }
}

//! The signature on the redirects to `connect.success_url` / `failure_url`: HMAC-SHA256,
//! under `connect.redirect_secret`, of the app's `ref`, the account id (empty on failure),
//! the outcome (`connected`, or the error code) and the time, one per line. The app checks
//! it before trusting `account_id`: a bare `success_url?account_id=42` proves nothing.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// Longest `ref` the app may pass to `start` (it travels in a cookie and two URLs).
pub const MAX_REF_CHARS: usize = 200;

/// The outcome signed for a success.
pub const CONNECTED: &str = "connected";

/// A `ref` is opaque to us but must survive a cookie and a URL unchanged: URL-unreserved
/// characters only (RFC 3986), at most [`MAX_REF_CHARS`].
pub fn valid_ref(r: &str) -> bool {
    r.len() <= MAX_REF_CHARS
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// `HEX(HMAC-SHA256(secret, ref "\n" account_id "\n" outcome "\n" ts))`, lower case.
pub fn sign(
    secret: &SecretString,
    app_ref: &str,
    account_id: &str,
    outcome: &str,
    ts: i64,
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes any key length");
    mac.update(format!("{app_ref}\n{account_id}\n{outcome}\n{ts}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Appends `ref`, `ts` and `sig` to a redirect that already carries `account_id` (success)
/// or `error` (failure).
pub fn append(
    url: &mut url::Url,
    secret: &SecretString,
    app_ref: &str,
    account_id: Option<i64>,
    outcome: &str,
    ts: i64,
) {
    let id = account_id.map(|i| i.to_string()).unwrap_or_default();
    let sig = sign(secret, app_ref, &id, outcome, ts);
    url.query_pairs_mut()
        .append_pair("ref", app_ref)
        .append_pair("ts", &ts.to_string())
        .append_pair("sig", &sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_url_safe_and_short() {
        assert!(valid_ref(""));
        assert!(valid_ref("user-42.session_7~x"));
        assert!(!valid_ref("a b"));
        assert!(!valid_ref("a;b=c"));
        assert!(!valid_ref(&"r".repeat(MAX_REF_CHARS + 1)));
    }

    #[test]
    fn the_signature_covers_every_field() {
        let k = SecretString::from("0123456789abcdef0123".to_string());
        let base = sign(&k, "r1", "42", CONNECTED, 1000);
        assert_eq!(base.len(), 64);
        assert_eq!(base, sign(&k, "r1", "42", CONNECTED, 1000));
        for other in [
            sign(&k, "r2", "42", CONNECTED, 1000),
            sign(&k, "r1", "43", CONNECTED, 1000),
            sign(&k, "r1", "42", "access_denied", 1000),
            sign(&k, "r1", "42", CONNECTED, 1001),
            sign(
                &SecretString::from("another-key-0123456".to_string()),
                "r1",
                "42",
                CONNECTED,
                1000,
            ),
            // The separator keeps fields from sliding into each other.
            sign(&k, "r14", "2", CONNECTED, 1000),
        ] {
            assert_ne!(base, other);
        }
    }
}

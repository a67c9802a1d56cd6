//! Subjects: the provider's user id, kept exactly as the provider gives it (`alice@example.org`,
//! `auth0|123`). Owns what makes a subject acceptable and how a stored subject is matched
//! against one a provider names. Pure.
//!
//! Nothing derives a file name or a metric label from a subject; logs quote it (JSON escapes
//! it) and the token API takes it percent-encoded in its path.

/// OpenID Connect Core 2: `sub` is at most 255 ASCII characters. Other providers' ids are
/// shorter; a longer one is a broken answer, not a user.
pub const MAX_LEN: usize = 255;

/// Checks a subject a provider gave, without altering it: not blank, at most [`MAX_LEN`]
/// characters, no control characters (it is printed by the CLI and written to logs).
pub fn check(subject: &str) -> Result<&str, String> {
    if subject.trim().is_empty() {
        return Err("it is empty".into());
    }
    if subject.chars().count() > MAX_LEN {
        return Err(format!("it is longer than {MAX_LEN} characters"));
    }
    if subject.chars().any(char::is_control) {
        return Err("it contains control characters".into());
    }
    Ok(subject)
}

/// Whether `given` (from the provider, exact) names the user stored as `stored`. Equal
/// strings only; except that refreshd before issue 18 stored subjects from an `id_token`
/// or userinfo with every character outside `[A-Za-z0-9_.:-]` dropped, so such a stored
/// value also matches the exact subject it was made from. Used only where a grant already
/// stored names its user again (a refresh answer); a new connection stores the exact form.
pub fn same(stored: &str, given: &str) -> bool {
    stored == given || stored == legacy_altered(given)
}

/// The altered form older versions stored (kept only to recognise those rows).
fn legacy_altered(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_kept_exactly_and_checked() {
        for s in ["alice@example.org", "auth0|123", "a b/c+d=é", "u1"] {
            assert_eq!(check(s), Ok(s));
        }
        assert!(check("").is_err());
        assert!(check("  ").is_err());
        assert!(check("a\nb").is_err());
        assert!(check(&"x".repeat(256)).is_err());
        assert!(check(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn identity_is_exact_with_a_legacy_match_for_altered_rows() {
        assert!(same("alice@example.org", "alice@example.org"));
        // a@b.c and ab.c are two users.
        assert!(!same("a@b.c", "ab.c"));
        // A row stored altered by an older version still matches its user.
        assert!(same("aliceexample.org", "alice@example.org"));
        assert!(same("auth0123", "auth0|123"));
        assert!(!same("auth0123", "auth0|124"));
    }
}

//! What `refreshd check` says about a provider's refresh-token lifetime: whether the
//! `expiring` flag can work at all, and whether `reauth.window` swallows the lifetime (every
//! account would be flagged `expiring` at once). Pure: words only, no decision changes.

use super::builtin::GENERIC;
use super::profile::{Credential, Profile, RefreshTtl};
use std::time::Duration;

/// Warnings about `[providers.NAME]` under a reauth window of `window`.
pub fn lifetime_warnings(name: &str, profile: &Profile, window: Duration) -> Vec<String> {
    let mut out = Vec::new();
    if profile.credential != Credential::RefreshToken {
        return out;
    }
    let announced =
        profile.refresh_expires_in_field.is_some() || profile.refresh_expires_at_field.is_some();
    let configured = profile.refresh_token_lifetime;
    if !announced && configured.is_none() {
        if profile.refresh_ttl != RefreshTtl::None {
            out.push(format!(
                "providers.{name}: refresh_ttl says the refresh token ends, but neither the token answer (no refresh_expires_in_field / refresh_expires_at_field) nor the config (refresh_token_lifetime) gives when: its end is unknown and the `expiring` flag cannot work for this provider; set refresh_token_lifetime (see docs/src/providers/oidc.md)"
            ));
        } else if profile.kind == GENERIC {
            out.push(format!(
                "providers.{name}: no refresh-token lifetime from the server or the config: accounts are flagged only once a refresh is refused, never `expiring` before; if the server's refresh tokens end, set refresh_token_lifetime and refresh_ttl (see docs/src/providers/oidc.md)"
            ));
        }
    }
    if let Some(life) = configured
        && window > life / 2
    {
        let when = if window >= life {
            "at connect".to_string()
        } else {
            format!(
                "{} after each grant",
                humantime::format_duration(life - window)
            )
        };
        out.push(format!(
            "providers.{name}: reauth.window ({}) is more than half of refresh_token_lifetime ({}): every account is flagged `expiring` {when}; set reauth.window to at most {}",
            humantime::format_duration(window),
            humantime::format_duration(life),
            humantime::format_duration(life / 2)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    /// A generic provider whose refresh token ends as `ttl` says, after `days` if given.
    fn profile(ttl: RefreshTtl, days: Option<u64>) -> Profile {
        Profile {
            token_url: "https://auth.example/token".into(),
            refresh_ttl: ttl,
            refresh_token_lifetime: days.map(|d| Duration::from_secs(d * DAY)),
            ..Profile::generic()
        }
    }
    const WEEK: Duration = Duration::from_secs(7 * DAY);

    #[test]
    fn unknown_refresh_lifetime_is_named() {
        let w = lifetime_warnings("own", &profile(RefreshTtl::Fixed, None), WEEK);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("`expiring` flag cannot work"), "{w:?}");
        assert!(w[0].contains("refresh_token_lifetime"), "{w:?}");
        let w = lifetime_warnings("own", &profile(RefreshTtl::None, None), WEEK);
        assert!(w[0].contains("no refresh-token lifetime"), "{w:?}");
        let fine = profile(RefreshTtl::Fixed, Some(90));
        assert!(lifetime_warnings("own", &fine, WEEK).is_empty());
        let announced = Profile {
            refresh_expires_in_field: Some("rei".into()),
            ..profile(RefreshTtl::Fixed, None)
        };
        assert!(lifetime_warnings("own", &announced, WEEK).is_empty());
        // Built-ins whose refresh tokens have no end are not nagged.
        let x = Profile::built_in("x").unwrap();
        assert!(lifetime_warnings("x", &x, WEEK).is_empty());
    }

    #[test]
    fn a_window_swallowing_the_lifetime_is_named() {
        let p = profile(RefreshTtl::Sliding, Some(3));
        let w = lifetime_warnings("own", &p, WEEK);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("at connect"), "{w:?}");
        assert!(w[0].contains("at most 1day 12h"), "{w:?}");
        let p = profile(RefreshTtl::Fixed, Some(10));
        let w = lifetime_warnings("own", &p, WEEK);
        assert!(w[0].contains("3days after each grant"), "{w:?}");
        let p = profile(RefreshTtl::Fixed, Some(14));
        assert!(lifetime_warnings("own", &p, WEEK).is_empty());
    }
}

//! Pure scheduling rules: when to refresh, how long to back off, when a refresh token is
//! close enough to its end that a person must log in again. No I/O; randomness is passed in.

use crate::model::{ReauthReason, Status};
use rand::Rng;
use std::time::Duration;

/// The knobs of `next_refresh_at`, taken from `[refresh]` in the config.
#[derive(Clone, Debug, PartialEq)]
pub struct RefreshTiming {
    pub lead: Duration,
    pub lead_fraction: f64,
    pub jitter: Duration,
    pub min_interval: Duration,
}

/// When to refresh a token that expires at `access_expires_at` and lived `lifetime` seconds.
///
/// `lead = max(lead, lead_fraction * lifetime)`, capped at half the lifetime so a token that
/// lives shorter than the lead is not refreshed in a tight loop; jitter (at most a quarter
/// of the lifetime) spreads accounts issued together; never earlier than
/// `last_refreshed_at + min_interval`.
pub fn next_refresh_at(
    timing: &RefreshTiming,
    access_expires_at: i64,
    lifetime: i64,
    last_refreshed_at: Option<i64>,
    rng: &mut impl Rng,
) -> i64 {
    let lifetime = lifetime.max(0);
    let by_fraction = (timing.lead_fraction * lifetime as f64) as i64;
    let lead = (timing.lead.as_secs() as i64)
        .max(by_fraction)
        .min(lifetime / 2);
    let jitter_cap = (timing.jitter.as_secs() as i64).min(lifetime / 4);
    let jitter = if jitter_cap > 0 {
        rng.random_range(0..=jitter_cap)
    } else {
        0
    };
    let at = access_expires_at - lead - jitter;
    match last_refreshed_at {
        Some(last) => at.max(last + timing.min_interval.as_secs() as i64),
        None => at,
    }
}

/// Exponential backoff with full jitter, for refreshes and webhook deliveries alike: after
/// the `attempt`-th consecutive failure (1 = the first) a delay drawn uniformly from
/// `[0, ceiling]`, where `ceiling = min(max, base * 2^(attempt-1))`; never shorter than the
/// peer's `Retry-After` when one is given (that wait is the peer's, so `max` does not cut it).
/// Full jitter spreads the retries of many failures over the whole interval, so a provider
/// (or a webhook receiver) that comes back is not hit by all of them at once.
pub fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = base.checked_mul(1u32 << doublings).unwrap_or(max).min(max);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    let drawn = Duration::from_millis(rng.random_range(0..=ceiling_ms));
    match retry_after {
        Some(ra) => drawn.max(ra),
        None => drawn,
    }
}

/// Where a refresh token stands relative to the reauth window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshTokenState {
    /// No end in sight (or the provider gives no end).
    Fine,
    /// Ends within the window: keep refreshing, but a person must log in before it ends.
    Expiring,
    /// Ended: refreshing is impossible.
    Expired,
}

pub fn refresh_token_state(
    now: i64,
    refresh_expires_at: Option<i64>,
    window: Duration,
) -> RefreshTokenState {
    match refresh_expires_at {
        None => RefreshTokenState::Fine,
        Some(end) if end <= now => RefreshTokenState::Expired,
        Some(end) if end <= now + window.as_secs() as i64 => RefreshTokenState::Expiring,
        Some(_) => RefreshTokenState::Fine,
    }
}

/// The refresh token's end after a refresh, by the profile's TTL rule: a fixed TTL never
/// moves later than the first grant's end; a sliding one takes what the provider says.
pub fn refresh_expires_at(
    ttl: crate::provider::profile::RefreshTtl,
    stored: Option<i64>,
    returned: Option<i64>,
) -> Option<i64> {
    use crate::provider::profile::RefreshTtl;
    match (ttl, stored, returned) {
        (RefreshTtl::Fixed, Some(old), Some(new)) => Some(old.min(new)),
        (_, old, new) => new.or(old),
    }
}

/// The status (and reauth reason) an account with fresh tokens gets from its refresh token's
/// state: one rule for refreshes, imports and connects.
pub fn status_for(state: RefreshTokenState) -> (Status, Option<ReauthReason>) {
    match state {
        RefreshTokenState::Fine => (Status::Active, None),
        RefreshTokenState::Expiring => (Status::Expiring, Some(ReauthReason::RefreshTokenExpiring)),
        RefreshTokenState::Expired => {
            (Status::NeedsReauth, Some(ReauthReason::RefreshTokenExpired))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn timing() -> RefreshTiming {
        RefreshTiming {
            lead: Duration::from_secs(600),
            lead_fraction: 0.1,
            jitter: Duration::from_secs(120),
            min_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn day_token_refreshes_lead_plus_jitter_before_expiry() {
        let mut rng = StdRng::seed_from_u64(1);
        let exp = 1_000_000;
        let life = 86_400;
        for _ in 0..1000 {
            let at = next_refresh_at(&timing(), exp, life, Some(exp - life), &mut rng);
            // lead = max(600, 8640) = 8640; jitter within 0..=120
            assert!((exp - 8_640 - 120..=exp - 8_640).contains(&at), "{at}");
        }
    }

    #[test]
    fn short_token_lead_capped_at_half_lifetime() {
        let mut rng = StdRng::seed_from_u64(2);
        let t = RefreshTiming {
            jitter: Duration::ZERO,
            min_interval: Duration::ZERO,
            ..timing()
        };
        // a 5-minute token with a 10-minute lead: refresh at half-life, not immediately
        assert_eq!(
            next_refresh_at(&t, 1_300, 300, Some(1_000), &mut rng),
            1_150
        );
    }

    #[test]
    fn never_earlier_than_min_interval_after_last_refresh() {
        let mut rng = StdRng::seed_from_u64(3);
        let at = next_refresh_at(&timing(), 1_040, 40, Some(1_000), &mut rng);
        assert_eq!(at, 1_060);
    }

    #[test]
    fn jitter_spreads_accounts() {
        let mut rng = StdRng::seed_from_u64(4);
        let set: std::collections::HashSet<i64> = (0..200)
            .map(|_| next_refresh_at(&timing(), 100_000, 7_200, None, &mut rng))
            .collect();
        assert!(set.len() > 50, "jitter should spread: {}", set.len());
    }

    #[test]
    fn backoff_is_full_jitter_up_to_the_doubling_ceiling() {
        let mut rng = StdRng::seed_from_u64(5);
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(1800);
        for attempt in 1..40u32 {
            let ceiling = Duration::from_secs((30u64 << (attempt - 1).min(20)).min(1800));
            let draws: Vec<Duration> = (0..400)
                .map(|_| backoff(attempt, base, max, None, &mut rng))
                .collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "{attempt}: {draws:?}");
            // Full jitter: the whole of [0, ceiling] is used, its lower half too (the
            // webhook's former draw never went below ceiling / 2).
            assert!(draws.iter().any(|d| *d < ceiling / 4), "{attempt}");
            assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "{attempt}");
        }
    }

    #[test]
    fn backoff_counts_attempts_from_one_and_keeps_milliseconds() {
        // The webhook's settings are milliseconds in tests: no whole-second floor.
        let mut rng = StdRng::seed_from_u64(7);
        let (base, max) = (Duration::from_millis(10), Duration::from_millis(40));
        let mut top = |attempt| {
            (0..400)
                .map(|_| backoff(attempt, base, max, None, &mut rng))
                .max()
                .unwrap()
        };
        let (t1, t2, t9) = (top(1), top(2), top(9));
        assert!(
            t1 <= Duration::from_millis(10) && t1 >= Duration::from_millis(8),
            "{t1:?}"
        );
        assert!(
            t2 <= Duration::from_millis(20) && t2 > Duration::from_millis(10),
            "{t2:?}"
        );
        assert!(
            t9 <= Duration::from_millis(40) && t9 > Duration::from_millis(20),
            "{t9:?}"
        );
        // A huge attempt count saturates at max instead of overflowing.
        for _ in 0..100 {
            assert!(backoff(u32::MAX, base, max, None, &mut rng) <= max);
        }
    }

    #[test]
    fn backoff_honours_retry_after_even_beyond_max() {
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..100 {
            let d = backoff(
                1,
                Duration::from_secs(30),
                Duration::from_secs(1800),
                Some(Duration::from_secs(120)),
                &mut rng,
            );
            assert_eq!(d, Duration::from_secs(120), "the draw is at most 30s");
            let d = backoff(
                1,
                Duration::from_secs(30),
                Duration::from_secs(60),
                Some(Duration::from_secs(3600)),
                &mut rng,
            );
            assert_eq!(d, Duration::from_secs(3600));
        }
    }

    #[test]
    fn fixed_ttl_never_moves_later_sliding_does() {
        use crate::provider::profile::RefreshTtl;
        assert_eq!(
            refresh_expires_at(RefreshTtl::Fixed, Some(1_000), Some(5_000)),
            Some(1_000)
        );
        assert_eq!(
            refresh_expires_at(RefreshTtl::Fixed, Some(1_000), Some(900)),
            Some(900)
        );
        assert_eq!(
            refresh_expires_at(RefreshTtl::Fixed, None, Some(5_000)),
            Some(5_000)
        );
        assert_eq!(
            refresh_expires_at(RefreshTtl::Sliding, Some(1_000), Some(5_000)),
            Some(5_000)
        );
        assert_eq!(
            refresh_expires_at(RefreshTtl::None, Some(1_000), None),
            Some(1_000)
        );
    }

    #[test]
    fn refresh_token_window() {
        let w = Duration::from_secs(7 * 86_400);
        assert_eq!(refresh_token_state(0, None, w), RefreshTokenState::Fine);
        assert_eq!(
            refresh_token_state(0, Some(8 * 86_400), w),
            RefreshTokenState::Fine
        );
        assert_eq!(
            refresh_token_state(0, Some(7 * 86_400), w),
            RefreshTokenState::Expiring
        );
        assert_eq!(
            refresh_token_state(10, Some(10), w),
            RefreshTokenState::Expired
        );
    }
}

//! Pure scheduling rules: the schedule of a fresh token set (when to refresh it, when its
//! refresh token ends, the account's status), how long to back off after a failure, when a
//! refresh token is close enough to its end that a person must log in again, and how far
//! ahead of its due second the refresh loop claims an account. No I/O; the time and the
//! randomness are passed in.

use crate::model::{ReauthReason, Status};
use crate::provider::profile::RefreshTtl;
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

/// A fresh token set as `schedule` sees it: only its dates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fresh {
    /// When the provider issued the set (unix seconds): now, or an import's `obtained_at`.
    pub obtained_at: i64,
    pub access: Access,
    /// The refresh token's lifetime from `obtained_at`; None when the provider gives none.
    pub refresh_expires_in: Option<i64>,
    pub origin: Origin,
    /// The provider's keep-alive (`providers.NAME.refresh_at_least_every`): refresh no later
    /// than this after `obtained_at`, however long the access token lives, so a provider
    /// that revokes unused refresh tokens sees this one used in time. None: off.
    pub keep_alive: Option<Duration>,
}

/// The access token of a fresh set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Access {
    /// A new access token living `expires_in` seconds from `obtained_at`.
    Issued { expires_in: i64 },
    /// The answer carried a new refresh token but no usable access token: the stored one is
    /// kept and a new one asked for `retry_in` after `obtained_at` (a first backoff step).
    Kept { retry_in: Duration },
}

/// Where a fresh set came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Origin {
    /// The account's first set: a connect's code exchange or an import.
    FirstGrant,
    /// Our refresh of a stored account.
    Refresh {
        /// The stored refresh token's end, before this refresh.
        stored_refresh_expires_at: Option<i64>,
        /// The provider's rule for how that end moves.
        ttl: RefreshTtl,
        /// The provider refuses to refresh a token younger than this.
        min_token_age: Duration,
    },
}

/// What is stored with a fresh token set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub next_refresh_at: i64,
    pub refresh_expires_at: Option<i64>,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
}

/// The schedule of a fresh token set: one rule for refreshes (engine), connects and imports.
///
/// - `refresh_expires_at`: `obtained_at + refresh_expires_in`; after a refresh the profile's
///   TTL rule applies (a fixed end never moves later, a missing one keeps the stored end).
/// - `status`: from that end, counted at `now` (an import's set may be older than now):
///   ended -> `needs_reauth`, within `reauth_window` -> `expiring`, else `active`.
/// - `next_refresh_at` for a new access token: `expiry - lead - jitter` (`next_refresh_at`'s
///   lead rule, never after the access token's expiry), then two floors that apply to our
///   own refreshes only: not before `obtained_at + min_interval` (no tight loop on a
///   provider that issues seconds-long tokens) and not before `obtained_at + min_token_age`
///   (the provider would refuse). The floors win over the expiry: a tight loop or a refused
///   request is worse than an access token that is late. A first grant gets no floors: we
///   have not refreshed it yet, and the due-time check defers a token that is too young.
///   A kept access token is asked for again `retry_in` (at least 1 s) after `obtained_at`.
/// - The keep-alive, when set, caps the lead rule at `obtained_at + keep_alive - jitter`
///   (the jitter at most a quarter of the interval); the floors still win over it.
///
/// Deliberately no clamp to the refresh token's end: an account whose refresh token ends
/// first is flagged by its status, and with a fixed TTL every refresh before that end would
/// schedule the next one before it again, a loop until it ends.
pub fn schedule(
    fresh: &Fresh,
    timing: &RefreshTiming,
    reauth_window: Duration,
    now: i64,
    rng: &mut impl Rng,
) -> Schedule {
    let at = fresh.obtained_at;
    let returned = fresh.refresh_expires_in.map(|s| at + s);
    let refresh_expires_at = match fresh.origin {
        Origin::FirstGrant => returned,
        Origin::Refresh {
            stored_refresh_expires_at,
            ttl,
            ..
        } => refresh_expires_at(ttl, stored_refresh_expires_at, returned),
    };
    let (status, reauth_reason) =
        status_for(refresh_token_state(now, refresh_expires_at, reauth_window));
    let next_refresh_at = match (fresh.access, fresh.origin) {
        (Access::Kept { retry_in }, _) => at + retry_in.as_secs().max(1) as i64,
        (Access::Issued { expires_in }, Origin::FirstGrant) => {
            let due = Due::new(at, expires_in, fresh.keep_alive);
            next_refresh_at(timing, &due, None, rng)
        }
        (Access::Issued { expires_in }, Origin::Refresh { min_token_age, .. }) => {
            let due = Due::new(at, expires_in, fresh.keep_alive);
            next_refresh_at(timing, &due, Some(at), rng).max(at + min_token_age.as_secs() as i64)
        }
    };
    Schedule {
        next_refresh_at,
        refresh_expires_at,
        status,
        reauth_reason,
    }
}

/// The dates `next_refresh_at` reads: the access token's end and lifetime, and the latest
/// refresh the keep-alive allows.
struct Due {
    access_expires_at: i64,
    lifetime: i64,
    /// `obtained_at + keep_alive` in seconds, and the keep-alive itself.
    keep_alive: Option<(i64, i64)>,
}

impl Due {
    fn new(obtained_at: i64, expires_in: i64, keep_alive: Option<Duration>) -> Due {
        let every = keep_alive.map(|d| d.as_secs() as i64);
        Due {
            access_expires_at: obtained_at + expires_in,
            lifetime: expires_in,
            keep_alive: every.map(|e| (obtained_at + e, e)),
        }
    }
}

/// When to refresh a token that expires at `access_expires_at` and lived `lifetime` seconds.
///
/// `lead = max(lead, lead_fraction * lifetime)`, capped at half the lifetime so a token that
/// lives shorter than the lead is not refreshed in a tight loop; jitter (at most a quarter
/// of the lifetime) spreads accounts issued together; no later than the keep-alive's latest
/// (less the jitter, at most a quarter of the interval); never earlier than
/// `last_refreshed_at + min_interval`.
fn next_refresh_at(
    timing: &RefreshTiming,
    due: &Due,
    last_refreshed_at: Option<i64>,
    rng: &mut impl Rng,
) -> i64 {
    let access_expires_at = due.access_expires_at;
    let lifetime = due.lifetime.max(0);
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
    let at = match due.keep_alive {
        Some((latest, every)) => at.min(latest - jitter.min(every / 4)),
        None => at,
    };
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

/// How long before its due second the continuous refresh loop claims an account. Due times
/// are whole seconds: without a lead, every account due in one second is claimed at its
/// start and they queue behind each other (claim batches, `refresh.concurrency`), late by
/// the queue. Claimed half a second early, they are sent by the time the second begins.
/// Below 1000 ms, so a loop looking at a whole second claims exactly what is due then
/// (whole-second test clocks see no change); half a second early costs nothing against
/// refresh margins of minutes. Leases are never judged by this shifted time.
pub const CLAIM_LEAD_MS: i64 = 500;

/// The latest due second a claim at `now_ms` (unix milliseconds) takes: accounts due by
/// `floor((now_ms + CLAIM_LEAD_MS) / 1000)`.
pub fn due_by(now_ms: i64) -> i64 {
    (now_ms + CLAIM_LEAD_MS).div_euclid(1000)
}

/// When (unix milliseconds) an idle loop at `now_ms` wakes for the earliest account due at
/// `next_due` (unix seconds): `CLAIM_LEAD_MS` before that second, where its claim would
/// take it. An account already inside the horizon but not claimed (its lease runs until
/// its due second, or another replica holds its row) is looked at again at its due second,
/// not in a loop before it.
pub fn wake_for_due(next_due: i64, now_ms: i64) -> i64 {
    let at = next_due.saturating_mul(1000);
    let early = at - CLAIM_LEAD_MS;
    if early > now_ms { early } else { at }
}

/// Whether a provider with room for `free` more claims, of its `concurrency` slots, is worth
/// a claim while refreshes are in flight: once that is a quarter of them (at least one).
/// Every claim walks past the accounts in flight (due, leased) in the due index, and each
/// one that joins a group commit is a statement more on the store's one writer: claiming
/// after each finished refresh costs more than the refresh, and after an eighth of the
/// slots the walk still cost the SQLite writer a tenth of its time in a burst.
pub fn worth_claiming(free: usize, concurrency: usize) -> bool {
    free >= (concurrency / 4).max(1)
}

/// How long before a lease ends its request must be sent: the request's timeout and 5 s to
/// store its answer must still fit, or another claim could refresh the account too.
pub fn answer_margin(request_timeout: Duration) -> Duration {
    request_timeout + Duration::from_secs(5)
}

/// How many refreshes of a provider with `concurrency` slots may be claimed at once: its
/// slots, and up to as many again claimed ahead, waiting for a slot. A claim is answered
/// only once its transaction is durable, after the group commit it joins, which takes
/// longer than a request to a fast provider: claiming only into free slots left most of
/// them idle meanwhile (in a burst at 128, about 30 requests at the provider on average).
/// The accounts claimed ahead hold their leases and no slot: they are sent as slots free
/// up, so the slots, not the claims, still bound the requests in flight. A throttled
/// provider claims ahead no more than its rate limit (`per_minute`) sends in half of
/// `send_window` (a lease less its `answer_margin`), so accounts claimed ahead are sent
/// long before their leases would make them give up.
pub fn claim_depth(concurrency: usize, per_minute: u32, send_window: Duration) -> usize {
    let slots = concurrency.max(1);
    let sendable = u64::from(per_minute).saturating_mul(send_window.as_secs()) / 120;
    let ahead = usize::try_from(sendable).unwrap_or(usize::MAX).min(slots);
    slots.saturating_add(ahead)
}

/// The refresh token's end after a refresh, by the profile's TTL rule: a fixed TTL never
/// moves later than the first grant's end; a sliding one takes what the provider says.
fn refresh_expires_at(ttl: RefreshTtl, stored: Option<i64>, returned: Option<i64>) -> Option<i64> {
    match (ttl, stored, returned) {
        (RefreshTtl::Fixed, Some(old), Some(new)) => Some(old.min(new)),
        (_, old, new) => new.or(old),
    }
}

/// The status (and reauth reason) an account with fresh tokens gets from its refresh token's
/// state.
fn status_for(state: RefreshTokenState) -> (Status, Option<ReauthReason>) {
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

    #[test]
    fn a_claim_takes_what_is_due_within_the_lead_and_a_whole_second_sees_no_change() {
        let t = 1_000_000;
        assert_eq!(due_by(t * 1000), t);
        assert_eq!(due_by(t * 1000 + 499), t);
        assert_eq!(
            due_by((t - 1) * 1000 + 400),
            t - 1,
            "0.6 s before t: not yet"
        );
        assert_eq!(due_by((t - 1) * 1000 + 500), t, "0.5 s before t: claimed");
        assert_eq!(due_by((t - 1) * 1000 + 600), t, "0.4 s before t: claimed");
    }

    #[test]
    fn a_claim_waits_for_a_quarter_of_the_slots_and_at_least_one() {
        assert!(!worth_claiming(31, 128));
        assert!(worth_claiming(32, 128));
        assert!(!worth_claiming(0, 3), "at least one free slot");
        assert!(worth_claiming(1, 3));
        assert!(worth_claiming(1, 1));
    }

    #[test]
    fn a_provider_claims_as_many_again_as_its_slots_ahead() {
        let window = Duration::from_secs(280); // the default lease less its margin
        assert_eq!(claim_depth(128, 600, window), 256);
        assert_eq!(claim_depth(1, 600, window), 2);
        assert_eq!(
            claim_depth(0, 600, window),
            2,
            "a provider always has a slot"
        );
        assert!(
            worth_claiming(claim_depth(128, 600, window) / 4, 128),
            "a quarter of the slots"
        );
    }

    #[test]
    fn a_throttled_provider_claims_ahead_only_what_half_the_lease_sends() {
        let window = Duration::from_secs(280);
        // 6 a minute: 14 in 140 s.
        assert_eq!(claim_depth(32, 6, window), 32 + 14);
        // Too slow to send even one in half the window: no claim ahead.
        assert_eq!(claim_depth(32, 0, window), 32);
        assert_eq!(claim_depth(32, 600, Duration::ZERO), 32);
        assert_eq!(
            answer_margin(Duration::from_secs(15)),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn the_idle_loop_wakes_the_lead_before_the_next_due_second() {
        let t = 1_000_000;
        assert_eq!(wake_for_due(t, (t - 10) * 1000), t * 1000 - CLAIM_LEAD_MS);
        // Inside the horizon but not claimed: at its due second, not at once.
        assert_eq!(wake_for_due(t, (t - 1) * 1000 + 600), t * 1000);
        assert_eq!(wake_for_due(t, t * 1000 - CLAIM_LEAD_MS), t * 1000);
    }

    fn due(access_expires_at: i64, lifetime: i64) -> Due {
        Due {
            access_expires_at,
            lifetime,
            keep_alive: None,
        }
    }

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
            let at = next_refresh_at(&timing(), &due(exp, life), Some(exp - life), &mut rng);
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
            next_refresh_at(&t, &due(1_300, 300), Some(1_000), &mut rng),
            1_150
        );
    }

    #[test]
    fn never_earlier_than_min_interval_after_last_refresh() {
        let mut rng = StdRng::seed_from_u64(3);
        let at = next_refresh_at(&timing(), &due(1_040, 40), Some(1_000), &mut rng);
        assert_eq!(at, 1_060);
    }

    #[test]
    fn jitter_spreads_accounts() {
        let mut rng = StdRng::seed_from_u64(4);
        let set: std::collections::HashSet<i64> = (0..200)
            .map(|_| next_refresh_at(&timing(), &due(100_000, 7_200), None, &mut rng))
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

    const WEEK: Duration = Duration::from_secs(7 * 86_400);

    /// No jitter, so every date is exact.
    fn exact() -> RefreshTiming {
        RefreshTiming {
            jitter: Duration::ZERO,
            ..timing()
        }
    }

    fn first(obtained_at: i64, expires_in: i64, refresh_expires_in: Option<i64>) -> Fresh {
        Fresh {
            obtained_at,
            access: Access::Issued { expires_in },
            refresh_expires_in,
            origin: Origin::FirstGrant,
            keep_alive: None,
        }
    }

    fn refreshed(at: i64, expires_in: i64, refresh_expires_in: Option<i64>) -> Fresh {
        Fresh {
            origin: Origin::Refresh {
                stored_refresh_expires_at: None,
                ttl: RefreshTtl::Sliding,
                min_token_age: Duration::ZERO,
            },
            ..first(at, expires_in, refresh_expires_in)
        }
    }

    fn at(fresh: Fresh, now: i64) -> Schedule {
        schedule(&fresh, &exact(), WEEK, now, &mut StdRng::seed_from_u64(8))
    }

    #[test]
    fn schedule_of_a_day_token_leads_by_the_larger_lead() {
        let s = at(first(1_000_000, 86_400, Some(365 * 86_400)), 1_000_000);
        assert_eq!(s.next_refresh_at, 1_000_000 + 86_400 - 8_640);
        assert_eq!(s.refresh_expires_at, Some(1_000_000 + 365 * 86_400));
        assert_eq!((s.status, s.reauth_reason), (Status::Active, None));
        // A refresh schedules the same set the same way when no floor is reached.
        assert_eq!(
            at(refreshed(1_000_000, 86_400, Some(365 * 86_400)), 1_000_000),
            s
        );
    }

    #[test]
    fn schedule_never_puts_a_first_grant_after_its_access_expiry() {
        let mut rng = StdRng::seed_from_u64(9);
        for expires_in in [-5_000, -1, 0, 1, 2, 40, 119, 600, 3_600, 86_400, 5_184_000] {
            for _ in 0..50 {
                let s = schedule(
                    &first(1_000, expires_in, None),
                    &timing(),
                    WEEK,
                    1_000,
                    &mut rng,
                );
                // The lead rule alone: connect and import once clamped to the expiry, which
                // it never passes.
                assert!(s.next_refresh_at <= 1_000 + expires_in, "{expires_in}");
            }
        }
    }

    #[test]
    fn schedule_of_an_already_expired_token_is_due_at_once() {
        // An import of a set obtained two days ago that lived one day.
        let now = 1_000_000;
        let s = at(first(now - 2 * 86_400, 86_400, None), now);
        assert!(s.next_refresh_at <= now - 86_400, "{}", s.next_refresh_at);
        // The same from a refresh answer saying expires_in 0: not before min_interval.
        assert_eq!(at(refreshed(now, 0, None), now).next_refresh_at, now + 60);
        assert_eq!(at(first(now, 0, None), now).next_refresh_at, now);
    }

    #[test]
    fn schedule_of_a_tiny_lifetime_halves_it_and_a_refresh_keeps_min_interval() {
        // 40 s: the lead is capped at half the lifetime.
        assert_eq!(at(first(1_000, 40, None), 1_000).next_refresh_at, 1_020);
        // After our own refresh the floor wins, even past the access expiry (1_040): a
        // refresh every 20 s would be a tight loop.
        assert_eq!(at(refreshed(1_000, 40, None), 1_000).next_refresh_at, 1_060);
    }

    #[test]
    fn schedule_after_a_refresh_waits_for_min_token_age() {
        let fresh = Fresh {
            origin: Origin::Refresh {
                stored_refresh_expires_at: None,
                ttl: RefreshTtl::None,
                min_token_age: Duration::from_secs(86_400),
            },
            ..first(1_000, 3_600, None)
        };
        assert_eq!(at(fresh, 1_000).next_refresh_at, 1_000 + 86_400);
        // A first grant is not held back: the due-time check defers a young token.
        assert_eq!(
            at(first(1_000, 3_600, None), 1_000).next_refresh_at,
            1_000 + 3_000
        );
    }

    #[test]
    fn schedule_flags_a_refresh_token_ending_before_the_access_token() {
        let s = at(first(1_000, 3_600, Some(100)), 1_000);
        assert_eq!(s.refresh_expires_at, Some(1_100));
        assert_eq!(
            (s.status, s.reauth_reason),
            (Status::Expiring, Some(ReauthReason::RefreshTokenExpiring))
        );
        // The refresh stays on the access token's schedule (no clamp to 1_100).
        assert_eq!(s.next_refresh_at, 1_000 + 3_000);
        let s = at(first(1_000, 3_600, Some(0)), 1_000);
        assert_eq!(
            (s.status, s.reauth_reason),
            (Status::NeedsReauth, Some(ReauthReason::RefreshTokenExpired))
        );
    }

    #[test]
    fn schedule_counts_an_imports_status_at_now_and_its_dates_from_obtained_at() {
        let now = 1_000_000;
        // Obtained 5 days ago with 10 days of refresh token: 5 left, within the week.
        let s = at(first(now - 5 * 86_400, 86_400, Some(10 * 86_400)), now);
        assert_eq!(s.refresh_expires_at, Some(now + 5 * 86_400));
        assert_eq!(s.status, Status::Expiring);
        assert_eq!(s.next_refresh_at, now - 5 * 86_400 + 86_400 - 8_640);
    }

    #[test]
    fn schedule_without_a_refresh_expiry_keeps_the_stored_end_or_none() {
        let s = at(first(1_000, 3_600, None), 1_000);
        assert_eq!((s.refresh_expires_at, s.status), (None, Status::Active));
        for ttl in [RefreshTtl::Fixed, RefreshTtl::Sliding, RefreshTtl::None] {
            let fresh = Fresh {
                origin: Origin::Refresh {
                    stored_refresh_expires_at: Some(1_000 + 3 * 86_400),
                    ttl,
                    min_token_age: Duration::ZERO,
                },
                ..first(1_000, 3_600, None)
            };
            let s = at(fresh, 1_000);
            assert_eq!(s.refresh_expires_at, Some(1_000 + 3 * 86_400), "{ttl:?}");
            assert_eq!(s.status, Status::Expiring, "{ttl:?}");
        }
    }

    #[test]
    fn schedule_keeps_a_fixed_end_and_takes_a_sliding_one() {
        let with = |ttl| Fresh {
            origin: Origin::Refresh {
                stored_refresh_expires_at: Some(1_000 + 30 * 86_400),
                ttl,
                min_token_age: Duration::ZERO,
            },
            ..first(1_000, 3_600, Some(365 * 86_400))
        };
        assert_eq!(
            at(with(RefreshTtl::Fixed), 1_000).refresh_expires_at,
            Some(1_000 + 30 * 86_400)
        );
        assert_eq!(
            at(with(RefreshTtl::Sliding), 1_000).refresh_expires_at,
            Some(1_000 + 365 * 86_400)
        );
    }

    #[test]
    fn schedule_of_a_kept_access_token_asks_again_after_the_retry() {
        let kept = |retry_in| Fresh {
            access: Access::Kept { retry_in },
            ..refreshed(1_000, 0, Some(86_400))
        };
        assert_eq!(
            at(kept(Duration::from_secs(17)), 1_000).next_refresh_at,
            1_017
        );
        assert_eq!(
            at(kept(Duration::from_millis(300)), 1_000).next_refresh_at,
            1_001
        );
        assert_eq!(at(kept(Duration::ZERO), 1_000).status, Status::Expiring);
    }

    fn kept_alive(fresh: Fresh, every: u64) -> Fresh {
        Fresh {
            keep_alive: Some(Duration::from_secs(every)),
            ..fresh
        }
    }

    #[test]
    fn keep_alive_caps_a_long_lived_access_token() {
        // A 60-day access token with a 7-day keep-alive: refreshed after 7 days, not 54.
        let (now, day) = (1_000_000, 86_400);
        let long = refreshed(now, 60 * day, Some(180 * day));
        assert_eq!(at(long, now).next_refresh_at, now + 60 * day - 6 * day);
        assert_eq!(
            at(kept_alive(long, 7 * 86_400), now).next_refresh_at,
            now + 7 * day
        );
        // A first grant (connect, import) is kept alive from when it was obtained: an
        // import of a set obtained 10 days ago is due at once.
        let imported = kept_alive(first(now - 10 * day, 60 * day, None), 7 * 86_400);
        assert_eq!(at(imported, now).next_refresh_at, now - 3 * day);
    }

    #[test]
    fn keep_alive_never_delays_the_lead_rule() {
        // A 2-hour token is refreshed on its own schedule; a day of keep-alive changes nothing.
        let short = first(1_000, 7_200, None);
        assert_eq!(
            at(kept_alive(short, 86_400), 1_000),
            at(short, 1_000),
            "the earlier of the two wins"
        );
    }

    #[test]
    fn keep_alive_jitter_stays_before_the_interval_and_floors_still_win() {
        let mut rng = StdRng::seed_from_u64(10);
        let fresh = kept_alive(refreshed(1_000, 90 * 86_400, None), 3_600);
        let draws: std::collections::HashSet<i64> = (0..300)
            .map(|_| schedule(&fresh, &timing(), WEEK, 1_000, &mut rng).next_refresh_at)
            .collect();
        // jitter = min(120 s, 3600 / 4): every draw within [1h - 120s, 1h].
        assert!(
            draws
                .iter()
                .all(|t| (1_000 + 3_480..=1_000 + 3_600).contains(t)),
            "{draws:?}"
        );
        assert!(
            draws.len() > 20,
            "jitter spreads the keep-alive too: {}",
            draws.len()
        );
        // A provider's min_token_age wins over a keep-alive shorter than it.
        let young = Fresh {
            origin: Origin::Refresh {
                stored_refresh_expires_at: None,
                ttl: RefreshTtl::Sliding,
                min_token_age: Duration::from_secs(86_400),
            },
            ..fresh
        };
        assert_eq!(at(young, 1_000).next_refresh_at, 1_000 + 86_400);
    }
}

//! One test per outcome of the engine's decisions (`decide`): no I/O, a fixed clock and a
//! seeded random draw.

use super::*;
use crate::model::Status;
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::{ExposeSecret, SecretString};

const NOW: i64 = 1_000_000;
const DAY: i64 = 86_400;

fn rules() -> Rules {
    Rules {
        timing: RefreshTiming {
            lead: Duration::from_secs(600),
            lead_fraction: 0.1,
            jitter: Duration::ZERO,
            min_interval: Duration::from_secs(60),
        },
        reauth_window: Duration::from_secs(7 * DAY as u64),
        backoff_base: Duration::from_secs(30),
        backoff_max: Duration::from_secs(1800),
        config_error_retry: Duration::from_secs(3600),
    }
}

fn refreshing() -> ProfileRules {
    ProfileRules {
        credential: Credential::RefreshToken,
        min_token_age: Duration::ZERO,
        refresh_ttl: RefreshTtl::Sliding,
        refresh_at_least_every: None,
    }
}

fn extending() -> ProfileRules {
    ProfileRules {
        credential: Credential::AccessToken,
        min_token_age: Duration::from_secs(DAY as u64),
        refresh_ttl: RefreshTtl::None,
        refresh_at_least_every: None,
    }
}

fn account() -> Account {
    Account {
        id: 7,
        provider: "tiktok".into(),
        subject: "user-1".into(),
        label: None,
        access_token: SecretString::from("act.OLD"),
        refresh_token: SecretString::from("rft.OLD"),
        scope: "user.info.basic".into(),
        token_type: "Bearer".into(),
        access_expires_at: NOW + 600,
        refresh_expires_at: Some(NOW + 300 * DAY),
        next_refresh_at: NOW,
        status: Status::Active,
        reauth_reason: None,
        reauth_flagged_at: None,
        failures: 0,
        last_error: None,
        last_refreshed_at: Some(NOW - DAY),
        generation: 3,
        created_at: NOW - 30 * DAY,
        updated_at: NOW - DAY,
        interrupted_at: None,
        grant: crate::model::Grant::RefreshToken,
    }
}

fn attempt(circuit_open: bool) -> Attempt<'static> {
    Attempt {
        owner: "host:1:2",
        duration_ms: 42,
        circuit_open,
        now: NOW,
    }
}

fn tokens(subject: Option<&str>) -> Answer {
    Answer {
        granted: Granted::Tokens(TokenSet {
            access_token: SecretString::from("act.NEW"),
            refresh_token: Some(SecretString::from("rft.NEW")),
            expires_in: DAY,
            refresh_expires_in: Some(365 * DAY),
            subject: subject.map(str::to_string),
            scope: Some("user.info.basic".into()),
            token_type: "Bearer".into(),
        }),
        problems: vec![],
        rotation_missing: false,
    }
}

fn failure(class: FailureClass, retry_after: Option<Duration>) -> ProviderFailure {
    ProviderFailure {
        class,
        message: "the provider said no".into(),
        http_status: Some(400),
        retry_after,
        answer_lost: false,
    }
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(17)
}

fn answered(account: &Account, profile: ProfileRules, answer: &Answer) -> After {
    after_answer(
        account,
        profile,
        &rules(),
        Ok((answer, 200)),
        attempt(false),
        &mut rng(),
    )
}

fn failed(account: &Account, f: &ProviderFailure, circuit_open: bool) -> After {
    after_answer(
        account,
        refreshing(),
        &rules(),
        Err(f),
        attempt(circuit_open),
        &mut rng(),
    )
}

/// The provider as `before_request` sees it: only its profile's rules matter.
fn configured(profile: ProfileRules) -> Option<(&'static (), ProfileRules)> {
    Some((&(), profile))
}

const UNCONFIGURED: Option<(&(), ProfileRules)> = None;

fn recorded(before: Before<'_, ()>) -> (Outcome, Option<String>) {
    match before {
        Before::Record {
            outcome,
            provider_error,
        } => (outcome, provider_error),
        Before::Send { .. } => panic!("expected a record, got a send"),
    }
}

// --- before the request -------------------------------------------------------------

#[test]
fn before_sends_the_refresh_token_or_the_long_lived_access_token() {
    let a = account();
    let send = |profile| match before_request(&a, configured(profile), &rules(), "o", NOW * 1000) {
        Before::Send {
            credential: Presented::Credential(c),
            ..
        } => c.expose_secret().to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(send(refreshing()), "rft.OLD");
    let a = Account {
        access_expires_at: NOW + 30 * DAY,
        ..account()
    };
    let send_extending =
        match before_request(&a, configured(extending()), &rules(), "o", NOW * 1000) {
            Before::Send {
                credential: Presented::Credential(c),
                ..
            } => c.expose_secret().to_string(),
            other => panic!("{other:?}"),
        };
    assert_eq!(send_extending, "act.OLD");
}

#[test]
fn before_flags_an_ended_refresh_token_without_asking_even_an_unknown_provider() {
    let a = Account {
        refresh_expires_at: Some(NOW - 5),
        ..account()
    };
    for profile in [configured(refreshing()), UNCONFIGURED] {
        let (outcome, provider_error) =
            recorded(before_request(&a, profile, &rules(), "o", NOW * 1000));
        assert_eq!(provider_error, None);
        match outcome {
            Outcome::Rejected {
                reason,
                generation,
                http_status,
                duration_ms,
                error,
                ..
            } => {
                assert_eq!(reason, ReauthReason::RefreshTokenExpired);
                assert_eq!((generation, http_status, duration_ms), (3, None, 0));
                assert!(error.starts_with("refresh token expired at "), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn before_an_unconfigured_provider_is_a_config_error_retried_slowly() {
    let (outcome, provider_error) = recorded(before_request(
        &account(),
        UNCONFIGURED,
        &rules(),
        "o",
        NOW * 1000,
    ));
    assert_eq!(
        provider_error.as_deref(),
        Some("provider \"tiktok\" is not configured")
    );
    match outcome {
        Outcome::ConfigError {
            owner,
            next_refresh_at,
            error,
            http_status,
            ..
        } => {
            assert_eq!(owner, "o");
            assert_eq!(next_refresh_at, NOW + 3600);
            assert_eq!(http_status, None);
            assert!(error.contains("add [providers.tiktok]"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn before_an_expired_long_lived_access_token_is_flagged_for_good() {
    let a = Account {
        access_expires_at: NOW,
        ..account()
    };
    match recorded(before_request(
        &a,
        configured(extending()),
        &rules(),
        "o",
        NOW * 1000,
    ))
    .0
    {
        Outcome::Rejected { reason, error, .. } => {
            assert_eq!(reason, ReauthReason::RefreshTokenExpired);
            assert!(error.contains("cannot be extended"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    // The same expiry is no reason to flag a refresh-token account.
    assert!(matches!(
        before_request(&a, configured(refreshing()), &rules(), "o", NOW * 1000),
        Before::Send { .. }
    ));
}

#[test]
fn before_a_token_younger_than_min_token_age_waits_until_it_is_old_enough() {
    let a = Account {
        last_refreshed_at: Some(NOW - 3600),
        access_expires_at: NOW + 60 * DAY,
        ..account()
    };
    match recorded(before_request(
        &a,
        configured(extending()),
        &rules(),
        "o",
        NOW * 1000,
    ))
    .0
    {
        Outcome::Transient {
            next_refresh_at,
            answer_lost,
            duration_ms,
            error,
            ..
        } => {
            assert_eq!(next_refresh_at, NOW - 3600 + DAY);
            assert!(!answer_lost);
            assert_eq!(duration_ms, 0);
            assert!(error.contains("min_token_age (1day)"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    // Counted from creation when never refreshed.
    let new = Account {
        last_refreshed_at: None,
        created_at: NOW - 100,
        ..a.clone()
    };
    match recorded(before_request(
        &new,
        configured(extending()),
        &rules(),
        "o",
        NOW * 1000,
    ))
    .0
    {
        Outcome::Transient {
            next_refresh_at, ..
        } => assert_eq!(next_refresh_at, NOW - 100 + DAY),
        other => panic!("{other:?}"),
    }
    // A token that would expire before it is old enough is tried anyway.
    let short = Account {
        access_expires_at: NOW + 3600,
        ..a
    };
    assert!(matches!(
        before_request(&short, configured(extending()), &rules(), "o", NOW * 1000),
        Before::Send { .. }
    ));
}

#[test]
fn a_token_claimed_within_the_lead_of_being_old_enough_waits_for_it_rather_than_failing() {
    // Deferred to `old_enough_at`, it is claimed CLAIM_LEAD_MS earlier, in the second before.
    let old_enough_at = NOW + 1;
    let a = Account {
        last_refreshed_at: Some(old_enough_at - DAY),
        access_expires_at: NOW + 60 * DAY,
        ..account()
    };
    let claimed_ms = old_enough_at * 1000 - crate::policy::CLAIM_LEAD_MS;
    match before_request(&a, configured(extending()), &rules(), "o", claimed_ms) {
        Before::Send { not_before, .. } => assert_eq!(not_before, Some(old_enough_at * 1000)),
        other => panic!("deferred again: {other:?}"),
    }
    // Earlier than the lead it is still deferred, and once old enough sent at once.
    assert!(matches!(
        before_request(&a, configured(extending()), &rules(), "o", claimed_ms - 1),
        Before::Record {
            outcome: Outcome::Transient { .. },
            ..
        }
    ));
    assert!(matches!(
        before_request(
            &a,
            configured(extending()),
            &rules(),
            "o",
            old_enough_at * 1000
        ),
        Before::Send {
            not_before: None,
            ..
        }
    ));
}

#[test]
fn last_send_leaves_the_timeout_and_five_seconds_of_the_lease() {
    assert_eq!(last_send_at(1_000, Duration::from_secs(15)), 980);
    assert_eq!(
        last_send_at(i64::MIN + 1, Duration::from_secs(15)),
        i64::MIN
    );
}

// --- after the answer ---------------------------------------------------------------

#[test]
fn after_tokens_rotate_with_the_one_schedule() {
    let after = answered(&account(), refreshing(), &tokens(Some("user-1")));
    assert_eq!(after.provider, ProviderSignal::Accepted);
    assert!(after.circuit_answered() && !after.parked_past_expiry);
    match after.outcome {
        Outcome::Rotated {
            tokens,
            generation,
            next_refresh_at,
            status,
            reauth_reason,
            http_status,
            duration_ms,
            ..
        } => {
            assert_eq!(tokens.access_token.expose_secret(), "act.NEW");
            assert_eq!(generation, 3);
            assert_eq!(next_refresh_at, NOW + DAY - 8_640);
            assert_eq!((status, reauth_reason), (Status::Active, None));
            assert_eq!((http_status, duration_ms), (Some(200), 42));
            assert_eq!(tokens.refresh_expires_in, Some(365 * DAY));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_tokens_the_profiles_keep_alive_caps_the_next_refresh() {
    // A day-long access token with a 6-hour keep-alive: due 6 hours after the rotation,
    // not the lead rule's 21.6 hours.
    let kept = ProfileRules {
        refresh_at_least_every: Some(Duration::from_secs(6 * 3_600)),
        ..refreshing()
    };
    match answered(&account(), kept, &tokens(Some("user-1"))).outcome {
        Outcome::Rotated {
            next_refresh_at, ..
        } => assert_eq!(next_refresh_at, NOW + 6 * 3_600),
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_tokens_a_fixed_ttl_stores_the_earlier_end_and_may_flag_expiring() {
    let a = Account {
        refresh_expires_at: Some(NOW + 3 * DAY),
        ..account()
    };
    let fixed = ProfileRules {
        refresh_ttl: RefreshTtl::Fixed,
        ..refreshing()
    };
    match answered(&a, fixed, &tokens(None)).outcome {
        Outcome::Rotated {
            tokens,
            status,
            reauth_reason,
            ..
        } => {
            assert_eq!(tokens.refresh_expires_in, Some(3 * DAY));
            assert_eq!(status, Status::Expiring);
            assert_eq!(reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_a_refresh_token_alone_keeps_the_access_token_and_asks_again_soon() {
    let answer = Answer {
        granted: Granted::RefreshTokenOnly {
            refresh_token: SecretString::from("rft.NEW"),
            refresh_expires_in: None,
            subject: None,
        },
        problems: vec!["access_token is empty".into()],
        rotation_missing: false,
    };
    let after = answered(&account(), refreshing(), &answer);
    assert_eq!(after.provider, ProviderSignal::Accepted);
    match after.outcome {
        Outcome::Rotated {
            tokens,
            next_refresh_at,
            ..
        } => {
            assert_eq!(tokens.access_token.expose_secret(), "act.OLD");
            assert_eq!(tokens.refresh_token.unwrap().expose_secret(), "rft.NEW");
            assert_eq!(tokens.expires_in, 600);
            // No lifetime returned: the stored end stays.
            assert_eq!(tokens.refresh_expires_in, Some(300 * DAY));
            assert!(
                (NOW + 1..=NOW + 30).contains(&next_refresh_at),
                "{next_refresh_at}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_tokens_of_another_user_are_rejected_and_nothing_stored() {
    let long = "x".repeat(500);
    let after = answered(&account(), refreshing(), &tokens(Some(&long)));
    // The provider answered properly: our client is fine.
    assert_eq!(after.provider, ProviderSignal::Accepted);
    match after.outcome {
        Outcome::Rejected {
            reason,
            error,
            http_status,
            ..
        } => {
            assert_eq!(reason, ReauthReason::SubjectMismatch);
            assert_eq!(http_status, Some(200));
            assert!(error.contains(&"x".repeat(64)) && !error.contains(&"x".repeat(65)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_a_transient_failure_backs_off_and_never_flags() {
    let mut f = failure(FailureClass::Transient, None);
    f.answer_lost = true;
    let a = Account {
        failures: 2,
        access_expires_at: NOW + DAY,
        ..account()
    };
    for seed in 0..50 {
        let after = after_answer(
            &a,
            refreshing(),
            &rules(),
            Err(&f),
            attempt(false),
            &mut StdRng::seed_from_u64(seed),
        );
        assert_eq!(after.provider, ProviderSignal::Nothing);
        assert!(!after.circuit_answered() && !after.parked_past_expiry);
        match after.outcome {
            Outcome::Transient {
                next_refresh_at,
                answer_lost,
                owner,
                error,
                ..
            } => {
                // The third failure in a row: full jitter up to 30 s * 4.
                assert!(
                    (NOW + 1..=NOW + 120).contains(&next_refresh_at),
                    "{next_refresh_at}"
                );
                assert!(answer_lost);
                assert_eq!(owner, "host:1:2");
                assert_eq!(error, "the provider said no");
            }
            other => panic!("{other:?}"),
        }
    }
    // Retry-After is honoured.
    let f = failure(FailureClass::Transient, Some(Duration::from_secs(900)));
    match failed(&a, &f, false).outcome {
        Outcome::Transient {
            next_refresh_at, ..
        } => assert_eq!(next_refresh_at, NOW + 900),
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_a_transient_failure_with_the_circuit_open_waits_for_the_circuit() {
    let a = Account {
        access_expires_at: NOW + DAY,
        ..account()
    };
    let probe = crate::circuit::PROBE_INTERVAL.as_secs() as i64;
    let at = |retry_after| match failed(&a, &failure(FailureClass::Transient, retry_after), true)
        .outcome
    {
        Outcome::Transient {
            next_refresh_at, ..
        } => next_refresh_at,
        other => panic!("{other:?}"),
    };
    assert_eq!(at(None), NOW + probe.max(1));
    assert_eq!(at(Some(Duration::from_secs(5_000))), NOW + 5_000);
}

#[test]
fn after_a_transient_failure_past_the_access_expiry_is_parked_and_says_so() {
    let a = Account {
        access_expires_at: NOW + 10,
        ..account()
    };
    let f = failure(FailureClass::Transient, Some(Duration::from_secs(600)));
    let after = failed(&a, &f, false);
    assert!(after.parked_past_expiry);
    match after.outcome {
        Outcome::Transient { error, .. } => {
            assert!(
                error.contains("; parked past expiry: the access token expires at"),
                "{error}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_a_config_error_or_an_odd_answer_retries_slowly_and_tells_the_provider_state() {
    for (class, signal) in [
        (
            FailureClass::Config,
            ProviderSignal::ConfigError("the provider said no".into()),
        ),
        (
            FailureClass::Unexpected,
            ProviderSignal::Unexpected("the provider said no".into()),
        ),
    ] {
        let after = failed(&account(), &failure(class, None), false);
        assert_eq!(after.provider, signal);
        assert!(after.circuit_answered());
        match after.outcome {
            Outcome::ConfigError {
                next_refresh_at,
                http_status,
                duration_ms,
                ..
            } => {
                assert_eq!(next_refresh_at, NOW + 3600);
                assert_eq!((http_status, duration_ms), (Some(400), 42));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn after_a_rejection_flags_with_its_reason_or_as_interrupted() {
    let reason_of =
        |a: &Account, r| match failed(a, &failure(FailureClass::Rejected(r), None), false) {
            After {
                outcome: Outcome::Rejected { reason, error, .. },
                provider: ProviderSignal::Answered,
                ..
            } => (reason, error),
            other => panic!("{other:?}"),
        };
    assert_eq!(
        reason_of(&account(), ReauthReason::InvalidGrant).0,
        ReauthReason::InvalidGrant
    );
    let cut = Account {
        interrupted_at: Some(NOW - 30),
        ..account()
    };
    let (reason, error) = reason_of(&cut, ReauthReason::InvalidGrant);
    assert_eq!(reason, ReauthReason::RefreshInterrupted);
    assert!(
        error.starts_with("the provider said no; an earlier refresh"),
        "{error}"
    );
    // Only invalid_grant is read as the loss of a rotated token.
    assert_eq!(
        reason_of(&cut, ReauthReason::ScopeWithdrawn).0,
        ReauthReason::ScopeWithdrawn
    );
}

#[test]
fn a_rotation_after_a_failing_stretch_or_a_lifted_flag_is_a_recovery() {
    let healthy = account();
    let now = healthy.access_expires_at - 60;
    assert_eq!(recovery(&healthy, false, now), None);
    let failing = Account {
        failures: FAILING_STREAK,
        ..account()
    };
    assert_eq!(
        recovery(&failing, false, now),
        Some(Recovery::Failures(FAILING_STREAK))
    );
    // Still flagged after the rotation (an expiring token not renewed): not recovered.
    assert_eq!(recovery(&failing, true, now), None);
    // A blip retried while the access token still worked: the app saw nothing.
    let blip = Account {
        failures: FAILING_STREAK - 1,
        ..account()
    };
    assert_eq!(recovery(&blip, false, now), None);
    // The same failures outlasting the access token: the app held an expired token.
    let expired_at = blip.access_expires_at;
    assert_eq!(
        recovery(&blip, false, expired_at),
        Some(Recovery::Failures(FAILING_STREAK - 1))
    );
    assert_eq!(recovery(&healthy, false, expired_at + 1), None);
    let forced = Account {
        reauth_reason: Some(ReauthReason::InvalidGrant),
        ..account()
    };
    assert_eq!(
        recovery(&forced, false, now),
        Some(Recovery::Flag(ReauthReason::InvalidGrant))
    );
    let renewed = Account {
        status: Status::Expiring,
        reauth_reason: Some(ReauthReason::RefreshTokenExpiring),
        ..account()
    };
    assert_eq!(
        recovery(&renewed, false, now),
        Some(Recovery::Flag(ReauthReason::RefreshTokenExpiring))
    );
}

#[test]
fn only_a_forced_retry_of_a_flagged_account_was_announced_before() {
    assert!(!flag_already_announced(&account()));
    let forced = Account {
        reauth_reason: Some(ReauthReason::InvalidGrant),
        ..account()
    };
    assert!(flag_already_announced(&forced));
    // An expiring account rejected for good is a new flag (needs_reauth), announced.
    let expiring = Account {
        status: Status::Expiring,
        reauth_reason: Some(ReauthReason::RefreshTokenExpiring),
        ..account()
    };
    assert!(!flag_already_announced(&expiring));
}

/// The same decisions for app tokens (`Grant::ClientCredentials`).
mod apps;

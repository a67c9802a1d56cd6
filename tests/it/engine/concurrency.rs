//! Several engines or processes on one database: leases keep one account to one refresh, a
//! rotation by another process is not a re-authorization, and a claim waiting on the rate
//! limit gives its lease back in time, a global permit bounds requests in flight, not
//! answers waiting to be stored, accounts claimed ahead wait for a provider's slot, and a
//! `--once` run longer than a lease still refreshes each account once.

use super::{
    INTERVAL, access_token, all_due_at, config_with, engine, import_users, lease, outcomes,
    refresh_token, spawn_run,
};
use crate::helpers::{self, TestApp, account};
use refreshd::model::{ReauthReason, Status, TokenSet};
use refreshd::sandbox::{Faults, SandboxConfig};
use refreshd::store::{Outcome, Recorded, StoreError};
use secrecy::SecretString;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn invalid_grant_after_another_process_rotated_is_not_reauth() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let direct = app.import(&store, &config, &["direct"], None).await[0];
    // "staged" falls due a minute after "direct".
    app.clock.advance(Duration::from_secs(60));
    let staged = app.import(&store, &config, &["staged"], None).await[0];
    let now = account(&store, direct).await.next_refresh_at;
    assert!(now < account(&store, staged).await.next_refresh_at);
    app.clock.set(now);

    // Direct: a claim holds generation g; another process rotates the account; then the
    // stale claim's invalid_grant arrives.
    let claimed = store
        .claim_due("owner-a", now, config.store.lease, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let stale = &claimed[0];
    assert_eq!(stale.id, direct);
    let g = stale.generation;
    let rotated = Outcome::Rotated {
        account_id: stale.id,
        generation: g,
        tokens: TokenSet {
            access_token: SecretString::from("act.other-process"),
            refresh_token: Some(SecretString::from("rft.other-process")),
            expires_in: 7200,
            refresh_expires_in: None,
            subject: None,
            scope: None,
            token_type: "Bearer".into(),
        },
        at: now,
        next_refresh_at: now + INTERVAL,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 5,
    };
    assert_eq!(store.record(rotated).await.unwrap(), Recorded::Applied);
    let rejected = Outcome::Rejected {
        owner: Some("owner-a".into()),
        account_id: stale.id,
        generation: g,
        reason: ReauthReason::InvalidGrant,
        at: now,
        error: "invalid_grant: Refresh token has already been used.".into(),
        http_status: Some(400),
        duration_ms: 5,
    };
    assert_eq!(store.record(rejected).await.unwrap(), Recorded::Superseded);
    let a = account(&store, stale.id).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.generation, g + 1);
    assert_eq!(refresh_token(&a), "rft.other-process");
    assert_eq!(outcomes(&store, stale.id).await[0], "superseded");

    // Staged with two engines on one file: engine A claims "staged" and its (slow) request
    // is in flight when its lease runs out (the clock jumps past it, as for a stalled
    // process); engine B claims it and refreshes first, so A's answer is invalid_grant
    // for a token B already rotated away.
    app.clock.set(account(&store, staged).await.next_refresh_at);
    let store_a = app.store().await;
    let store_b = app.store().await;
    let (engine_a, _tx_a) = engine(&store_a, &app.clock, &config);
    let (engine_b, _tx_b) = engine(&store_b, &app.clock, &config);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(400),
        ..Faults::default()
    });
    // A current-thread runtime: every task logs into these.
    let logs = helpers::Logs::default();
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    let task_a = {
        let e = engine_a.clone();
        tokio::spawn(async move { e.run_due(CancellationToken::new()).await })
    };
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    app.sandbox.set_faults(Faults::default());
    app.clock
        .advance(config.store.lease + Duration::from_secs(1));
    engine_b.run_due(CancellationToken::new()).await.unwrap();
    assert_eq!(engine_b.stats().snapshot().rotated, 1);
    task_a.await.unwrap().unwrap();

    let sa = engine_a.stats().snapshot();
    assert_eq!(sa.superseded, 1, "{sa:?}");
    assert_eq!(sa.flagged, 0, "{sa:?}");
    // Its line says it outlived its lease: the one way two refreshes may overlap.
    let superseded = logs
        .text()
        .lines()
        .filter(|l| l.contains(r#""outcome":"superseded""#))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(superseded.len(), 1, "{}", logs.text());
    assert!(
        superseded[0].contains(r#""lease_ended":true"#),
        "{superseded:?}"
    );
    let a = account(&store, staged).await;
    assert_eq!(a.status, Status::Active, "flagged by a stale invalid_grant");
    assert_eq!(a.reauth_reason, None);
    assert_eq!(
        app.sandbox.current_refresh_token("staged").as_deref(),
        Some(refresh_token(&a))
    );
    assert!(app.sandbox.access_token_valid("staged", access_token(&a)));
    assert_eq!(
        outcomes(&store, staged).await[..2],
        ["superseded", "rotated"]
    );
    // The staged double refresh is exactly one reuse, by A's stale claim.
    assert_eq!(app.sandbox.stats().reuse_rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_one_file_never_refresh_one_account_twice() {
    const N: usize = 300;
    const CYCLES: u64 = 6;
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let (subjects, ids) = import_users(&app, &store, &config, N).await;

    let store_a = app.store().await;
    let store_b = app.store().await;
    let (engine_a, _tx_a) = engine(&store_a, &app.clock, &config);
    let (engine_b, _tx_b) = engine(&store_b, &app.clock, &config);
    assert_ne!(engine_a.owner(), engine_b.owner());
    let shutdown = CancellationToken::new();
    let tasks: Vec<_> = [&engine_a, &engine_b]
        .into_iter()
        .map(|e| {
            let (e, s) = (e.clone(), shutdown.clone());
            tokio::spawn(async move { e.run(s).await })
        })
        .collect();

    let rotated = || engine_a.stats().snapshot().rotated + engine_b.stats().snapshot().rotated;
    for cycle in 1..=CYCLES {
        let due = all_due_at(&store, &ids).await;
        app.clock.set(due);
        let want = N as u64 * cycle;
        let done = helpers::eventually(20, || async move { rotated() >= want }).await;
        assert!(
            done,
            "cycle {cycle}: {} of {want} refreshes recorded; sandbox {:?}",
            rotated(),
            app.sandbox.stats()
        );
        assert_eq!(app.sandbox.stats().refreshed, want, "cycle {cycle}");
    }
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }

    let s = app.sandbox.stats();
    assert_eq!(s.reuse_rejected, 0, "an account was refreshed twice: {s:?}");
    assert_eq!(s.requests, N as u64 * CYCLES, "{s:?}");
    let (sa, sb) = (engine_a.stats().snapshot(), engine_b.stats().snapshot());
    assert_eq!(sa.superseded + sb.superseded, 0, "{sa:?} {sb:?}");
    assert_eq!(sa.rotated + sb.rotated, N as u64 * CYCLES);
    assert!(
        sa.rotated > 0 && sb.rotated > 0,
        "one engine did nothing: {sa:?} {sb:?}"
    );
    for (&id, subject) in ids.iter().zip(&subjects) {
        let a = account(&store, id).await;
        assert_eq!(a.status, Status::Active, "{subject}");
        assert_eq!(a.generation, CYCLES as i64, "{subject}");
        assert_eq!(
            app.sandbox.current_refresh_token(subject).as_deref(),
            Some(refresh_token(&a)),
            "{subject}"
        );
        assert!(
            app.sandbox.access_token_valid(subject, access_token(&a)),
            "{subject}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_on_the_rate_limit_gives_its_lease_back_before_it_ends() {
    // Found by the interop harness (scenario `outage`): after an outage, claimed accounts
    // waited in the provider's rate limit longer than their lease. The lease lapsed, a new
    // claim took it (recording a crash window that never was), and the old attempt's
    // "lease too short" release, under the same owner, gave the new claim's lease back:
    // a third claim then refreshed the account while the second was in flight, with a
    // token the provider had just retired, and oidc-provider revoked the grant.
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("providers.tiktok", "rate_limit", 1.into()),
            ("providers.tiktok", "burst", 1.into()),
        ],
    );
    let store = app.store().await;
    let ids = app.import(&store, &config, &["w1", "w2", "w3"], None).await;
    app.clock.set(all_due_at(&store, &ids).await);
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    let waiting: Vec<i64> = {
        let mut v = Vec::new();
        for &id in &ids {
            if account(&store, id).await.generation == 0 {
                v.push(id);
            }
        }
        v
    };
    assert_eq!(waiting.len(), 2);
    // lease 30s - (request_timeout 5s + 5s): the waits give up 20s after the claim.
    app.clock.advance(Duration::from_secs(21));
    assert!(helpers::eventually(5, || async { stats.snapshot().released >= 2 }).await);
    // Given back, not lapsed: claiming them again records no crash window.
    for &id in &waiting {
        let interrupted: Option<i64> = store
            .call(move |c| {
                c.query_row(
                    "SELECT interrupted_at FROM accounts WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .map_err(|source| StoreError::Sqlite {
                    context: "test query",
                    source,
                })
            })
            .await
            .unwrap();
        assert_eq!(interrupted, None, "account {id}");
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(app.sandbox.stats().reuse_rejected, 0);
}

/// refresh.concurrency bounds requests in flight, not answers waiting for their durable
/// commit: while the first answer cannot be stored (the store's worker is held), the next
/// account's request is already sent; both are stored once the worker is free.
#[tokio::test]
async fn a_permit_goes_back_when_the_answer_is_in_not_when_it_is_stored() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("refresh", "concurrency", 1.into()),
            ("providers.tiktok", "concurrency", 2.into()),
        ],
    );
    let store = app.store().await;
    let ids = app.import(&store, &config, &["q1", "q2"], None).await;
    app.clock.set(all_due_at(&store, &ids).await);
    // Slow answers: the test holds the worker while the first request is in flight.
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(200),
        ..Faults::default()
    });
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<()>();
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .call(move |_| {
                    let _ = free_rx.recv();
                    Ok(())
                })
                .await
        })
    };
    assert!(
        helpers::eventually(5, || async move { sb.stats().requests >= 2 }).await,
        "the second request waited for the first answer's commit"
    );
    assert_eq!(engine.stats().snapshot().rotated, 0, "nothing stored yet");
    free_tx.send(()).unwrap();
    held.await.unwrap().unwrap();
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 2 }).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Accounts leased at the moment: claimed, in flight, or answered and not stored yet.
async fn leased_now(store: &refreshd::store::Store) -> u64 {
    store
        .call(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM accounts WHERE lease_owner IS NOT NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|source| StoreError::Sqlite {
                context: "test query",
                source,
            })
        })
        .await
        .expect("count leases") as u64
}

/// A provider's slots bound its requests in flight, while as many accounts again are
/// claimed ahead, leased and waiting for a slot (`policy::claim_depth`): a claim is answered
/// only once its transaction is durable, and claiming only into free slots left them idle
/// meanwhile. Nothing past the depth is claimed, and every account is refreshed once.
///
/// The global permits (8) are far above the provider's slots (2), so only the slots can
/// hold the requests at 2. Watched through the whole run, every 20 ms:
/// - requests at the provider (counted as they arrive) minus those it has answered
///   (`refreshed`, counted once the slow delay is over) never exceed the 2 slots;
/// - the accounts claimed never exceed the depth, 4, and reach it (claimed ahead). A lease
///   also stays on an answered account until its outcome is stored (the slot went back
///   with the answer), so the claimed ones are the leased ones minus those answered and not
///   stored yet. Read in the order stored, leased, answered, that difference is never more
///   than the accounts truly claimed at the moment the leases were read.
#[tokio::test]
async fn accounts_claimed_ahead_wait_for_a_slot_and_never_raise_the_requests_in_flight() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("refresh", "concurrency", 8.into()),
            ("providers.tiktok", "concurrency", 2.into()),
        ],
    );
    let store = app.store().await;
    let names = ["d1", "d2", "d3", "d4", "d5", "d6", "d7"];
    let ids = app.import(&store, &config, &names, None).await;
    app.clock.set(all_due_at(&store, &ids).await);
    // Slow answers: two requests at a time stay at the provider for a second each.
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_secs(1),
        ..Faults::default()
    });
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let stats = engine.stats();
    let sb = &app.sandbox;
    let total = names.len() as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut most_claimed, mut most_at_provider) = (0, 0);
    loop {
        let stored = stats.snapshot().rotated;
        let leased = leased_now(&store).await;
        let s = sb.stats();
        let at_provider = s.requests - s.refreshed;
        assert!(
            at_provider <= 2,
            "{at_provider} requests at the provider with 2 slots: {s:?}"
        );
        let claimed = leased.saturating_sub(s.refreshed - stored);
        assert!(
            claimed <= 4,
            "{claimed} claimed (leased {leased}, answered {}, stored {stored}), depth 4",
            s.refreshed
        );
        most_claimed = most_claimed.max(claimed);
        most_at_provider = most_at_provider.max(at_provider);
        if stored == total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all refreshed: {stored} of {total}, {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most_claimed, 4, "two in flight and two claimed ahead");
    assert_eq!(most_at_provider, 2, "both slots were used");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let s = sb.stats();
    assert_eq!(
        (s.requests, s.refreshed, s.reuse_rejected),
        (total, total, 0)
    );
    for &id in &ids {
        assert_eq!(account(&store, id).await.generation, 1, "account {id}");
    }
}

/// `--once` judges and sets leases by the real now, not by the second it started: a run
/// longer than the lease (less the request's timeout and 5 s) otherwise claims accounts
/// with leases already past their send deadline, gives each back (still due) and claims it
/// again, without end. Here one slot, so two accounts are claimed at a time; while the
/// first request hangs, 25 s pass: the account claimed with it is given back, and every
/// later claim must still be able to send.
#[tokio::test]
async fn a_once_run_longer_than_the_lease_still_refreshes_every_account_once() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("refresh", "concurrency", 1.into()),
            ("providers.tiktok", "concurrency", 1.into()),
        ],
    );
    // The helpers' lease and request timeout: sends stop 10 s before a lease ends.
    assert_eq!(
        (config.store.lease, config.refresh.request_timeout),
        (Duration::from_secs(30), Duration::from_secs(5))
    );
    let store = app.store().await;
    let names = ["o1", "o2", "o3", "o4"];
    let ids = app.import(&store, &config, &names, None).await;
    let started = all_due_at(&store, &ids).await;
    app.clock.set(started);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let mut task = {
        let e = engine.clone();
        tokio::spawn(async move { e.run_due(CancellationToken::new()).await })
    };
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    // Past the send deadline of leases taken at `started` (started + 20 s), within the
    // first one's lease (started + 30 s): its answer is stored as ever.
    app.clock.set(started + 25);
    let finished = tokio::time::timeout(Duration::from_secs(10), &mut task).await;
    if finished.is_err() {
        task.abort();
    }
    let s = sb.stats();
    let done = engine.stats().snapshot();
    assert!(
        finished.is_ok(),
        "--once never finished: {done:?}, provider {s:?}"
    );
    finished.unwrap().unwrap().unwrap();
    assert_eq!(done.rotated, names.len() as u64, "{done:?}");
    // The one claimed with the first account, at its send deadline; none claimed later.
    assert_eq!(done.released, 1, "{done:?}");
    assert_eq!(
        (s.requests, s.refreshed, s.reuse_rejected),
        (names.len() as u64, names.len() as u64, 0)
    );
    for &id in &ids {
        let a = account(&store, id).await;
        assert_eq!(a.generation, 1, "account {id}");
        assert!(a.next_refresh_at > started + 25, "account {id}");
        assert_eq!(lease(&store, id).await.0, None, "account {id}");
    }
}

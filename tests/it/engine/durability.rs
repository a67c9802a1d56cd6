//! A rotation the database refuses: it waits in the recovery file, is committed before the
//! account is claimed again, and a run that ends with it still there fails and says so; an
//! account claimed ahead is not sent once the store cannot hold its result.

use super::{access_token, config_with, engine, lease, outcomes, refresh_token, run_once};
use crate::helpers::{self, TestApp, account};
use refreshd::config::Config;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Status;
use refreshd::sandbox::{Faults, SandboxConfig};
use refreshd::store::{Store, recovery_path};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn open_store(app: &TestApp, busy_timeout: Duration) -> Store {
    helpers::open_store(&app.db, busy_timeout).await
}

/// A second connection holding the database's write lock until rolled back or dropped.
fn lock_writes(db: &std::path::Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    c
}

/// Imports `u1`, makes it due, and runs one engine pass whose commit the database refuses:
/// the sandbox rotates (slowly, so the test can take the write lock while the request is in
/// flight), the store cannot commit and writes the recovery file. Returns the account id, the
/// engine's store, and the connection still holding the lock.
async fn refresh_into_recovery_file(
    app: &TestApp,
    config: &Config,
) -> (i64, Store, rusqlite::Connection, String) {
    let store = open_store(app, config.store.busy_timeout).await;
    let id = app.import(&store, config, &["u1"], None).await[0];
    let original = refresh_token(&account(&store, id).await).to_string();
    app.clock.set(account(&store, id).await.next_refresh_at);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let (engine, _tx) = engine(&store, &app.clock, config);
    let task = {
        let e = engine.clone();
        tokio::spawn(async move { e.run_due(CancellationToken::new()).await })
    };
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    let locker = lock_writes(&app.db);
    task.await.unwrap().unwrap();
    app.sandbox.set_faults(Faults::default());

    let stats = engine.stats().snapshot();
    assert_eq!((stats.rotated, stats.deferred), (1, 1), "{stats:?}");
    let current = app.sandbox.current_refresh_token("u1").unwrap();
    assert_ne!(current, original, "the sandbox rotated");
    // The database still holds the rotated-away token...
    let in_db: String = locker
        .query_row(
            "SELECT refresh_token FROM accounts WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_db, original);
    // ...and the recovery file the new one.
    let recovery = store.own_recovery_path(&app.db);
    let text = std::fs::read_to_string(&recovery).expect("recovery file written");
    assert_eq!(text.lines().count(), 1, "one entry in the recovery file");
    let entry: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(entry["account_id"], id);
    assert_eq!(entry["generation"], 0);
    assert_eq!(entry["refresh_token"].as_str(), Some(current.as_str()));
    (id, store, locker, original)
}

#[tokio::test]
async fn recovery_file_keeps_a_rotation_the_database_refused() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[("store", "busy_timeout", "100ms".into())],
    );
    let (id, store, locker, _) = refresh_into_recovery_file(&app, &config).await;
    let recovery = store.own_recovery_path(&app.db);

    // Closing while the database is still locked cannot commit: the file stays.
    store.close().await;
    assert!(recovery.exists(), "recovery file removed without a commit");
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    // The next start replays it.
    let store = app.store().await;
    assert!(!recovery.exists(), "recovery file not removed after replay");
    let a = account(&store, id).await;
    let current = app.sandbox.current_refresh_token("u1").unwrap();
    assert_eq!(
        refresh_token(&a),
        current,
        "the rotated refresh token was lost"
    );
    assert!(app.sandbox.access_token_valid("u1", access_token(&a)));
    assert_eq!(a.generation, 1);
    assert_eq!(a.status, Status::Active);
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(outcomes(&store, id).await[0], "rotated");

    // And the recovered token works.
    app.clock.set(a.next_refresh_at);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 1, "{report:?}");
    let a = account(&store, id).await;
    assert_eq!(a.generation, 2);
    assert_eq!(
        app.sandbox.current_refresh_token("u1").as_deref(),
        Some(refresh_token(&a))
    );
    let s = app.sandbox.stats();
    assert_eq!((s.refreshed, s.reuse_rejected), (2, 0), "{s:?}");
}

/// While a rotation waits in the recovery file, the database row still holds the refresh
/// token the provider has rotated away. Once the database is writable again, no claim may
/// hand that token out (presenting it is a reuse, which some providers punish by revoking
/// the grant): the deferred rotation must be committed first.
#[tokio::test]
async fn deferred_rotation_is_committed_before_the_account_is_claimed_again() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[("store", "busy_timeout", "100ms".into())],
    );
    let (id, store, locker, original) = refresh_into_recovery_file(&app, &config).await;

    // A job while the database is still locked: the worker's retry of the deferred commit
    // fails (after the busy timeout).
    assert_eq!(refresh_token(&account(&store, id).await), original);
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    // The claim's lease ran out meanwhile (a long lock); the account is due.
    app.clock
        .advance(config.store.lease + Duration::from_secs(1));
    let claimed = store
        .claim_due("another-claim", app.clock.now(), config.store.lease, 10)
        .await
        .unwrap();
    let current = app.sandbox.current_refresh_token("u1").unwrap();
    for a in &claimed {
        assert_eq!(a.id, id);
        assert_eq!(
            refresh_token(a),
            current,
            "claimed with the refresh token the provider rotated away; the deferred rotation was not committed first"
        );
    }
    store.close().await;
    let store = app.store().await;
    assert_eq!(refresh_token(&account(&store, id).await), current);
}

/// A run that has to stop while the database still refuses a rotation it received fails,
/// naming the account and the recovery file (which must not be deleted); the next run
/// commits it.
#[tokio::test]
async fn a_run_ending_with_a_rotation_only_in_the_recovery_file_fails_and_says_so() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[("store", "busy_timeout", "50ms".into())],
    );
    let store = open_store(&app, config.store.busy_timeout).await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    app.clock.set(account(&store, id).await.next_refresh_at);
    store.close().await;
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let run = {
        let (config, clock) = (config.clone(), app.clock.clone());
        tokio::spawn(async move {
            lifecycle::run(
                config,
                RunOptions {
                    once: true,
                    ..RunOptions::new(clock)
                },
                CancellationToken::new(),
            )
            .await
        })
    };
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    let locker = lock_writes(&app.db);
    let err = run.await.unwrap().unwrap_err();
    let recovery = recovery_path(&app.db);
    match &err {
        lifecycle::DaemonError::PendingRotations { count, path } => {
            assert_eq!(*count, 1);
            // The run's own file: `<db>.recovery.<owner>`.
            assert!(
                path.starts_with(&format!("{}.", recovery.display())),
                "{path}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("keep that file"), "{err}");
    assert_eq!(refreshd::store::pending_recovery_files(&app.db).len(), 1);
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    app.sandbox.set_faults(Faults::default());

    // The next run commits it before anything else.
    run_once(&app, &config).await;
    assert!(refreshd::store::pending_recovery_files(&app.db).is_empty());
    let store = app.store().await;
    assert_eq!(
        app.sandbox.current_refresh_token("u1").as_deref(),
        Some(refresh_token(&account(&store, id).await))
    );
}

/// An account claimed ahead, waiting for its provider's slot, is checked again just before
/// its request: once the store file is gone (its lease and a rotated token have nowhere to
/// go), it is given back unsent instead of presenting its refresh token.
#[tokio::test]
async fn an_account_claimed_ahead_is_not_sent_once_the_store_is_gone() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("refresh", "concurrency", 8.into()),
            ("providers.tiktok", "concurrency", 1.into()),
        ],
    );
    let store = open_store(&app, config.store.busy_timeout).await;
    let ids = app.import(&store, &config, &["g1", "g2"], None).await;
    app.clock.set(super::all_due_at(&store, &ids).await);
    // The first request hangs while the test removes the store file.
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_secs(3),
        ..Faults::default()
    });
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = super::spawn_run(&engine, &shutdown);
    let both_leased = || async {
        let mut n = 0;
        for &id in &ids {
            n += usize::from(lease(&store, id).await.0.is_some());
        }
        n == 2
    };
    assert!(
        helpers::eventually(5, both_leased).await,
        "one sent, one claimed ahead"
    );
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests == 1 }).await);
    std::fs::remove_file(&app.db).unwrap();
    assert!(
        helpers::eventually(5, || async { !store.may_send() }).await,
        "the store notices its file is gone"
    );
    // The first answer frees the slot; the account waiting for it is given back.
    let stats = engine.stats();
    let given_back = || async {
        let s = stats.snapshot();
        s.released + s.record_errors >= 1
    };
    assert!(
        helpers::eventually(10, given_back).await,
        "{:?}",
        stats.snapshot()
    );
    assert_eq!(
        sb.stats().requests,
        1,
        "the account claimed ahead was not sent"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

//! Shutdown of the continuous engine: in-flight refreshes drain, nothing is sent once a stop
//! is requested, and an answer that comes after the grace period is still stored.

use super::{
    access_token, all_due_at, config_with, engine, import_users, lease, refresh_token, spawn_run,
    try_config_with, wait_until_idle,
};
use crate::helpers::{self, TestApp, account};
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Status;
use refreshd::sandbox::{Faults, SandboxConfig};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight() {
    const N: usize = 24;
    const BURST: u64 = 8;
    let app = TestApp::start(SandboxConfig::default()).await;
    // 8 requests go out at once; the rest of the claimed accounts wait for the provider's
    // rate limit (one a minute) when the shutdown comes.
    let config = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("providers.tiktok", "rate_limit", 1.into()),
            ("providers.tiktok", "burst", (BURST as i64).into()),
            ("shutdown", "grace", "10s".into()),
        ],
    );
    let store = app.store().await;
    let (subjects, ids) = import_users(&app, &store, &config, N).await;
    let originals: Vec<String> = {
        let mut v = Vec::new();
        for &id in &ids {
            v.push(refresh_token(&account(&store, id).await).to_string());
        }
        v
    };
    app.clock.set(all_due_at(&store, &ids).await);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(500),
        ..Faults::default()
    });

    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= BURST }).await);
    assert_eq!(
        app.sandbox.stats().refreshed,
        0,
        "cancel while the requests are in flight"
    );
    let cancelled = Instant::now();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let took = cancelled.elapsed();
    assert!(took < config.shutdown.grace, "drain took {took:?}");

    let stats = engine.stats().snapshot();
    let s = app.sandbox.stats();
    assert_eq!(s.reuse_rejected, 0, "{s:?}");
    assert_eq!(s.requests, BURST, "requests sent after the shutdown: {s:?}");
    assert_eq!(
        stats.rotated, BURST,
        "in-flight refreshes not finished: {stats:?}"
    );
    assert!(stats.released > 0, "{stats:?}");
    let mut rotated = 0;
    for (i, (&id, subject)) in ids.iter().zip(&subjects).enumerate() {
        let a = account(&store, id).await;
        let current = app.sandbox.current_refresh_token(subject).unwrap();
        assert_eq!(
            refresh_token(&a),
            current,
            "{subject}: stored token is not the live one"
        );
        assert_eq!(
            lease(&store, id).await,
            (None, None),
            "{subject}: lease left behind"
        );
        assert_eq!(a.status, Status::Active);
        if a.generation == 1 {
            rotated += 1;
            assert_ne!(current, originals[i]);
            assert!(app.sandbox.access_token_valid(subject, access_token(&a)));
        } else {
            assert_eq!(a.generation, 0, "{subject}");
            assert_eq!(
                current, originals[i],
                "{subject}: rotated at the sandbox only"
            );
        }
    }
    assert_eq!(rotated, BURST);
}

/// Shutdown is requested while the engine waits for a claim (the store is busy). The claim
/// then returns accounts, but nothing has been sent for them yet: that is the safe point,
/// and every one of them must be given back, not sent.
#[tokio::test]
async fn no_request_is_sent_after_shutdown_is_requested() {
    const N: usize = 10;
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let (subjects, ids) = import_users(&app, &store, &config, N).await;
    let due = all_due_at(&store, &ids).await;

    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    // The engine has looked at the store (nothing due) and waits for the clock.
    wait_until_idle(&engine, &app.clock).await;

    // Occupy the store's worker thread until released.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let blocker = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .call(move |_| {
                    started_tx.send(()).unwrap();
                    let _ = release_rx.recv();
                    Ok(())
                })
                .await
        })
    };
    assert!(
        helpers::eventually(5, || {
            let started = started_rx.try_recv().is_ok();
            async move { started }
        })
        .await
    );

    // Accounts become due: the engine wakes and asks the (busy) store for a claim.
    app.clock.set(due);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // Shutdown comes while the claim is pending; then the store answers it.
    shutdown.cancel();
    release_tx.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    task.await.unwrap().unwrap();

    let s = app.sandbox.stats();
    assert_eq!(
        s.requests, 0,
        "refresh requests were sent after shutdown was requested: {s:?}"
    );
    for (&id, subject) in ids.iter().zip(&subjects) {
        let a = account(&store, id).await;
        assert_eq!(lease(&store, id).await, (None, None), "{subject}");
        assert_eq!(
            app.sandbox.current_refresh_token(subject).as_deref(),
            Some(refresh_token(&a))
        );
    }
}

/// A refresh still in flight when the grace period ends is answered after the daemon has
/// stopped. If the provider rotated, that answer is the account's only working refresh
/// token. Either the configuration refuses a grace period shorter than a request can take,
/// or the rotation must still be stored.
#[tokio::test]
async fn a_refresh_answered_after_the_grace_period_is_not_lost() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = match try_config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("refresh", "request_timeout", "5s".into()),
            ("shutdown", "grace", "200ms".into()),
        ],
    ) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("shutdown.grace"), "{msg}");
            return;
        }
        Ok(c) => c,
    };
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    app.clock.set(account(&store, id).await.next_refresh_at);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(600),
        ..Faults::default()
    });
    let shutdown = CancellationToken::new();
    let daemon = {
        let (config, clock, s) = (config.clone(), app.clock.clone(), shutdown.clone());
        tokio::spawn(async move { lifecycle::run(config, RunOptions::new(clock), s).await })
    };
    let sb = &app.sandbox;
    assert!(helpers::eventually(5, || async move { sb.stats().requests >= 1 }).await);
    shutdown.cancel();
    daemon.await.unwrap().expect("daemon run");

    // The sandbox answers (and rotates) after the daemon returned.
    assert!(helpers::eventually(5, || async move { sb.stats().refreshed >= 1 }).await);
    let current = app.sandbox.current_refresh_token("u1").unwrap();
    let kept = helpers::eventually(1, || {
        let (store, current) = (&store, &current);
        async move { refresh_token(&account(store, id).await) == current }
    })
    .await;
    assert!(
        kept,
        "the provider rotated after the grace period and the new refresh token was not stored: the account is lost"
    );
}

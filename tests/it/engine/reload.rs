//! New settings (SIGHUP) and the engine: every reload reaches an idle engine, which sleeps
//! rather than spins when no reload can come; a new rate limit holds the accounts already
//! claimed too.

use super::{all_due_at, config_with, engine, spawn_run, wait_until_idle};
use crate::helpers::{self, TestApp, account};
use refreshd::engine::Settings;
use refreshd::sandbox::{Faults, SandboxConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `Engine::new` takes a settings receiver. When no reload can ever come (the sender is
/// gone), an idle engine must still sleep, not spin on the closed channel.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn idle_engine_does_not_spin_when_no_reload_can_come() {
    /// CPU time of the current thread (the test runtime's only thread), clock ticks.
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of stat(5); the first after ')' is field 3.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let (engine, tx) = engine(&store, &app.clock, &config);
    drop(tx);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    wait_until_idle(&engine, &app.clock).await;

    let before = thread_cpu_ticks();
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let used = thread_cpu_ticks() - before;
    // Idle: about 1 tick (the polls themselves); spinning: 10 or more.
    assert!(
        used < 5,
        "an idle engine with nothing due used {used} clock ticks of CPU in 500 ms (busy loop)"
    );

    // It still works.
    app.clock.set(account(&store, id).await.next_refresh_at);
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// SIGHUP's new settings reach an idle engine every time: the idle wait used to mark a new
/// value as seen, and the loop then kept the old settings about half the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reaches_an_idle_engine_every_time() {
    for round in 0..6 {
        let app = TestApp::start(SandboxConfig::default()).await;
        let good = config_with(&app, &app.sandbox.token_url(), &[]);
        let bad = config_with(
            &app,
            &app.sandbox.token_url(),
            &[("providers.tiktok", "client_secret", "wrong-secret".into())],
        );
        let store = app.store().await;
        let id = app.import(&store, &good, &["reloaded"], None).await[0];
        let (engine, tx) = engine(&store, &app.clock, &bad);
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let (engine, token) = (engine.clone(), token.clone());
            async move { engine.run(token).await }
        });
        // Let the engine go idle (nothing is due), then reload with the right secret.
        assert!(
            helpers::eventually(5, || async {
                engine
                    .stats()
                    .heartbeat
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
            })
            .await
        );
        tx.send_replace(Arc::new(Settings::new(good.clone()).expect("providers")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = account(&store, id).await;
        app.clock.set(before.next_refresh_at);
        engine.waker().notify_one();
        assert!(
            helpers::eventually(5, || async {
                account(&store, id).await.generation > before.generation
            })
            .await,
            "round {round}: the account was not rotated with the reloaded credentials: {:?}",
            account(&store, id).await.last_error
        );
        assert_eq!(
            app.sandbox.stats().client_rejected,
            0,
            "round {round}: old secret used"
        );
        token.cancel();
        task.await.unwrap().unwrap();
    }
}

/// A reload that lowers a provider's rate limit holds the accounts it had claimed before
/// the reload as well: they wait for a slot, then for the new limiter, not the old one.
/// Two slots, four accounts: two in flight (slow answers) and two claimed ahead when the
/// rate drops to 1 a minute with a burst of 1; of the two, one is sent (the new burst) and
/// the other waits until its lease's send deadline and is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_rate_limit_holds_the_accounts_claimed_before_the_reload() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let fast = [
        ("refresh", "concurrency", 8.into()),
        ("providers.tiktok", "concurrency", 2.into()),
        ("providers.tiktok", "rate_limit", 6000.into()),
        ("providers.tiktok", "burst", 10.into()),
    ];
    let config = config_with(&app, &app.sandbox.token_url(), &fast);
    let mut slow = fast.clone();
    slow[2].2 = 1.into();
    slow[3].2 = 1.into();
    let slower = config_with(&app, &app.sandbox.token_url(), &slow);
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["r1", "r2", "r3", "r4"], None)
        .await;
    app.clock.set(all_due_at(&store, &ids).await);
    app.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(500),
        ..Faults::default()
    });
    let (engine, tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let sb = &app.sandbox;
    let leased = || async {
        let mut n = 0;
        for &id in &ids {
            n += usize::from(super::lease(&store, id).await.0.is_some());
        }
        n
    };
    assert!(
        helpers::eventually(5, || async {
            sb.stats().requests == 2 && leased().await == 4
        })
        .await,
        "two in flight and two claimed ahead: {:?}",
        sb.stats()
    );
    let reloaded = Settings::reloaded(slower, &tx.borrow()).expect("providers");
    tx.send_replace(Arc::new(reloaded));

    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated >= 3 }).await);
    assert_eq!(
        sb.stats().requests,
        3,
        "the fourth waits for the new limiter"
    );
    // lease 30 s - (request_timeout 5 s + 5 s): the wait gives up 20 s after the claim.
    app.clock.advance(Duration::from_secs(21));
    assert!(helpers::eventually(5, || async { stats.snapshot().released >= 1 }).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(sb.stats().requests, 3);
    let mut generations = Vec::new();
    for &id in &ids {
        generations.push(account(&store, id).await.generation);
    }
    generations.sort_unstable();
    assert_eq!(generations, [0, 1, 1, 1]);
}

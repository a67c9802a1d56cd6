//! The claim lead: the continuous loop claims an account up to `policy::CLAIM_LEAD_MS`
//! before its due second (so a second's accounts are sent as it begins), judges leases by
//! the real time, and `--once` keeps claiming only what was due when it started. A token
//! deferred until it is old enough (`min_token_age`) and claimed in the lead waits for that
//! second, once, rather than failing again.

use super::{engine, outcomes, run_once, spawn_run, wait_until_idle};
use crate::helpers::{self, TestApp, account};
use refreshd::config::Config;
use refreshd::engine::{Engine, EngineError, Settings};
use refreshd::sandbox::SandboxConfig;
use refreshd::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running engine, its settings sender (kept alive), its stop and its task.
type Running = (
    Engine,
    watch::Sender<Arc<Settings>>,
    CancellationToken,
    JoinHandle<Result<(), EngineError>>,
);

/// Starts an engine on `store` and waits until it has looked at the store at the clock's
/// time and found nothing to claim, plus a little longer.
async fn run_until_idle(app: &TestApp, store: &Store, config: &Config) -> Running {
    let (engine, tx) = engine(store, &app.clock, config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    wait_until_idle(&engine, &app.clock).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    (engine, tx, shutdown, task)
}

/// Sets the manual clock `ms` milliseconds before second `t`.
fn before(app: &TestApp, t: i64, ms: u64) {
    app.clock.set(t - 1);
    app.clock.advance(Duration::from_millis(1000 - ms));
}

#[tokio::test]
async fn an_account_due_at_t_is_refreshed_at_t_minus_0_4_s_and_not_at_t_minus_0_6_s() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let t = account(&store, id).await.next_refresh_at;
    let imported = outcomes(&store, id).await;
    before(&app, t, 600);
    let (engine, _tx, shutdown, task) = run_until_idle(&app, &store, &config).await;
    let stats = engine.stats();
    assert_eq!(
        stats.snapshot().rotated,
        0,
        "claimed 0.6 s before its due second"
    );
    assert_eq!(outcomes(&store, id).await, imported);

    app.clock.advance(Duration::from_millis(200));
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    // Stored as refreshed in the second before t (the clock still reads t - 0.4 s).
    let refreshed = account(&store, id).await;
    assert_eq!(
        refreshed.last_refreshed_at,
        Some(t - 1),
        "refreshed before t"
    );
    assert!(refreshed.next_refresh_at > t);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_lease_that_ends_at_t_is_not_taken_over_at_t_minus_0_4_s() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let t = account(&store, id).await.next_refresh_at;
    // Another process leased it so that its lease ends exactly at t.
    let lease = config.store.lease;
    let held = store
        .claim_due_except(
            "other:1",
            t - lease.as_secs() as i64,
            t,
            lease,
            1,
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    before(&app, t, 400);
    let (engine, _tx, shutdown, task) = run_until_idle(&app, &store, &config).await;
    let stats = engine.stats();
    assert_eq!(
        stats.snapshot().rotated,
        0,
        "took a lease over before it ended"
    );
    assert_eq!(
        super::lease(&store, id).await,
        (Some("other:1".to_string()), Some(t))
    );

    // At t the lease has ended: the idle loop wakes then and takes the account over.
    app.clock.set(t);
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn run_once_claims_no_lead() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let t = account(&store, id).await.next_refresh_at;
    before(&app, t, 400);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 0, "{report:?}");
    assert_eq!(account(&store, id).await.next_refresh_at, t);

    app.clock.set(t);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 1, "{report:?}");
}

/// An account of a provider with `min_token_age = "110m"`, refreshed by `--once` when due
/// (108 min after it was issued) and so deferred to the second it is old enough; and that
/// second.
async fn deferred_until_old_enough(app: &TestApp) -> (Config, Store, i64, i64) {
    let config = super::config_with(
        app,
        &app.sandbox.token_url(),
        &[("providers.tiktok", "min_token_age", "110m".into())],
    );
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let imported = account(&store, id).await;
    let old_enough_at = imported.created_at + 110 * 60;
    app.clock.set(imported.next_refresh_at);
    run_once(app, &config).await;
    let deferred = account(&store, id).await;
    assert_eq!(deferred.next_refresh_at, old_enough_at);
    assert_eq!(deferred.failures, 1);
    (config, store, id, old_enough_at)
}

/// Starts the loop 0.4 s before `old_enough_at` and waits until it has claimed `id`.
async fn claimed_in_the_lead(
    app: &TestApp,
    store: &Store,
    config: &Config,
    id: i64,
    old_enough_at: i64,
) -> Running {
    before(app, old_enough_at, 400);
    let (engine, tx) = engine(store, &app.clock, config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let claimed = || async { super::lease(store, id).await.0.is_some() };
    assert!(
        helpers::eventually(5, claimed).await,
        "not claimed in the lead"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        app.sandbox.stats().requests,
        0,
        "sent before it was old enough"
    );
    assert_eq!(account(store, id).await.failures, 1, "deferred again");
    (engine, tx, shutdown, task)
}

#[tokio::test]
async fn a_token_deferred_until_old_enough_is_claimed_within_the_lead_and_sent_once_old_enough() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let (config, store, id, old_enough_at) = deferred_until_old_enough(&app).await;
    let (engine, _tx, shutdown, task) =
        claimed_in_the_lead(&app, &store, &config, id, old_enough_at).await;

    app.clock.set(old_enough_at);
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    let a = account(&store, id).await;
    assert_eq!((a.failures, a.last_refreshed_at), (0, Some(old_enough_at)));
    let transients = outcomes(&store, id).await;
    assert_eq!(transients.iter().filter(|o| *o == "transient").count(), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_while_waiting_to_be_old_enough_gives_the_lease_back_unsent() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let (config, store, id, old_enough_at) = deferred_until_old_enough(&app).await;
    let (_engine, _tx, shutdown, task) =
        claimed_in_the_lead(&app, &store, &config, id, old_enough_at).await;

    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(app.sandbox.stats().requests, 0);
    assert_eq!(super::lease(&store, id).await, (None, None));
    let a = account(&store, id).await;
    assert_eq!((a.failures, a.next_refresh_at), (1, old_enough_at));
}

/// A claim that came back short took everything due: the loop waits for the next due
/// account, as after an empty claim, rather than claiming again at once only to walk past
/// the accounts it just leased. Claims are numbered in their lease owner (`owner:N`).
#[tokio::test]
async fn a_claim_that_comes_back_short_is_not_followed_by_another_at_once() {
    use refreshd::sandbox::TOKEN_PATH;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    let body = super::token_body("u1");
    // The first account's request is answered at once; the second's hangs (past the
    // test's end), so its lease stays to be read.
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(body.clone()))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    super::mount_hanging_answer(&server, body, None).await;
    let config = super::config_with(
        &app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[("refresh", "request_timeout", "10s".into())],
    );
    let store = app.store().await;
    let first = app.import(&store, &config, &["u1"], None).await[0];
    app.clock.advance(Duration::from_secs(3600));
    let second = app.import(&store, &config, &["u2"], None).await[0];
    app.clock.set(account(&store, first).await.next_refresh_at);
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().rotated == 1 }).await);
    wait_until_idle(&engine, &app.clock).await;

    app.clock.set(account(&store, second).await.next_refresh_at);
    let leased = || async { super::lease(&store, second).await.0.is_some() };
    assert!(
        helpers::eventually(5, leased).await,
        "the second account was not claimed"
    );
    let owner = super::lease(&store, second).await.0.unwrap();
    assert!(
        owner.ends_with(":2"),
        "{owner}: the second account's claim was not the loop's second"
    );
    shutdown.cancel();
    task.abort();
}

//! The refresh engine driven through the library: `lifecycle::run` with `once` and the
//! continuous `Engine::run`, against the sandbox provider (or wiremock for exact answers) on
//! loopback and a real SQLite file. Time is the manual clock shared by the sandbox and the
//! engine, so days pass in milliseconds; real waiting is limited to 20 ms polls.

use crate::helpers::{self, T0, TestApp, account};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::engine::{Engine, Settings};
use refreshd::jobs;
use refreshd::lifecycle::{self, RunOptions, RunReport};
use refreshd::model::{Account, ReauthReason, Status, TokenSet};
use refreshd::sandbox::{Faults, SandboxConfig, TOKEN_PATH};
use refreshd::store::{Outcome, Recorded, Store, StoreError, recovery_path};
use secrecy::{ExposeSecret, SecretString};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// The sandbox's access tokens live 2 h; with `lead = 10m, lead_fraction = 0.1` (the
/// helpers' config) the lead is 12 min, so a token is refreshed 108 min after it was issued.
const ACCESS_TTL: i64 = 2 * HOUR;
const LEAD: i64 = 12 * MINUTE;
const INTERVAL: i64 = ACCESS_TTL - LEAD;
/// The helpers' `refresh.backoff_base` and `refresh.backoff_max`, in seconds.
const BACKOFF_BASE: i64 = 30;
const BACKOFF_MAX: i64 = 1800;

// ---- set-up ----

/// The helpers' test config with keys replaced or added: `(section, key, value)`, where a
/// section may be dotted (`providers.tiktok`).
fn config_with(app: &TestApp, token_url: &str, overrides: &[(&str, &str, toml::Value)]) -> Config {
    try_config_with(app, token_url, overrides).expect("test config")
}

fn try_config_with(
    app: &TestApp,
    token_url: &str,
    overrides: &[(&str, &str, toml::Value)],
) -> Result<Config, refreshd::config::ConfigError> {
    let mut table: toml::Table = helpers::config_toml(&app.db, token_url, "")
        .parse()
        .expect("the helpers' TOML parses");
    for (section, key, value) in overrides {
        let mut t = &mut table;
        for part in section.split('.') {
            t = t
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a table");
        }
        t.insert(key.to_string(), value.clone());
    }
    Config::from_toml_str(&table.to_string())
}

/// `refreshd run --once` at the clock's current time: refreshes everything due, sweeps, and
/// closes its store.
async fn run_once(app: &TestApp, config: &Config) -> RunReport {
    let clock = app.clock.clone();
    lifecycle::run(
        config.clone(),
        RunOptions {
            once: true,
            ..RunOptions::new(clock)
        },
        CancellationToken::new(),
    )
    .await
    .expect("run --once")
}

/// An engine on `store`. The settings sender is returned because the engine's idle wait also
/// watches for new settings: it must outlive the engine.
fn engine(store: &Store, clock: &Clock, config: &Config) -> (Engine, watch::Sender<Arc<Settings>>) {
    let settings = Arc::new(Settings::new(config.clone()).expect("providers"));
    let (tx, rx) = watch::channel(settings);
    (Engine::new(store.clone(), clock.clone(), rx), tx)
}

async fn open_store(app: &TestApp, busy_timeout: Duration) -> Store {
    helpers::open_store(&app.db, busy_timeout).await
}

fn refresh_token(a: &Account) -> &str {
    a.refresh_token.expose_secret()
}

fn access_token(a: &Account) -> &str {
    a.access_token.expose_secret()
}

/// The refresh log's outcomes for one account, newest first.
async fn outcomes(store: &Store, id: i64) -> Vec<String> {
    store
        .log_entries(id, 10_000)
        .await
        .expect("read log")
        .into_iter()
        .map(|e| e.outcome)
        .collect()
}

/// `(lease_owner, lease_expires_at)` of one account.
async fn lease(store: &Store, id: i64) -> (Option<String>, Option<i64>) {
    store
        .call(move |c| {
            c.query_row(
                "SELECT lease_owner, lease_expires_at FROM accounts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|source| StoreError::Sqlite {
                context: "test query",
                source,
            })
        })
        .await
        .expect("read lease")
}

/// The latest `next_refresh_at` among `ids`: once the clock is there, all of them are due.
async fn all_due_at(store: &Store, ids: &[i64]) -> i64 {
    let mut due = i64::MIN;
    for &id in ids {
        due = due.max(account(store, id).await.next_refresh_at);
    }
    due
}

/// The ceiling of the backoff after the n-th consecutive failure, seconds.
fn backoff_ceiling(failures: u32) -> i64 {
    (BACKOFF_BASE << (failures - 1).min(20)).min(BACKOFF_MAX)
}

/// A TikTok-shaped success body.
fn token_body(open_id: &str) -> serde_json::Value {
    serde_json::json!({
        "access_token": "act.from-wiremock",
        "expires_in": 7200,
        "refresh_token": "rft.from-wiremock",
        "refresh_expires_in": 86_400 * 100,
        "open_id": open_id,
        "scope": "user.info.basic",
        "token_type": "Bearer",
    })
}

/// The timestamp prefix of the sandbox's `log_id`s at unix second `now`.
fn log_id_stamp(now: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(now)
        .unwrap()
        .format(time::macros::format_description!(
            "[year][month][day][hour][minute][second]"
        ))
        .unwrap()
}

// ---- rotation ----

#[tokio::test]
async fn rotation_persisted_and_old_refresh_token_never_reused() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let subjects = ["u1", "u2", "u3", "u4", "u5"];
    let ids = app.import(&store, &config, &subjects, None).await;
    let n = subjects.len() as u64;

    let mut seen: HashSet<String> = HashSet::new();
    for &id in &ids {
        assert!(seen.insert(refresh_token(&account(&store, id).await).to_string()));
    }
    for cycle in 1..=4u64 {
        let due = all_due_at(&store, &ids).await;
        assert!(due > app.clock.now(), "cycle {cycle}: due {due} already");

        // One second early: nothing is refreshed.
        app.clock.set(due - 1);
        let early = run_once(&app, &config).await;
        assert_eq!(early.stats.rotated, 0, "cycle {cycle}: refreshed early");
        assert_eq!(app.sandbox.stats().requests, n * (cycle - 1));

        app.clock.set(due);
        let report = run_once(&app, &config).await;
        assert_eq!(report.stats.rotated, n, "cycle {cycle}: {report:?}");
        assert_eq!(report.newly_flagged(), 0, "cycle {cycle}: {report:?}");
        for (&id, subject) in ids.iter().zip(subjects) {
            let a = account(&store, id).await;
            let current = app.sandbox.current_refresh_token(subject).unwrap();
            assert_eq!(refresh_token(&a), current, "{subject}: stored != sandbox");
            assert!(
                app.sandbox.access_token_valid(subject, access_token(&a)),
                "{subject}: stored access token is not the valid one"
            );
            assert_eq!(a.generation, cycle as i64, "{subject}");
            assert_eq!(a.status, Status::Active, "{subject}");
            assert_eq!(a.failures, 0, "{subject}");
            assert_eq!(a.last_error, None, "{subject}");
            assert_eq!(a.last_refreshed_at, Some(due), "{subject}");
            assert_eq!(a.access_expires_at, due + ACCESS_TTL, "{subject}");
            assert_eq!(a.next_refresh_at, due + INTERVAL, "{subject}");
            assert_eq!(lease(&store, id).await, (None, None), "{subject}");
            assert!(
                seen.insert(current.clone()),
                "{subject}: a refresh token came back"
            );
            let log = outcomes(&store, id).await;
            assert_eq!(log[0], "rotated", "{subject}: {log:?}");
            assert_eq!(
                log.iter().filter(|o| *o == "rotated").count() as u64,
                cycle,
                "{subject}: {log:?}"
            );
        }
        let s = app.sandbox.stats();
        assert_eq!(s.reuse_rejected, 0, "cycle {cycle}: {s:?}");
        assert_eq!(s.refreshed, n * cycle, "{s:?}");
        assert_eq!(s.requests, n * cycle, "one request per refresh: {s:?}");
    }
}

#[tokio::test]
async fn refresh_token_kept_when_none_returned() {
    let app = TestApp::start(SandboxConfig {
        rotate: false,
        ..SandboxConfig::default()
    })
    .await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app.import(&store, &config, &["u1", "u2"], None).await;
    let before: Vec<Account> =
        futures::future::join_all(ids.iter().map(|&id| account(&store, id))).await;

    for cycle in 1..=2 {
        let mut old_access = Vec::new();
        for &id in &ids {
            old_access.push(access_token(&account(&store, id).await).to_string());
        }
        app.clock.set(all_due_at(&store, &ids).await);
        let report = run_once(&app, &config).await;
        assert_eq!(report.stats.rotated, 2);
        for (i, (&id, subject)) in ids.iter().zip(["u1", "u2"]).enumerate() {
            let a = account(&store, id).await;
            assert_eq!(
                refresh_token(&a),
                refresh_token(&before[i]),
                "{subject}: refresh token changed although none was returned"
            );
            assert_eq!(
                app.sandbox.current_refresh_token(subject).as_deref(),
                Some(refresh_token(&a))
            );
            assert_ne!(
                access_token(&a),
                old_access[i],
                "{subject}: access token not replaced"
            );
            assert!(app.sandbox.access_token_valid(subject, access_token(&a)));
            assert_eq!(a.generation, cycle);
            assert_eq!(a.status, Status::Active);
        }
    }
    assert_eq!(app.sandbox.stats().refreshed, 4);
}

// ---- failures ----

#[tokio::test]
async fn invalid_grant_flags_with_reason_and_is_not_retried() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["ok1", "ok2", "gone"], None)
        .await;
    let gone = ids[2];
    app.sandbox.revoke("gone");

    let due = all_due_at(&store, &ids).await;
    app.clock.set(due);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 2, "{report:?}");
    assert_eq!(report.stats.flagged, 1, "{report:?}");
    assert_eq!(report.newly_flagged(), 1, "{report:?}");
    assert_eq!(report.stats.transient, 0, "{report:?}");

    let a = account(&store, gone).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    assert_eq!(a.reauth_flagged_at, Some(due));
    let err = a.last_error.clone().expect("last_error is set");
    assert!(err.contains("invalid_grant"), "{err}");
    assert!(
        err.contains(&format!("log_id {}SANDBOX", log_id_stamp(due))),
        "the provider's log_id is kept for support: {err}"
    );
    assert_eq!(a.generation, 0);
    assert_eq!(lease(&store, gone).await, (None, None));
    let log = store.log_entries(gone, 10).await.unwrap();
    assert_eq!(log[0].outcome, "reauth_required");
    assert_eq!(log[0].http_status, Some(400));
    let log_len = log.len();
    let s = app.sandbox.stats();
    assert_eq!((s.requests, s.revoked_rejected), (3, 1), "{s:?}");

    // A day later the healthy accounts are refreshed again; the flagged one is not asked.
    app.clock.set(due + DAY);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 2, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    let s = app.sandbox.stats();
    assert_eq!(
        (s.requests, s.revoked_rejected),
        (5, 1),
        "a rejected refresh token was presented again: {s:?}"
    );
    let a = account(&store, gone).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(store.log_entries(gone, 10).await.unwrap().len(), log_len);
}

#[tokio::test]
async fn transient_failures_back_off_and_recover() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let original = refresh_token(&account(&store, id).await).to_string();
    app.sandbox.set_faults(Faults {
        server_error: 1.0,
        ..Faults::default()
    });

    for failures in 1..=4u32 {
        let now = account(&store, id).await.next_refresh_at;
        // Not retried before the backoff is over.
        app.clock.set(now - 1);
        assert_eq!(run_once(&app, &config).await.stats.transient, 0);
        assert_eq!(app.sandbox.stats().requests, u64::from(failures - 1));

        app.clock.set(now);
        let report = run_once(&app, &config).await;
        assert_eq!(report.stats.transient, 1, "{report:?}");
        assert_eq!(report.newly_flagged(), 0, "{report:?}");
        let a = account(&store, id).await;
        assert_eq!(a.failures, failures as i64);
        assert_eq!(a.status, Status::Active, "a transient failure flagged");
        assert_eq!(a.reauth_reason, None);
        let ceiling = backoff_ceiling(failures);
        assert!(
            (now + 1..=now + ceiling).contains(&a.next_refresh_at),
            "failure {failures}: next_refresh_at {} not in [now+1, now+{ceiling}]",
            a.next_refresh_at - now
        );
        let err = a.last_error.clone().unwrap();
        assert!(
            err.contains("server_error") || err.contains("temporarily_unavailable"),
            "{err}"
        );
        assert_eq!(refresh_token(&a), original);
        assert_eq!(lease(&store, id).await, (None, None));
        let log = store.log_entries(id, 1).await.unwrap();
        assert_eq!(log[0].outcome, "transient");
        assert!(
            matches!(log[0].http_status, Some(500 | 503)),
            "{:?}",
            log[0]
        );
    }

    // Rate limited: the provider's Retry-After wins over a shorter backoff.
    app.sandbox.set_faults(Faults {
        rate_limited: 1.0,
        retry_after_secs: 600,
        ..Faults::default()
    });
    let now = account(&store, id).await.next_refresh_at;
    app.clock.set(now);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.transient, 1, "{report:?}");
    let a = account(&store, id).await;
    assert_eq!(a.failures, 5);
    assert_eq!(a.status, Status::Active);
    assert!(
        a.next_refresh_at >= now + 600,
        "Retry-After ignored: retry in {}s",
        a.next_refresh_at - now
    );
    assert!(a.next_refresh_at <= now + 600.max(backoff_ceiling(5)));
    assert!(
        a.last_error
            .as_deref()
            .unwrap()
            .contains("rate_limit_exceeded")
    );
    assert_eq!(
        store.log_entries(id, 1).await.unwrap()[0].http_status,
        Some(429)
    );

    // The provider recovers.
    app.sandbox.set_faults(Faults::default());
    let now = a.next_refresh_at;
    app.clock.set(now);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 1, "{report:?}");
    let a = account(&store, id).await;
    assert_eq!(a.failures, 0);
    assert_eq!(a.last_error, None);
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.generation, 1);
    assert_eq!(
        app.sandbox.current_refresh_token("u1").as_deref(),
        Some(refresh_token(&a))
    );
    assert_ne!(refresh_token(&a), original);
    assert!(app.sandbox.access_token_valid("u1", access_token(&a)));
    assert_eq!(outcomes(&store, id).await[0], "rotated");
    let s = app.sandbox.stats();
    assert_eq!(s.reuse_rejected, 0, "{s:?}");
    assert_eq!(
        (s.requests, s.refreshed, s.faults_injected),
        (6, 1, 5),
        "{s:?}"
    );
}

#[tokio::test]
async fn timeout_is_transient() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    // Would be a good answer, were it not late.
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body("u1"))
                .set_delay(Duration::from_secs(3)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let config = config_with(
        &app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[("refresh", "request_timeout", "1s".into())],
    );
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    let original = refresh_token(&account(&store, id).await).to_string();
    let now = account(&store, id).await.next_refresh_at;
    app.clock.set(now);

    let started = Instant::now();
    let report = run_once(&app, &config).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2_500),
        "request_timeout not applied: {took:?}"
    );
    assert_eq!(report.stats.transient, 1, "{report:?}");
    assert_eq!(report.stats.rotated, 0, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    let a = account(&store, id).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.failures, 1);
    assert_eq!(refresh_token(&a), original);
    assert!(
        a.last_error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        a.last_error
    );
    assert!((now + 1..=now + BACKOFF_BASE).contains(&a.next_refresh_at));
    // The provider may have rotated in the answer that came too late: the lease is not
    // given back but runs until the retry, so the crash window stays on record.
    let (owner, until) = lease(&store, id).await;
    assert!(owner.is_some());
    assert_eq!(until, Some(a.next_refresh_at));
    server.verify().await;
}

#[tokio::test]
async fn invalid_grant_after_a_timed_out_refresh_names_the_crash_window() {
    // Found by the interop harness (tests/interop, scenario `cut`): oidc-provider rotated,
    // the answer never arrived, the retry presented the retired token, the provider revoked
    // the grant, and the account was flagged plain `invalid_grant`, as if its user had
    // revoked access.
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body("u1"))
                .set_delay(Duration::from_secs(3)),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_grant", "error_description": "grant request is invalid"
        })))
        .mount(&server)
        .await;
    let config = config_with(
        &app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[("refresh", "request_timeout", "1s".into())],
    );
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    app.clock.set(account(&store, id).await.next_refresh_at);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.transient, 1, "{report:?}");

    // The retry gets a 503; the window stays on record for the one after it.
    app.clock.set(account(&store, id).await.next_refresh_at);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.transient, 1, "{report:?}");
    let retry_at = account(&store, id).await.next_refresh_at;
    app.clock.set(retry_at);
    let report = run_once(&app, &config).await;
    assert_eq!(report.newly_flagged(), 1, "{report:?}");
    let a = account(&store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshInterrupted));
    let err = a.last_error.unwrap();
    assert!(
        err.contains("answer was lost") && err.contains(&refreshd::clock::rfc3339(retry_at)),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_connection_interrupts_nothing() {
    // Nothing listens: the provider never saw the request, so a later invalid_grant is the
    // user's doing, not a lost answer.
    let app = TestApp::start(SandboxConfig::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{TOKEN_PATH}", closed.local_addr().unwrap());
    drop(closed);
    let config = config_with(&app, &url, &[]);
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    app.clock.set(account(&store, id).await.next_refresh_at);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.transient, 1, "{report:?}");
    assert_eq!(lease(&store, id).await, (None, None));
}

#[tokio::test]
async fn error_in_200_classified() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    let config = config_with(
        &app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[("refresh", "config_error_retry", "2h".into())],
    );
    let store = app.store().await;
    let subjects = ["grant", "server", "client"];
    let ids = app.import(&store, &config, &subjects, None).await;
    let bodies = [
        r#"{"error":"invalid_grant","error_description":"Refresh token is invalid or expired.","log_id":"LOG-GRANT"}"#,
        r#"{"error":"server_error","error_description":"Something went wrong.","log_id":"LOG-SERVER"}"#,
        r#"{"error":"invalid_client","error_description":"Client key or secret is invalid.","log_id":"LOG-CLIENT"}"#,
    ];
    let mut tokens = Vec::new();
    for (subject, body) in subjects.iter().zip(bodies) {
        let token = app.sandbox.current_refresh_token(subject).unwrap();
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .and(body_string_contains(token.as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/json"))
            .expect(1)
            .mount(&server)
            .await;
        tokens.push(token);
    }
    let now = all_due_at(&store, &ids).await;
    app.clock.set(now);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.flagged, 1, "{report:?}");
    assert_eq!(report.stats.transient, 1, "{report:?}");
    assert_eq!(report.stats.config_errors, 1, "{report:?}");
    assert_eq!(report.stats.rotated, 0, "{report:?}");
    server.verify().await;

    // invalid_grant in a 200: needs a human.
    let a = account(&store, ids[0]).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    let err = a.last_error.clone().unwrap();
    assert!(
        err.contains("invalid_grant") && err.contains("LOG-GRANT"),
        "{err}"
    );
    assert_eq!(refresh_token(&a), tokens[0]);

    // server_error in a 200: retried later, not flagged.
    let a = account(&store, ids[1]).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.failures, 1);
    assert!((now + 1..=now + BACKOFF_BASE).contains(&a.next_refresh_at));
    assert!(a.last_error.as_deref().unwrap().contains("server_error"));
    assert_eq!(refresh_token(&a), tokens[1]);

    // invalid_client in a 200: our configuration is wrong, the account is fine.
    let a = account(&store, ids[2]).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.next_refresh_at, now + 2 * HOUR);
    let err = a.last_error.clone().unwrap();
    assert!(
        err.contains("invalid_client") && err.contains("LOG-CLIENT"),
        "{err}"
    );
    assert_eq!(refresh_token(&a), tokens[2]);
    assert_eq!(outcomes(&store, ids[2]).await[0], "config_error");
    for &id in &ids {
        assert_eq!(lease(&store, id).await, (None, None));
    }
}

// ---- the reauth window ----

#[tokio::test]
async fn reauth_window_flagging_and_digest() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let window = config.reauth.window;
    assert_eq!(window, Duration::from_secs(7 * DAY as u64));
    let store = app.store().await;
    let days = |d: i64| Duration::from_secs((d * DAY) as u64);
    let short = app
        .import(&store, &config, &["short"], Some(days(30)))
        .await[0];
    let long = app
        .import(&store, &config, &["long"], Some(days(180)))
        .await[0];
    let brief = app
        .import(&store, &config, &["brief"], Some(days(25)))
        .await[0];
    for id in [short, long, brief] {
        assert_eq!(account(&store, id).await.status, Status::Active);
    }

    // Day 24: "short" ends in 6 days and "brief" in 1, both inside the 7-day window.
    app.clock.set(T0 + 24 * DAY);
    let report = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    let mut expiring: Vec<i64> = report.expiring.iter().map(|a| a.id).collect();
    expiring.sort();
    assert_eq!(expiring, [short, brief]);
    assert!(report.expired.is_empty());
    for id in [short, brief] {
        let a = account(&store, id).await;
        assert_eq!(a.status, Status::Expiring);
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
        assert_eq!(a.reauth_flagged_at, Some(T0 + 24 * DAY));
    }
    assert_eq!(account(&store, long).await.status, Status::Active);
    // Reported once.
    let again = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(jobs::digest(&store).await.unwrap(), 2);

    // Expiring accounts are still refreshed, and stay expiring (not reported again).
    app.clock.set(T0 + 24 * DAY + 1);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 3, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    for (id, subject, ends) in [(short, "short", 30), (brief, "brief", 25)] {
        let a = account(&store, id).await;
        assert_eq!(a.status, Status::Expiring, "{subject}");
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
        assert_eq!(
            a.reauth_flagged_at,
            Some(T0 + 24 * DAY),
            "{subject}: flag time moved"
        );
        assert_eq!(a.refresh_expires_at, Some(T0 + ends * DAY), "{subject}");
        assert_eq!(a.generation, 1, "{subject}");
        assert_eq!(
            app.sandbox.current_refresh_token(subject).as_deref(),
            Some(refresh_token(&a))
        );
    }
    assert_eq!(account(&store, long).await.status, Status::Active);

    // Day 26: "brief" has ended: the sweep flags it, and it is not refreshed any more.
    app.clock.set(T0 + 26 * DAY);
    let report = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        report.expired.iter().map(|a| a.id).collect::<Vec<_>>(),
        [brief]
    );
    assert!(report.expiring.is_empty());
    let a = account(&store, brief).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
    let requests = app.sandbox.stats().requests;
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 2, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    assert_eq!(app.sandbox.stats().requests, requests + 2);
    assert_eq!(account(&store, short).await.status, Status::Expiring);

    // Day 31: "short" has ended. Nobody swept: the engine flags it without asking the
    // provider (a dead refresh token cannot work).
    app.clock.set(T0 + 31 * DAY);
    let requests = app.sandbox.stats().requests;
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 1, "{report:?}");
    assert_eq!(report.stats.flagged, 1, "{report:?}");
    assert_eq!(report.newly_flagged(), 1, "{report:?}");
    assert_eq!(
        app.sandbox.stats().requests,
        requests + 1,
        "only \"long\" was asked"
    );
    assert_eq!(app.sandbox.stats().expired_rejected, 0);
    let a = account(&store, short).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
    assert!(
        a.last_error.as_deref().unwrap().contains("expired"),
        "{:?}",
        a.last_error
    );
    assert_eq!(outcomes(&store, short).await[0], "reauth_required");
    let again = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(jobs::digest(&store).await.unwrap(), 2);
    assert_eq!(account(&store, long).await.status, Status::Active);
    assert_eq!(app.sandbox.stats().reuse_rejected, 0);
}

// ---- concurrency ----

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
    let subjects: Vec<String> = (0..N).map(|i| format!("user-{i:03}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(&store, &config, &refs, None).await;

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
async fn schedule_over_simulated_days() {
    const GROUPS: i64 = 5;
    const PER_GROUP: usize = 10;
    const SIM_DAYS: i64 = 10;
    // Divides INTERVAL (108 min), so every refresh happens exactly when it is due.
    const STEP: i64 = 6 * MINUTE;
    let app = TestApp::start(SandboxConfig {
        refresh_ttl: Duration::from_secs(365 * DAY as u64),
        ..SandboxConfig::default()
    })
    .await;
    let config = app.config("");
    let min_interval = config.refresh.min_interval.as_secs() as i64;
    let store = app.store().await;
    let (engine, _tx) = engine(&store, &app.clock, &config);

    // Groups imported 24 minutes apart, so refreshes do not all fall on the same steps.
    let mut imported_at: HashMap<i64, i64> = HashMap::new();
    let mut subject_of: HashMap<i64, String> = HashMap::new();
    for g in 0..GROUPS {
        app.clock.set(T0 + g * 4 * STEP);
        let subjects: Vec<String> = (0..PER_GROUP).map(|i| format!("g{g}-u{i}")).collect();
        let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
        for (id, s) in app
            .import(&store, &config, &refs, None)
            .await
            .into_iter()
            .zip(subjects)
        {
            imported_at.insert(id, app.clock.now());
            subject_of.insert(id, s);
        }
    }
    let end = T0 + SIM_DAYS * DAY;
    let mut now = app.clock.now();
    while now < end {
        now += STEP;
        app.clock.set(now);
        // Before this step's refreshes: no stored access token has expired.
        let expired = store
            .call(move |c| {
                c.query_row(
                    "SELECT COUNT(*), MIN(access_expires_at) FROM accounts
                     WHERE access_expires_at <= ?1 OR status != 'active'",
                    [now],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
                )
                .map_err(|source| StoreError::Sqlite {
                    context: "test query",
                    source,
                })
            })
            .await
            .unwrap();
        assert_eq!(
            expired,
            (0, None),
            "at {now}: (accounts with an expired access token or not active, earliest expiry)"
        );
        engine.run_due(CancellationToken::new()).await.unwrap();
    }

    let mut total = 0;
    for (&id, &from) in &imported_at {
        let subject = &subject_of[&id];
        let times: Vec<i64> = {
            let mut t: Vec<i64> = store
                .log_entries(id, 10_000)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.outcome == "rotated")
                .map(|e| e.at)
                .collect();
            t.sort();
            t
        };
        let expected = (end - from) / INTERVAL;
        let got = times.len() as i64;
        assert!(
            (expected - 2..=expected + 2).contains(&got),
            "{subject}: {got} refreshes, expected {expected} ± 2"
        );
        let mut last = from;
        for &t in &times {
            assert!(
                t - last >= min_interval,
                "{subject}: refreshed {}s after the last",
                t - last
            );
            assert!(t - last < ACCESS_TTL, "{subject}: a {}s gap", t - last);
            last = t;
        }
        let a = account(&store, id).await;
        assert!(
            app.sandbox.access_token_valid(subject, access_token(&a)),
            "{subject}"
        );
        assert_eq!(
            app.sandbox.current_refresh_token(subject).as_deref(),
            Some(refresh_token(&a))
        );
        total += got as u64;
    }
    let s = app.sandbox.stats();
    assert_eq!(s.reuse_rejected, 0, "{s:?}");
    assert_eq!((s.requests, s.refreshed), (total, total), "{s:?}");
    assert_eq!(engine.stats().snapshot().rotated, total);
}

// ---- durability ----

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

// ---- shutdown ----

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
    let subjects: Vec<String> = (0..N).map(|i| format!("user-{i:02}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(&store, &config, &refs, None).await;
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
    let task = {
        let (e, s) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move { e.run(s).await })
    };
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
    let subjects: Vec<String> = (0..N).map(|i| format!("user-{i}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(&store, &config, &refs, None).await;
    let due = all_due_at(&store, &ids).await;

    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = {
        let (e, s) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move { e.run(s).await })
    };
    // The engine has looked at the store (nothing due) and waits for the clock.
    let stats = engine.stats();
    let looked =
        || async { stats.heartbeat.load(std::sync::atomic::Ordering::Relaxed) == app.clock.now() };
    assert!(helpers::eventually(5, looked).await);

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
    let task = {
        let (e, s) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move { e.run(s).await })
    };
    let stats = engine.stats();
    let looked =
        || async { stats.heartbeat.load(std::sync::atomic::Ordering::Relaxed) == app.clock.now() };
    assert!(helpers::eventually(5, looked).await);

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

// ---- events for listeners in the process (sinks, webhooks) ----

/// Drains what has been emitted so far.
fn drain(
    rx: &mut tokio::sync::broadcast::Receiver<refreshd::events::Event>,
) -> Vec<refreshd::events::Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn engine_announces_state_changes_once() {
    use refreshd::events::Event;
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["u1", "u2", "gone"], None)
        .await;
    app.sandbox.revoke("gone");
    let (engine, settings) = engine(&store, &app.clock, &config);
    let mut rx = engine.events().subscribe();

    app.clock.set(all_due_at(&store, &ids).await);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let mut events = drain(&mut rx);
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::ReauthRequired {
                account_id: ids[2],
                provider: "tiktok".into(),
                subject: "gone".into(),
                label: Some("label of gone".into()),
                reason: "invalid_grant".into(),
                refresh_expires_at: account(&store, ids[2]).await.refresh_expires_at,
            },
            Event::TokensChanged {
                account_id: ids[0],
                provider: "tiktok".into(),
                subject: "u1".into(),
            },
            Event::TokensChanged {
                account_id: ids[1],
                provider: "tiktok".into(),
                subject: "u2".into(),
            },
        ]
    );

    // Wrong client credentials: announced once for the provider, not once per account.
    let wrong = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("providers.tiktok", "client_secret", "not-the-secret".into()),
            ("refresh", "config_error_retry", "10m".into()),
        ],
    );
    settings.send_replace(Arc::new(Settings::new(wrong).unwrap()));
    app.clock.set(all_due_at(&store, &ids[..2]).await);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Event::ProviderRejected { provider, error } if provider == "tiktok" && !error.contains("not-the-secret")),
        "{events:?}"
    );
    assert!(app.sandbox.stats().client_rejected >= 2);

    // Fixed credentials: the provider recovers once, both accounts get new tokens.
    settings.send_replace(Arc::new(Settings::new(config.clone()).unwrap()));
    app.clock.advance(Duration::from_secs(11 * 60));
    engine.run_due(CancellationToken::new()).await.unwrap();
    let events = drain(&mut rx);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        ["provider_recovered", "tokens_changed", "tokens_changed"],
        "{events:?}"
    );
}

#[tokio::test]
async fn invalid_grant_after_a_lost_answer_names_the_crash_window() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app.import(&store, &config, &["lost", "idle"], None).await;
    let due = all_due_at(&store, &ids).await;
    app.clock.set(due);

    // A process claims both, sends one refresh (the provider rotates), and dies before
    // storing the answer; the other account's request was never sent.
    let claimed = store
        .claim_due("dead-process", due, config.store.lease, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(
        claimed.iter().all(|a| a.interrupted_at.is_none()),
        "a first claim interrupts nothing"
    );
    let lost = claimed.iter().find(|a| a.subject == "lost").unwrap();
    let answer = reqwest::Client::new()
        .post(app.sandbox.token_url())
        .form(&[
            ("client_key", helpers::CLIENT_KEY),
            ("client_secret", helpers::CLIENT_SECRET),
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token(lost)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let lease_end = due + config.store.lease.as_secs() as i64;

    // After the lease ends, this daemon picks both up.
    app.clock.set(lease_end + 1);
    let report = run_once(&app, &config).await;
    assert_eq!(
        (report.stats.rotated, report.stats.flagged),
        (1, 1),
        "{report:?}"
    );
    let a = account(&store, ids[0]).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshInterrupted));
    let err = a.last_error.unwrap();
    assert!(
        err.contains("cut off") && err.contains(&refreshd::clock::rfc3339(lease_end)),
        "{err}"
    );
    // The one never sent was simply refreshed.
    let b = account(&store, ids[1]).await;
    assert_eq!((b.status, b.generation), (Status::Active, 1));
    assert_eq!(app.sandbox.stats().reuse_rejected, 1);
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
    let task = {
        let (e, s) = (engine.clone(), shutdown.clone());
        tokio::spawn(async move { e.run(s).await })
    };
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

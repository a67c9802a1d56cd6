//! Failed refreshes: invalid_grant flags with its reason, transient failures (5xx, timeouts,
//! refused connections, errors inside a 200) back off and recover, and an invalid_grant after
//! an answer that may have been lost names the crash window.

use super::{
    BACKOFF_BASE, BACKOFF_MAX, DAY, HOUR, access_token, all_due_at, config_with, engine, lease,
    mount_hanging_answer, outcomes, refresh_token, run_once, spawn_run, token_body,
};
use crate::helpers::{self, TestApp, account};
use refreshd::config::Config;
use refreshd::model::{ReauthReason, Status};
use refreshd::sandbox::{Faults, SandboxConfig, TOKEN_PATH};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The ceiling of the backoff after the n-th consecutive failure, seconds.
fn backoff_ceiling(failures: u32) -> i64 {
    (BACKOFF_BASE << (failures - 1).min(20)).min(BACKOFF_MAX)
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

/// A good answer for `u1` that comes 3 s late: after `timing_out_config`'s request timeout.
fn late_answer() -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(token_body("u1"))
        .set_delay(Duration::from_secs(3))
}

/// The test config against `server`'s token endpoint, with a 1 s request timeout.
fn timing_out_config(app: &TestApp, server: &MockServer) -> Config {
    config_with(
        app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[("refresh", "request_timeout", "1s".into())],
    )
}

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
        .respond_with(late_answer())
        .expect(1)
        .mount(&server)
        .await;
    let config = timing_out_config(&app, &server);
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
        .respond_with(late_answer())
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
    let config = timing_out_config(&app, &server);
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

/// An idle loop with a request still in flight looks again when another refresh ends with
/// a retry due before its next wake-up: the retry is sent at its time, not once the slow
/// request ends (nor at `refresh.max_idle`).
#[tokio::test]
async fn a_retry_is_sent_at_its_time_while_another_request_still_hangs() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    // Of the two first requests, one fails after half a second, once the loop has found
    // nothing more due and sleeps, and the other hangs (30 s of real time, past the test's
    // end); what comes after answers at once.
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(500)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    mount_hanging_answer(&server, token_body("u1"), Some(1)).await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let config = config_with(
        &app,
        &format!("{}{TOKEN_PATH}", server.uri()),
        &[
            ("refresh", "max_idle", "2m".into()),
            ("refresh", "request_timeout", "20s".into()),
            ("store", "lease", "60s".into()),
        ],
    );
    let store = app.store().await;
    let ids = app.import(&store, &config, &["u1", "u2"], None).await;
    app.clock.set(all_due_at(&store, &ids).await);
    let (engine, _tx) = engine(&store, &app.clock, &config);
    let shutdown = CancellationToken::new();
    let task = spawn_run(&engine, &shutdown);
    let stats = engine.stats();
    assert!(helpers::eventually(5, || async { stats.snapshot().transient == 1 }).await);
    let mut retry_at = i64::MAX;
    for &id in &ids {
        let a = account(&store, id).await;
        if a.failures == 1 {
            retry_at = a.next_refresh_at;
        }
    }
    assert!(retry_at < i64::MAX, "one account failed once");
    // The failure was stored after the loop went to sleep (its next wake-up at
    // refresh.max_idle): only the failure's end can tell it the retry is due sooner.
    app.clock.set(retry_at);
    let sent = || async { server.received_requests().await.unwrap_or_default().len() >= 3 };
    assert!(
        helpers::eventually(3, sent).await,
        "the retry waited for the hanging request"
    );
    shutdown.cancel();
    task.abort();
}

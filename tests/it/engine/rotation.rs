//! Rotation and the schedule: a rotated refresh token is stored and the old one never sent
//! again, a kept one stays, and days of refreshes land where the lead puts them.

use super::{
    ACCESS_TTL, DAY, INTERVAL, MINUTE, access_token, all_due_at, engine, lease, outcomes,
    refresh_token, run_once,
};
use crate::helpers::{T0, TestApp, account};
use refreshd::model::{Account, Status};
use refreshd::sandbox::SandboxConfig;
use refreshd::store::StoreError;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

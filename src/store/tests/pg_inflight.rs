//! PostgreSQL only: the group-commit task runs two group commits at once, each on its own
//! pooled connection, and keeps one commit at a time's guarantees: a group naming an
//! account of a commit in flight is not committed beside it, a group to split is committed
//! one outcome at a time only once the other commit settled, and a close (or every handle
//! dropped) lets the commits in flight settle first: a close answers their callers before
//! it returns, and a failed commit's rotations are deferred and retried, not lost. The
//! store's connections go through the proxy of `pg_commit`, which holds the answers of a
//! connection that sent a COMMIT.

use super::pg_commit::{Turns, hold_row, through_proxy};
use super::*;
use crate::crypto::Keyring;
use crate::store::recovery;
use futures::FutureExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A store (its connections through a proxy) of accounts claimed by OWNER in a schema of
/// its own, with the schema's URL (not through the proxy) for sessions of the test's own.
struct Proxied {
    dir: TempDir,
    store: Store,
    ids: Vec<i64>,
    turns: Arc<Turns>,
    url: String,
}

/// A [`Proxied`] store of `accounts` accounts in a schema named after `test`, or None
/// after a NOT RUN (no PostgreSQL installed).
async fn proxied_store(test: &str, accounts: usize) -> Option<Proxied> {
    let url = refreshd_testkit::postgres_schema(test).await?;
    let (proxied, turns) = through_proxy(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES.scope(Some(proxied), async { options(&dir) }).await;
    let store = Store::open(opts).await.unwrap();
    let new = (1..=accounts)
        .map(|n| new_account("tiktok", &format!("u{n}"), NOW))
        .collect();
    let ids = insert(&store, new).await;
    let claimed = store.claim_due(OWNER, NOW, LEASE, accounts).await.unwrap();
    assert_eq!(claimed.len(), accounts);
    turns.reset();
    Some(Proxied {
        dir,
        store,
        ids,
        turns,
        url,
    })
}

/// Waits until `n` COMMITs went through the proxy (at most 2 s).
async fn commits_sent(turns: &Turns, n: usize) {
    for _ in 0..2000 {
        if turns.commits() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{n} COMMITs were not sent within 2 s");
}

/// Waits until `done` says so, or panics after 5 s with `what` (a safety timeout: it only
/// fires when the test fails).
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..2500 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("not within 5 s: {what}");
}

/// A session of the test's own on `url`, outside the proxy.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A transient failure PostgreSQL refuses for good: its error text holds a NUL, which no
/// text value may (SQLSTATE 22021, not transient). A group holding it is split.
fn refused(id: i64, at: i64) -> Outcome {
    let mut o = transient(id, OWNER, at);
    if let Outcome::Transient { error, .. } = &mut o {
        *error = "HTTP 503\0".into();
    }
    o
}

#[tokio::test]
async fn postgres_two_groups_on_other_accounts_commit_at_once() {
    let Some(p) = proxied_store("pg_inflight_overlap", 2).await else {
        return;
    };
    let (store, ids, turns) = (&p.store, &p.ids, &p.turns);
    // The first group's answers are held until a COMMIT comes on another connection.
    turns.hold.arm(true);
    let first = store.record(rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1));
    let second = async {
        commits_sent(turns, 1).await;
        store
            .record(rotated(ids[1], 0, "at-2", Some("rt-2"), NOW + 2))
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(
        (first.unwrap(), second.unwrap()),
        (Recorded::Applied, Recorded::Applied)
    );
    assert!(
        turns.hold.overlapped.load(Ordering::SeqCst),
        "the second group's COMMIT was sent while the first waited for its answer"
    );
    assert_eq!(
        get(store, ids[0]).await.access_token.expose_secret(),
        "at-1"
    );
    assert_eq!(
        get(store, ids[1]).await.access_token.expose_secret(),
        "at-2"
    );
    store.close().await;
}

#[tokio::test]
async fn postgres_a_group_naming_an_account_in_flight_is_not_committed_beside_it() {
    let Some(p) = proxied_store("pg_inflight_same_account", 1).await else {
        return;
    };
    let (store, id, turns) = (&p.store, p.ids[0], &p.turns);
    // The first group's answers are held, and nothing releases them but the proxy's
    // fallback, a second after they came. The second outcome is sent as soon as the first
    // COMMIT is out: were the two commits let overlap, the second group would have that
    // second to send its COMMIT (on a new connection, its statements prepared first, a
    // few round trips of a few milliseconds each), and the proxy would see it.
    turns.hold.arm(false);
    // The second rotation is of the generation the first writes: its guard must see it.
    let first = store.record(rotated(id, 0, "at-1", Some("rt-1"), NOW + 1));
    let second = async {
        commits_sent(turns, 1).await;
        store
            .record(rotated(id, 1, "at-2", Some("rt-2"), NOW + 2))
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert!(
        !turns.hold.overlapped.load(Ordering::SeqCst),
        "the two commits overlapped: the second group's COMMIT was sent while the first's answers were held"
    );
    assert_eq!(turns.ends(), ["COMMIT", "COMMIT"]);
    assert_eq!(
        (first.unwrap(), second.unwrap()),
        (Recorded::Applied, Recorded::Applied)
    );
    let a = get(store, id).await;
    assert_eq!((a.access_token.expose_secret(), a.generation), ("at-2", 2));
    assert_eq!(
        log_outcomes(store, id).await,
        ["rotated", "rotated", "imported"]
    );
    store.close().await;
}

#[tokio::test]
async fn postgres_a_group_to_split_beside_a_commit_in_flight_is_committed_alone_after_it() {
    let Some(p) = proxied_store("pg_inflight_split", 4).await else {
        return;
    };
    let (store, ids, turns) = (&p.store, &p.ids, &p.turns);
    turns.hold.arm(false);
    let held = store.record(rotated(ids[0], 0, "at-0", Some("rt-0"), NOW + 1));
    // Sent together once the first COMMIT is out, so one group on other accounts: a
    // rotation and a failure, and a failure the server refuses for good, which fails the
    // group (rolled back, its COMMIT never sent) while the first commit's answers are held.
    let split = async {
        commits_sent(turns, 1).await;
        tokio::join!(
            store.record(rotated(ids[1], 0, "at-1", Some("rt-1"), NOW + 2)),
            store.record(transient(ids[2], OWNER, NOW + 2)),
            store.record(refused(ids[3], NOW + 2)),
        )
    };
    let release = async {
        until("the group to split failed", async || {
            turns.ends().len() >= 2
        })
        .await;
        assert_eq!(
            turns.ends(),
            ["COMMIT", "ROLLBACK"],
            "the failed group's end"
        );
        // Were its outcomes committed one at a time at once, the first would go out a few
        // milliseconds after the ROLLBACK's answer: on the group's connection, whose
        // statements are prepared, in one flight with its COMMIT (held too, then).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            turns.ends(),
            ["COMMIT", "ROLLBACK"],
            "an outcome of the group to split was committed while the other commit was in flight"
        );
        turns.hold.release();
    };
    let (held, (rotation, failure, refused), ()) = tokio::join!(held, split, release);
    assert_eq!(held.unwrap(), Recorded::Applied, "the held commit's caller");
    assert_eq!(
        (rotation.unwrap(), failure.unwrap()),
        (Recorded::Applied, Recorded::Applied),
        "the split group's good outcomes"
    );
    assert!(
        matches!(refused, Err(StoreError::NotStored { .. })),
        "the refused outcome: {refused:?}"
    );
    assert!(!turns.hold.overlapped.load(Ordering::SeqCst));
    // Then each outcome alone: two commits and the refused one's rollback.
    let ends = turns.ends();
    assert_eq!(ends[..2], ["COMMIT", "ROLLBACK"]);
    let mut alone = ends[2..].to_vec();
    alone.sort();
    assert_eq!(alone, ["COMMIT", "COMMIT", "ROLLBACK"]);
    assert_eq!(
        get(store, ids[0]).await.access_token.expose_secret(),
        "at-0"
    );
    let a = get(store, ids[1]).await;
    assert_eq!((a.access_token.expose_secret(), a.generation), ("at-1", 1));
    assert_eq!(log_outcomes(store, ids[1]).await, ["rotated", "imported"]);
    assert_eq!(get(store, ids[2]).await.failures, 1);
    assert_eq!(log_outcomes(store, ids[2]).await, ["transient", "imported"]);
    assert_eq!(get(store, ids[3]).await.failures, 0);
    assert_eq!(log_outcomes(store, ids[3]).await, ["imported"]);
    store.close().await;
}

#[tokio::test]
async fn postgres_commits_in_flight_when_every_handle_is_dropped_settle_and_lose_nothing() {
    let Some(Proxied {
        dir,
        store,
        ids,
        turns,
        url,
    }) = proxied_store("pg_inflight_dropped", 2).await
    else {
        return;
    };
    let watcher = connect(&url).await;
    let file = store.own_recovery_path(&dir.path().join("refreshd.db"));
    // The second account's row is held by a session of the test's: the second group's lock
    // times out and its commit fails (transiently). Only the worker settling that commit
    // defers its rotation, which the worker's stop then retries.
    let holder = hold_row(&url, ids[1]).await;
    turns.hold.arm(false);
    let caller = |id: i64, access: &'static str, at: i64| {
        let store = store.clone();
        tokio::spawn(async move { store.record(rotated(id, 0, access, None, at)).await })
    };
    let first = caller(ids[0], "at-1", NOW + 1);
    commits_sent(&turns, 1).await;
    let second = caller(ids[1], "at-2", NOW + 2);
    commits_sent(&turns, 2).await;
    // Both commits in flight, their answers held: the callers go (a shutdown aborting their
    // tasks), and with them every handle of the store.
    first.abort();
    second.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(second.await.unwrap_err().is_cancelled());
    drop(store);
    // The worker sees its channel closed; then the answers come.
    tokio::time::sleep(Duration::from_millis(20)).await;
    turns.hold.release();
    let keys = Keyring::default();
    until(
        "the failed commit's rotation is deferred to the recovery file",
        async || {
            matches!(recovery::read(&file, &keys), Ok(Some(o)) if o.iter().any(|o| o.account_id() == ids[1]))
        },
    )
    .await;
    // Its retry waits for the row: let it go.
    holder.batch_execute("ROLLBACK").await.unwrap();
    let generation = async |id: i64| -> i64 {
        let sql = "SELECT generation FROM accounts WHERE id = $1";
        watcher.query_one(sql, &[&id]).await.unwrap().get(0)
    };
    until("both rotations committed", async || {
        generation(ids[0]).await == 1 && generation(ids[1]).await == 1
    })
    .await;
    until("the recovery file removed, nothing deferred", async || {
        !file.exists()
    })
    .await;
    for id in [ids[0], ids[1]] {
        let sql = "SELECT outcome FROM refresh_log WHERE account_id = $1 ORDER BY id";
        let rows = watcher.query(sql, &[&id]).await.unwrap();
        let log: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(log, ["imported", "rotated"], "account {id}");
    }
}

#[tokio::test]
async fn postgres_a_close_answers_the_callers_of_both_commits_in_flight_before_it_returns() {
    let Some(p) = proxied_store("pg_inflight_close", 2).await else {
        return;
    };
    let (store, ids, turns) = (&p.store, &p.ids, &p.turns);
    turns.hold.arm(false);
    let mut first = std::pin::pin!(store.record(rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1)));
    let mut second = std::pin::pin!(async {
        commits_sent(turns, 1).await;
        store
            .record(rotated(ids[1], 0, "at-2", Some("rt-2"), NOW + 2))
            .await
    });
    // Both COMMITs out and their answers held.
    tokio::select! {
        r = &mut first => panic!("answered while its commit's answers were held: {r:?}"),
        r = &mut second => panic!("answered while its commit's answers were held: {r:?}"),
        () = commits_sent(turns, 2) => {}
    }
    assert!(
        turns.hold.overlapped.load(Ordering::SeqCst),
        "both commits were in flight when the close came"
    );
    // The close comes, then the answers: when it returns, both callers were answered
    // (their results wait in their replies, read here without waiting).
    let close = async {
        store.close().await;
        (
            first.as_mut().now_or_never(),
            second.as_mut().now_or_never(),
        )
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        turns.hold.release();
    };
    let ((first, second), ()) = tokio::join!(close, release);
    let answered = |r: Option<Result<Recorded, StoreError>>| {
        r.expect("a caller not answered when the close returned")
            .unwrap()
    };
    assert_eq!(
        (answered(first), answered(second)),
        (Recorded::Applied, Recorded::Applied)
    );
    // Committed, as answered.
    for id in [ids[0], ids[1]] {
        let sql = "SELECT generation FROM accounts WHERE id = ?1";
        assert_eq!(query(store, sql, id).await, Some(1), "account {id}");
    }
}

//! PostgreSQL only: the group-commit task runs two group commits at once, each on its own
//! pooled connection, and keeps one commit at a time's guarantees: a group naming an
//! account of a commit in flight waits for it, and a close answers every caller of the
//! commits in flight with what they committed. The store's connections go through the
//! proxy of `pg_commit`, which holds the answers of a connection that sent a COMMIT.

use super::pg_commit::{Turns, through_proxy};
use super::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A store (its connections through a proxy) of `accounts` accounts claimed by OWNER in a
/// schema named after `test`, or None after a NOT RUN (no PostgreSQL installed).
async fn proxied_store(
    test: &str,
    accounts: usize,
) -> Option<(TempDir, Store, Vec<i64>, Arc<Turns>)> {
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
    Some((dir, store, ids, turns))
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

#[tokio::test]
async fn postgres_two_groups_on_other_accounts_commit_at_once() {
    let Some((_dir, store, ids, turns)) = proxied_store("pg_inflight_overlap", 2).await else {
        return;
    };
    // The first group's answers are held until a COMMIT comes on another connection.
    turns.hold.arm(true);
    let first = store.record(rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1));
    let second = async {
        commits_sent(&turns, 1).await;
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
        get(&store, ids[0]).await.access_token.expose_secret(),
        "at-1"
    );
    assert_eq!(
        get(&store, ids[1]).await.access_token.expose_secret(),
        "at-2"
    );
    store.close().await;
}

#[tokio::test]
async fn postgres_a_group_naming_an_account_in_flight_waits_for_its_commit() {
    let Some((_dir, store, ids, turns)) = proxied_store("pg_inflight_same_account", 1).await else {
        return;
    };
    let id = ids[0];
    turns.hold.arm(false);
    // The second rotation is of the generation the first writes: its guard must see it.
    let first = store.record(rotated(id, 0, "at-1", Some("rt-1"), NOW + 1));
    let second = async {
        commits_sent(&turns, 1).await;
        store
            .record(rotated(id, 1, "at-2", Some("rt-2"), NOW + 2))
            .await
    };
    let release = async {
        commits_sent(&turns, 1).await;
        // Time enough for the second group's commit to be sent, were it not held back.
        for _ in 0..200 {
            if turns.hold.overlapped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        turns.hold.release();
    };
    let (first, second, ()) = tokio::join!(first, second, release);
    assert!(
        !turns.hold.overlapped.load(Ordering::SeqCst),
        "the second group's COMMIT was sent before the first group was answered"
    );
    assert_eq!(
        (first.unwrap(), second.unwrap()),
        (Recorded::Applied, Recorded::Applied)
    );
    let a = get(&store, id).await;
    assert_eq!((a.access_token.expose_secret(), a.generation), ("at-2", 2));
    assert_eq!(
        log_outcomes(&store, id).await,
        ["rotated", "rotated", "imported"]
    );
    store.close().await;
}

#[tokio::test]
async fn postgres_a_close_answers_the_callers_of_both_commits_in_flight() {
    let Some((_dir, store, ids, turns)) = proxied_store("pg_inflight_close", 2).await else {
        return;
    };
    turns.hold.arm(false);
    let first = store.record(rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1));
    let second = async {
        commits_sent(&turns, 1).await;
        store
            .record(rotated(ids[1], 0, "at-2", Some("rt-2"), NOW + 2))
            .await
    };
    // Both COMMITs out and their answers held: the close comes, then the answers.
    let close = async {
        commits_sent(&turns, 2).await;
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            turns.hold.release();
        };
        tokio::join!(store.close(), release);
    };
    let (first, second, ()) = tokio::join!(first, second, close);
    assert!(
        turns.hold.overlapped.load(Ordering::SeqCst),
        "both commits were in flight when the close came"
    );
    assert_eq!(
        (first.unwrap(), second.unwrap()),
        (Recorded::Applied, Recorded::Applied)
    );
    // Committed, as answered.
    for id in [ids[0], ids[1]] {
        let sql = "SELECT generation FROM accounts WHERE id = ?1";
        assert_eq!(query(&store, sql, id).await, Some(1), "account {id}");
    }
}

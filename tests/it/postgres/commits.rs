//! What PostgreSQL refuses or must hold at once: a rotation refused for good is quarantined,
//! a large import is one transaction, locks in id order, and updates an account created
//! beside its batch.

use super::{new_account, open_pg, postgres_url, raw, rotated_a_second_later, tokens};
use crate::helpers::{eventually, now};
use refreshd::model::TokenSet;
use refreshd::store::{NewAccount, Recorded};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_database_refuses_for_good_is_quarantined_not_a_poison() {
    let Some(url) = postgres_url(
        "postgres::a_rotation_the_database_refuses_for_good_is_quarantined_not_a_poison",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = open_pg(&url, dir.path()).await;
    let t = now();
    let ids: Vec<i64> = store
        .upsert(vec![new_account("p1", t), new_account("p2", t)], t)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let claimed = store
        .claim_due("owner-a", t, Duration::from_secs(10), 10)
        .await
        .unwrap();
    let a = claimed.iter().find(|a| a.id == ids[0]).unwrap();
    // PostgreSQL text cannot hold a NUL: this rotation can never be stored.
    let bad = rotated_a_second_later(
        a,
        TokenSet {
            scope: Some("user\u{0}info".into()),
            ..tokens("at-new", "rt-new")
        },
        t,
    );
    assert_eq!(store.record(bad).await.unwrap(), Recorded::Deferred);
    assert_eq!(store.pending_rotations(), vec![a.id]);
    // While its rotation waits in the recovery file, the account is never claimed again
    // (its stored refresh token may be retired at the provider), even after the lease.
    let again = store
        .claim_due("owner-b", t + 60, Duration::from_secs(10), 10)
        .await
        .unwrap();
    assert!(again.iter().all(|x| x.id != a.id), "{again:?}");
    assert!(again.iter().any(|x| x.id == ids[1]));

    // The retry finds it refused for good: moved to the quarantine file, the rest unblocked.
    // The process's own recovery file: emptied once nothing in it waits any more.
    let recovery = store.own_recovery_path(&dir.path().join("refreshd.db"));
    let quarantine = PathBuf::from(format!("{}.rejected", recovery.display()));
    assert!(
        eventually(10, || async {
            quarantine.exists() && std::fs::metadata(&recovery).map_or(true, |m| m.len() == 0)
        })
        .await,
        "quarantined"
    );
    assert!(store.pending_rotations().is_empty());
    store.close().await;
    drop(store);
    // And a restart is not blocked by it.
    let reopened = open_pg(&url, dir.path()).await;
    assert_eq!(reopened.get(ids[1]).await.unwrap().unwrap().subject, "p2");
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_is_one_transaction_without_running_out_of_locks() {
    let Some(url) =
        postgres_url("postgres::a_large_import_is_one_transaction_without_running_out_of_locks")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = open_pg(&url, dir.path()).await;
    let t = now();
    // More accounts than the server's lock table holds per transaction by default
    // (max_locks_per_transaction 64 x max_connections 100): no per-account lock may be kept.
    let accounts: Vec<NewAccount> = (0..10_000)
        .map(|i| new_account(&format!("bulk-{i:05}"), t))
        .collect();
    let ids = store.upsert(accounts, t).await.unwrap();
    assert_eq!(ids.len(), 10_000);
    assert!(ids.iter().all(|(_, inserted)| *inserted));
    store.close().await;
}

/// An account another transaction creates after a batch looked it up and before the batch's
/// INSERT (a connect beside the import) is updated by the import: neither duplicated nor
/// refused, with its `imported` log row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_created_beside_a_batch_is_updated_by_the_import() {
    let Some(url) =
        postgres_url("postgres::an_account_created_beside_a_batch_is_updated_by_the_import").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = open_pg(&url, dir.path()).await;
    let t = now();
    let mut other = raw(&url).await;
    let other_tx = other.transaction().await.unwrap();
    let theirs: i64 = other_tx
        .query_one(
            "INSERT INTO accounts (provider, subject, access_token, refresh_token,
                access_expires_at, next_refresh_at, created_at, updated_at)
             VALUES ('tiktok', 'racer', 'at-theirs', 'rt-theirs', $1, $1, $1, $1) RETURNING id",
            &[&t],
        )
        .await
        .unwrap()
        .get(0);
    let import = tokio::spawn({
        let store = store.clone();
        let batch = vec![new_account("racer", t), new_account("calm", t)];
        async move { store.upsert(batch, t).await }
    });
    // The batch did not see the uncommitted row; its INSERT now waits for that transaction.
    let watch = raw(&url).await;
    assert!(
        waits_for_a_lock(&watch, "INSERT INTO accounts (id,").await,
        "the import's INSERT waits for the other transaction"
    );
    other_tx.commit().await.unwrap();
    let ids = import.await.unwrap().unwrap();
    assert_eq!(
        ids[0],
        (theirs, false),
        "the account created meanwhile is updated"
    );
    assert!(ids[1].1, "the other account of the batch is inserted");
    let racer = store.get(theirs).await.unwrap().unwrap();
    assert_eq!(racer.access_token.expose_secret(), "at-racer");
    let outcomes: Vec<String> = store
        .log_entries(theirs, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(outcomes, ["imported"]);
    let count: i64 = watch
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    store.close().await;
}

/// A re-import locks its batch's accounts in id order, as a replica's commit group does,
/// whatever the order of the file's lines: the two wait for each other, never deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimport_locks_its_accounts_in_id_order_beside_a_commit_group() {
    let Some(url) =
        postgres_url("postgres::a_reimport_locks_its_accounts_in_id_order_beside_a_commit_group")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = open_pg(&url, dir.path()).await;
    let t = now();
    let ids: Vec<i64> = store
        .upsert(vec![new_account("first", t), new_account("second", t)], t)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // A commit group's order: the lower id first.
    let mut group = raw(&url).await;
    let group_tx = group.transaction().await.unwrap();
    let lock = "SELECT id FROM accounts WHERE id = $1 FOR UPDATE";
    group_tx.execute(lock, &[&ids[0]]).await.unwrap();
    // The file lists the higher id first.
    let import = tokio::spawn({
        let store = store.clone();
        let batch = vec![new_account("second", t + 1), new_account("first", t + 1)];
        async move { store.upsert(batch, t + 1).await }
    });
    assert!(
        waits_for_a_lock(&raw(&url).await, "WITH found AS").await,
        "the import waits for the group's first row"
    );
    // The import holds nothing the group still needs: its second lock is granted (in batch
    // order the two would deadlock, and the server would fail one of them).
    group_tx
        .batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .unwrap();
    group_tx.execute(lock, &[&ids[1]]).await.unwrap();
    group_tx.commit().await.unwrap();
    let again = import.await.unwrap().unwrap();
    assert_eq!(again, [(ids[1], false), (ids[0], false)]);
    store.close().await;
}

/// Whether, within 10 s, a statement starting with `statement` waits for a lock.
async fn waits_for_a_lock(watch: &tokio_postgres::Client, statement: &str) -> bool {
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                   WHERE NOT l.granted AND starts_with(a.query, $1)";
    eventually(10, || async {
        let row = watch.query_one(waiting, &[&statement]).await.unwrap();
        row.get::<_, i64>(0) > 0
    })
    .await
}

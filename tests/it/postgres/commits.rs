//! What PostgreSQL refuses or must hold at once: a rotation refused for good is quarantined,
//! and a large import is one transaction.

use super::{new_account, open_pg, postgres_url, rotated_a_second_later, tokens};
use crate::helpers::{eventually, now};
use refreshd::model::TokenSet;
use refreshd::store::{NewAccount, Recorded};
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

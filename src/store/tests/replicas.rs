//! PostgreSQL only: a stalled commit, replicas' liveness locks.

use super::*;
use std::sync::atomic::Ordering;

// ---- a stalled PostgreSQL commit (issue 13, item 4) ----

/// A row held by another transaction fails the group commit within its lock_timeout: the
/// rotation goes to the recovery file at once instead of waiting in memory.
#[tokio::test]
async fn a_postgres_commit_blocked_on_a_row_lock_defers_at_once() {
    let Some(url) = refreshd_testkit::postgres_schema("row_lock_defer").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES
        .scope(Some(url.clone()), async { options(&dir) })
        .await;
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM accounts WHERE id = {id} FOR UPDATE"
        ))
        .await
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        store.record(rotated(id, 0, "at-x", Some("rt-x"), NOW + 1)),
    )
    .await
    .expect("the commit does not wait for the row lock")
    .unwrap();
    assert_eq!(r, Recorded::Deferred);
    client.batch_execute("ROLLBACK").await.unwrap();
    wait_for_recovery_commit(&store.own_recovery_path(&opts.path)).await;
    assert_eq!(get(&store, id).await.refresh_token.expose_secret(), "rt-x");
}

// ---- PostgreSQL replicas' liveness locks (issue 13, item 7) ----

/// Opens a PostgreSQL replica with a `store.path` of its own (as on another host).
async fn replica(url: &str) -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES
        .scope(Some(url.to_string()), async { options(&dir) })
        .await;
    let store = Store::open(opts).await.unwrap();
    (dir, store)
}

/// Claims at `now` as `store` until something is taken (at most ~10 s), returning it.
async fn claim_eventually(store: &Store, now: i64) -> Vec<Account> {
    for n in 0..100 {
        let taken = store
            .claim_due(&format!("{}:{n}", store.owner()), now, LEASE, 10)
            .await
            .unwrap();
        if !taken.is_empty() {
            return taken;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Vec::new()
}

/// A replica that dies (its store dropped, so its connection and lock go) has its leases
/// taken over within seconds by another, crash window recorded; a live replica's leases
/// and an owner of an older version (no liveness marker) wait for their lease to end.
#[tokio::test]
async fn a_dead_postgres_replicas_leases_are_taken_over_and_a_live_ones_are_not() {
    let Some(url) = refreshd_testkit::postgres_schema("pg_dead_replica").await else {
        return;
    };
    let (_da, a) = replica(&url).await;
    let (_db, b) = replica(&url).await;
    let (_dc, c) = replica(&url).await;
    let accts = insert(
        &a,
        ["u1", "u2", "u3"]
            .iter()
            .map(|s| new_account("tiktok", s, NOW))
            .collect(),
    )
    .await;
    for (store, owner) in [
        (&b, format!("{}:1", b.owner())),
        (&c, format!("{}:1", c.owner())),
        (&a, "oldhost:42:0000cafe:1".to_string()),
    ] {
        assert_eq!(
            store.claim_due(&owner, NOW, LEASE, 1).await.unwrap().len(),
            1
        );
    }
    assert!(
        b.owner()
            .starts_with(crate::store::postgres::liveness::MARKER),
        "{}",
        b.owner()
    );
    drop(b);
    let started = std::time::Instant::now();
    let taken = claim_eventually(&a, NOW + 1).await;
    assert_eq!(ids(&taken), [accts[0]], "only the dead replica's lease");
    assert_eq!(taken[0].interrupted_at, Some(NOW + 1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // At least two more whole checks (the first counted may have begun earlier): the live
    // replica and the old-style owner keep their leases.
    let checks = &a.health.liveness_checks;
    let before = checks.load(Ordering::Relaxed);
    for _ in 0..200 {
        if checks.load(Ordering::Relaxed) >= before + 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        checks.load(Ordering::Relaxed) >= before + 3,
        "a's liveness checks ran"
    );
    let none = a.claim_due("x:1", NOW + 2, LEASE, 10).await.unwrap();
    assert!(none.is_empty(), "{:?}", ids(&none));
    let after = a
        .claim_due("x:2", NOW + LEASE.as_secs() as i64, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(
        ids(&after),
        [accts[1], accts[2]],
        "at the end of their leases"
    );
}

/// A replica whose lock connection is cut stops claiming while it cannot take its lock
/// again (here another session holds it), and claims again once it has it.
#[tokio::test]
async fn a_replica_that_lost_its_lock_connection_stops_claiming_until_it_has_it_again() {
    let Some(url) = refreshd_testkit::postgres_schema("pg_lock_lost").await else {
        return;
    };
    let (_db, b) = replica(&url).await;
    insert(&b, vec![new_account("tiktok", "u1", NOW)]).await;
    let key = crate::store::postgres::liveness::key_of(b.owner()).unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let killed: bool = client
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND objsubid = 1
               AND classid::bigint = $1 AND objid::bigint = $2",
            &[
                &((key as u64 >> 32) as i64),
                &((key as u64 & 0xffff_ffff) as i64),
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Waits for b's backend to end, then keeps b from taking its lock again.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    let mut paused = false;
    for _ in 0..100 {
        if !b.may_refresh(usize::MAX) {
            paused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(paused, "b stopped claiming");
    let err = b.claim_due("y:1", NOW + 1, LEASE, 1).await.unwrap_err();
    assert!(err.to_string().contains("liveness lock"), "{err}");
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    for _ in 0..100 {
        if b.may_refresh(usize::MAX) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b.may_refresh(usize::MAX), "b claims again");
    let taken = b.claim_due("y:2", NOW + 1, LEASE, 1).await.unwrap();
    assert_eq!(taken.len(), 1);
}

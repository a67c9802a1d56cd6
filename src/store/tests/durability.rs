//! Rotations whose commit failed: the recovery file, its replay, per-owner files, dead owners.

use super::*;

#[tokio::test]
async fn failed_commit_defers_to_recovery_file_then_commits() {
    let (dir, store) = temp_store().await;
    let db = options(&dir).path;
    let recovery = store.own_recovery_path(&db);
    assert_eq!(
        recovery,
        dir.path()
            .join(format!("refreshd.db.recovery.{}", store.owner()))
    );
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let other = insert(&store, vec![new_account("tiktok", "u2", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();

    let locker = defer_a_rotation(&store, &db, id).await;
    assert_eq!(mode(&recovery), 0o600);
    let text = std::fs::read_to_string(&recovery).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.ends_with('\n'));
    let entry: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(entry["account_id"], id);
    assert_eq!(entry["generation"], 0);
    assert_eq!(entry["access_token"], "at-deferred");
    assert_eq!(entry["refresh_token"], "rt-deferred");
    assert_eq!(get(&store, id).await.access_token.expose_secret(), "at-u1");

    // Outcomes other than rotations are not deferred: they fail.
    let err = store
        .record(transient(other, OWNER, NOW + 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("commit failed"), "{err}");

    let_worker_retry_fail().await;
    locker.execute_batch("ROLLBACK").unwrap();
    wait_for_recovery_commit(&recovery).await;
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-deferred");
    assert_eq!(a.refresh_token.expose_secret(), "rt-deferred");
    assert_eq!(a.generation, 1);
    assert_eq!(a.access_expires_at, NOW + 1 + 7200);
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(log_outcomes(&store, id).await[0], "rotated");
}

/// A read sees no row a deferred rotation updates: the worker retries its deferred
/// rotations before it answers one, rather than at its next timed retry.
#[tokio::test]
async fn a_read_after_the_database_frees_up_sees_the_deferred_rotation() {
    let (dir, store) = temp_store().await;
    let db = options(&dir).path;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let locker = defer_a_rotation(&store, &db, id).await;
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    // At once: the worker's timed retry (a second apart) has not come yet.
    let a = get(&store, id).await;
    assert_eq!(a.refresh_token.expose_secret(), "rt-deferred");
    assert_eq!(a.generation, 1);
}

#[tokio::test]
async fn close_commits_deferred_rotations_once_the_database_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let recovery = recovery_path(&opts.path);
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];

    let locker = lock_writes(&opts.path);
    let r = store
        .record(rotated(id, 0, "at-closed", None, NOW + 1))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Deferred);
    let_worker_retry_fail().await;
    locker.execute_batch("ROLLBACK").unwrap();
    store.close().await;
    assert!(!recovery.exists());
    let access: String = locker
        .query_row(
            "SELECT access_token FROM accounts WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(access, "at-closed");
}

#[tokio::test]
async fn open_replays_recovery_file_left_by_a_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let store = Store::open(opts.clone()).await.unwrap();
    let recovery = store.own_recovery_path(&opts.path);
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();

    let locker = lock_writes(&opts.path);
    let r = store
        .record(rotated(id, 0, "at-replayed", None, NOW + 1))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Deferred);
    // Close retries a few times, fails on the lock, and leaves the file for the next start.
    tokio::time::timeout(Duration::from_secs(5), store.close())
        .await
        .expect("close returns although the database stays locked");
    assert!(matches!(store.get(id).await, Err(StoreError::Closed)));
    drop(store);
    assert!(recovery.exists());
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    let store = Store::open(opts).await.unwrap();
    assert!(!recovery.exists());
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-replayed");
    assert_eq!(a.refresh_token.expose_secret(), "rt-u1");
    assert_eq!(a.generation, 1);
    assert_eq!(log_outcomes(&store, id).await, ["rotated", "imported"]);
}

async fn replay_skips_a_rotation_already_committed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let recovery = recovery_path(&opts.path);
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let outcome = rotated(id, 0, "at-new", Some("rt-new"), NOW + 1);
    assert_eq!(
        store.record(outcome.clone()).await.unwrap(),
        Recorded::Applied
    );
    let before = get(&store, id).await;
    store.close().await;
    drop(store);
    // The process died after committing but before removing the file.
    recovery::append(&recovery, &Default::default(), &[outcome]).unwrap();

    let store = Store::open(opts).await.unwrap();
    assert!(!recovery.exists());
    let a = get(&store, id).await;
    assert_eq!(a.generation, before.generation);
    assert_eq!(a.updated_at, before.updated_at);
    assert_eq!(a.access_token.expose_secret(), "at-new");
    assert_eq!(
        log_outcomes(&store, id).await,
        ["rotated", "imported"],
        "skipped, not recorded as superseded"
    );
}

async fn garbled_recovery_line_fails_open_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let recovery = recovery_path(&opts.path);
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.close().await;
    drop(store);

    recovery::append(
        &recovery,
        &Default::default(),
        &[rotated(id, 0, "at-1", None, NOW + 1)],
    )
    .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&recovery)
        .unwrap()
        .write_all(b"{\"account_id\": oops}\n")
        .unwrap();
    recovery::append(
        &recovery,
        &Default::default(),
        &[rotated(id, 1, "at-2", None, NOW + 2)],
    )
    .unwrap();

    let err = Store::open(opts.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Recovery { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&recovery.display().to_string()), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    assert!(recovery.exists(), "kept for the operator");

    // A complete last line is no torn write either: it must parse.
    std::fs::write(&recovery, b"not json\n").unwrap();
    let err = Store::open(opts.clone()).await.unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");

    // Nothing was applied: moving the file away shows the untouched account.
    std::fs::remove_file(&recovery).unwrap();
    let store = Store::open(opts).await.unwrap();
    assert_eq!(get(&store, id).await.generation, 0);
}

async fn torn_last_recovery_line_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let recovery = recovery_path(&opts.path);
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.close().await;
    drop(store);

    recovery::append(
        &recovery,
        &Default::default(),
        &[rotated(id, 0, "at-1", None, NOW + 1)],
    )
    .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&recovery)
        .unwrap()
        .write_all(b"{\"account_id\": 1, \"genera")
        .unwrap();

    let store = Store::open(opts).await.unwrap();
    assert!(!recovery.exists());
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-1");
    assert_eq!(a.generation, 1);
}

// ---- recovery files per owner, dead owners (issue 13, items 1 and 7) ----

/// Two processes on one file, both deferring while a third holds the write lock: each
/// rotation sits in its writer's own file, and a process starting meanwhile leaves the
/// live writers' files alone (it never removes what it did not commit).
#[tokio::test]
async fn deferred_rotations_stay_in_their_writers_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let a = Store::open(opts.clone()).await.unwrap();
    let b = Store::open(opts.clone()).await.unwrap();
    assert_ne!(a.owner(), b.owner());
    let accts = insert(
        &a,
        vec![
            new_account("tiktok", "u1", NOW),
            new_account("tiktok", "u2", NOW),
        ],
    )
    .await;
    let locker = lock_writes(&opts.path);
    let ra = a.record(rotated(accts[0], 0, "at-a", Some("rt-a"), NOW + 1));
    let rb = b.record(rotated(accts[1], 0, "at-b", Some("rt-b"), NOW + 1));
    let (ra, rb) = tokio::join!(ra, rb);
    assert_eq!(ra.unwrap(), Recorded::Deferred);
    assert_eq!(rb.unwrap(), Recorded::Deferred);
    let (fa, fb) = (
        a.own_recovery_path(&opts.path),
        b.own_recovery_path(&opts.path),
    );
    assert!(std::fs::read_to_string(&fa).unwrap().contains("at-a"));
    assert!(std::fs::read_to_string(&fb).unwrap().contains("at-b"));
    assert!(!std::fs::read_to_string(&fa).unwrap().contains("at-b"));
    // A process starting now replays no live writer's file.
    let c = Store::open(opts.clone()).await.unwrap();
    assert!(std::fs::read_to_string(&fb).unwrap().contains("at-b"));
    assert!(std::fs::read_to_string(&fa).unwrap().contains("at-a"));
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    wait_for_recovery_commit(&fa).await;
    wait_for_recovery_commit(&fb).await;
    assert_eq!(get(&c, accts[0]).await.access_token.expose_secret(), "at-a");
    assert_eq!(
        get(&c, accts[1]).await.refresh_token.expose_secret(),
        "rt-b"
    );
    for s in [a, b, c] {
        s.close().await;
    }
    assert!(
        !fa.exists() && !fb.exists(),
        "empty own files go at a clean stop"
    );
}

/// A dead writer's file (no live instance lock) is committed and removed by the next
/// process to open the store, as is the old single `<db>.recovery`.
#[tokio::test]
async fn a_dead_writers_recovery_file_is_replayed_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let store = Store::open(opts.clone()).await.unwrap();
    let accts = insert(
        &store,
        vec![
            new_account("tiktok", "u1", NOW),
            new_account("tiktok", "u2", NOW),
        ],
    )
    .await;
    store.close().await;
    drop(store);
    let dead = owner_recovery_path(&opts.path, "deadhost:4242:0000beef");
    recovery::append(
        &dead,
        &Default::default(),
        &[rotated(accts[0], 0, "at-dead", Some("rt-dead"), NOW + 1)],
    )
    .unwrap();
    let legacy = recovery_path(&opts.path);
    recovery::append(
        &legacy,
        &Default::default(),
        &[rotated(accts[1], 0, "at-old", Some("rt-old"), NOW + 1)],
    )
    .unwrap();
    let store = Store::open(opts.clone()).await.unwrap();
    assert!(!dead.exists() && !legacy.exists());
    assert_eq!(
        get(&store, accts[0]).await.refresh_token.expose_secret(),
        "rt-dead"
    );
    assert_eq!(
        get(&store, accts[1]).await.refresh_token.expose_secret(),
        "rt-old"
    );
}

/// The daemon's gated open hands a store out before its checks end; beside a dead writer's
/// recovery file it does not: the rotations in the file are replayed first, so no read
/// (the token API, the start-up token files) sees the rows without them. The checks' hook
/// would hold a gated open's checks for good.
#[tokio::test]
async fn a_gated_open_replays_a_dead_writers_recovery_file_before_any_read() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, id) = one_account_closed(&dir).await;
    let dead = owner_recovery_path(&opts.path, "deadhost:4242:0000beef");
    let rotation = rotated(id, 0, "at-dead", Some("rt-dead"), NOW + 1);
    recovery::append(&dead, &Default::default(), &[rotation]).unwrap();
    let (_release, hook) = held_checks();
    let store = Store::open_gated(opts, Some(hook)).await.unwrap();
    assert!(!dead.exists());
    let checks = store.checks();
    assert!(
        matches!(checks, crate::store::Checks::Passed(_)),
        "checked before it was handed out: {checks:?}"
    );
    let a = get(&store, id).await;
    assert_eq!(a.refresh_token.expose_secret(), "rt-dead");
    assert_eq!(a.access_token.expose_secret(), "at-dead");
}

/// A lease whose owner's instance lock is free is taken over at once (the claim records
/// the crash window); a live owner's lease is not.
#[tokio::test]
async fn a_dead_owners_leases_are_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let live = Store::open(opts.clone()).await.unwrap();
    let accts = insert(
        &live,
        vec![
            new_account("tiktok", "u1", NOW),
            new_account("tiktok", "u2", NOW),
        ],
    )
    .await;
    // u1 leased by a process that died (its instance file is there, unlocked).
    let dead = "deadhost:4242:0000beef";
    std::fs::write(instance::instance_path(&opts.path, dead), "").unwrap();
    let taken = live
        .claim_due(&format!("{dead}:1"), NOW, LEASE, 1)
        .await
        .unwrap();
    assert_eq!(ids(&taken), [accts[0]]);
    // u2 leased by the live process.
    let taken = live
        .claim_due(&format!("{}:1", live.owner()), NOW, LEASE, 1)
        .await
        .unwrap();
    assert_eq!(ids(&taken), [accts[1]]);

    let next = Store::open(opts.clone()).await.unwrap();
    let again = next
        .claim_due(&format!("{}:1", next.owner()), NOW + 1, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&again), [accts[0]], "only the dead owner's lease");
    assert_eq!(again[0].interrupted_at, Some(NOW + 1));
    assert!(!instance::instance_path(&opts.path, dead).exists());
}

on_both_backends!(
    replay_skips_a_rotation_already_committed,
    garbled_recovery_line_fails_open_with_path_and_line,
    torn_last_recovery_line_is_ignored,
);

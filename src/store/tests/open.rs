//! Opening a store: the file, its checks and schema, read-only opens, a damaged file.

use super::*;

// ---- open ----

#[tokio::test]
async fn open_creates_private_wal_database_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let store = Store::open(opts.clone()).await.unwrap();
    assert_eq!(mode(&opts.path), 0o600);

    let (journal, sync, version) = store
        .call(|c| {
            let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0));
            Ok((
                q("PRAGMA journal_mode"),
                q("PRAGMA synchronous"),
                q("PRAGMA user_version"),
            ))
        })
        .await
        .unwrap();
    assert_eq!(journal.unwrap(), rusqlite::types::Value::Text("wal".into()));
    assert_eq!(sync.unwrap(), rusqlite::types::Value::Integer(2));
    assert_eq!(
        version.unwrap(),
        rusqlite::types::Value::Integer(sqlite::schema::MIGRATIONS.len() as i64)
    );
    assert!(
        !sqlite::schema::MIGRATIONS.is_empty(),
        "user_version above is not 0"
    );

    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    // The WAL and its index hold tokens too, and exist while the store is open (a clean
    // close removes them).
    for suffix in ["-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", opts.path.display()));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    store.close().await;
    drop(store);

    let store = Store::open(opts.clone()).await.unwrap();
    assert_eq!(get(&store, id).await.subject, "u1");
    assert_eq!(mode(&opts.path), 0o600);
}

#[tokio::test]
async fn open_fails_when_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(StoreOptions {
        path: dir.path().join("nope").join("refreshd.db"),
        busy_timeout: Duration::from_millis(50),
        keyring: Default::default(),
        postgres: None,
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Create { .. }), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn read_only_open_leaves_the_recovery_file_and_refuses_writes() {
    let (dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "ro", NOW)]).await[0];
    store.close().await;
    let opts = options(&dir);
    let recovery = recovery_path(&opts.path);
    std::fs::write(&recovery, "the daemon's, not ours\n").unwrap();

    let ro = Store::open_read_only(opts.clone()).await.unwrap();
    assert_eq!(ro.get(id).await.unwrap().unwrap().subject, "ro");
    assert!(
        recovery.exists(),
        "a read-only open must not replay or remove it"
    );
    let write = ro
        .call(|c| {
            c.execute("UPDATE accounts SET label = 'x'", [])
                .map_err(|source| StoreError::Sqlite {
                    context: "test write",
                    source,
                })
        })
        .await;
    assert!(write.is_err(), "writes must fail on a read-only store");
}

#[tokio::test]
async fn read_only_open_of_an_unmigrated_database_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    rusqlite::Connection::open(&opts.path)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER)")
        .unwrap();
    let err = Store::open_read_only(opts).await.unwrap_err().to_string();
    assert!(
        err.contains("schema version 0") && err.contains("refreshd run"),
        "{err}"
    );
}

async fn replicas_opening_a_fresh_store_together_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    // The default busy_timeout, not the suite's 50 ms: four opens of a fresh file each check
    // it, migrate it and replay under its lock in turn, which a loaded machine stretches.
    let opts = StoreOptions {
        busy_timeout: Duration::from_secs(5),
        ..options(&dir)
    };
    let opens = (0..4).map(|_| Store::open(opts.clone()));
    let stores: Vec<Store> = futures::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.expect("every replica opens"))
        .collect();
    for s in &stores {
        assert!(s.schema_current().await.unwrap());
    }
    // They all work on the one schema.
    let id = insert(&stores[0], vec![new_account("tiktok", "u1", NOW)]).await[0];
    assert_eq!(get(&stores[3], id).await.subject, "u1");
    for s in stores {
        s.close().await;
    }
}

#[test]
fn both_backends_know_the_same_migrations() {
    // One version number means the same schema on SQLite and PostgreSQL (store copy).
    assert_eq!(
        sqlite::schema::MIGRATIONS.len(),
        crate::store::postgres::MIGRATIONS.len()
    );
}

#[tokio::test]
async fn sealing_key_ids_reads_both_columns_and_skips_garbled_values() {
    let (_dir, store) = temp_store().await;
    let ids = insert(
        &store,
        vec![
            new_account("tiktok", "a", NOW),
            new_account("tiktok", "b", NOW),
            new_account("tiktok", "c", NOW),
        ],
    )
    .await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let found = store
        .call(move |conn| {
            let set = |id: i64, col: &str, v: &str| {
                conn.execute(
                    &format!("UPDATE accounts SET {col} = ?2 WHERE id = ?1"),
                    rusqlite::params![id, v],
                )
                .unwrap();
            };
            set(a, "access_token", "enc:v1:00000000000000aa:AAAA");
            set(b, "refresh_token", "enc:v1:00000000000000bb:BBBB");
            // Garbled: not hex, too short. Neither is a key id.
            set(c, "access_token", "enc:v1:zzzzzzzzzzzzzzzz:CCCC");
            set(c, "refresh_token", "enc:v1:12:DDDD");
            sqlite::queries::sealing_key_ids(conn)
        })
        .await
        .unwrap();
    let mut found = found;
    found.sort();
    assert_eq!(found, ["00000000000000aa", "00000000000000bb"]);
}

// ---- damaged store (issue 13, item 9) ----

/// Writes garbage over the start of page `page` (1-based) of a closed database.
fn garble_page(path: &Path, page: u64) {
    use std::io::{Seek, SeekFrom};
    // Every page in the main file first: a WAL copy would hide the garbage.
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start((page - 1) * 4096)).unwrap();
    f.write_all(&[0xA5; 512]).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test]
async fn a_damaged_database_fails_check_and_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir);
    let store = Store::open(opts.clone()).await.unwrap();
    let many: Vec<NewAccount> = (0..60)
        .map(|i| new_account("tiktok", &format!("u{i}"), NOW))
        .collect();
    insert(&store, many).await;
    store.close().await;
    drop(store);
    assert!(
        sqlite::check_report(&opts.path, false)
            .iter()
            .all(|(_, ok)| *ok)
    );
    garble_page(&opts.path, 2);
    for full in [false, true] {
        let report = sqlite::check_report(&opts.path, full);
        assert!(
            report
                .iter()
                .any(|(line, ok)| !ok && line.contains("FAILED") && line.contains("damaged")),
            "{report:?}"
        );
    }
    let err = Store::open(opts).await.unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("is damaged"), "{err}");
}

on_both_backends!(replicas_opening_a_fresh_store_together_migrate_it_once,);

/// A claim sent while a gated open's checks run is held, and answered empty once they
/// pass: it carries the `now` and lease end of when it was sent, which the checks may have
/// outlasted. The next claim takes the account.
#[tokio::test]
async fn a_claim_held_at_the_gate_is_answered_empty_once_the_checks_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, id) = one_account_closed(&dir).await;
    let (release, hook) = held_checks();
    let store = Store::open_gated(opts, Some(hook)).await.unwrap();
    let claim = {
        let store = store.clone();
        tokio::spawn(async move { store.claim_due(OWNER, NOW, LEASE, 10).await })
    };
    // The worker answers a read sent after the claim: the claim is held, not running.
    get(&store, id).await;
    assert!(!claim.is_finished(), "a claim ran before the checks passed");
    release.send(()).unwrap();
    let held = claim.await.unwrap().expect("the held claim is answered");
    assert!(
        held.is_empty(),
        "the held claim leased {} accounts",
        held.len()
    );
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
}

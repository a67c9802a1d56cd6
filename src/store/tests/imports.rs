//! Imports in batches (`upsert`, `upsert_stream`): a batch mixing new and existing accounts,
//! with sealed tokens, and a stream of several batches committed or rolled back whole.

use super::*;

/// A store whose tokens are sealed: a token written for the wrong id would not open.
async fn sealing_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    crate::crypto::generate_key_file(&key).unwrap();
    let opts = StoreOptions {
        keyring: crate::crypto::Keyring::load(Some(&key), &[]).unwrap(),
        ..options(&dir)
    };
    let store = Store::open(opts).await.unwrap();
    (dir, store)
}

async fn a_batch_of_new_and_existing_accounts_gets_ids_in_order_sealed_for_them() {
    let (_dir, store) = sealing_store().await;
    let old = insert(
        &store,
        vec![
            new_account("tiktok", "b", NOW),
            new_account("tiktok", "d", NOW),
        ],
    )
    .await;
    let batch: Vec<NewAccount> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|s| NewAccount {
            tokens: tokens(&format!("at2-{s}"), Some(&format!("rt2-{s}"))),
            ..new_account("tiktok", s, NOW + 100)
        })
        .collect();
    let ids = store.upsert(batch, NOW + 10).await.unwrap();
    let inserted: Vec<bool> = ids.iter().map(|(_, new)| *new).collect();
    assert_eq!(inserted, [true, false, true, false, true]);
    assert_eq!((ids[1].0, ids[3].0), (old[0], old[1]), "existing ids kept");
    let mut distinct: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "{ids:?}");
    for ((id, _), s) in ids.iter().zip(["a", "b", "c", "d", "e"]) {
        let a = get(&store, *id).await;
        assert_eq!(a.subject, s);
        assert_eq!(a.access_token.expose_secret(), format!("at2-{s}"));
        assert_eq!(a.refresh_token.expose_secret(), format!("rt2-{s}"));
        assert_eq!(a.next_refresh_at, NOW + 100);
        let imports = if ["b", "d"].contains(&s) { 2 } else { 1 };
        assert_eq!(log_outcomes(&store, *id).await, vec!["imported"; imports]);
    }
    // A new account after a removed one never takes a sealed value of another id.
    store
        .remove(ids[4].0, NOW + 10, &super::admin(), None)
        .await
        .unwrap();
    let again = store
        .upsert(vec![new_account("tiktok", "f", NOW)], NOW + 20)
        .await
        .unwrap();
    assert_eq!(
        get(&store, again[0].0).await.access_token.expose_secret(),
        "at-f"
    );
    store.close().await;
}

async fn a_stream_of_batches_commits_whole_or_leaves_nothing() {
    let (_dir, store) = temp_store().await;
    let batch = |from: usize| -> Vec<NewAccount> {
        (from..from + 700)
            .map(|k| new_account("tiktok", &format!("s{k}"), NOW))
            .collect()
    };
    // Dropped before its end: rolled back, nothing of the first batches stays.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let writer = tokio::spawn({
        let store = store.clone();
        async move { store.upsert_stream(rx, NOW, |_, _| {}).await }
    });
    tx.send(Some(batch(0))).await.unwrap();
    tx.send(Some(batch(700))).await.unwrap();
    drop(tx);
    assert!(writer.await.unwrap().is_err());
    assert_eq!(store.counts().await.unwrap(), vec![]);
    // Ended with None: committed, each batch handed back with its ids.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = tokio::spawn({
        let (store, seen) = (store.clone(), seen.clone());
        async move {
            store
                .upsert_stream(rx, NOW, move |records, ids| {
                    assert_eq!(records.len(), ids.len());
                    seen.lock().unwrap().extend(ids.iter().copied());
                })
                .await
        }
    });
    for from in [0, 700, 1400] {
        tx.send(Some(batch(from))).await.unwrap();
    }
    tx.send(None).await.unwrap();
    writer.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2100);
    assert!(seen.iter().all(|(_, new)| *new));
    assert_eq!(
        store.counts().await.unwrap(),
        vec![("tiktok".to_string(), Status::Active, 2100)]
    );
    let last = seen.last().unwrap().0;
    assert_eq!(get(&store, last).await.subject, "s2099");
    assert_eq!(log_outcomes(&store, last).await, ["imported"]);
    store.close().await;
}

/// A batch wider than one multi-row INSERT, existing accounts scattered through it: each
/// account keeps its place, the existing ones their ids, and each gets one log row.
async fn a_wide_batch_keeps_each_account_in_its_place() {
    let (_dir, store) = sealing_store().await;
    let subject = |k: usize| format!("s{k:03}");
    let existing: Vec<usize> = vec![0, 49, 50, 51, 120, 249];
    let old = insert(
        &store,
        existing
            .iter()
            .map(|&k| new_account("tiktok", &subject(k), NOW))
            .collect(),
    )
    .await;
    let batch: Vec<NewAccount> = (0..250)
        .map(|k| NewAccount {
            tokens: tokens(&format!("at2-{k}"), Some(&format!("rt2-{k}"))),
            ..new_account("tiktok", &subject(k), NOW + 100)
        })
        .collect();
    let ids = store.upsert(batch, NOW + 10).await.unwrap();
    assert_eq!(ids.len(), 250);
    for (k, (id, new)) in ids.iter().enumerate() {
        let was = existing.iter().position(|&e| e == k);
        assert_eq!(*new, was.is_none(), "account {k}");
        if let Some(w) = was {
            assert_eq!(*id, old[w], "account {k} keeps its id");
        }
        let a = get(&store, *id).await;
        assert_eq!(a.subject, subject(k));
        assert_eq!(a.access_token.expose_secret(), format!("at2-{k}"));
        assert_eq!(a.refresh_token.expose_secret(), format!("rt2-{k}"));
        let imports = if was.is_some() { 2 } else { 1 };
        assert_eq!(log_outcomes(&store, *id).await, vec!["imported"; imports]);
    }
    let mut distinct: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 250);
    store.close().await;
}

/// An account refused in the middle of a streamed import (under a lease) fails the import
/// whole: the accounts written before it, in its batch and in earlier ones, are gone.
async fn a_refusal_in_the_middle_of_a_stream_leaves_nothing() {
    let (_dir, store) = temp_store().await;
    let leased = insert(&store, vec![new_account("tiktok", "leased", NOW)]).await[0];
    let claimed = store.claim_due("me", NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed), [leased]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let writer = tokio::spawn({
        let store = store.clone();
        async move { store.upsert_stream(rx, NOW + 1, |_, _| {}).await }
    });
    let fresh = |from: usize, n: usize| -> Vec<NewAccount> {
        (from..from + n)
            .map(|k| new_account("tiktok", &format!("s{k}"), NOW))
            .collect()
    };
    tx.send(Some(fresh(0, 300))).await.unwrap();
    let mut second = fresh(300, 130);
    second.insert(
        77,
        NewAccount {
            obtained_at: NOW + 1,
            ..new_account("tiktok", "leased", NOW)
        },
    );
    tx.send(Some(second)).await.unwrap();
    let _ = tx.send(Some(fresh(500, 10))).await;
    let _ = tx.send(None).await;
    let e = writer.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("leased"), "{e}");
    assert_eq!(
        store.counts().await.unwrap(),
        vec![("tiktok".to_string(), Status::Active, 1)]
    );
    assert_eq!(log_outcomes(&store, leased).await, ["imported"]);
    store.close().await;
}

/// A streamed SQLite import puts its temporary-storage setting back after its transaction,
/// committed or rolled back: the store's connection outlives the import (the setting itself
/// is tested in `sqlite/tests.rs`).
#[tokio::test]
async fn a_sqlite_import_puts_its_setting_back() {
    let (_dir, store) = POSTGRES.scope(None, temp_store()).await;
    let Backend::Sqlite(s) = &store.backend else {
        unreachable!("a SQLite store")
    };
    let temp_store = || {
        s.read(|c| {
            c.query_row("PRAGMA temp_store", [], |r| r.get::<_, i64>(0))
                .map_err(|source| StoreError::Sqlite {
                    context: "read temp_store",
                    source,
                })
        })
    };
    let before = temp_store().await.unwrap();
    assert_ne!(
        before, 2,
        "the test needs a connection whose temp_store is not MEMORY"
    );
    for commit in [true, false] {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let during = std::sync::Arc::new(std::sync::Mutex::new(None));
        let writer = tokio::spawn({
            let (store, during) = (store.clone(), during.clone());
            async move {
                store
                    .upsert_stream(rx, NOW, move |_, _| {
                        *during.lock().unwrap() = Some(());
                    })
                    .await
            }
        });
        let subject = if commit { "a" } else { "b" };
        tx.send(Some(vec![new_account("tiktok", subject, NOW)]))
            .await
            .unwrap();
        if commit {
            tx.send(None).await.unwrap();
        }
        drop(tx);
        assert_eq!(writer.await.unwrap().is_ok(), commit);
        assert!(during.lock().unwrap().is_some());
        assert_eq!(temp_store().await.unwrap(), before);
    }
    store.close().await;
}

/// On PostgreSQL a batch finds its accounts through the (provider, subject) index, never by
/// reading the whole table: a scan per batch made a large import quadratic.
#[tokio::test]
async fn a_postgres_batch_is_looked_up_through_the_index() {
    let test = "store::tests::imports::a_postgres_batch_is_looked_up_through_the_index";
    let Some(url) = refreshd_testkit::postgres_schema(test).await else {
        return;
    };
    POSTGRES
        .scope(Some(url), async {
            let (_dir, store) = temp_store().await;
            let stored: Vec<NewAccount> = (0..5000)
                .map(|k| new_account("tiktok", &format!("s{k}"), NOW))
                .collect();
            insert(&store, stored).await;
            // Half of the batch stored, half new: what a re-import with new lines looks up.
            let subjects: Vec<String> = (4500..5500).map(|k| format!("s{k}")).collect();
            let providers = vec!["tiktok"; subjects.len()];
            let Backend::Postgres(p) = &store.backend else {
                unreachable!("a PostgreSQL store")
            };
            let client = p.client("explain the import's lookup").await.unwrap();
            let explain = format!("EXPLAIN {}", crate::store::postgres::writes::LOOK_UP_BATCH);
            let plan: Vec<String> = client
                .query(&explain, &[&providers, &subjects])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan"), "{plan}");
            assert!(plan.contains("accounts_provider_subject_key"), "{plan}");
            drop(client);
            store.close().await;
        })
        .await
}

on_both_backends!(
    a_batch_of_new_and_existing_accounts_gets_ids_in_order_sealed_for_them,
    a_stream_of_batches_commits_whole_or_leaves_nothing,
    a_wide_batch_keeps_each_account_in_its_place,
    a_refusal_in_the_middle_of_a_stream_leaves_nothing,
);

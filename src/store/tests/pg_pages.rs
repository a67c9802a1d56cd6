//! PostgreSQL only: room in the accounts table's pages (its fillfactor, schema version 8),
//! so that a claim, which sets only the unindexed lease columns, is a HOT update on a
//! freshly imported store: no new entry in any of the table's indexes.

use super::*;

/// A store on a fresh schema of the throwaway cluster, and a connection of the test's own.
async fn pg_store(test: &str) -> Option<(TempDir, Store, tokio_postgres::Client)> {
    let url = refreshd_testkit::postgres_schema(test).await?;
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES
        .scope(Some(url.clone()), async { options(&dir) })
        .await;
    let store = Store::open(opts).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    Some((dir, store, client))
}

/// The accounts table's updates and HOT updates as the server counts them, once it counts
/// at least `updates`. An idle backend may hold its counts for up to ten seconds; one that
/// ends reports them as it exits, so the store is closed and dropped first (its connections
/// end) and this waits only for those backends to exit.
async fn updates_counted(client: &tokio_postgres::Client, updates: i64) -> (i64, i64) {
    let mut seen = (0, 0);
    for _ in 0..100 {
        let row = client
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                 WHERE relid = 'accounts'::regclass",
                &[],
            )
            .await
            .unwrap();
        seen = (row.get(0), row.get(1));
        if seen.0 >= updates {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the server counted {seen:?} (updates, HOT) within 2 s, not {updates} updates");
}

#[tokio::test]
async fn postgres_accounts_pages_keep_room_so_a_claim_is_a_hot_update() {
    let Some((_dir, store, client)) = pg_store("pg_claim_hot").await else {
        return;
    };
    let options: Option<Vec<String>> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'accounts'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=80".to_string()]));
    // One import batch fills the table's first pages; the earliest due account is the first
    // row of the first page, which without the room is full.
    let batch: Vec<NewAccount> = (0..1000)
        .map(|n| new_account("tiktok", &format!("u{n:04}"), NOW + n))
        .collect();
    let ids = store.upsert(batch, NOW).await.unwrap();
    let claimed = store.claim_due(OWNER, NOW, LEASE, 1).await.unwrap();
    assert_eq!(super::ids(&claimed), [ids[0].0]);
    store.close().await;
    drop(store);
    assert_eq!(updates_counted(&client, 1).await, (1, 1), "(updates, HOT)");
}

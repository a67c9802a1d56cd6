//! Store tests on real database files in a temporary directory (and PostgreSQL schemas in a
//! throwaway cluster), split by theme; the helpers and `on_both_backends!` live here.

use super::rules::CONNECT_REMEMBER;
use super::*;
use crate::model::{Account, ReauthReason, Status, TokenSet};
use secrecy::{ExposeSecret, SecretString};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tempfile::TempDir;

const NOW: i64 = 1_700_000_000;
const OWNER: &str = "owner-a";
const LEASE: Duration = Duration::from_secs(60);

/// Who the store tests' admin changes are by.
fn admin() -> Actor {
    Actor {
        who: "tester (uid 1000)".into(),
        via: "accounts test".into(),
    }
}

fn tokens(access: &str, refresh: Option<&str>) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access),
        refresh_token: refresh.map(SecretString::from),
        expires_in: 3600,
        refresh_expires_in: None,
        subject: None,
        scope: Some("user.info".into()),
        token_type: "Bearer".into(),
    }
}

/// An active account with tokens `at-<subject>` / `rt-<subject>`, due at `next_refresh_at`.
fn new_account(provider: &str, subject: &str, next_refresh_at: i64) -> NewAccount {
    NewAccount {
        provider: provider.into(),
        subject: subject.into(),
        label: None,
        tokens: tokens(&format!("at-{subject}"), Some(&format!("rt-{subject}"))),
        obtained_at: NOW,
        next_refresh_at,
        status: Status::Active,
        reauth_reason: None,
    }
}

tokio::task_local! {
    /// The PostgreSQL URL (with a schema of its own) of the test running in this task, or
    /// None for SQLite. Set by `on_both_backends!`.
    static POSTGRES: Option<String>;
}

fn options(dir: &TempDir) -> StoreOptions {
    StoreOptions {
        path: dir.path().join("refreshd.db"),
        busy_timeout: Duration::from_millis(50),
        keyring: Default::default(),
        postgres: POSTGRES
            .try_with(|u| u.clone())
            .ok()
            .flatten()
            .map(|url| PgOptions {
                url: SecretString::from(url),
                pool_size: 4,
            }),
    }
}

/// Runs each listed test on SQLite and on PostgreSQL (`NAME::sqlite`, `NAME::postgres`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::POSTGRES.scope(None, super::$name()).await
            }
            #[tokio::test]
            async fn postgres() {
                // A throwaway cluster (refreshd-testkit), or a NOT RUN when none is installed.
                let test = concat!("store::tests::", stringify!($name), "::postgres");
                if let Some(url) = refreshd_testkit::postgres_schema(test).await {
                    super::POSTGRES.scope(Some(url), super::$name()).await
                }
            }
        }
    )*};
}

async fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(options(&dir)).await.unwrap();
    (dir, store)
}

/// A closed SQLite store of one account due at NOW (its options and the account's id):
/// what a daemon's gated open finds.
async fn one_account_closed(dir: &TempDir) -> (StoreOptions, i64) {
    let opts = options(dir);
    let store = Store::open(opts.clone()).await.unwrap();
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.close().await;
    (opts, id)
}

/// A hook that holds a gated open's checks until the sender sends (or is dropped).
fn held_checks() -> (std::sync::mpsc::Sender<()>, crate::store::CheckHook) {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let hook: crate::store::CheckHook = Box::new(move || {
        let _ = held.recv();
    });
    (release, hook)
}

async fn insert(store: &Store, accounts: Vec<NewAccount>) -> Vec<i64> {
    let ids = store.upsert(accounts, NOW).await.unwrap();
    assert!(ids.iter().all(|(_, inserted)| *inserted));
    ids.into_iter().map(|(id, _)| id).collect()
}

async fn get(store: &Store, id: i64) -> Account {
    store.get(id).await.unwrap().expect("account exists")
}

/// A successful refresh of `id` at `generation`, issued at `at`.
fn rotated(id: i64, generation: i64, access: &str, refresh: Option<&str>, at: i64) -> Outcome {
    Outcome::Rotated {
        account_id: id,
        generation,
        tokens: TokenSet {
            expires_in: 7200,
            ..tokens(access, refresh)
        },
        at,
        next_refresh_at: at + 6000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 12,
    }
}

fn transient(id: i64, owner: &str, at: i64) -> Outcome {
    Outcome::Transient {
        account_id: id,
        owner: owner.into(),
        at,
        next_refresh_at: at + 30,
        error: "HTTP 503".into(),
        http_status: Some(503),
        duration_ms: 7,
        answer_lost: false,
    }
}

/// One integer (or NULL) from a raw query (`?1` is `id`), on either backend.
async fn query(store: &Store, sql: &'static str, id: i64) -> Option<i64> {
    store.test_query_i64(sql, id).await.unwrap()
}

async fn lease(store: &Store, id: i64) -> (Option<String>, Option<i64>) {
    store.test_lease(id).await.unwrap()
}

async fn log_outcomes(store: &Store, id: i64) -> Vec<String> {
    let entries = store.log_entries(id, 100).await.unwrap();
    entries.into_iter().map(|e| e.outcome).collect()
}

fn ids(accounts: &[Account]) -> Vec<i64> {
    accounts.iter().map(|a| a.id).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A second connection holding the database's write lock until it is dropped or rolled back.
fn lock_writes(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    c
}

/// Holds the database's write lock and records a rotation of `id` (`rt-deferred`), which
/// the worker defers to the recovery file; returns the lock's connection.
async fn defer_a_rotation(store: &Store, db: &Path, id: i64) -> rusqlite::Connection {
    let locker = lock_writes(db);
    let r = store
        .record(rotated(id, 0, "at-deferred", Some("rt-deferred"), NOW + 1))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Deferred);
    locker
}

/// After each job the worker retries deferred commits, waiting out the 50 ms busy timeout.
/// Lets that retry give up, so that releasing the lock afterwards leaves the commit to the
/// periodic retry or to `close`.
async fn let_worker_retry_fail() {
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (sending the worker no jobs, so only its periodic retry can commit) until the
/// recovery file is gone or empty.
async fn wait_for_recovery_commit(recovery: &Path) {
    for _ in 0..100 {
        if std::fs::metadata(recovery).map_or(true, |m| m.len() == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("deferred rotation was not committed within 5 s");
}

mod accounts;
mod admin;
mod admin_page;
mod apps;
mod audit;
mod durability;
mod imports;
mod open;
mod pg_commit;
mod pg_durable;
mod pg_pages;
mod plan;
mod records;
mod replicas;
mod windows;

/// Raw reads for the tests, on either backend.
impl Store {
    /// One integer (or NULL) from a raw query whose `?1` is `id`, on either backend.
    pub(crate) async fn test_query_i64(
        &self,
        sql: &'static str,
        id: i64,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(p) = self.pg() {
            let c = p.client("test query").await?;
            let row = c
                .query_one(&sql.replace("?1", "$1::bigint"), &[&id])
                .await
                .map_err(postgres::pg_err("test query"))?;
            return Ok(row.get(0));
        }
        self.sqlite("test query")?
            .read(move |c| {
                c.query_row(sql, [id], |r| r.get(0))
                    .map_err(|source| StoreError::Sqlite {
                        context: "test query",
                        source,
                    })
            })
            .await
    }

    pub(crate) async fn test_lease(
        &self,
        id: i64,
    ) -> Result<(Option<String>, Option<i64>), StoreError> {
        let sql = "SELECT lease_owner, lease_expires_at FROM accounts WHERE id = ?1";
        if let Some(p) = self.pg() {
            let c = p.client("test query").await?;
            let row = c
                .query_one(&sql.replace("?1", "$1"), &[&id])
                .await
                .map_err(postgres::pg_err("test query"))?;
            return Ok((row.get(0), row.get(1)));
        }
        self.sqlite("test query")?
            .read(move |c| {
                c.query_row(sql, [id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(|source| StoreError::Sqlite {
                        context: "test query",
                        source,
                    })
            })
            .await
    }
}

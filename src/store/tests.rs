//! Store tests on real database files in a temporary directory.

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
        rusqlite::types::Value::Integer(schema::MIGRATIONS.len() as i64)
    );
    assert!(
        !schema::MIGRATIONS.is_empty(),
        "user_version above is not 0"
    );

    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
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

// ---- upsert ----

async fn upsert_inserts_then_updates_by_provider_and_subject() {
    let (_dir, store) = temp_store().await;
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        reauth_reason: Some(ReauthReason::InvalidGrant),
        tokens: TokenSet {
            refresh_expires_in: Some(1000),
            ..tokens("at-1", Some("rt-1"))
        },
        label: Some("Shop".into()),
        ..new_account("tiktok", "u1", NOW)
    };
    let first = store
        .upsert(vec![flagged, new_account("other", "u1", NOW)], NOW)
        .await
        .unwrap();
    assert!(first[0].1 && first[1].1);
    assert_ne!(
        first[0].0, first[1].0,
        "same subject, other provider: a new account"
    );
    let id = first[0].0;
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_flagged_at, Some(NOW));
    assert_eq!(a.generation, 0);
    assert_eq!(a.refresh_expires_at, Some(NOW + 1000));

    // Second import: new access token, no refresh token, active again.
    let again = NewAccount {
        tokens: tokens("at-2", None),
        obtained_at: NOW + 10,
        ..new_account("tiktok", "u1", NOW + 500)
    };
    let second = store.upsert(vec![again], NOW + 10).await.unwrap();
    assert_eq!(second, vec![(id, false)]);
    let a = get(&store, id).await;
    assert_eq!(a.generation, 1);
    assert_eq!(a.access_token.expose_secret(), "at-2");
    assert_eq!(a.refresh_token.expose_secret(), "rt-1", "kept");
    assert_eq!(a.access_expires_at, NOW + 10 + 3600);
    assert_eq!(a.next_refresh_at, NOW + 500);
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.reauth_flagged_at, None);
    assert_eq!(
        a.label.as_deref(),
        Some("Shop"),
        "label kept when none given"
    );
    // The kept refresh token keeps its known expiry.
    assert_eq!(a.refresh_expires_at, Some(NOW + 1000));

    // Third import with a refresh token replaces it.
    let third = NewAccount {
        tokens: tokens("at-3", Some("rt-3")),
        ..new_account("tiktok", "u1", NOW)
    };
    assert_eq!(
        store.upsert(vec![third], NOW + 20).await.unwrap(),
        vec![(id, false)]
    );
    let a = get(&store, id).await;
    assert_eq!(a.generation, 2);
    assert_eq!(a.refresh_token.expose_secret(), "rt-3");
    assert_eq!(
        a.refresh_expires_at, None,
        "a new refresh token of unknown lifetime"
    );
    assert_eq!(log_outcomes(&store, id).await, ["imported"; 3]);
}

async fn upsert_refused_under_a_live_lease_then_clears_lease_and_failures() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW)).await.unwrap();
    store.claim_due(OWNER, NOW + 30, LEASE, 10).await.unwrap();
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));

    // A refresh may be in flight: its rotation must not be superseded by an import.
    let err = store
        .upsert(vec![new_account("tiktok", "u1", NOW)], NOW + 31)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("being refreshed"), "{err}");
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));

    // Once the lease has run out (its holder died), the import goes through.
    store
        .upsert(vec![new_account("tiktok", "u1", NOW)], NOW + 30 + 61)
        .await
        .unwrap();
    let a = get(&store, id).await;
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(a.failures, 0);
    assert_eq!(a.last_error, None);
}

async fn upsert_is_all_or_nothing() {
    let (_dir, store) = temp_store().await;
    // The second record is refused (its account is being refreshed): the first is not
    // stored either.
    insert(&store, vec![new_account("tiktok", "u2", NOW)]).await;
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let logged = query(&store, "SELECT COUNT(*) FROM refresh_log WHERE ?1 = ?1", 0).await;
    let err = store
        .upsert(
            vec![
                new_account("tiktok", "u1", NOW),
                new_account("tiktok", "u2", NOW),
            ],
            NOW + 1,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("being refreshed"), "{err}");
    assert!(store.find("tiktok", "u1").await.unwrap().is_none());
    assert_eq!(
        query(&store, "SELECT COUNT(*) FROM refresh_log WHERE ?1 = ?1", 0).await,
        logged
    );
}

// ---- claim_due ----

async fn claim_due_takes_due_refreshable_accounts_in_order() {
    let (_dir, store) = temp_store().await;
    let accounts = vec![
        new_account("tiktok", "late", NOW - 10),
        new_account("tiktok", "early", NOW - 30),
        new_account("tiktok", "exactly-now", NOW),
        new_account("tiktok", "future", NOW + 1),
        NewAccount {
            status: Status::Expiring,
            reauth_reason: Some(ReauthReason::RefreshTokenExpiring),
            ..new_account("tiktok", "expiring", NOW - 20)
        },
        NewAccount {
            status: Status::NeedsReauth,
            reauth_reason: Some(ReauthReason::InvalidGrant),
            ..new_account("tiktok", "flagged", NOW - 100)
        },
        NewAccount {
            status: Status::Disabled,
            ..new_account("tiktok", "disabled", NOW - 100)
        },
    ];
    let id = insert(&store, accounts).await;
    let (late, early, exact, future, expiring, flagged, disabled) =
        (id[0], id[1], id[2], id[3], id[4], id[5], id[6]);

    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed), [early, expiring, late, exact]);
    for a in &claimed {
        assert_eq!(
            lease(&store, a.id).await,
            (Some(OWNER.to_string()), Some(NOW + 60))
        );
    }
    for id in [future, flagged, disabled] {
        assert_eq!(lease(&store, id).await, (None, None));
    }
    // Nothing else is due, and flagged or disabled accounts never are.
    assert!(
        store
            .claim_due("owner-b", NOW, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let much_later = store
        .claim_due("owner-b", NOW + 30, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&much_later), [future]);
}

async fn claim_due_except_leaves_out_saturated_providers() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("linkedin", "a", NOW - 30),
            new_account("x", "b", NOW - 20),
            new_account("google", "c", NOW - 10),
            new_account("linkedin", "d", NOW + 50),
            new_account("google", "e", NOW + 60),
        ],
    )
    .await;
    let skip = vec!["linkedin".to_string(), "x".to_string()];
    assert_eq!(
        store.next_due_except(NOW, skip.clone()).await.unwrap(),
        Some(NOW - 10)
    );
    let claimed = store
        .claim_due_except(OWNER, NOW, LEASE, 10, skip.clone())
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [id[2]]);
    // The skipped providers' due accounts stay unleased for a later claim.
    assert_eq!(lease(&store, id[0]).await, (None, None));
    assert_eq!(
        store.next_due_except(NOW, skip).await.unwrap(),
        Some(NOW + 60)
    );
    let rest = store
        .claim_due_except(OWNER, NOW, LEASE, 10, Vec::new())
        .await
        .unwrap();
    assert_eq!(ids(&rest), [id[0], id[1]]);
}

async fn claim_due_respects_limit() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("tiktok", "a", NOW - 1),
            new_account("tiktok", "b", NOW - 3),
            new_account("tiktok", "c", NOW - 2),
        ],
    )
    .await;
    let first = store.claim_due(OWNER, NOW, LEASE, 2).await.unwrap();
    assert_eq!(ids(&first), [id[1], id[2]]);
    let rest = store.claim_due(OWNER, NOW, LEASE, 2).await.unwrap();
    assert_eq!(ids(&rest), [id[0]]);
}

async fn claim_due_lease_blocks_other_owners_until_it_expires() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    assert_eq!(
        ids(&store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap()),
        [id]
    );
    assert!(
        store
            .claim_due("owner-b", NOW, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_due("owner-b", NOW + 59, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let taken = store
        .claim_due("owner-b", NOW + 61, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&taken), [id]);
    assert_eq!(
        lease(&store, id).await,
        (Some("owner-b".to_string()), Some(NOW + 61 + 60))
    );
}

// ---- record: Rotated ----

async fn rotated_applies_when_generation_matches() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    // A failure first, so there is something to reset.
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(
        store.record(transient(id, OWNER, NOW)).await.unwrap(),
        Recorded::Applied
    );
    let claimed = store.claim_due(OWNER, NOW + 30, LEASE, 10).await.unwrap();
    assert_eq!(claimed[0].generation, 0);
    assert_eq!(claimed[0].failures, 1);

    let at = NOW + 40;
    let outcome = Outcome::Rotated {
        account_id: id,
        generation: 0,
        tokens: TokenSet {
            expires_in: 7200,
            refresh_expires_in: Some(86_400),
            scope: Some("user.info video.list".into()),
            ..tokens("at-new", None)
        },
        at,
        next_refresh_at: at + 6000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 33,
    };
    assert_eq!(store.record(outcome).await.unwrap(), Recorded::Applied);
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-new");
    assert_eq!(
        a.refresh_token.expose_secret(),
        "rt-u1",
        "COALESCE keeps it"
    );
    assert_eq!(a.access_expires_at, at + 7200);
    assert_eq!(a.refresh_expires_at, Some(at + 86_400));
    assert_eq!(a.next_refresh_at, at + 6000);
    assert_eq!(a.scope, "user.info video.list");
    assert_eq!(a.failures, 0);
    assert_eq!(a.last_error, None);
    assert_eq!(a.last_refreshed_at, Some(at));
    assert_eq!(a.generation, 1);
    assert_eq!(lease(&store, id).await, (None, None));
    let log = store.log_entries(id, 1).await.unwrap();
    assert_eq!(log[0].outcome, "rotated");
    assert_eq!(log[0].at, at);
    assert_eq!(log[0].http_status, Some(200));
    assert_eq!(log[0].duration_ms, Some(33));

    // A new refresh token replaces the stored one.
    assert_eq!(
        store
            .record(rotated(id, 1, "at-3", Some("rt-3"), at + 100))
            .await
            .unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.refresh_token.expose_secret(), "rt-3");
    assert_eq!(a.generation, 2);
}

async fn rotated_is_superseded_when_generation_moved() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(claimed[0].generation, 0);
    // Meanwhile (our lease having run out) the account is re-imported.
    let mut reimport = new_account("tiktok", "u1", NOW + 500);
    reimport.tokens = tokens("at-import", Some("rt-import"));
    store.upsert(vec![reimport], NOW + 61).await.unwrap();
    let before = get(&store, id).await;

    let r = store
        .record(rotated(id, 0, "at-stale", Some("rt-stale"), NOW + 62))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Superseded);
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-import");
    assert_eq!(a.refresh_token.expose_secret(), "rt-import");
    assert_eq!(a.generation, before.generation);
    assert_eq!(a.updated_at, before.updated_at);
    assert_eq!(a.last_refreshed_at, None);
    assert_eq!(log_outcomes(&store, id).await[0], "superseded");
}

// ---- record: Rejected ----

async fn rejected_flags_needs_reauth_when_generation_matches() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let r = store
        .record(Outcome::Rejected {
            account_id: id,
            generation: 0,
            reason: ReauthReason::InvalidGrant,
            at: NOW + 1,
            error: "invalid_grant: revoked".into(),
            http_status: Some(400),
            duration_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(r, Recorded::Applied);
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    assert_eq!(a.reauth_flagged_at, Some(NOW + 1));
    assert_eq!(a.last_error.as_deref(), Some("invalid_grant: revoked"));
    assert_eq!(a.failures, 1);
    assert_eq!(a.access_token.expose_secret(), "at-u1", "tokens untouched");
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(log_outcomes(&store, id).await[0], "reauth_required");
    assert!(
        store
            .claim_due(OWNER, NOW + 10_000, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn rejected_after_a_rotation_elsewhere_is_superseded() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let generation = claimed[0].generation;
    // Another process rotated the account while our refresh was in flight, so the provider
    // rejects the token we sent: it is already replaced.
    assert_eq!(
        store
            .record(rotated(
                id,
                generation,
                "at-other",
                Some("rt-other"),
                NOW + 1
            ))
            .await
            .unwrap(),
        Recorded::Applied
    );
    let r = store
        .record(Outcome::Rejected {
            account_id: id,
            generation,
            reason: ReauthReason::InvalidGrant,
            at: NOW + 2,
            error: "invalid_grant".into(),
            http_status: Some(400),
            duration_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(r, Recorded::Superseded);
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.reauth_flagged_at, None);
    assert_eq!(a.failures, 0);
    assert_eq!(a.access_token.expose_secret(), "at-other");
    assert_eq!(log_outcomes(&store, id).await[0], "superseded");
}

// ---- record: Transient, ConfigError, Released ----

async fn transient_counts_failure_and_releases_lease() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(
        store.record(transient(id, OWNER, NOW + 1)).await.unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.failures, 1);
    assert_eq!(a.next_refresh_at, NOW + 31);
    assert_eq!(a.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(a.generation, 0);
    assert_eq!(a.status, Status::Active);
    assert_eq!(lease(&store, id).await, (None, None));
    let log = store.log_entries(id, 1).await.unwrap();
    assert_eq!(log[0].outcome, "transient");
    assert_eq!(log[0].http_status, Some(503));
    assert_eq!(log[0].error.as_deref(), Some("HTTP 503"));

    // Due again at the new time, and failures keep counting.
    assert!(
        store
            .claim_due(OWNER, NOW + 30, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.claim_due(OWNER, NOW + 31, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW + 32)).await.unwrap();
    assert_eq!(get(&store, id).await.failures, 2);
}

async fn transient_with_lost_lease_leaves_row_to_new_owner() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    // Our lease ran out and another owner took the account.
    store
        .claim_due("owner-b", NOW + 100, LEASE, 10)
        .await
        .unwrap();
    let r = store.record(transient(id, OWNER, NOW + 101)).await.unwrap();
    assert_eq!(r, Recorded::LeaseLost);
    let a = get(&store, id).await;
    assert_eq!(a.failures, 0);
    assert_eq!(a.next_refresh_at, NOW);
    assert_eq!(a.last_error, None);
    assert_eq!(
        lease(&store, id).await,
        (Some("owner-b".to_string()), Some(NOW + 160))
    );
    assert_eq!(
        log_outcomes(&store, id).await[0],
        "transient",
        "still logged"
    );
}

async fn config_error_and_release_need_the_lease() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let config_error = |owner: &str| Outcome::ConfigError {
        account_id: id,
        owner: owner.into(),
        at: NOW + 1,
        next_refresh_at: NOW + 3600,
        error: "invalid_client".into(),
        http_status: Some(401),
        duration_ms: 3,
    };
    assert_eq!(
        store.record(config_error("intruder")).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));
    assert_eq!(
        store.record(config_error(OWNER)).await.unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.failures, 0, "never counted against the account");
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.next_refresh_at, NOW + 3600);
    assert_eq!(a.last_error.as_deref(), Some("invalid_client"));
    assert_eq!(lease(&store, id).await, (None, None));

    store.claim_due(OWNER, NOW + 3600, LEASE, 10).await.unwrap();
    let release = |owner: &str| Outcome::Released {
        account_id: id,
        owner: owner.into(),
    };
    store.record(release("intruder")).await.unwrap();
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));
    store.record(release(OWNER)).await.unwrap();
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(
        ids(&store
            .claim_due("owner-b", NOW + 3600, LEASE, 10)
            .await
            .unwrap()),
        [id]
    );
}

// ---- group commit ----

async fn concurrent_records_are_all_committed() {
    let (_dir, store) = temp_store().await;
    let accounts = (0..200)
        .map(|i| new_account("tiktok", &format!("u{i}"), NOW))
        .collect();
    let ids = insert(&store, accounts).await;
    let claimed = store.claim_due(OWNER, NOW, LEASE, 500).await.unwrap();
    assert_eq!(claimed.len(), 200);

    let tasks: Vec<_> = claimed
        .iter()
        .map(|a| {
            let store = store.clone();
            let outcome = rotated(a.id, a.generation, &format!("new-{}", a.id), None, NOW + 1);
            tokio::spawn(async move { store.record(outcome).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Recorded::Applied);
    }
    for id in ids {
        let a = get(&store, id).await;
        assert_eq!(a.access_token.expose_secret(), format!("new-{id}"));
        assert_eq!(a.generation, 1);
    }
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM accounts WHERE lease_owner IS NULL AND generation = ?1",
            1
        )
        .await,
        Some(200)
    );
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM refresh_log WHERE outcome = 'rotated' AND ?1 = ?1",
            0
        )
        .await,
        Some(200)
    );
}

// ---- recovery ----

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

    let locker = lock_writes(&db);
    let r = store
        .record(rotated(id, 0, "at-deferred", Some("rt-deferred"), NOW + 1))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Deferred);
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

// ---- sweep ----

async fn sweep_flags_expiring_and_expired_refresh_tokens_once() {
    let (_dir, store) = temp_store().await;
    let with_refresh_life = |subject: &str, status: Status, obtained_at: i64, life: i64| {
        let mut a = new_account("tiktok", subject, NOW + 5000);
        a.status = status;
        a.obtained_at = obtained_at;
        a.tokens.refresh_expires_in = Some(life);
        a
    };
    let id = insert(
        &store,
        vec![
            with_refresh_life("soon", Status::Active, NOW, 1000),
            with_refresh_life("over", Status::Active, NOW - 100, 99),
            new_account("tiktok", "no-lifetime", NOW + 5000),
            with_refresh_life("far", Status::Active, NOW, 100_000),
            with_refresh_life("was-expiring", Status::Expiring, NOW - 100, 50),
            with_refresh_life("disabled", Status::Disabled, NOW - 100, 50),
        ],
    )
    .await;
    let (soon, over, none, far, was_expiring, disabled) =
        (id[0], id[1], id[2], id[3], id[4], id[5]);
    let window = Duration::from_secs(3600);

    let report = store.sweep(NOW, window).await.unwrap();
    let summary_ids = |v: &[AccountSummary]| {
        let mut ids: Vec<i64> = v.iter().map(|a| a.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(summary_ids(&report.expiring), [soon]);
    assert_eq!(summary_ids(&report.expired), [over, was_expiring]);
    assert_eq!(report.expiring[0].status, Status::Expiring);

    let a = get(&store, soon).await;
    assert_eq!(a.status, Status::Expiring);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
    assert_eq!(a.reauth_flagged_at, Some(NOW));
    for id in [over, was_expiring] {
        let a = get(&store, id).await;
        assert_eq!(a.status, Status::NeedsReauth);
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
        // The error shown is the one that decided the status.
        assert_eq!(
            a.last_error,
            Some(format!(
                "refresh token expired at {}",
                crate::clock::rfc3339(a.refresh_expires_at.unwrap())
            ))
        );
        assert_eq!(log_outcomes(&store, id).await[0], "reauth_required");
    }
    for id in [none, far] {
        let a = get(&store, id).await;
        assert_eq!(a.status, Status::Active);
        assert_eq!(a.reauth_reason, None);
        assert_eq!(log_outcomes(&store, id).await, ["imported"]);
    }
    assert_eq!(get(&store, disabled).await.status, Status::Disabled);
    assert_eq!(
        log_outcomes(&store, soon).await,
        ["reauth_required", "imported"]
    );

    let again = store.sweep(NOW + 1, window).await.unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(log_outcomes(&store, soon).await.len(), 2);

    // Once its refresh token has ended, the expiring account is reported as expired.
    let later = store.sweep(NOW + 1000, window).await.unwrap();
    assert_eq!(summary_ids(&later.expired), [soon]);
    assert!(later.expiring.is_empty());
    assert_eq!(
        store.flagged_ids().await.unwrap(),
        [
            (soon, Status::NeedsReauth),
            (over, Status::NeedsReauth),
            (was_expiring, Status::NeedsReauth)
        ]
    );
}

// ---- admin operations ----

async fn mark_due_needs_force_for_flagged_accounts() {
    let (_dir, store) = temp_store().await;
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        reauth_reason: Some(ReauthReason::InvalidGrant),
        ..new_account("tiktok", "flagged", NOW + 5000)
    };
    let id = insert(
        &store,
        vec![flagged, new_account("tiktok", "ok", NOW + 5000)],
    )
    .await;
    let (flagged, ok) = (id[0], id[1]);

    let err = store.mark_due(flagged, NOW, false).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(get(&store, flagged).await.status, Status::NeedsReauth);
    assert_eq!(get(&store, flagged).await.next_refresh_at, NOW + 5000);

    assert_eq!(
        store.mark_due(flagged, NOW, true).await.unwrap(),
        Status::NeedsReauth
    );
    let a = get(&store, flagged).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.failures, 0, "a forced retry starts a fresh failure count");
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.reauth_flagged_at, None);
    assert_eq!(a.next_refresh_at, NOW);
    assert_eq!(log_outcomes(&store, flagged).await[0], "marked_due");

    assert_eq!(
        store.mark_due(ok, NOW, false).await.unwrap(),
        Status::Active
    );
    assert_eq!(get(&store, ok).await.next_refresh_at, NOW);
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed).len(), 2);

    assert!(matches!(
        store.mark_due(9999, NOW, true).await,
        Err(StoreError::NotFound(9999))
    ));
}

async fn remove_deletes_account_and_its_log() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("tiktok", "u1", NOW),
            new_account("tiktok", "u2", NOW),
        ],
    )
    .await;
    store.remove(id[0]).await.unwrap();
    assert!(store.get(id[0]).await.unwrap().is_none());
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM refresh_log WHERE account_id = ?1",
            id[0]
        )
        .await,
        Some(0)
    );
    assert_eq!(
        log_outcomes(&store, id[1]).await,
        ["imported"],
        "others kept"
    );
    assert!(store.get(id[1]).await.unwrap().is_some());

    let err = store.remove(id[0]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(i) if i == id[0]),
        "{err:?}"
    );
}

async fn list_pages_and_filters() {
    let (_dir, store) = temp_store().await;
    let with_status = |provider: &str, subject: &str, status: Status| NewAccount {
        status,
        ..new_account(provider, subject, NOW)
    };
    let id = insert(
        &store,
        vec![
            with_status("tiktok", "a", Status::Active),
            with_status("tiktok", "b", Status::NeedsReauth),
            with_status("other", "c", Status::Expiring),
            with_status("tiktok", "d", Status::Disabled),
            with_status("tiktok", "e", Status::Active),
        ],
    )
    .await;
    let list = |filter: ListFilter, after: i64, page: usize| {
        let store = store.clone();
        async move {
            let v = store.list(filter, after, page).await.unwrap();
            v.into_iter().map(|a| a.id).collect::<Vec<_>>()
        }
    };

    assert_eq!(list(ListFilter::default(), 0, 2).await, [id[0], id[1]]);
    assert_eq!(list(ListFilter::default(), id[1], 2).await, [id[2], id[3]]);
    assert_eq!(list(ListFilter::default(), id[3], 2).await, [id[4]]);
    assert!(list(ListFilter::default(), id[4], 2).await.is_empty());

    let tiktok = ListFilter {
        provider: Some("tiktok".into()),
        ..Default::default()
    };
    assert_eq!(
        list(tiktok.clone(), 0, 100).await,
        [id[0], id[1], id[3], id[4]]
    );
    assert_eq!(list(tiktok.clone(), id[1], 1).await, [id[3]]);
    let active = ListFilter {
        status: Some(Status::Active),
        ..Default::default()
    };
    assert_eq!(list(active, 0, 100).await, [id[0], id[4]]);
    let human = ListFilter {
        needs_reauth: true,
        ..Default::default()
    };
    assert_eq!(list(human, 0, 100).await, [id[1], id[2]]);
    let tiktok_human = ListFilter {
        needs_reauth: true,
        ..tiktok
    };
    assert_eq!(list(tiktok_human, 0, 100).await, [id[1]]);

    let page = store.list(ListFilter::default(), 0, 1).await.unwrap();
    assert_eq!(page[0].subject, "a");
    assert_eq!(page[0].provider, "tiktok");
    assert_eq!(page[0].scope, "user.info");
    assert_eq!(page[0].access_expires_at, NOW + 3600);
}

async fn log_entries_are_newest_first() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW + 10)).await.unwrap();
    store.claim_due(OWNER, NOW + 40, LEASE, 10).await.unwrap();
    store
        .record(rotated(id, 0, "at-2", None, NOW + 50))
        .await
        .unwrap();
    // Same second as the rotation: the later entry still comes first.
    store.mark_due(id, NOW + 50, false).await.unwrap();

    let log = store.log_entries(id, 10).await.unwrap();
    let seen: Vec<(&str, i64)> = log.iter().map(|e| (e.outcome.as_str(), e.at)).collect();
    assert_eq!(
        seen,
        [
            ("marked_due", NOW + 50),
            ("rotated", NOW + 50),
            ("transient", NOW + 10),
            ("imported", NOW)
        ]
    );
    assert_eq!(store.log_entries(id, 2).await.unwrap().len(), 2);
    assert!(store.log_entries(id + 1, 10).await.unwrap().is_empty());
}

async fn counts_group_by_provider_and_status() {
    let (_dir, store) = temp_store().await;
    assert!(store.counts().await.unwrap().is_empty());
    let with_status = |provider: &str, subject: &str, status: Status| NewAccount {
        status,
        ..new_account(provider, subject, NOW)
    };
    insert(
        &store,
        vec![
            with_status("tiktok", "a", Status::Active),
            with_status("tiktok", "b", Status::Active),
            with_status("tiktok", "c", Status::NeedsReauth),
            with_status("other", "d", Status::Active),
        ],
    )
    .await;
    assert_eq!(
        store.counts().await.unwrap(),
        [
            ("other".to_string(), Status::Active, 1),
            ("tiktok".to_string(), Status::Active, 2),
            ("tiktok".to_string(), Status::NeedsReauth, 1),
        ]
    );
}

async fn next_due_skips_held_leases_and_flagged_accounts() {
    let (_dir, store) = temp_store().await;
    assert_eq!(store.next_due(NOW).await.unwrap(), None);
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        ..new_account("tiktok", "flagged", NOW + 10)
    };
    insert(
        &store,
        vec![
            new_account("tiktok", "later", NOW + 100),
            new_account("tiktok", "sooner", NOW + 50),
            flagged,
        ],
    )
    .await;
    assert_eq!(store.next_due(NOW).await.unwrap(), Some(NOW + 50));

    // Another process holds "sooner" until NOW + 110.
    let held = store
        .claim_due("owner-b", NOW + 50, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(store.next_due(NOW + 60).await.unwrap(), Some(NOW + 100));
    // Once that lease has run out, it counts again.
    assert_eq!(store.next_due(NOW + 110).await.unwrap(), Some(NOW + 50));
}

async fn prune_log_deletes_older_entries() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.record(transient(id, OWNER, NOW + 10)).await.unwrap();
    store.record(transient(id, OWNER, NOW + 20)).await.unwrap();
    let left = |store: Store| async move {
        let log = store.log_entries(id, 10).await.unwrap();
        log.iter().map(|e| e.at).collect::<Vec<_>>()
    };
    // Strictly older than the cutoff only.
    assert_eq!(store.prune_log(NOW + 10).await.unwrap(), 1);
    assert_eq!(left(store.clone()).await, [NOW + 20, NOW + 10]);
    assert_eq!(store.prune_log(NOW + 15).await.unwrap(), 1);
    assert_eq!(left(store.clone()).await, [NOW + 20]);
    assert_eq!(store.prune_log(NOW + 15).await.unwrap(), 0);
    assert!(store.get(id).await.unwrap().is_some(), "accounts untouched");
}

async fn mark_due_never_reenables_a_disabled_account() {
    let (_dir, store) = temp_store().await;
    let disabled = NewAccount {
        status: Status::Disabled,
        ..new_account("tiktok", "off", NOW + 5000)
    };
    let id = insert(&store, vec![disabled]).await[0];
    for force in [false, true] {
        let err = store.mark_due(id, NOW, force).await.unwrap_err();
        assert!(err.to_string().contains("disabled"), "{err}");
        assert_eq!(get(&store, id).await.status, Status::Disabled);
    }
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

async fn upsert_refuses_tokens_older_than_the_last_refresh() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store
        .record(rotated(id, 0, "at-new", Some("rt-new"), NOW + 100))
        .await
        .unwrap();
    // An export taken before that rotation.
    let mut old = new_account("tiktok", "u1", NOW);
    old.obtained_at = NOW + 50;
    let err = store.upsert(vec![old], NOW + 200).await.unwrap_err();
    assert!(err.to_string().contains("refreshed after"), "{err}");
    assert_eq!(
        get(&store, id).await.refresh_token.expose_secret(),
        "rt-new"
    );
}

async fn connect_states_are_single_use_expire_and_any_handle_takes_them() {
    let (dir, store) = temp_store().await;
    // Another process on the same store: the callback may reach any replica.
    let other = Store::open(options(&dir)).await.unwrap();
    let pending = |provider: &str, expires_at: i64| PendingConnect {
        provider: provider.into(),
        verifier: Some(SecretString::from("verifier-1")),
        label: Some("shop".into()),
        account: Some(7),
        scopes: vec!["user.info.basic".into(), "video.list".into()],
        expires_at,
    };
    for k in ["k1", "k2", "k3"] {
        assert!(
            store
                .connect_state_put(k, pending("tiktok", 100), 0, 10)
                .await
                .unwrap()
        );
    }
    let taken = other
        .connect_state_take("k1", "tiktok", 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.verifier.unwrap().expose_secret(), "verifier-1");
    assert_eq!(
        (taken.label.as_deref(), taken.account),
        (Some("shop"), Some(7))
    );
    assert_eq!(taken.scopes, ["user.info.basic", "video.list"]);
    let problem = |r: Result<PendingConnect, StateProblem>| r.err();
    assert_eq!(
        problem(store.connect_state_take("k1", "tiktok", 50).await.unwrap()),
        Some(StateProblem::Replayed)
    );
    assert_eq!(
        problem(store.connect_state_take("k2", "tiktok", 101).await.unwrap()),
        Some(StateProblem::Expired)
    );
    assert_eq!(
        problem(store.connect_state_take("nope", "tiktok", 0).await.unwrap()),
        Some(StateProblem::Unknown)
    );
    assert_eq!(
        problem(other.connect_state_take("k3", "google", 0).await.unwrap()),
        Some(StateProblem::WrongProvider)
    );
    // A state refused once is spent: the right provider cannot use it afterwards.
    assert_eq!(
        problem(store.connect_state_take("k3", "tiktok", 0).await.unwrap()),
        Some(StateProblem::Replayed)
    );
    // At most `max_open` in progress; spent and expired ones do not count.
    assert!(
        store
            .connect_state_put("k4", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .connect_state_put("k5", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .connect_state_put("k6", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    // Long after expiry they are forgotten (a replay then reads as unknown).
    let later = 100 + CONNECT_REMEMBER + 1;
    assert!(
        store
            .connect_state_put("k7", pending("tiktok", later + 100), later, 2)
            .await
            .unwrap()
    );
    assert_eq!(
        problem(
            store
                .connect_state_take("k1", "tiktok", later)
                .await
                .unwrap()
        ),
        Some(StateProblem::Unknown)
    );
    other.close().await;
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

on_both_backends!(
    transient_with_a_lost_answer_keeps_the_lease_until_the_retry_and_records_the_window,
    replicas_opening_a_fresh_store_together_migrate_it_once,
    connect_states_are_single_use_expire_and_any_handle_takes_them,
    upsert_inserts_then_updates_by_provider_and_subject,
    upsert_refused_under_a_live_lease_then_clears_lease_and_failures,
    upsert_is_all_or_nothing,
    claim_due_takes_due_refreshable_accounts_in_order,
    claim_due_except_leaves_out_saturated_providers,
    claim_due_respects_limit,
    claim_due_lease_blocks_other_owners_until_it_expires,
    rotated_applies_when_generation_matches,
    rotated_is_superseded_when_generation_moved,
    rejected_flags_needs_reauth_when_generation_matches,
    rejected_after_a_rotation_elsewhere_is_superseded,
    transient_counts_failure_and_releases_lease,
    transient_with_lost_lease_leaves_row_to_new_owner,
    config_error_and_release_need_the_lease,
    replay_skips_a_rotation_already_committed,
    garbled_recovery_line_fails_open_with_path_and_line,
    torn_last_recovery_line_is_ignored,
    sweep_flags_expiring_and_expired_refresh_tokens_once,
    mark_due_needs_force_for_flagged_accounts,
    remove_deletes_account_and_its_log,
    list_pages_and_filters,
    log_entries_are_newest_first,
    counts_group_by_provider_and_status,
    next_due_skips_held_leases_and_flagged_accounts,
    prune_log_deletes_older_entries,
    mark_due_never_reenables_a_disabled_account,
    upsert_refuses_tokens_older_than_the_last_refresh
);

mod concurrent_records_are_all_committed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        super::POSTGRES
            .scope(None, super::concurrent_records_are_all_committed())
            .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        let test = "store::tests::concurrent_records_are_all_committed::postgres";
        if let Some(url) = refreshd_testkit::postgres_schema(test).await {
            super::POSTGRES
                .scope(Some(url), super::concurrent_records_are_all_committed())
                .await
        }
    }
}

#[test]
fn both_backends_know_the_same_migrations() {
    // One version number means the same schema on SQLite and PostgreSQL (store copy).
    assert_eq!(schema::MIGRATIONS.len(), postgres::MIGRATIONS.len());
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
            sqlite::sealing_key_ids(conn)
        })
        .await
        .unwrap();
    let mut found = found;
    found.sort();
    assert_eq!(found, ["00000000000000aa", "00000000000000bb"]);
}

async fn transient_with_a_lost_answer_keeps_the_lease_until_the_retry_and_records_the_window() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let retry = NOW + 30;
    let mut lost = transient(id, OWNER, NOW);
    if let Outcome::Transient { answer_lost, .. } = &mut lost {
        *answer_lost = true;
    }
    assert_eq!(store.record(lost).await.unwrap(), Recorded::Applied);
    assert_eq!(lease(&store, id).await, (Some(OWNER.into()), Some(retry)));
    // The engine still wakes for the retry, and nobody claims the account before it.
    assert_eq!(store.next_due(NOW + 1).await.unwrap(), Some(retry));
    assert!(
        store
            .claim_due("other", retry - 1, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.claim_due("other", retry, LEASE, 10).await.unwrap();
    assert_eq!(again[0].interrupted_at, Some(retry));

    // A plain transient failure right after keeps the window on record too...
    store.record(transient(id, "other", retry)).await.unwrap();
    let third = store.claim_due(OWNER, retry + 30, LEASE, 10).await.unwrap();
    assert_eq!(third[0].interrupted_at, Some(retry + 30));
    // ...until an attempt ends otherwise: a rotation gives the lease back for good.
    store
        .record(rotated(
            id,
            third[0].generation,
            "at-2",
            Some("rt-2"),
            retry + 31,
        ))
        .await
        .unwrap();
    assert_eq!(lease(&store, id).await, (None, None));
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
    assert!(check::report(&opts.path, false).iter().all(|(_, ok)| *ok));
    garble_page(&opts.path, 2);
    for full in [false, true] {
        let report = check::report(&opts.path, full);
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
    assert!(b.owner().starts_with(liveness::MARKER), "{}", b.owner());
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
    // A few more checks: the live replica and the old-style owner keep their leases.
    tokio::time::sleep(Duration::from_millis(2500)).await;
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
    let key = liveness::key_of(b.owner()).unwrap();
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

//! The SQLite worker carries its callers' spans; the queries on `:memory:`.

use super::{SqliteStore, queries, schema, writes};
use crate::crypto::Keyring;
use crate::model::{Status, TokenSet};
use crate::store::deferred::Health;
use crate::store::types::{NewAccount, Outcome, Recorded, StoreOptions};
use rusqlite::{Connection, TransactionBehavior};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::Instrument;

const NOW: i64 = 1_700_000_000;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of the process from now on: the worker is another thread, so only a
/// global subscriber sees its lines (tests that install their own keep theirs).
fn captured() -> &'static Buf {
    static BUF: OnceLock<Buf> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Buf::default();
        let writer = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        buf
    })
}

#[tokio::test]
async fn a_log_line_of_a_store_job_carries_the_callers_span() {
    let buf = captured();
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        path: dir.path().join("refreshd.db"),
        busy_timeout: Duration::from_secs(5),
        keyring: Keyring::default(),
        postgres: None,
    };
    let health = Arc::new(Health::default());
    let store = SqliteStore::start(opts, "me".into(), health, false)
        .await
        .unwrap();
    let span = tracing::info_span!("refresh", account = 424_242);
    let worker = store
        .call(|_| {
            tracing::info!("store job probe");
            Ok(std::thread::current().name().map(str::to_string))
        })
        .instrument(span)
        .await
        .unwrap();
    assert_eq!(
        worker.as_deref(),
        Some("refreshd-store"),
        "ran on the worker"
    );
    // Without a span around the call, the job's line carries none.
    store
        .call(|_| {
            tracing::info!("store job probe without span");
            Ok(())
        })
        .await
        .unwrap();
    store.close().await;
    let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = |probe: &str| {
        logged
            .lines()
            .find(|l| l.ends_with(probe))
            .unwrap_or_else(|| panic!("no line {probe:?} in {logged}"))
            .to_string()
    };
    assert!(
        line("store job probe").contains("refresh{account=424242}"),
        "{logged}"
    );
    assert!(
        !line("store job probe without span").contains("account=424242"),
        "{logged}"
    );
}

fn memory() -> Connection {
    let mut c = Connection::open_in_memory().unwrap();
    schema::migrate(&mut c).unwrap();
    c
}

fn account(subject: &str) -> NewAccount {
    NewAccount {
        provider: "tiktok".into(),
        subject: subject.into(),
        label: None,
        tokens: TokenSet {
            access_token: SecretString::from(format!("at-{subject}")),
            refresh_token: Some(SecretString::from(format!("rt-{subject}"))),
            expires_in: 3600,
            refresh_expires_in: Some(100),
            subject: None,
            scope: None,
            token_type: "Bearer".into(),
        },
        obtained_at: NOW,
        next_refresh_at: NOW,
        status: Status::Active,
        reauth_reason: None,
    }
}

fn upsert(c: &mut Connection, accounts: &[NewAccount]) -> Vec<i64> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let ids = writes::upsert(&tx, &Keyring::default(), accounts, NOW).unwrap();
    tx.commit().unwrap();
    ids.into_iter().map(|(id, _)| id).collect()
}

#[test]
fn a_claimed_account_takes_its_rotation_once() {
    let mut c = memory();
    let keys = Keyring::default();
    let id = upsert(&mut c, &[account("u1")])[0];
    let claimed =
        queries::claim_due_except(&c, &keys, "me:1", NOW, NOW + 60, 10, &[], &[]).unwrap();
    assert_eq!(claimed.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
    let rotated = Outcome::Rotated {
        account_id: id,
        generation: claimed[0].generation,
        tokens: TokenSet {
            access_token: SecretString::from("at-new"),
            ..account("u1").tokens
        },
        at: NOW + 1,
        next_refresh_at: NOW + 3000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 5,
    };
    assert_eq!(
        writes::record(&c, &keys, &rotated).unwrap(),
        Recorded::Applied
    );
    assert_eq!(
        writes::record(&c, &keys, &rotated).unwrap(),
        Recorded::Superseded
    );
    let a = queries::get(&c, &keys, id).unwrap().unwrap();
    assert_eq!(a.access_token.expose_secret(), "at-new");
    assert_eq!((a.generation, a.next_refresh_at), (1, NOW + 3000));
    let log: Vec<String> = queries::log_entries(&c, id, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(log, ["superseded", "rotated", "imported"]);
}

#[test]
fn the_sweep_flags_an_ended_refresh_token_once() {
    let mut c = memory();
    let id = upsert(&mut c, &[account("u1")])[0];
    let sweep = |c: &mut Connection| {
        let tx = c.transaction().unwrap();
        let r = queries::sweep(&tx, NOW + 100, NOW + 200).unwrap();
        tx.commit().unwrap();
        r
    };
    let first = sweep(&mut c);
    assert_eq!(first.expired.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
    assert!(sweep(&mut c).expired.is_empty());
    let flagged = queries::flagged_ids(&c).unwrap();
    assert_eq!(flagged, [(id, Status::NeedsReauth)]);
}

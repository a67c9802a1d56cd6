//! The SQLite worker: its callers' spans, group commits and claims, the checkpoint thread,
//! close; the queries on `:memory:`.

use super::{Opening, SqliteStore, claim, queries, schema, writes};
use crate::crypto::Keyring;
use crate::model::{Status, TokenSet};
use crate::store::deferred::Health;
use crate::store::types::{NewAccount, Outcome, Recorded, StoreOptions};
use crate::telemetry::capture;
use rusqlite::{Connection, TransactionBehavior};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

const NOW: i64 = 1_700_000_000;

/// A store file in `dir`, without keys.
fn file_options(dir: &std::path::Path) -> StoreOptions {
    StoreOptions {
        path: dir.join("refreshd.db"),
        busy_timeout: Duration::from_secs(5),
        keyring: Keyring::default(),
        postgres: None,
    }
}

#[tokio::test]
async fn a_log_line_of_a_store_job_carries_the_callers_span() {
    let buf = capture::global();
    let dir = tempfile::tempdir().unwrap();
    let opts = file_options(dir.path());
    let health = Arc::new(Health::default());
    let store = SqliteStore::start(opts, "me".into(), health, Opening::Checked)
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
    let logged = buf.text();
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
        queries::claim_due_except(&c, &keys, "me:1", NOW, NOW, NOW + 60, 10, &[], &[]).unwrap();
    assert_eq!(claimed.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
    let rotated = rotation_of(&claimed[0]);
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
        let r = queries::sweep(&tx, NOW + 100, NOW + 200, 10).unwrap();
        tx.commit().unwrap();
        r
    };
    let first = sweep(&mut c);
    assert_eq!(first.expired.iter().map(|a| a.id).collect::<Vec<_>>(), [id]);
    assert!(sweep(&mut c).expired.is_empty());
    let flagged = queries::flagged_ids(&c).unwrap();
    assert_eq!(flagged, [(id, Status::NeedsReauth)]);
}

fn claim_for(owner: &str, limit: usize) -> claim::Claim {
    claim::Claim {
        owner: owner.into(),
        now: NOW,
        due_by: NOW,
        lease_until: NOW + 60,
        limit,
        skip: Vec::new(),
        exclude: Vec::new(),
        dead: Vec::new(),
    }
}

/// A rotation of the claimed `a`: new access and refresh tokens, due again in 50 minutes.
fn rotation_of(a: &crate::model::Account) -> Outcome {
    Outcome::Rotated {
        account_id: a.id,
        generation: a.generation,
        tokens: TokenSet {
            access_token: SecretString::from("at-new"),
            refresh_token: Some(SecretString::from("rt-new")),
            ..account(&a.subject).tokens
        },
        at: NOW + 1,
        next_refresh_at: NOW + 3000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 5,
    }
}

#[test]
fn one_transaction_commits_the_outcomes_then_claims_what_is_due() {
    let mut c = memory();
    let keys = Keyring::default();
    let ids = upsert(&mut c, &[account("a"), account("b")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 1)).unwrap();
    let done = rotation_of(&first[0]);
    let (results, claimed) =
        claim::commit_group(&mut c, &keys, &[&done], Some(&claim_for("me:2", 10))).unwrap();
    assert_eq!(results, [Recorded::Applied]);
    // The rotated account is not due any more; the other one is claimed by the same commit.
    let other = *ids.iter().find(|&&id| id != first[0].id).unwrap();
    let claimed: Vec<i64> = claimed.unwrap().unwrap().iter().map(|a| a.id).collect();
    assert_eq!(claimed, [other]);
    let a = queries::get(&c, &keys, first[0].id).unwrap().unwrap();
    assert_eq!(a.refresh_token.expose_secret(), "rt-new");
    let owner: Option<String> = c
        .query_row(
            "SELECT lease_owner FROM accounts WHERE id = ?1",
            [other],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(owner.as_deref(), Some("me:2"));
}

#[test]
fn a_failing_claim_is_rolled_back_alone_and_the_outcomes_stay_committed() {
    let mut c = memory();
    let keys = Keyring::default();
    upsert(&mut c, &[account("a"), account("b")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 1)).unwrap();
    // Any new lease fails: the claim breaks, a rotation (which ends its lease) does not.
    c.execute_batch(
        "CREATE TEMP TRIGGER no_claims BEFORE UPDATE OF lease_owner ON accounts
         WHEN NEW.lease_owner IS NOT NULL BEGIN SELECT RAISE(ABORT, 'no claims'); END;",
    )
    .unwrap();
    let done = rotation_of(&first[0]);
    let (results, claimed) =
        claim::commit_group(&mut c, &keys, &[&done], Some(&claim_for("me:2", 10))).unwrap();
    assert_eq!(results, [Recorded::Applied]);
    assert!(claimed.unwrap().is_err());
    let a = queries::get(&c, &keys, first[0].id).unwrap().unwrap();
    assert_eq!(a.refresh_token.expose_secret(), "rt-new");
    let leased: i64 = c
        .query_row(
            "SELECT count(*) FROM accounts WHERE lease_owner IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leased, 0, "the failed claim left no lease");
}

#[test]
fn a_claim_whose_failure_ended_the_transaction_fails_the_group_with_its_own_error() {
    let mut c = memory();
    let keys = Keyring::default();
    upsert(&mut c, &[account("a"), account("b")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 1)).unwrap();
    // RAISE(ROLLBACK) ends the whole transaction, as SQLite does on some I/O errors.
    c.execute_batch(
        "CREATE TEMP TRIGGER claim_ends_all BEFORE UPDATE OF lease_owner ON accounts
         WHEN NEW.lease_owner IS NOT NULL BEGIN SELECT RAISE(ROLLBACK, 'claim ended all'); END;",
    )
    .unwrap();
    let done = rotation_of(&first[0]);
    let err = claim::commit_group(&mut c, &keys, &[&done], Some(&claim_for("me:2", 10)))
        .expect_err("the outcomes were rolled back with the claim");
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.contains("claim ended all"), "its own error: {text}");
    assert!(c.is_autocommit());
    let a = queries::get(&c, &keys, first[0].id).unwrap().unwrap();
    assert_ne!(
        a.refresh_token.expose_secret(),
        "rt-new",
        "nothing half-applied"
    );
}

#[test]
fn a_transaction_left_open_is_rolled_back_before_the_next_group() {
    let mut c = memory();
    let keys = Keyring::default();
    upsert(&mut c, &[account("a")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 1)).unwrap();
    c.execute_batch("BEGIN; UPDATE accounts SET subject = 'stray';")
        .unwrap();
    let done = rotation_of(&first[0]);
    let (results, _) = claim::commit_group(&mut c, &keys, &[&done], None).unwrap();
    assert_eq!(results, [Recorded::Applied]);
    let a = queries::get(&c, &keys, first[0].id).unwrap().unwrap();
    assert_eq!(a.subject, "a", "the stray transaction was not committed");
    assert_eq!(a.refresh_token.expose_secret(), "rt-new");
}

#[test]
fn a_failing_outcome_rolls_the_whole_group_back_and_the_next_group_commits() {
    let mut c = memory();
    let keys = Keyring::default();
    upsert(&mut c, &[account("a"), account("b")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 2)).unwrap();
    c.execute_batch(
        "CREATE TEMP TRIGGER no_rotation BEFORE UPDATE OF access_token ON accounts
         WHEN NEW.access_token <> OLD.access_token AND NEW.id = OLD.id AND OLD.subject = 'b'
         BEGIN SELECT RAISE(ABORT, 'no rotation'); END;",
    )
    .unwrap();
    let (a, b) = match first[0].subject.as_str() {
        "a" => (&first[0], &first[1]),
        _ => (&first[1], &first[0]),
    };
    let (done_a, done_b) = (rotation_of(a), rotation_of(b));
    assert!(claim::commit_group(&mut c, &keys, &[&done_a, &done_b], None).is_err());
    assert!(
        c.is_autocommit(),
        "the failed group's transaction is closed"
    );
    let kept = queries::get(&c, &keys, a.id).unwrap().unwrap();
    assert_ne!(
        kept.refresh_token.expose_secret(),
        "rt-new",
        "nothing of the failed group stays"
    );
    let (results, _) = claim::commit_group(&mut c, &keys, &[&done_a], None).unwrap();
    assert_eq!(results, [Recorded::Applied]);
    // The group's transaction statements come from the cache, prepared once.
    for (sql, runs) in [("BEGIN IMMEDIATE", 2), ("ROLLBACK", 1), ("COMMIT", 1)] {
        let ran = c
            .prepare_cached(sql)
            .unwrap()
            .get_status(rusqlite::StatementStatus::Run);
        assert_eq!(ran, runs, "{sql} ran from the cache");
    }
}

#[test]
fn the_claim_statement_is_prepared_once() {
    let dir = tempfile::tempdir().unwrap();
    let opts = file_options(dir.path());
    let mut c = super::connect(&opts).unwrap();
    schema::migrate(&mut c).unwrap();
    let keys = Keyring::default();
    let subjects: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    upsert(
        &mut c,
        &subjects.iter().map(|s| account(s)).collect::<Vec<_>>(),
    );
    let skip = ["other".to_string()];
    for (i, limit) in [1, 2, 3, 5, 8].into_iter().enumerate() {
        let owner = format!("me:{i}");
        let now = NOW + i as i64;
        queries::claim_due_except(
            &c,
            &keys,
            &owner,
            now,
            now,
            now + 60,
            limit,
            &skip,
            &[i as i64],
        )
        .unwrap();
    }
    for (i, limit) in [1, 2, 3, 5, 8].into_iter().enumerate() {
        let now = NOW + 10 + i as i64;
        queries::claim_due_except(&c, &keys, "me:9", now, now, now + 60, limit, &skip, &[])
            .unwrap();
    }
    for exclude in [true, false] {
        let stmt = c
            .prepare_cached(&queries::claim_sql(&skip, exclude))
            .unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
        assert!(stmt.get_status(rusqlite::StatementStatus::Run) >= 5);
    }
}

#[test]
fn a_claim_leaves_out_the_accounts_it_is_told_to() {
    let mut c = memory();
    let keys = Keyring::default();
    let ids = upsert(&mut c, &[account("u1"), account("u2"), account("u3")]);
    let claim = |owner: &str, exclude: &[i64]| -> Vec<i64> {
        queries::claim_due_except(&c, &keys, owner, NOW, NOW, NOW + 60, 10, &[], exclude)
            .unwrap()
            .iter()
            .map(|a| a.id)
            .collect()
    };
    let mut first = claim("me:1", &[ids[1]]);
    first.sort_unstable();
    assert_eq!(
        first,
        [ids[0], ids[2]],
        "the excluded account stays unleased"
    );
    assert_eq!(
        claim("me:2", &[]),
        [ids[1]],
        "with nothing excluded (the statement without the exclusion clause) it is claimed"
    );
}

/// Records, in `order`, when the task it belongs to is woken.
struct Woken(&'static str, Arc<Mutex<Vec<&'static str>>>);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.1.lock().unwrap().push(self.0);
    }
}

/// Polls `f` once (it must wait), as task `name`, whose wake is noted in `order`.
fn poll_as<F: std::future::Future + Unpin>(
    f: &mut F,
    name: &'static str,
    order: &Arc<Mutex<Vec<&'static str>>>,
) {
    let waker = std::task::Waker::from(Arc::new(Woken(name, order.clone())));
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(std::pin::Pin::new(f).poll(&mut cx).is_pending());
}

#[test]
fn a_group_answers_its_claim_before_its_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = memory();
    let keys = Keyring::default();
    upsert(&mut c, &[account("a"), account("b")]);
    let first = claim::run(&c, &keys, &claim_for("me:1", 1)).unwrap();
    let health = Arc::new(Health::default());
    let mut worker = super::Worker::new(&file_options(dir.path()), "me", None, health, None);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (record_tx, mut record_rx) = tokio::sync::oneshot::channel();
    let (claim_tx, mut claim_rx) = tokio::sync::oneshot::channel();
    poll_as(&mut record_rx, "outcome", &order);
    poll_as(&mut claim_rx, "claim", &order);
    let claim = claim_for("me:2", 10);
    let outcomes = vec![(rotation_of(&first[0]), record_tx)];
    let unanswered = worker.commit_group(&mut c, outcomes, Some((&claim, claim_tx)));
    assert!(unanswered.is_none(), "the claim ran in the group");
    assert_eq!(*order.lock().unwrap(), ["claim", "outcome"]);
    assert_eq!(claim_rx.try_recv().unwrap().unwrap().len(), 1);
    assert_eq!(record_rx.try_recv().unwrap().unwrap(), Recorded::Applied);
}

#[tokio::test]
async fn the_worker_answers_a_claim_queued_behind_outcomes_after_committing_them() {
    let dir = tempfile::tempdir().unwrap();
    let health = Arc::new(Health::default());
    let store = SqliteStore::start(
        file_options(dir.path()),
        "me".into(),
        health,
        Opening::Checked,
    )
    .await
    .unwrap();
    let accounts = vec![account("a"), account("b")];
    store
        .in_tx("import", move |tx| {
            writes::upsert(tx, &Keyring::default(), &accounts, NOW)
        })
        .await
        .unwrap();
    let first = store.claim(claim_for("me:1", 1)).await.unwrap();
    // Hold the worker, so the outcome and the next claim wait in its queue together.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let hold = store.call(move |_| {
        held.recv().unwrap();
        Ok(())
    });
    // `join!` polls its futures in order the first time: the three jobs are queued before
    // the worker is let go.
    let (_, recorded, claimed, _) = tokio::join!(
        hold,
        store.record(rotation_of(&first[0])),
        store.claim(claim_for("me:2", 10)),
        async { release.send(()).unwrap() }
    );
    assert_eq!(recorded.unwrap(), Recorded::Applied);
    // The claim ran after the outcome: the rotated account is not due any more.
    let claimed: Vec<String> = claimed.unwrap().into_iter().map(|a| a.subject).collect();
    let other = if first[0].subject == "a" { "b" } else { "a" };
    assert_eq!(claimed, [other]);
    store.close().await;
}

/// The b-trees (tables and indexes, by name) whose pages `write` put into the WAL.
fn btrees_written(c: &Connection, write: impl FnOnce(&Connection)) -> Vec<String> {
    let wal_path = c.path().map(|p| format!("{p}-wal")).unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    write(c);
    // A WAL frame: a 24-byte header starting with the page number, then the page.
    let (header, frame) = (32, 24 + 4096);
    let wal = std::fs::read(wal_path).unwrap();
    let pages: Vec<u32> = wal[header..]
        .chunks_exact(frame)
        .map(|f| u32::from_be_bytes(f[..4].try_into().unwrap()))
        .collect();
    let mut names: Vec<String> = c
        .prepare(
            "SELECT DISTINCT name FROM dbstat WHERE pageno IN (SELECT value FROM json_each(?1))",
        )
        .unwrap()
        .query_map([serde_json::to_string(&pages).unwrap()], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names.sort();
    names
}

#[test]
fn a_rotation_rewrites_the_status_and_refresh_end_indexes_only_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = super::connect(&file_options(dir.path())).unwrap();
    schema::migrate(&mut c).unwrap();
    let keys = Keyring::default();
    // Each account's refresh token ends at NOW + 100.
    upsert(
        &mut c,
        &[account("kept"), account("moved"), account("ending")],
    );
    let claimed = claim::run(&c, &keys, &claim_for("me:1", 3)).unwrap();
    let rotation = |subject: &str, refresh_expires_in: i64, new_status: Status| {
        let mut o = rotation_of(claimed.iter().find(|a| a.subject == subject).unwrap());
        if let Outcome::Rotated { tokens, status, .. } = &mut o {
            tokens.refresh_expires_in = Some(refresh_expires_in);
            *status = new_status;
        }
        o
    };
    let record = |o: Outcome| {
        btrees_written(&c, |c| {
            assert_eq!(writes::record(c, &keys, &o).unwrap(), Recorded::Applied);
        })
    };
    // Rotations happen at NOW + 1: 99 s left is the same end.
    let kept = record(rotation("kept", 99, Status::Active));
    assert!(kept.contains(&"accounts_due".to_string()), "{kept:?}");
    assert!(!kept.contains(&"accounts_status".to_string()), "{kept:?}");
    assert!(
        !kept.contains(&"accounts_refresh_expiry".to_string()),
        "{kept:?}"
    );
    let moved = record(rotation("moved", 500, Status::Active));
    assert!(
        moved.contains(&"accounts_refresh_expiry".to_string()),
        "{moved:?}"
    );
    assert!(!moved.contains(&"accounts_status".to_string()), "{moved:?}");
    let ending = record(rotation("ending", 99, Status::Expiring));
    assert!(
        ending.contains(&"accounts_status".to_string()),
        "{ending:?}"
    );
    let stored = |subject: &str| {
        let a = queries::find(&c, &keys, "tiktok", subject)
            .unwrap()
            .unwrap();
        (a.status, a.refresh_expires_at, a.generation)
    };
    assert_eq!(stored("kept"), (Status::Active, Some(NOW + 100), 1));
    assert_eq!(stored("moved"), (Status::Active, Some(NOW + 501), 1));
    assert_eq!(stored("ending"), (Status::Expiring, Some(NOW + 100), 1));
}

/// The write gate: while the start-up checks are held, a read is answered and cannot
/// write (`query_only`), a write waits; once they pass, the write goes through.
#[tokio::test]
async fn a_gated_store_reads_at_once_and_holds_writes_until_its_checks_pass() {
    use crate::store::gate::Checks;
    let dir = tempfile::tempdir().unwrap();
    let opts = file_options(dir.path());
    let checked = Arc::new(Health::default());
    SqliteStore::start(opts.clone(), "me".into(), checked, Opening::Checked)
        .await
        .unwrap()
        .close()
        .await;
    let (release, held) = std::sync::mpsc::channel::<()>();
    let health = Arc::new(Health::default());
    let hook: crate::store::gate::CheckHook = Box::new(move || {
        let _ = held.recv();
    });
    let store = SqliteStore::start(
        opts,
        "me".into(),
        health.clone(),
        Opening::Gated(Some(hook)),
    )
    .await
    .unwrap();
    assert_eq!(health.checks.state(), Checks::Pending);
    assert_eq!(
        store.read(|c| schema::version(c)).await.unwrap(),
        schema::MIGRATIONS.len()
    );
    let sneaked = store
        .read(|c| {
            c.execute_batch("CREATE TABLE sneaked(x)")
                .map_err(|source| crate::store::StoreError::Sqlite {
                    context: "test",
                    source,
                })
        })
        .await;
    assert!(sneaked.is_err(), "a read wrote while the checks ran");
    let write = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .in_tx("test", |tx| {
                    tx.execute_batch("CREATE TABLE written(x)")
                        .map_err(|source| crate::store::StoreError::Sqlite {
                            context: "test",
                            source,
                        })
                })
                .await
        })
    };
    // The worker answers a read queued after the write: the write is held, not running.
    store.read(|_| Ok(())).await.unwrap();
    assert!(!write.is_finished());
    release.send(()).unwrap();
    write
        .await
        .unwrap()
        .expect("the held write runs once the checks pass");
    assert!(matches!(health.checks.state(), Checks::Passed(_)));
    store.close().await;
}

/// A store file of `n` due accounts, opened as the daemon's is.
async fn store_of(dir: &std::path::Path, n: usize) -> SqliteStore {
    let health = Arc::new(Health::default());
    let store = SqliteStore::start(file_options(dir), "me".into(), health, Opening::Checked)
        .await
        .unwrap();
    let accounts: Vec<NewAccount> = (0..n).map(|i| account(&format!("s{i}"))).collect();
    store
        .in_tx("import", move |tx| {
            writes::upsert(tx, &Keyring::default(), &accounts, NOW)
        })
        .await
        .unwrap();
    store
}

/// Claims up to `n` due accounts and commits their rotations, sent together (one group).
async fn rotate(store: &SqliteStore, owner: &str, n: usize) {
    let claimed = store.claim(claim_for(owner, n)).await.unwrap();
    let recorded =
        futures::future::join_all(claimed.iter().map(|a| store.record(rotation_of(a)))).await;
    assert!(recorded.iter().all(|r| matches!(r, Ok(Recorded::Applied))));
}

/// Sets a pragma on the worker's connection.
async fn pragma_on_worker(store: &SqliteStore, sql: &'static str) {
    store
        .call(move |c| {
            c.query_row(sql, [], |_| Ok(()))
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(()),
                    e => Err(e),
                })
                .map_err(|source| crate::store::StoreError::Sqlite {
                    context: "test",
                    source,
                })
        })
        .await
        .unwrap();
}

/// With the WAL copied by the checkpoint thread, the writer's own checkpoint still bounds
/// it: under a long series of group commits the WAL file never outgrows the bound (here
/// lowered to 64 pages) by more than one group's pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_with_the_checkpoints_off_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_of(dir.path(), 3000).await;
    rotate(&store, "me:0", 1).await;
    pragma_on_worker(&store, "PRAGMA wal_autocheckpoint = 64").await;
    let wal = dir.path().join("refreshd.db-wal");
    let mut largest = 0;
    for round in 1..=60 {
        rotate(&store, &format!("me:{round}"), 40).await;
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
    }
    // 2,400 rotations wrote several times the bound: without a checkpoint starting the WAL
    // over, it would hold them all.
    let pages = largest / 4096;
    assert!(pages <= 64 + 200, "the WAL grew to {pages} pages");
    store.close().await;
}

/// The checkpoint thread copies committed pages into the database file without the
/// writer: with the writer's own checkpoint off, the file still changes after a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_thread_copies_the_wal_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_of(dir.path(), 10).await;
    rotate(&store, "me:1", 1).await;
    pragma_on_worker(&store, "PRAGMA wal_autocheckpoint = 0").await;
    pragma_on_worker(&store, "PRAGMA wal_checkpoint(TRUNCATE)").await;
    let db = dir.path().join("refreshd.db");
    let before = std::fs::read(&db).unwrap();
    rotate(&store, "me:2", 5).await;
    // The thread checkpoints within about 100 ms of a commit.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read(&db).unwrap() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing copied the commit into the database file"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.close().await;
}

/// The answers of a group are handed to the runtime, and only after its commit: when a
/// caller hears back, another connection already reads its rotation from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_is_answered_only_after_its_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_of(dir.path(), 20).await;
    let claimed = store.claim(claim_for("me:1", 20)).await.unwrap();
    let path = dir.path().join("refreshd.db");
    let answered = claimed.iter().map(|a| {
        let (store, path, rotation) = (store.clone(), path.clone(), rotation_of(a));
        async move {
            let id = rotation.account_id();
            assert_eq!(store.record(rotation).await.unwrap(), Recorded::Applied);
            let other = Connection::open(&path).unwrap();
            let stored = queries::get(&other, &Keyring::default(), id)
                .unwrap()
                .unwrap();
            assert_eq!(stored.refresh_token.expose_secret(), "rt-new");
        }
    });
    futures::future::join_all(answered).await;
    store.close().await;
}

/// A store opened on a runtime that has since shut down still answers its callers: the
/// answers handed to that runtime are sent when its never-run task is dropped.
#[test]
fn answers_reach_their_callers_when_the_opening_runtime_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let opening = tokio::runtime::Runtime::new().unwrap();
    let store = opening.block_on(store_of(dir.path(), 1));
    drop(opening);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let claimed = store.claim(claim_for("me:1", 1)).await.unwrap();
        let recorded = tokio::time::timeout(
            Duration::from_secs(10),
            store.record(rotation_of(&claimed[0])),
        )
        .await
        .expect("answered, not left waiting");
        assert_eq!(recorded.unwrap(), Recorded::Applied);
        store.close().await;
    });
}

/// The checkpoint thread never creates the store file: started after the file was deleted
/// (between a commit and the thread's start), it fails and the file stays gone, for the
/// store's watch to report it deleted rather than replaced.
#[test]
fn the_checkpoint_thread_never_creates_a_deleted_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let opts = file_options(dir.path());
    let writer = super::open::connect(&opts).unwrap();
    std::fs::remove_file(&opts.path).unwrap();
    assert!(super::checkpoint::Checkpointer::start(&opts, &writer).is_err());
    assert!(
        !opts.path.exists(),
        "the checkpoint thread made a new store file"
    );
}

#[test]
fn an_imports_settings_keep_temporary_files_in_memory_and_are_put_back() {
    let mut c = Connection::open_in_memory().unwrap();
    let temp_store =
        |c: &Connection| -> i64 { c.query_row("PRAGMA temp_store", [], |r| r.get(0)).unwrap() };
    c.pragma_update(None, "temp_store", 1).unwrap();
    let before = writes::import_settings(&mut c).unwrap();
    assert_eq!(temp_store(&c), 2, "MEMORY while the import runs");
    writes::restore_settings(&mut c, before).unwrap();
    assert_eq!(temp_store(&c), 1, "put back after it");
}

/// `close` answers only once the worker's connection is closed: its last checkpoint done and
/// (it being the only connection here) the WAL removed, so a store opened right after (a CLI
/// command, a restart, the next test) meets none of its locks; a second `close` waits as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_answers_after_the_connection_is_closed() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let store = store_of(dir.path(), 200).await;
        rotate(&store, "me:1", 200).await;
        let wal = dir.path().join("refreshd.db-wal");
        assert!(wal.exists(), "round {round}: no WAL before close");
        // Two handles closing: the later call, too, returns only after the connection closed.
        let first = store.clone();
        let first = tokio::spawn(async move { first.close().await });
        tokio::task::yield_now().await;
        store.close().await;
        assert!(
            !wal.exists(),
            "round {round}: the WAL is still there after close"
        );
        let mut c = Connection::open(dir.path().join("refreshd.db")).unwrap();
        c.busy_timeout(Duration::ZERO).unwrap();
        c.transaction_with_behavior(TransactionBehavior::Exclusive)
            .unwrap_or_else(|e| panic!("round {round}: the file is still locked: {e}"))
            .commit()
            .unwrap();
        first.await.unwrap();
    }
}

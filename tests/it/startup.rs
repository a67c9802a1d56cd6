//! Start-up: the daemon is ready (store open, tokens readable) before the store's start-up
//! checks end, and nothing writes to the store before they pass: no claim, no refresh, no
//! write of any caller. The checks are held by the test's hook (no real wait for them),
//! and the store counts the writes it holds (no real wait for those either); a failing
//! check still stops the daemon with its error.

use crate::helpers::{self, TestApp, eventually};
use refreshd::engine::Engine;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::sandbox::SandboxConfig;
use refreshd::store::{Checks, Store};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type Ready = (Store, Engine, Option<std::net::SocketAddr>);

/// Starts the daemon (library, ops server on loopback) with its store checks held until
/// the returned sender is sent to (or dropped); returns what `on_ready` saw.
async fn start_held(
    app: &TestApp,
) -> (
    std::sync::mpsc::Sender<()>,
    Ready,
    CancellationToken,
    tokio::task::JoinHandle<Result<lifecycle::RunReport, lifecycle::DaemonError>>,
) {
    let config = app.config("\n[server]\nlisten = \"127.0.0.1:0\"\n");
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opts = RunOptions {
        on_ready: Some(Box::new(move |s: &Store, e: &Engine, addr| {
            let _ = tx.send((s.clone(), e.clone(), addr));
        })),
        before_store_checks: Some(Box::new(move || {
            let _ = held.recv();
        })),
        ..RunOptions::new(app.clock.clone())
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(lifecycle::run(config, opts, shutdown.clone()));
    let ready = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("ready while the checks are held")
        .expect("daemon started");
    (release, ready, shutdown, task)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("ops server answers");
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The lease columns of account `id`, read by a connection of the test's own.
fn lease_owner(db: &std::path::Path, id: i64) -> Option<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(
        "SELECT lease_owner FROM accounts WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// A store of two accounts, due now: the engine's first pass wants to claim them.
async fn two_due_accounts() -> (TestApp, Vec<i64>) {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app.import(&store, &config, &["u1", "u2"], None).await;
    let due = helpers::account(&store, ids[0]).await.next_refresh_at;
    store.close().await;
    app.clock.set(due + 60);
    (app, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_readable_before_the_checks_end_but_nothing_written_until_they_pass() {
    let (app, ids) = two_due_accounts().await;

    let (release, (store, engine, addr), shutdown, task) = start_held(&app).await;
    let addr = addr.expect("the ops server listens");
    assert_eq!(store.checks(), Checks::Pending);
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // Tokens are read while the checks run.
    let a = helpers::account(&store, ids[0]).await;
    assert_eq!(a.id, ids[0]);

    // A write of any caller waits at the gate, as do the engine's claims. The engine's
    // first claim (sent as it started; it waits there, so no second one) is held first,
    // then the caller's write is counted on its own.
    engine.waker().notify_one();
    assert!(
        eventually(10, || async { store.writes_held() >= 1 }).await,
        "the engine's claim did not reach the gate"
    );
    let held = store.writes_held();
    let before = helpers::account(&store, ids[1]).await.next_refresh_at;
    let writer = {
        let store = store.clone();
        let (now, id) = (app.clock.now(), ids[1]);
        tokio::spawn(async move { store.mark_due(id, now, true).await })
    };
    assert!(
        eventually(10, || async { store.writes_held() > held }).await,
        "the caller's write did not reach the gate: {} held",
        store.writes_held()
    );
    // A read is answered after every job sent before it: had either gone through, it
    // would be written by now.
    assert_eq!(
        helpers::account(&store, ids[1]).await.next_refresh_at,
        before,
        "a write went through before the checks passed"
    );
    assert!(
        !writer.is_finished(),
        "a write was answered before the checks passed"
    );
    assert_eq!(app.sandbox.stats().requests, 0, "a refresh was sent");
    assert_eq!(lease_owner(&app.db, ids[0]), None, "a lease was written");
    assert_eq!(store.checks(), Checks::Pending);
    // Checks longer than twice server.stall_after (a big store, a slow disk): the loop
    // waiting at the gate is starting, not stalled, so no probe restarts the daemon.
    app.clock.advance(Duration::from_secs(11 * 60));
    for probe in ["/healthz", "/readyz"] {
        let (status, body) = get(addr, probe).await;
        assert_eq!(status, 200, "{probe} while the checks run: {body}");
    }

    release.send(()).unwrap();
    store.checks_settled().await.expect("the checks pass");
    assert!(matches!(store.checks(), Checks::Passed(_)));
    writer.await.unwrap().expect("the held write went through");
    engine.waker().notify_one();
    assert!(
        eventually(10, || async { engine.stats().snapshot().rotated == 2 }).await,
        "refreshing started once the checks passed"
    );
    shutdown.cancel();
    task.await.unwrap().expect("clean stop");
}

/// A store whose page 2 is garbage: the daemon still opens it (its header is fine) and is
/// ready, then the check fails: every held write is refused, nothing is claimed, and the
/// daemon stops with the same error as before (naming the file and what to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_refuses_every_write_and_stops_the_daemon_with_its_error() {
    use std::io::{Seek, SeekFrom, Write};
    let (app, ids) = two_due_accounts().await;
    // Every page in the file itself, none newer in the WAL: the garbage is what is read.
    rusqlite::Connection::open(&app.db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&app.db)
        .unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&[0xA5; 512]).unwrap();
    f.sync_all().unwrap();
    let before = std::fs::read(&app.db).unwrap();

    let (release, (store, _engine, _addr), _shutdown, task) = start_held(&app).await;
    let writer = {
        let store = store.clone();
        let (now, id) = (app.clock.now(), ids[1]);
        tokio::spawn(async move { store.mark_due(id, now, true).await })
    };
    release.send(()).unwrap();
    let e = store.checks_settled().await.unwrap_err().to_string();
    assert!(e.contains("is damaged"), "{e}");
    assert!(matches!(store.checks(), Checks::Failed(_)));
    let refused = writer.await.unwrap().unwrap_err().to_string();
    assert!(refused.contains("start-up checks"), "{refused}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        stopped.contains("is damaged")
            && stopped.contains(&app.db.display().to_string())
            && stopped.contains("restore it from a backup"),
        "{stopped}"
    );
    assert_eq!(app.sandbox.stats().requests, 0, "a refresh was sent");
    assert_eq!(
        std::fs::read(&app.db).unwrap(),
        before,
        "the damaged file was written to"
    );
}

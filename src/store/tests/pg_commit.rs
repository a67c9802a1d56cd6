//! PostgreSQL only: a group commit of rotations is one round trip to the server (BEGIN,
//! the row lock, the rotations with their log rows, COMMIT sent together), and a group that
//! fails (a row another session holds) ends its transaction and leaves its connection
//! usable: by a ROLLBACK when its COMMIT was still to be sent (a group with other
//! outcomes), by the pipelined COMMIT alone otherwise (a group of rotations); when that
//! ROLLBACK fails, the connection leaves the pool. Watched by a proxy between the pool's
//! connection and the throwaway cluster.

use super::*;
use crate::crypto::Keyring;
use crate::store::postgres::group;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts the client's turns on the connections it forwards: a turn is the client sending
/// after the server's answer reached it (the first sending too). The server's bytes are
/// held a few milliseconds, so requests the client sends together are never split by an
/// answer in between. Keeps the text of the client's simple queries too (what
/// `batch_execute` sends: BEGIN, COMMIT, ROLLBACK). `fail_rollback` answers a ROLLBACK with
/// an error itself, without passing it on (the session stays inside its transaction).
#[derive(Default)]
struct Turns {
    turns: AtomicUsize,
    answered: AtomicBool,
    queries: Mutex<Vec<String>>,
    fail_rollback: AtomicBool,
}

impl Turns {
    fn reset(&self) {
        self.turns.store(0, Ordering::SeqCst);
        self.answered.store(true, Ordering::SeqCst);
        self.queries.lock().unwrap().clear();
    }

    /// The transaction ends (COMMIT, ROLLBACK) among the simple queries since the reset.
    fn ends(&self) -> Vec<String> {
        let queries = self.queries.lock().unwrap();
        queries
            .iter()
            .filter(|q| *q == "COMMIT" || *q == "ROLLBACK")
            .cloned()
            .collect()
    }
}

/// The client's bytes on one connection, cut into protocol messages: the first (the
/// startup message) has no type byte, each after it a type byte and a length.
#[derive(Default)]
struct Messages {
    buf: Vec<u8>,
    started: bool,
}

impl Messages {
    /// Takes `bytes` and records the text of each whole simple query (`Q`) in `queries`;
    /// returns those texts.
    fn feed(&mut self, bytes: &[u8], queries: &Mutex<Vec<String>>) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut fed = Vec::new();
        loop {
            let at = usize::from(self.started);
            let Some(len) = self.buf.get(at..at + 4) else {
                return fed;
            };
            let end = at + u32::from_be_bytes(len.try_into().unwrap()) as usize;
            if self.buf.len() < end {
                return fed;
            }
            if self.started && self.buf[0] == b'Q' {
                // The query string ends with a NUL.
                let text = String::from_utf8_lossy(&self.buf[5..end - 1]).into_owned();
                queries.lock().unwrap().push(text.clone());
                fed.push(text);
            }
            self.buf.drain(..end);
            self.started = true;
        }
    }
}

/// What a server answers to a query that failed: an ErrorResponse, then ReadyForQuery in a
/// failed transaction.
fn error_answer(message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (kind, value) in [(b'S', "ERROR"), (b'C', "08006"), (b'M', message)] {
        fields.push(kind);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut answer = vec![b'E'];
    answer.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    answer.extend_from_slice(&fields);
    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'E']);
    answer
}

/// A proxy to `server` on a loopback port of its own; returns the port.
async fn proxy(server: (String, u16), turns: Arc<Turns>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = TcpStream::connect((server.0.as_str(), server.1))
                .await
                .unwrap();
            let (mut cr, cw) = client.into_split();
            let (mut sr, mut sw) = upstream.into_split();
            let cw = Arc::new(tokio::sync::Mutex::new(cw));
            let (t, to_client) = (turns.clone(), cw.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut messages = Messages::default();
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    if t.answered.swap(false, Ordering::SeqCst) {
                        t.turns.fetch_add(1, Ordering::SeqCst);
                    }
                    let fed = messages.feed(&buf[..n], &t.queries);
                    // A ROLLBACK sent alone (as `batch_execute` does) fails without reaching
                    // the server.
                    if fed == ["ROLLBACK"] && t.fail_rollback.swap(false, Ordering::SeqCst) {
                        let answer = error_answer("the proxy refused the ROLLBACK");
                        if to_client.lock().await.write_all(&answer).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let t = turns.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    t.answered.store(true, Ordering::SeqCst);
                    if cw.lock().await.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// `url` through a new proxy: the proxied URL and the proxy's `Turns`.
async fn through_proxy(url: &str) -> (String, Arc<Turns>) {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let server = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => (h.clone(), config.get_ports()[0]),
        other => panic!("the test cluster listens on TCP, not {other:?}"),
    };
    let turns = Arc::new(Turns::default());
    let port = proxy(server.clone(), turns.clone()).await;
    let proxied = url.replacen(&format!(":{}/", server.1), &format!(":{port}/"), 1);
    (proxied, turns)
}

/// A store of accounts claimed by OWNER, and a pool of one connection (through the proxy)
/// to its schema: a group commit's connection, which the pool hands out again.
struct Proxied {
    _dir: TempDir,
    store: Store,
    ids: Vec<i64>,
    url: String,
    pool: Pool,
    turns: Arc<Turns>,
}

/// A [`Proxied`] store of `accounts` accounts in a schema named after `test`, or None
/// after a NOT RUN (no PostgreSQL installed).
async fn proxied(test: &str, accounts: usize) -> Option<Proxied> {
    let url = refreshd_testkit::postgres_schema(test).await?;
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES
        .scope(Some(url.clone()), async { options(&dir) })
        .await;
    let store = Store::open(opts).await.unwrap();
    let new = (1..=accounts)
        .map(|n| new_account("tiktok", &format!("u{n}"), NOW))
        .collect();
    let ids = insert(&store, new).await;
    assert_eq!(
        store
            .claim_due(OWNER, NOW, LEASE, accounts)
            .await
            .unwrap()
            .len(),
        accounts
    );

    let (proxied, turns) = through_proxy(&url).await;
    let proxied: tokio_postgres::Config = proxied.parse().unwrap();
    let manager = Manager::from_config(
        proxied,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(1).build().unwrap();
    Some(Proxied {
        _dir: dir,
        store,
        ids,
        url,
        pool,
        turns,
    })
}

/// Another session (not through the proxy) holding `id`'s row, with the lock a group
/// commit takes, until it rolls back.
async fn hold_row(url: &str, id: i64) -> tokio_postgres::Client {
    let (holder, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    holder.batch_execute("BEGIN").await.unwrap();
    let sql = "SELECT id FROM accounts WHERE id = $1 FOR NO KEY UPDATE";
    assert_eq!(holder.execute(sql, &[&id]).await.unwrap(), 1);
    holder
}

/// The session `pid`'s state in pg_stat_activity, read by `by` outside a transaction (a
/// transaction reads the activity once, at its first look).
async fn state(by: &tokio_postgres::Client, pid: i32) -> String {
    let sql = "SELECT state FROM pg_stat_activity WHERE pid = $1";
    by.query_one(sql, &[&pid]).await.unwrap().get(0)
}

async fn backend_pid(client: &deadpool_postgres::Client) -> i32 {
    let row = client.query_one("SELECT pg_backend_pid()", &[]).await;
    row.unwrap().get(0)
}

/// A group commit that fails on a held row: transient, the lock timeout's SQLSTATE.
fn assert_lock_timeout(e: &StoreError) {
    assert!(e.is_transient(), "not transient: {e}");
    assert!(e.to_string().contains("55P03"), "not a lock timeout: {e}");
}

#[tokio::test]
async fn postgres_a_group_of_rotations_is_one_round_trip() {
    let Some(p) = proxied("pg_group_one_round_trip", 3).await else {
        return;
    };
    let (ids, turns) = (&p.ids, &p.turns);
    let client = p.pool.get().await.unwrap();
    let keys = Keyring::default();

    // The first group prepares the statements (once per connection).
    let first = rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1);
    let r = group::commit(&client, &keys, &[&first])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied]);
    turns.reset();
    let (second, third) = (
        rotated(ids[1], 0, "at-2", Some("rt-2"), NOW + 2),
        rotated(ids[2], 0, "at-3", Some("rt-3"), NOW + 3),
    );
    let r = group::commit(&client, &keys, &[&second, &third])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied, Recorded::Applied]);
    assert_eq!(
        turns.turns.load(Ordering::SeqCst),
        1,
        "round trips of a group commit of two rotations"
    );
    drop(client);
    // Committed: the tokens and the log rows are there for the store's own connections.
    for (id, access) in [(ids[1], "at-2"), (ids[2], "at-3")] {
        assert_eq!(get(&p.store, id).await.access_token.expose_secret(), access);
        assert_eq!(log_outcomes(&p.store, id).await, ["rotated", "imported"]);
    }
    p.store.close().await;
}

#[tokio::test]
async fn postgres_a_failed_group_with_other_outcomes_is_rolled_back_and_its_connection_reused() {
    let Some(p) = proxied("pg_group_others_rolled_back", 1).await else {
        return;
    };
    let id = p.ids[0];
    let keys = Keyring::default();
    let client = p.pool.get().await.unwrap();
    let pid = backend_pid(&client).await;
    let holder = hold_row(&p.url, id).await;

    // A failure is not a rotation: the body (BEGIN, the lock, its update) goes first, the
    // COMMIT only after it, so the lock timing out leaves it unsent.
    p.turns.reset();
    let failed = transient(id, OWNER, NOW + 1);
    let e = group::commit(&client, &keys, &[&failed])
        .await
        .result
        .unwrap_err();
    assert_lock_timeout(&e);
    assert_eq!(p.turns.ends(), ["ROLLBACK"], "the failed group's ends");
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state(&holder, pid).await, "idle", "the group's session");

    // The pool's one connection, the same session: the next group commits on it.
    drop(client);
    let client = p.pool.get().await.unwrap();
    assert_eq!(backend_pid(&client).await, pid);
    let r = group::commit(&client, &keys, &[&failed])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied]);
    drop(client);
    let a = get(&p.store, id).await;
    assert_eq!((a.failures, a.last_error.as_deref()), (1, Some("HTTP 503")));
    assert_eq!(log_outcomes(&p.store, id).await, ["transient", "imported"]);
    p.store.close().await;
}

#[tokio::test]
async fn postgres_a_failed_group_of_rotations_is_ended_by_its_commit_without_a_rollback() {
    let Some(p) = proxied("pg_group_rotations_no_rollback", 2).await else {
        return;
    };
    let keys = Keyring::default();
    let client = p.pool.get().await.unwrap();
    // The first group prepares the statements (once per connection): the failed one is
    // then one flight.
    let first = rotated(p.ids[0], 0, "at-1", Some("rt-1"), NOW + 1);
    let r = group::commit(&client, &keys, &[&first])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied]);
    let pid = backend_pid(&client).await;
    let holder = hold_row(&p.url, p.ids[1]).await;

    // BEGIN..COMMIT go out together: the COMMIT reaches the failed transaction and ends it
    // (as a rollback), so no ROLLBACK follows, nor a second round trip.
    p.turns.reset();
    let locked = rotated(p.ids[1], 0, "at-2", Some("rt-2"), NOW + 2);
    let e = group::commit(&client, &keys, &[&locked])
        .await
        .result
        .unwrap_err();
    assert_lock_timeout(&e);
    assert_eq!(p.turns.ends(), ["COMMIT"], "the failed group's ends");
    assert_eq!(
        p.turns.turns.load(Ordering::SeqCst),
        1,
        "round trips of the failed group"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    // The error came with the lock's answer: one more round trip on the session, answered
    // in order, so the pipelined COMMIT has run before its state is read.
    assert_eq!(backend_pid(&client).await, pid);
    assert_eq!(state(&holder, pid).await, "idle", "the group's session");

    // The pool's one connection, the same session: the next group commits on it.
    drop(client);
    let client = p.pool.get().await.unwrap();
    assert_eq!(backend_pid(&client).await, pid);
    let r = group::commit(&client, &keys, &[&locked])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied]);
    drop(client);
    let a = get(&p.store, p.ids[1]).await;
    assert_eq!(a.access_token.expose_secret(), "at-2");
    assert_eq!(
        log_outcomes(&p.store, p.ids[1]).await,
        ["rotated", "imported"]
    );
    p.store.close().await;
}

#[tokio::test]
async fn postgres_a_connection_whose_rollback_failed_does_not_go_back_to_the_pool() {
    let Some(p) = proxied("pg_group_rollback_failed", 1).await else {
        return;
    };
    let id = p.ids[0];
    let keys = Keyring::default();
    let pid = backend_pid(&p.pool.get().await.unwrap()).await;
    let holder = hold_row(&p.url, id).await;

    // The group fails on the held row before its COMMIT is sent; the proxy refuses its
    // ROLLBACK, so the session stays inside the failed transaction.
    p.turns.fail_rollback.store(true, Ordering::SeqCst);
    let failed = transient(id, OWNER, NOW + 1);
    let e = crate::store::postgres::commit_on(&p.pool, &keys, &[&failed])
        .await
        .unwrap_err();
    assert_lock_timeout(&e);
    assert!(
        !p.turns.fail_rollback.load(Ordering::SeqCst),
        "no ROLLBACK sent"
    );
    assert_eq!(p.pool.status().size, 0, "the connection left the pool");
    holder.batch_execute("ROLLBACK").await.unwrap();

    // The next pooled client is a new session, outside any transaction.
    let client = p.pool.get().await.unwrap();
    let row = client.query_one("SELECT pg_backend_pid()", &[]).await;
    let next: i32 = row.expect("the next pooled session is usable").get(0);
    assert_ne!(
        next, pid,
        "the session whose ROLLBACK failed was handed out again"
    );
    let r = group::commit(&client, &keys, &[&failed])
        .await
        .result
        .unwrap();
    assert_eq!(r, [Recorded::Applied]);
    drop(client);
    p.store.close().await;
}

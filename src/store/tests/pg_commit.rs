//! PostgreSQL only: a group commit of rotations is one round trip to the server (BEGIN,
//! the row lock, the rotations with their log rows, COMMIT sent together), counted by a
//! proxy between the pool's connection and the throwaway cluster.

use super::*;
use crate::store::postgres::group;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts the client's turns on the connections it forwards: a turn is the client sending
/// after the server's answer reached it (the first sending too). The server's bytes are
/// held a few milliseconds, so requests the client sends together are never split by an
/// answer in between.
#[derive(Default)]
struct Turns {
    turns: AtomicUsize,
    answered: AtomicBool,
}

impl Turns {
    fn reset(&self) {
        self.turns.store(0, Ordering::SeqCst);
        self.answered.store(true, Ordering::SeqCst);
    }
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
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = upstream.into_split();
            let t = turns.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    if t.answered.swap(false, Ordering::SeqCst) {
                        t.turns.fetch_add(1, Ordering::SeqCst);
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
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn postgres_a_group_of_rotations_is_one_round_trip() {
    let Some(url) = refreshd_testkit::postgres_schema("pg_group_one_round_trip").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let opts = POSTGRES
        .scope(Some(url.clone()), async { options(&dir) })
        .await;
    let store = Store::open(opts).await.unwrap();
    let accounts = (1..=3)
        .map(|n| new_account("tiktok", &format!("u{n}"), NOW))
        .collect();
    let ids = insert(&store, accounts).await;
    assert_eq!(
        store.claim_due(OWNER, NOW, LEASE, 3).await.unwrap().len(),
        3
    );

    // The pool's one connection goes through the proxy.
    let config: tokio_postgres::Config = url.parse().unwrap();
    let server = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => (h.clone(), config.get_ports()[0]),
        other => panic!("the test cluster listens on TCP, not {other:?}"),
    };
    let turns = Arc::new(Turns::default());
    let port = proxy(server.clone(), turns.clone()).await;
    let proxied: tokio_postgres::Config = url
        .replacen(&format!(":{}/", server.1), &format!(":{port}/"), 1)
        .parse()
        .unwrap();
    let manager = Manager::from_config(
        proxied,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(1).build().unwrap();
    let client = pool.get().await.unwrap();
    let keys = crate::crypto::Keyring::default();

    // The first group prepares the statements (once per connection).
    let first = rotated(ids[0], 0, "at-1", Some("rt-1"), NOW + 1);
    let r = group::commit(&client, &keys, &[&first]).await.unwrap();
    assert_eq!(r, [Recorded::Applied]);
    turns.reset();
    let (second, third) = (
        rotated(ids[1], 0, "at-2", Some("rt-2"), NOW + 2),
        rotated(ids[2], 0, "at-3", Some("rt-3"), NOW + 3),
    );
    let r = group::commit(&client, &keys, &[&second, &third])
        .await
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
        assert_eq!(get(&store, id).await.access_token.expose_secret(), access);
        assert_eq!(log_outcomes(&store, id).await, ["rotated", "imported"]);
    }
    store.close().await;
}

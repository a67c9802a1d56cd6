//! The connection to PostgreSQL: a lost one is transient with no outcome half written, and
//! `sslmode=require` speaks TLS and checks the certificate.

use super::{import, open_pg, pg_store_options, postgres_url, raw, rotated_a_second_later, tokens};
use crate::helpers::{eventually, now};
use refreshd::clock::Clock;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use refreshd::store::{Recorded, Store};
use secrecy::ExposeSecret;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_transient_and_no_outcome_is_half_written() {
    let Some(url) =
        postgres_url("postgres::a_lost_connection_is_transient_and_no_outcome_is_half_written")
            .await
    else {
        return;
    };
    // Named, so the server can drop exactly this store's connections.
    let url = format!("{url}&application_name=refreshd_connloss");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(SandboxConfig::default(), Clock::system())
        .await
        .unwrap();
    let store = open_pg(&url, dir.path()).await;
    import(&store, &sandbox, 3).await;
    let t = now();
    let claimed = store
        .claim_due("owner-a", t, Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);

    // The server drops every connection of this test's schema (a restart, a failover).
    let admin = raw(&url).await;
    let kill_others = async || {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name = 'refreshd_connloss'",
                &[],
            )
            .await
            .unwrap()
    };
    // Every pooled connection is dead now: the first use of each fails, transiently.
    let _ = kill_others().await;
    let mut transient_errors = 0;
    let mut recorded = Vec::new();
    for a in &claimed {
        let outcome = rotated_a_second_later(
            a,
            tokens(format!("at-new-{}", a.id), format!("rt-new-{}", a.id)),
            t,
        );
        match store.record(outcome).await {
            Ok(r) => recorded.push(r),
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                transient_errors += 1;
            }
        }
        match store.get(a.id).await {
            Ok(_) => {}
            Err(e) => {
                assert!(e.is_transient(), "a lost connection is transient: {e}");
                transient_errors += 1;
            }
        }
    }
    eprintln!("records: {recorded:?}, transient errors: {transient_errors}");
    // Rotated tokens are never dropped: applied, or deferred to the recovery file and
    // committed by the retry once a connection works again.
    assert!(
        recorded
            .iter()
            .all(|r| matches!(r, Recorded::Applied | Recorded::Deferred)),
        "{recorded:?}"
    );
    assert_eq!(recorded.len(), 3);
    let committed = eventually(10, || async {
        let mut ok = true;
        for a in &claimed {
            match store.get(a.id).await {
                Ok(Some(acc)) => {
                    ok &= acc.access_token.expose_secret() == format!("at-new-{}", a.id)
                        && acc.generation == 1
                }
                _ => ok = false,
            }
        }
        ok
    })
    .await;
    assert!(committed, "the rotations reached the database");
    // Each rotation is in the log once: nothing written twice, nothing half.
    let logged: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM refresh_log WHERE outcome = 'rotated'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 3);
    store.close().await;
    assert!(!refreshd::store::recovery_path(&dir.path().join("refreshd.db")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_speaks_tls_and_checks_the_certificate() {
    let Some(url) =
        postgres_url("postgres::sslmode_require_speaks_tls_and_checks_the_certificate").await
    else {
        return;
    };
    let ssl: String = raw(&url)
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    if ssl != "on" {
        // The throwaway cluster has TLS when openssl made it a certificate.
        refreshd_testkit::not_run(
            "postgres::sslmode_require_speaks_tls_and_checks_the_certificate",
            "a PostgreSQL server with ssl = on (openssl for the throwaway cluster's certificate)",
            "apt-get install openssl",
        );
        return;
    }
    // The server's certificate (self-signed for localhost, or Debian's snakeoil) names a host,
    // never an IP address: a client that checks certificates must refuse it at 127.0.0.1,
    // and say so without the password.
    let base = refreshd_testkit::postgres(
        "postgres::sslmode_require_speaks_tls_and_checks_the_certificate",
    )
    .unwrap();
    let cfg: tokio_postgres::Config = base.parse().unwrap();
    let password = String::from_utf8_lossy(cfg.get_password().unwrap_or(b"")).into_owned();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or(user);
    let tls_url = format!("postgres://{user}:{password}@127.0.0.1:{port}/{db}?sslmode=require");
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(pg_store_options(&tls_url, dir.path()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}/{db}")), "{err}");
    assert!(
        !err.contains(&format!(":{password}@")),
        "no password: {err}"
    );
    drop(url);
}

//! PostgreSQL: real `refreshd run` replicas sharing one database, connection loss, and
//! `store copy` between the backends, on the test binary's throwaway PostgreSQL cluster
//! (refreshd-testkit; `REFRESHD_TEST_POSTGRES_URL` names another server).

use crate::helpers::{CLIENT_KEY, CLIENT_SECRET, bin, eventually};
use refreshd::clock::Clock;
use refreshd::model::{Status, TokenSet};
use refreshd::sandbox::{Sandbox, SandboxConfig};
use refreshd::store::{NewAccount, Outcome, PgOptions, Recorded, Store, StoreOptions};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A URL on a fresh schema of the throwaway cluster (refreshd-testkit), or None after a
/// NOT RUN when PostgreSQL is not installed.
pub async fn postgres_url(test: &str) -> Option<String> {
    refreshd_testkit::postgres_schema(test).await
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Tokens that live an hour, with no refresh-token lifetime, scope or subject.
fn tokens(access: impl Into<String>, refresh: impl Into<String>) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.into()),
        refresh_token: Some(SecretString::from(refresh.into())),
        expires_in: 3600,
        refresh_expires_in: None,
        subject: None,
        scope: None,
        token_type: "Bearer".into(),
    }
}

fn pg_store_options(url: &str, dir: &Path) -> StoreOptions {
    StoreOptions {
        path: dir.join("refreshd.db"),
        busy_timeout: Duration::from_secs(5),
        keyring: Default::default(),
        postgres: Some(PgOptions {
            url: SecretString::from(url.to_string()),
            pool_size: 4,
        }),
    }
}

fn now() -> i64 {
    Clock::system().now()
}

/// Imports fresh sandbox grants for `n` users, due now.
async fn import(store: &Store, sandbox: &Sandbox, n: usize) -> Vec<i64> {
    let t = now();
    let accounts = (0..n)
        .map(|i| {
            let open_id = format!("user-{i:03}");
            let g = sandbox.grant(&open_id, "user.info.basic", None);
            NewAccount {
                provider: "tiktok".into(),
                subject: open_id,
                label: None,
                tokens: TokenSet {
                    access_token: SecretString::from(g["access_token"].as_str().unwrap()),
                    refresh_token: Some(SecretString::from(g["refresh_token"].as_str().unwrap())),
                    expires_in: g["expires_in"].as_i64().unwrap(),
                    refresh_expires_in: g["refresh_expires_in"].as_i64(),
                    subject: None,
                    scope: Some("user.info.basic".into()),
                    token_type: "Bearer".into(),
                },
                obtained_at: t,
                next_refresh_at: t,
                status: Status::Active,
                reauth_reason: None,
            }
        })
        .collect();
    store
        .upsert(accounts, t)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// One `refreshd run` with its JSON log collected; SIGKILLed when dropped.
struct Replica {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    fn start(config: &Path) -> Replica {
        let mut cmd = Command::new(bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REFRESHD_") || k == "RUST_LOG" {
                cmd.env_remove(&k);
            }
        }
        cmd.args(["--config", config.to_str().unwrap(), "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn refreshd run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        let into = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                into.lock().unwrap().push(line);
            }
        });
        Replica { child, log }
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == name)
            .collect()
    }

    fn owner(&self) -> Option<String> {
        self.events("starting")
            .first()
            .and_then(|e| e["owner"].as_str().map(str::to_string))
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn generations(db: &tokio_postgres::Client) -> Vec<(String, i64, String, Option<String>)> {
    db.query(
        "SELECT subject, generation, status, reauth_reason FROM accounts ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_replicas_share_the_work_and_pick_up_a_killed_ones_leases() {
    let Some(url) =
        postgres_url("postgres::four_replicas_share_the_work_and_pick_up_a_killed_ones_leases")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(
        SandboxConfig {
            access_ttl: Duration::from_secs(3600),
            ..SandboxConfig::default()
        },
        Clock::system(),
    )
    .await
    .unwrap();
    const N: usize = 120;
    let store = Store::open(pg_store_options(&url, dir.path()))
        .await
        .unwrap();
    let ids = import(&store, &sandbox, N).await;
    assert_eq!(ids.len(), N);

    // A slow provider rate (per process) keeps accounts leased while they wait their turn,
    // so the replica killed later holds leases of accounts it never sent.
    let config = dir.path().join("refreshd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[store]
url = {url:?}
path = {recovery:?}
lease = "9s"
pool_size = 4

[refresh]
lead = "10m"
jitter = "0s"
min_interval = "1s"
request_timeout = "2s"
connect_timeout = "1s"
max_idle = "500ms"
concurrency = 8

[log]
format = "json"
level = "info"

[providers.tiktok]
client_key = "{CLIENT_KEY}"
client_secret = "{CLIENT_SECRET}"
token_url = {token:?}
rate_limit = 900
burst = 1
"#,
            recovery = dir.path().join("recovery-base").display().to_string(),
            token = sandbox.token_url(),
        ),
    )
    .unwrap();
    let db = raw(&url).await;

    // Phase 1: four replicas refresh every account once; none twice.
    let mut replicas: Vec<Replica> = (0..4).map(|_| Replica::start(&config)).collect();
    let all_refreshed = eventually(30, || async {
        generations(&db).await.iter().all(|(_, g, _, _)| *g >= 1)
    })
    .await;
    let logs: String = replicas.iter().map(Replica::text).collect();
    assert!(
        all_refreshed,
        "not every account was refreshed; logs:\n{logs}"
    );
    let stats = sandbox.stats();
    assert_eq!(stats.reuse_rejected, 0, "{stats:?}");
    assert_eq!(
        stats.refreshed, N as u64,
        "each account exactly once: {stats:?}"
    );
    let per_replica: Vec<usize> = replicas
        .iter()
        .map(|r| {
            r.events("refresh")
                .iter()
                .filter(|e| e["outcome"] == "rotated")
                .count()
        })
        .collect();
    eprintln!("rotations per replica: {per_replica:?}");
    assert_eq!(per_replica.iter().sum::<usize>(), N);
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "work spread over all four replicas: {per_replica:?}"
    );

    // Phase 2: everything due again; kill one replica while it holds leases.
    let victim = replicas[0].owner().expect("the victim logged its owner id");
    db.execute("UPDATE accounts SET next_refresh_at = $1", &[&now()])
        .await
        .unwrap();
    let held = || async {
        // Each claim's lease is the process's owner id plus the claim's number.
        db.query(
            "SELECT id FROM accounts WHERE lease_owner LIKE $1 || ':%'",
            &[&victim],
        )
        .await
        .unwrap()
        .len()
    };
    assert!(
        eventually(10, || async { held().await >= 3 }).await,
        "the victim never held leases"
    );
    replicas[0].kill();
    let orphaned: Vec<i64> = db
        .query(
            "SELECT id FROM accounts WHERE lease_owner LIKE $1 || ':%' ORDER BY id",
            &[&victim],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stats_at_kill = sandbox.stats();
    eprintln!(
        "killed {victim} holding {} leases; sandbox had answered {} refreshes",
        orphaned.len(),
        stats_at_kill.refreshed
    );
    assert!(!orphaned.is_empty());

    // The others take over once the lease (9 s) has run out.
    let done = eventually(30, || async {
        generations(&db)
            .await
            .iter()
            .all(|(_, g, status, _)| *g >= 2 || status == "needs_reauth")
    })
    .await;
    let logs: String = replicas[1..].iter().map(Replica::text).collect();
    assert!(done, "accounts left behind after the kill; logs:\n{logs}");
    let rows = generations(&db).await;
    let flagged: Vec<_> = rows.iter().filter(|r| r.2 == "needs_reauth").collect();
    let stats = sandbox.stats();
    eprintln!(
        "after the kill: {} flagged (crash window), {} reuse rejections",
        flagged.len(),
        stats.reuse_rejected
    );
    // Only a refresh the provider answered and the victim never stored can be lost, and it
    // must then be named for what it is. Everything else is picked up.
    assert!(
        stats.reuse_rejected as usize <= flagged.len() && flagged.len() <= 8,
        "at most the victim's in-flight refreshes (concurrency 8): {flagged:?} {stats:?}"
    );
    for (subject, _, _, reason) in &flagged {
        assert_eq!(reason.as_deref(), Some("refresh_interrupted"), "{subject}");
    }
    // Nothing lost: every active account's stored refresh token is the provider's current one.
    for r in db
        .query(
            "SELECT subject, refresh_token, status FROM accounts ORDER BY id",
            &[],
        )
        .await
        .unwrap()
    {
        let (subject, token, status): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if status == "active" {
            assert_eq!(
                Some(token),
                sandbox.current_refresh_token(&subject),
                "{subject}"
            );
        }
    }
    for r in &mut replicas {
        r.kill();
    }
    store.close().await;
}

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
    let store = Store::open(pg_store_options(&url, dir.path()))
        .await
        .unwrap();
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
        let outcome = Outcome::Rotated {
            account_id: a.id,
            generation: a.generation,
            tokens: tokens(format!("at-new-{}", a.id), format!("rt-new-{}", a.id)),
            at: t + 1,
            next_refresh_at: t + 3000,
            status: Status::Active,
            reauth_reason: None,
            http_status: Some(200),
            duration_ms: 5,
        };
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

/// Runs the real binary to the end (off the async threads, which serve nothing here).
fn cli(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REFRESHD_") || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    let out = cmd
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run refreshd");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn verified_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("verified:"))
        .unwrap_or_else(|| panic!("no verification line in:\n{out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_sealed_accounts_and_history_both_ways_and_resumes() {
    let Some(url) = postgres_url(
        "postgres::store_copy_moves_sealed_accounts_and_history_both_ways_and_resumes",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    refreshd::crypto::generate_key_file(&key).unwrap();
    let config = dir.path().join("refreshd.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nencryption_key_file = {:?}\n",
            key.display().to_string()
        ),
    )
    .unwrap();
    let keyring = refreshd::crypto::Keyring::load(Some(&key), &[]).unwrap();
    let sqlite = dir.path().join("source.db");
    let sandbox = Sandbox::start(SandboxConfig::default(), Clock::system())
        .await
        .unwrap();

    // A SQLite store with sealed tokens, rotations, a flagged account and some history.
    let source = Store::open(StoreOptions {
        path: sqlite.clone(),
        busy_timeout: Duration::from_secs(5),
        keyring: keyring.clone(),
        postgres: None,
    })
    .await
    .unwrap();
    let ids = import(&source, &sandbox, 50).await;
    let t = now();
    for a in source
        .claim_due("copier", t, Duration::from_secs(1), 20)
        .await
        .unwrap()
    {
        let outcome = if a.id % 7 == 0 {
            Outcome::Rejected {
                account_id: a.id,
                generation: a.generation,
                reason: refreshd::model::ReauthReason::InvalidGrant,
                at: t,
                error: "invalid_grant".into(),
                http_status: Some(400),
                duration_ms: 3,
            }
        } else {
            Outcome::Rotated {
                account_id: a.id,
                generation: a.generation,
                tokens: tokens(format!("at-2-{}", a.id), format!("rt-2-{}", a.id)),
                at: t,
                next_refresh_at: t + 3000,
                status: Status::Active,
                reauth_reason: None,
                http_status: Some(200),
                duration_ms: 4,
            }
        };
        source.record(outcome).await.unwrap();
    }
    let before: Vec<_> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(source.get(*id).await.unwrap().unwrap());
        }
        v
    };
    source.close().await;
    drop(source);

    // A log row whose account is gone (removed while a refresh was in flight) is history too.
    rusqlite::Connection::open(&sqlite)
        .unwrap()
        .execute(
            "INSERT INTO refresh_log (account_id, at, outcome) VALUES (99999, ?1, 'superseded')",
            [t],
        )
        .unwrap();
    let logged: i64 = rusqlite::Connection::open(&sqlite)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM refresh_log", [], |r| r.get(0))
        .unwrap();

    // A mistyped URL is refused without echoing it (it may carry a password).
    let typo = url.replacen("postgres://", "postgress://", 1);
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            &typo,
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("unknown store scheme \"postgress\""), "{out}");
    assert!(!out.contains(&typo), "{out}");

    // SQLite -> PostgreSQL, the URL read from a file (not on the command line).
    let url_file = dir.path().join("store-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            &format!("@{}", url_file.display()),
            "--batch",
            "16",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("copied 50 account(s)"), "{out}");
    assert!(
        out.contains(&format!("and {logged} refresh-log row(s)")),
        "every log row, the orphan too: {out}"
    );
    assert!(
        !out.contains("refreshd_ci:") && !out.contains(":refreshd@"),
        "no password printed: {out}"
    );
    let forth = verified_line(&out);

    let pg = Store::open(StoreOptions {
        keyring: keyring.clone(),
        ..pg_store_options(&url, dir.path())
    })
    .await
    .unwrap();
    for a in &before {
        let b = pg.get(a.id).await.unwrap().unwrap();
        assert_eq!(
            (
                &b.subject,
                b.access_token.expose_secret(),
                b.refresh_token.expose_secret(),
                b.generation,
                b.status,
                b.reauth_reason
            ),
            (
                &a.subject,
                a.access_token.expose_secret(),
                a.refresh_token.expose_secret(),
                a.generation,
                a.status,
                a.reauth_reason
            )
        );
        assert_eq!(
            pg.log_entries(a.id, 10).await.unwrap().len(),
            if a.generation > 0 || a.status == Status::NeedsReauth {
                2
            } else {
                1
            }
        );
    }
    // New accounts on PostgreSQL get ids after the copied ones.
    let fresh = import_one(&pg, &sandbox, "after-copy").await;
    assert!(fresh > *ids.iter().max().unwrap(), "{fresh}");
    pg.remove(fresh).await.unwrap();
    pg.close().await;

    // PostgreSQL -> SQLite: the same rows, byte for byte.
    let back = dir.path().join("back.db");
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            &url,
            "--to",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(verified_line(&out), forth, "same checksums both ways");

    // Interrupted copy: the destination holds the first 20 accounts and the first log rows
    // (each table is copied in id order); the rerun resumes after them.
    let c = rusqlite::Connection::open(&back).unwrap();
    c.execute_batch(&format!(
        "DELETE FROM refresh_log WHERE id > 7; DELETE FROM accounts WHERE id > {0};",
        ids[19]
    ))
    .unwrap();
    drop(c);
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            &url,
            "--to",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("resumed after account {}", ids[19])),
        "{out}"
    );
    assert!(out.contains("copied 30 account(s)"), "{out}");
    assert_eq!(verified_line(&out), forth);

    // A destination holding other accounts is refused, and so is a source being refreshed.
    let foreign = dir.path().join("foreign.db");
    let f = Store::open(StoreOptions {
        path: foreign.clone(),
        busy_timeout: Duration::from_secs(5),
        keyring: keyring.clone(),
        postgres: None,
    })
    .await
    .unwrap();
    import_one(&f, &sandbox, "someone-else").await;
    f.close().await;
    drop(f);
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            foreign.to_str().unwrap(),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("copy into an empty store"), "{out}");
    let c = rusqlite::Connection::open(&sqlite).unwrap();
    c.execute(
        "UPDATE accounts SET lease_owner = 'x', lease_expires_at = ?1 WHERE id = ?2",
        rusqlite::params![now() + 600, ids[0]],
    )
    .unwrap();
    drop(c);
    let other = dir.path().join("other.db");
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            other.to_str().unwrap(),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("being refreshed right now"), "{out}");
    // Rotations waiting in the source's recovery file must be committed first.
    std::fs::write(refreshd::store::recovery_path(&sqlite), "").unwrap();
    let (code, out) = cli(
        &config,
        &[
            "store",
            "copy",
            "--from",
            sqlite.to_str().unwrap(),
            "--to",
            other.to_str().unwrap(),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("not yet committed"), "{out}");
}

async fn import_one(store: &Store, sandbox: &Sandbox, open_id: &str) -> i64 {
    let g = sandbox.grant(open_id, "user.info.basic", None);
    let t = now();
    store
        .upsert(
            vec![NewAccount {
                provider: "tiktok".into(),
                subject: open_id.into(),
                label: None,
                tokens: tokens(
                    g["access_token"].as_str().unwrap(),
                    g["refresh_token"].as_str().unwrap(),
                ),
                obtained_at: t,
                next_refresh_at: t + 3000,
                status: Status::Active,
                reauth_reason: None,
            }],
            t,
        )
        .await
        .unwrap()[0]
        .0
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

fn new_account(subject: &str, t: i64) -> NewAccount {
    NewAccount {
        provider: "tiktok".into(),
        subject: subject.into(),
        label: None,
        tokens: tokens(format!("at-{subject}"), format!("rt-{subject}")),
        obtained_at: t,
        next_refresh_at: t,
        status: Status::Active,
        reauth_reason: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_connecting_one_new_user_at_once_both_succeed() {
    let Some(url) =
        postgres_url("postgres::two_replicas_connecting_one_new_user_at_once_both_succeed").await
    else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(pg_store_options(&url, d1.path()))
        .await
        .unwrap();
    let b = Store::open(pg_store_options(&url, d2.path()))
        .await
        .unwrap();
    let t = now();
    for i in 0..30 {
        let s = format!("race-{i}");
        let (ra, rb) = tokio::join!(
            a.upsert(vec![new_account(&s, t)], t),
            b.upsert(vec![new_account(&s, t)], t)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra[0].0, rb[0].0, "one account");
        assert!(ra[0].1 ^ rb[0].1, "exactly one of them inserted it");
    }
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_database_refuses_for_good_is_quarantined_not_a_poison() {
    let Some(url) = postgres_url(
        "postgres::a_rotation_the_database_refuses_for_good_is_quarantined_not_a_poison",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(pg_store_options(&url, dir.path()))
        .await
        .unwrap();
    let t = now();
    let ids: Vec<i64> = store
        .upsert(vec![new_account("p1", t), new_account("p2", t)], t)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let claimed = store
        .claim_due("owner-a", t, Duration::from_secs(10), 10)
        .await
        .unwrap();
    let a = claimed.iter().find(|a| a.id == ids[0]).unwrap();
    // PostgreSQL text cannot hold a NUL: this rotation can never be stored.
    let bad = Outcome::Rotated {
        account_id: a.id,
        generation: a.generation,
        tokens: TokenSet {
            scope: Some("user\u{0}info".into()),
            ..tokens("at-new", "rt-new")
        },
        at: t + 1,
        next_refresh_at: t + 3000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 5,
    };
    assert_eq!(store.record(bad).await.unwrap(), Recorded::Deferred);
    assert_eq!(store.pending_rotations(), vec![a.id]);
    // While its rotation waits in the recovery file, the account is never claimed again
    // (its stored refresh token may be retired at the provider), even after the lease.
    let again = store
        .claim_due("owner-b", t + 60, Duration::from_secs(10), 10)
        .await
        .unwrap();
    assert!(again.iter().all(|x| x.id != a.id), "{again:?}");
    assert!(again.iter().any(|x| x.id == ids[1]));

    // The retry finds it refused for good: moved to the quarantine file, the rest unblocked.
    // The process's own recovery file: emptied once nothing in it waits any more.
    let recovery = store.own_recovery_path(&dir.path().join("refreshd.db"));
    let quarantine = PathBuf::from(format!("{}.rejected", recovery.display()));
    assert!(
        eventually(10, || async {
            quarantine.exists() && std::fs::metadata(&recovery).map_or(true, |m| m.len() == 0)
        })
        .await,
        "quarantined"
    );
    assert!(store.pending_rotations().is_empty());
    store.close().await;
    drop(store);
    // And a restart is not blocked by it.
    let reopened = Store::open(pg_store_options(&url, dir.path()))
        .await
        .unwrap();
    assert_eq!(reopened.get(ids[1]).await.unwrap().unwrap().subject, "p2");
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_is_one_transaction_without_running_out_of_locks() {
    let Some(url) =
        postgres_url("postgres::a_large_import_is_one_transaction_without_running_out_of_locks")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(pg_store_options(&url, dir.path()))
        .await
        .unwrap();
    let t = now();
    // More accounts than the server's lock table holds per transaction by default
    // (max_locks_per_transaction 64 x max_connections 100): no per-account lock may be kept.
    let accounts: Vec<NewAccount> = (0..10_000)
        .map(|i| new_account(&format!("bulk-{i:05}"), t))
        .collect();
    let ids = store.upsert(accounts, t).await.unwrap();
    assert_eq!(ids.len(), 10_000);
    assert!(ids.iter().all(|(_, inserted)| *inserted));
    store.close().await;
}

//! `refreshd run` replicas sharing one PostgreSQL database: they share the work, pick up a
//! killed one's leases, and connect one new user at once without a conflict.

use super::{import, new_account, open_pg, postgres_url, raw};
use crate::helpers::{CLIENT_KEY, CLIENT_SECRET, bin, eventually, now};
use refreshd::clock::Clock;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

    /// Refresh attempts whose answer was recorded as `superseded`.
    /// Superseded answers of attempts that outlived their lease (`lease_ended`), the only
    /// ones another replica may have refreshed at the same time.
    fn superseded_after_lease_ended(&self) -> usize {
        self.events("refresh")
            .iter()
            .filter(|e| e["outcome"] == "superseded" && e["lease_ended"] == true)
            .count()
    }

    /// This replica's log lines about one account.
    fn lines_of(&self, account: i64) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["account"] == account))
            .cloned()
            .collect()
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
    let store = open_pg(&url, dir.path()).await;
    let ids = import(&store, &sandbox, N).await;
    assert_eq!(ids.len(), N);

    // Debug lines name every lease given back unsent (`lease_released`) in a failure's history.
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
level = "debug"

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
    // A replica stalled past its lease (a loaded machine) may send a token another replica
    // has just rotated: one reuse, recorded as `superseded` with `lease_ended`, never a
    // flag. Any other reuse is two refreshes under valid leases.
    let superseded: usize = replicas
        .iter()
        .map(Replica::superseded_after_lease_ended)
        .sum();
    assert!(
        stats.reuse_rejected as usize <= superseded,
        "{stats:?}, {superseded} superseded after their lease ended"
    );
    assert_eq!(
        stats.refreshed, N as u64,
        "each account exactly once: {stats:?}"
    );
    let rotated = |r: &Replica| {
        r.events("refresh")
            .iter()
            .filter(|e| e["outcome"] == "rotated")
            .count()
    };
    // A rotation is logged after its commit, and its line read from the pipe after that:
    // the last ones can trail the generations just seen.
    eventually(10, || async {
        replicas.iter().map(rotated).sum::<usize>() >= N
    })
    .await;
    let per_replica: Vec<usize> = replicas.iter().map(rotated).collect();
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
    // must then be named for what it is. Everything else is picked up. A reuse that flagged
    // nothing is a stalled live replica's stale attempt (see phase 1).
    let superseded: usize = replicas
        .iter()
        .map(Replica::superseded_after_lease_ended)
        .sum();
    assert!(
        stats.reuse_rejected as usize <= flagged.len() + superseded && flagged.len() <= 8,
        "at most the victim's in-flight refreshes (concurrency 8): {flagged:?} {stats:?}, {superseded} superseded after their lease ended"
    );
    for (subject, _, _, reason) in &flagged {
        if reason.as_deref() != Some("refresh_interrupted") {
            // Seen once under heavy load: keep what every replica logged about the account.
            let id: i64 = db
                .query_one("SELECT id FROM accounts WHERE subject = $1", &[subject])
                .await
                .unwrap()
                .get(0);
            let history: Vec<String> = replicas
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    r.lines_of(id)
                        .into_iter()
                        .map(move |l| format!("replica {i}: {l}"))
                })
                .collect();
            panic!(
                "{subject} (account {id}) flagged {reason:?}, not refresh_interrupted; \
                 victim {victim}; its lines:\n{}",
                history.join("\n")
            );
        }
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
async fn two_replicas_connecting_one_new_user_at_once_both_succeed() {
    let Some(url) =
        postgres_url("postgres::two_replicas_connecting_one_new_user_at_once_both_succeed").await
    else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open_pg(&url, d1.path()).await;
    let b = open_pg(&url, d2.path()).await;
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

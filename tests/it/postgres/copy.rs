//! `store copy` between SQLite and PostgreSQL: sealed accounts and history both ways, resumed.

use super::{import, pg_store_options, postgres_url, tokens};
use crate::helpers::{bin, now};
use refreshd::clock::Clock;
use refreshd::model::Status;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use refreshd::store::{NewAccount, Outcome, Store, StoreOptions};
use secrecy::ExposeSecret;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Opens the SQLite store at `path` with tokens sealed by `keyring`.
async fn open_sealed_sqlite(path: &Path, keyring: &refreshd::crypto::Keyring) -> Store {
    Store::open(StoreOptions {
        path: path.to_path_buf(),
        busy_timeout: Duration::from_secs(5),
        keyring: keyring.clone(),
        postgres: None,
    })
    .await
    .unwrap()
}

/// `refreshd store copy --from FROM --to TO` with `config`.
fn store_copy(config: &Path, from: &str, to: &str) -> (Option<i32>, String) {
    cli(config, &["store", "copy", "--from", from, "--to", to])
}

fn verified_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("verified:"))
        .unwrap_or_else(|| panic!("no verification line in:\n{out}"))
        .to_string()
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
    let source = open_sealed_sqlite(&sqlite, &keyring).await;
    let ids = import(&source, &sandbox, 50).await;
    let t = now();
    for a in source
        .claim_due("copier", t, Duration::from_secs(1), 20)
        .await
        .unwrap()
    {
        let outcome = if a.id % 7 == 0 {
            Outcome::Rejected {
                owner: Some("copier".into()),
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
    let (code, out) = store_copy(&config, sqlite.to_str().unwrap(), &typo);
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
        out.contains(&format!(", {logged} refresh-log row(s) and 0 audit row(s)")),
        "every log row, the orphan too: {out}"
    );
    assert!(
        !out.contains("refreshd_ci:") && !out.contains(":refreshd@"),
        "no password printed: {out}"
    );
    let forth = verified_line(&out);
    assert!(forth.ends_with("audit_log 0 rows sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"), "{forth}");

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
    let by = refreshd::store::Actor {
        who: "copy test".into(),
        via: "tests/it/postgres/copy.rs".into(),
    };
    pg.remove(fresh, 0, &by, None).await.unwrap();
    pg.close().await;

    // PostgreSQL -> SQLite: the same rows, byte for byte.
    let back = dir.path().join("back.db");
    let (code, out) = store_copy(&config, &url, back.to_str().unwrap());
    assert_eq!(code, Some(0), "{out}");
    // The same accounts and log; the removal's audit row (the only trace of `fresh`) moved too.
    let accounts_and_log = |line: &str| line.split("; audit_log").next().unwrap().to_string();
    let back_line = verified_line(&out);
    assert_eq!(
        accounts_and_log(&back_line),
        accounts_and_log(&forth),
        "same checksums both ways"
    );
    assert!(back_line.contains("audit_log 1 rows"), "{back_line}");
    let copied = open_sealed_sqlite(&back, &keyring).await;
    let trail = copied.audit_entries(fresh).await.unwrap();
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(
        (trail[0].action.as_str(), trail[0].who.as_str()),
        ("removed", "copy test")
    );
    copied.close().await;

    // Interrupted copy: the destination holds the first 20 accounts and the first log rows
    // (each table is copied in id order); the rerun resumes after them.
    let c = rusqlite::Connection::open(&back).unwrap();
    c.execute_batch(&format!(
        "DELETE FROM refresh_log WHERE id > 7; DELETE FROM accounts WHERE id > {0};",
        ids[19]
    ))
    .unwrap();
    drop(c);
    let (code, out) = store_copy(&config, &url, back.to_str().unwrap());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("resumed after account {}", ids[19])),
        "{out}"
    );
    assert!(out.contains("copied 30 account(s)"), "{out}");
    assert_eq!(verified_line(&out), back_line);

    // A destination holding other accounts is refused, and so is a source being refreshed.
    let foreign = dir.path().join("foreign.db");
    let f = open_sealed_sqlite(&foreign, &keyring).await;
    import_one(&f, &sandbox, "someone-else").await;
    f.close().await;
    drop(f);
    let (code, out) = store_copy(&config, sqlite.to_str().unwrap(), foreign.to_str().unwrap());
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
    let (code, out) = store_copy(&config, sqlite.to_str().unwrap(), other.to_str().unwrap());
    assert_ne!(code, Some(0));
    assert!(out.contains("being refreshed right now"), "{out}");
    // Rotations waiting in the source's recovery file must be committed first.
    std::fs::write(refreshd::store::recovery_path(&sqlite), "").unwrap();
    let (code, out) = store_copy(&config, sqlite.to_str().unwrap(), other.to_str().unwrap());
    assert_ne!(code, Some(0));
    assert!(out.contains("not yet committed"), "{out}");
}

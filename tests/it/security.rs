//! Encryption at rest through the library and the binary: sealed round trips, no clear token
//! in any file of the store, a wrong or missing key refused at start, rows that cannot be
//! swapped, and `rekey` (in place, key rotation, resumable, beside a running daemon).

use crate::helpers::{self, TestApp};
use refreshd::config::Config;
use refreshd::crypto::{Keyring, generate_key_file};
use refreshd::model::{Status, TokenSet};
use refreshd::sandbox::SandboxConfig;
use refreshd::store::{self, Outcome, Recorded, Store, StoreError, StoreOptions, recovery_path};
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn key(app: &TestApp, name: &str) -> PathBuf {
    let p = app.dir.path().join(name);
    generate_key_file(&p).expect("keygen");
    p
}

fn ring(primary: Option<&Path>, older: &[&Path]) -> Keyring {
    let older: Vec<PathBuf> = older.iter().map(|p| p.to_path_buf()).collect();
    Keyring::load(primary, &older).expect("keys")
}

async fn open(app: &TestApp, keyring: Keyring) -> Result<Store, StoreError> {
    Store::open(StoreOptions {
        path: app.db.clone(),
        busy_timeout: Duration::from_secs(2),
        keyring,
        postgres: None,
    })
    .await
}

/// The test config with `[store]` keys added.
fn config(app: &TestApp, store_keys: &str) -> Config {
    let text = helpers::config_toml(&app.db, &app.sandbox.token_url(), "").replacen(
        "[store]\n",
        &format!("[store]\n{store_keys}\n"),
        1,
    );
    Config::from_toml_str(&text).expect("test config")
}

/// The clear tokens of every account, read through `store`.
async fn tokens(store: &Store, ids: &[i64]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let a = store.get(*id).await.unwrap().unwrap();
        out.push(a.access_token.expose_secret().to_string());
        out.push(a.refresh_token.expose_secret().to_string());
    }
    out
}

/// Every file of the store that exists: database, WAL, SHM, recovery file.
fn store_bytes(db: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = vec![db.to_path_buf(), recovery_path(db)];
    files.extend(store::pending_recovery_files(db));
    for suffix in ["-wal", "-shm"] {
        let mut s = db.as_os_str().to_owned();
        s.push(suffix);
        files.push(PathBuf::from(s));
    }
    files
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn assert_no_clear_token(db: &Path, secrets: &[String]) {
    // Indexed by the first 4 bytes: one pass over each file, whatever the number of secrets.
    let mut by_prefix: std::collections::HashMap<&[u8], Vec<&[u8]>> = Default::default();
    for s in secrets {
        assert!(s.len() >= 8, "test secrets are long enough to be unique");
        by_prefix
            .entry(&s.as_bytes()[..4])
            .or_default()
            .push(s.as_bytes());
    }
    for (path, bytes) in store_bytes(db) {
        for i in 0..bytes.len().saturating_sub(3) {
            if let Some(candidates) = by_prefix.get(&bytes[i..i + 4]) {
                for s in candidates {
                    assert!(
                        !bytes[i..].starts_with(s),
                        "{} holds a clear token ({}…)",
                        path.display(),
                        String::from_utf8_lossy(&s[..8])
                    );
                }
            }
        }
    }
}

fn sealed_values(db: &Path) -> Vec<(i64, String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT id, access_token, refresh_token FROM accounts ORDER BY id")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn rotated(id: i64, generation: i64, access: &str, refresh: &str, at: i64) -> Outcome {
    Outcome::Rotated {
        account_id: id,
        generation,
        tokens: TokenSet {
            access_token: SecretString::from(access.to_string()),
            refresh_token: Some(SecretString::from(refresh.to_string())),
            expires_in: 7200,
            refresh_expires_in: None,
            subject: None,
            scope: None,
            token_type: "Bearer".into(),
        },
        at,
        next_refresh_at: at + 6000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 1,
    }
}

#[tokio::test]
async fn encrypted_store_round_trips_and_no_file_holds_a_clear_token() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = key(&app, "token.key");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", k.display().to_string()),
    );
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let ids = app.import(&store, &cfg, &["u1", "u2", "u3"], None).await;
    let imported = tokens(&store, &ids).await;
    for (_, at, rt) in sealed_values(&app.db) {
        assert!(
            at.starts_with("enc:v1:") && rt.starts_with("enc:v1:"),
            "{at}"
        );
    }
    // A rotation through the real refresh path is sealed too.
    app.clock
        .set(store.get(ids[0]).await.unwrap().unwrap().next_refresh_at);
    store.close().await;
    let report = refreshd::lifecycle::run(
        cfg.clone(),
        refreshd::lifecycle::RunOptions {
            once: true,
            ..refreshd::lifecycle::RunOptions::new(app.clock.clone())
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("run --once");
    assert_eq!(report.stats.rotated, 3, "{report:?}");
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let now = tokens(&store, &ids).await;
    assert_ne!(now, imported, "the tokens rotated");

    // A deferred rotation (database locked) goes to the recovery file: sealed there too.
    let locker = rusqlite::Connection::open(&app.db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let a = store.get(ids[1]).await.unwrap().unwrap();
    let deferred = [
        "act.DEFERRED-ACCESS-0123456789",
        "rft.DEFERRED-REFRESH-0123456789",
    ];
    let r = store
        .record(rotated(
            ids[1],
            a.generation,
            deferred[0],
            deferred[1],
            app.clock.now(),
        ))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Deferred);
    let recovery = std::fs::read_to_string(store.own_recovery_path(&app.db)).unwrap();
    assert!(recovery.contains("enc:v1:"), "{recovery}");
    let mut secrets: Vec<String> = imported.iter().chain(&now).cloned().collect();
    secrets.extend(deferred.iter().map(|s| s.to_string()));
    assert!(
        store_bytes(&app.db).len() >= 3,
        "database, WAL and recovery file expected"
    );
    assert_no_clear_token(&app.db, &secrets);
    drop(locker);
    store.close().await;

    // Reopened with the key, the deferred rotation was committed and reads back clear.
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let a = store.get(ids[1]).await.unwrap().unwrap();
    assert_eq!(a.access_token.expose_secret(), deferred[0]);
    assert_eq!(a.refresh_token.expose_secret(), deferred[1]);
    assert_no_clear_token(&app.db, &secrets);
    store.close().await;
}

#[tokio::test]
async fn a_key_that_opens_nothing_is_refused_at_start_naming_the_key() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let good = key(&app, "good.key");
    let other = key(&app, "other.key");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", good.display().to_string()),
    );
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    app.import(&store, &cfg, &["u1"], None).await;
    store.close().await;
    let good_id = cfg.store.keyring.primary_id().unwrap().to_string();

    let e = open(&app, ring(Some(&other), &[])).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::MissingKey { .. }), "{msg}");
    assert!(msg.contains(&good_id), "{msg}");
    assert!(msg.contains(&other.display().to_string()), "{msg}");
    // No key at all, and read-only opens (accounts list/show) too.
    let e = open(&app, Keyring::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&good_id) && e.contains("encryption_key_file"),
        "{e}"
    );
    let ro = Store::open_read_only(StoreOptions {
        path: app.db.clone(),
        busy_timeout: Duration::from_secs(2),
        keyring: Keyring::default(),
        postgres: None,
    })
    .await;
    assert!(ro.is_err());

    // The binary says so and exits non-zero without touching any account.
    let bad_cfg = app.dir.path().join("bad.toml");
    std::fs::write(
        &bad_cfg,
        helpers::config_toml(&app.db, &app.sandbox.token_url(), "").replacen(
            "[store]\n",
            &format!(
                "[store]\nencryption_key_file = {:?}\n",
                other.display().to_string()
            ),
            1,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(helpers::bin())
        .args(["--config", bad_cfg.to_str().unwrap(), "run", "--once"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&good_id), "{stderr}");
    let store = open(&app, ring(Some(&good), &[])).await.unwrap();
    assert_eq!(store.get(1).await.unwrap().unwrap().status, Status::Active);
    store.close().await;
}

#[tokio::test]
async fn sealed_values_cannot_be_swapped_between_rows() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = key(&app, "k");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", k.display().to_string()),
    );
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let ids = app.import(&store, &cfg, &["u1", "u2", "u3"], None).await;
    // An attacker with write access to the file gives u1 the tokens of u2.
    let c = rusqlite::Connection::open(&app.db).unwrap();
    c.execute(
        "UPDATE accounts SET refresh_token = (SELECT refresh_token FROM accounts WHERE id = ?2)
         WHERE id = ?1",
        [ids[0], ids[1]],
    )
    .unwrap();
    let e = store.get(ids[0]).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("account {}", ids[0])) && e.contains("refresh_token"),
        "{e}"
    );
    // The others are still served: claiming skips the altered row.
    app.clock.advance(Duration::from_secs(3 * 3600));
    let claimed = store
        .claim_due("t", app.clock.now(), Duration::from_secs(60), 10)
        .await
        .unwrap();
    let claimed: Vec<i64> = claimed.iter().map(|a| a.id).collect();
    assert_eq!(claimed, vec![ids[1], ids[2]]);
    store.close().await;
}

#[tokio::test]
async fn a_garbled_value_is_its_rows_problem_only() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = key(&app, "k");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", k.display().to_string()),
    );
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let ids = app.import(&store, &cfg, &["u1", "u2", "u3"], None).await;
    store.close().await;
    let c = rusqlite::Connection::open(&app.db).unwrap();
    for (id, garbage) in [
        (ids[0], "enc:v1:garbage"),
        (ids[1], "enc:v1:0123456789abcdeX:AAAA"),
    ] {
        c.execute(
            "UPDATE accounts SET access_token = ?2 WHERE id = ?1",
            rusqlite::params![id, garbage],
        )
        .unwrap();
    }
    drop(c);
    // The store still opens; the garbled rows say what is wrong; the third is served.
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let e = store.get(ids[0]).await.unwrap_err().to_string();
    assert!(e.contains("not a well-formed sealed value"), "{e}");
    app.clock.advance(Duration::from_secs(3 * 3600));
    let claimed = store
        .claim_due("t", app.clock.now(), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![ids[2]]
    );
    store.close().await;
}

#[tokio::test]
async fn rekey_encrypts_in_place_then_rotates_keys_resumably() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let clear_cfg = config(&app, "");
    let store = open(&app, Keyring::default()).await.unwrap();
    let names: Vec<String> = (0..7).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = app.import(&store, &clear_cfg, &names, None).await;
    let clear = tokens(&store, &ids).await;
    store.close().await;

    // Encrypt in place, interrupted after one batch of 3, then resumed.
    let a = key(&app, "a.key");
    let store = open(&app, ring(Some(&a), &[])).await.unwrap();
    assert_eq!(store.count_to_rekey().await.unwrap(), 7);
    let first = store.rekey_batch(0, 3).await.unwrap();
    assert_eq!(first.resealed, 3);
    store.close().await;
    let store = open(&app, ring(Some(&a), &[])).await.unwrap();
    assert_eq!(store.count_to_rekey().await.unwrap(), 4);
    assert_eq!(
        tokens(&store, &ids).await,
        clear,
        "clear and sealed rows both read"
    );
    let mut progress = 0;
    let report = store::rekey(&store, 3, |n| progress += n).await.unwrap();
    assert_eq!((report.resealed, report.remaining, progress), (4, 0, 4));
    store.close().await;
    assert_no_clear_token(&app.db, &clear);

    // Rotate to key b: a daemon still on key a keeps writing meanwhile.
    let b = key(&app, "b.key");
    let store = open(&app, ring(Some(&b), &[&a])).await.unwrap();
    let old_daemon = open(&app, ring(Some(&a), &[])).await;
    // The old daemon cannot open rows already under b... but before rekey, all are under a.
    let old_daemon = old_daemon.unwrap();
    store.rekey_batch(0, 4).await.unwrap();
    let g = store.get(ids[1]).await.unwrap().unwrap().generation;
    let r = old_daemon
        .record(rotated(
            ids[1],
            g,
            "act.WRITTEN-UNDER-A-0000",
            "rft.WRITTEN-UNDER-A-0000",
            app.clock.now(),
        ))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Applied);
    old_daemon.close().await;
    let report = store::rekey(&store, 4, |_| {}).await.unwrap();
    assert_eq!(report.remaining, 0, "{report:?}");
    store.close().await;
    let b_id = ring(Some(&b), &[]).primary_id().unwrap().to_string();
    for (_, at, rt) in sealed_values(&app.db) {
        assert!(at.contains(&b_id) && rt.contains(&b_id), "{at} {rt}");
    }
    // Key a can go: b alone opens everything, including the old daemon's rotation.
    let store = open(&app, ring(Some(&b), &[])).await.unwrap();
    let a1 = store.get(ids[1]).await.unwrap().unwrap();
    assert_eq!(a1.access_token.expose_secret(), "act.WRITTEN-UNDER-A-0000");
    store.close().await;
}

#[tokio::test]
async fn rekey_never_loses_a_rotation_in_flight() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let a = key(&app, "a.key");
    let b = key(&app, "b.key");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", a.display().to_string()),
    );
    let daemon = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let ids = app.import(&daemon, &cfg, &["u1", "u2"], None).await;
    // The daemon claims u1 and asks the provider...
    app.clock.advance(Duration::from_secs(3 * 3600));
    let claimed = daemon
        .claim_due("daemon", app.clock.now(), Duration::from_secs(60), 1)
        .await
        .unwrap();
    let generation = claimed[0].generation;
    // ...while rekey re-seals every row, the claimed one included...
    let rekey = open(&app, ring(Some(&b), &[&a])).await.unwrap();
    let report = store::rekey(&rekey, 100, |_| {}).await.unwrap();
    assert_eq!(report.resealed, 2);
    // ...then the provider's rotation arrives: it must still be stored.
    let r = daemon
        .record(rotated(
            claimed[0].id,
            generation,
            "act.NEW-0000000000",
            "rft.NEW-0000000000",
            app.clock.now(),
        ))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Applied);
    daemon.close().await;
    let a1 = rekey.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(a1.refresh_token.expose_secret(), "rft.NEW-0000000000");
    // The daemon wrote under a: one row for the next rekey pass.
    assert_eq!(rekey.count_to_rekey().await.unwrap(), 1);
    assert_eq!(
        store::rekey(&rekey, 100, |_| {}).await.unwrap().remaining,
        0
    );
    rekey.close().await;
}

#[tokio::test]
async fn keygen_and_rekey_through_the_binary() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = app.dir.path().join("cli.key");
    let run = |args: &[&str]| {
        std::process::Command::new(helpers::bin())
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = run(&["keygen", k.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(ring(Some(&k), &[]).primary_id(), Some(id.as_str()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let out = run(&["keygen", k.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let store = open(&app, Keyring::default()).await.unwrap();
    let ids = app
        .import(&store, &config(&app, ""), &["u1", "u2"], None)
        .await;
    let clear = tokens(&store, &ids).await;
    store.close().await;
    let cfg = app.dir.path().join("enc.toml");
    std::fs::write(
        &cfg,
        helpers::config_toml(&app.db, &app.sandbox.token_url(), "").replacen(
            "[store]\n",
            &format!(
                "[store]\nencryption_key_file = {:?}\n",
                k.display().to_string()
            ),
            1,
        ),
    )
    .unwrap();
    let out = run(&["--config", cfg.to_str().unwrap(), "rekey", "--batch", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("re-sealed 2 account(s)") && stdout.contains(&id),
        "{stdout}"
    );
    // No progress bar drawn on a pipe.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("accounts re-sealed"));
    assert_no_clear_token(&app.db, &clear);
    let out = run(&["--config", cfg.to_str().unwrap(), "accounts", "list"]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn debug_of_config_and_account_types_redacts() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = key(&app, "k");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", k.display().to_string()),
    );
    let store = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let ids = app.import(&store, &cfg, &["u1"], None).await;
    let account = store.get(ids[0]).await.unwrap().unwrap();
    let mut secrets = tokens(&store, &ids).await;
    secrets.push(helpers::CLIENT_SECRET.to_string());
    secrets.push(std::fs::read_to_string(&k).unwrap().trim().to_string());
    let outcome = rotated(1, 0, &secrets[0], &secrets[1], 0);
    let debug = format!(
        "{cfg:?} {account:?} {outcome:?} {:?} {:?} {store:?}",
        cfg.store.keyring, cfg.providers
    );
    assert!(debug.contains("REDACTED"), "{debug}");
    for s in &secrets {
        assert!(!debug.contains(s.as_str()), "Debug shows a secret: {debug}");
    }
    store.close().await;
}

#[cfg(unix)]
#[tokio::test]
async fn files_readable_by_others_warn_or_refuse_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::start(SandboxConfig::default()).await;
    let k = key(&app, "k");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let write_config = |policy: &str| {
        let p = app.dir.path().join(format!("{policy}.toml"));
        std::fs::write(
            &p,
            helpers::config_toml(&app.db, &app.sandbox.token_url(), "").replacen(
                "[store]\n",
                &format!(
                    "[store]\nencryption_key_file = {:?}\npermissions = {policy:?}\ncreate = true\n",
                    k.display().to_string()
                ),
                1,
            ),
        )
        .unwrap();
        p
    };
    let run = |cfg: &Path| {
        std::process::Command::new(helpers::bin())
            .args(["--config", cfg.to_str().unwrap(), "run", "--once"])
            .env_remove("RUST_LOG")
            .env("REFRESHD_LOG__FORMAT", "json")
            .output()
            .unwrap()
    };
    let out = run(&write_config("refuse"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&k.display().to_string()) && stderr.contains("644"),
        "{stderr}"
    );
    assert!(!app.db.exists(), "nothing was created");

    let out = run(&write_config("warn"));
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("file_readable_by_others"), "{log}");
    // Root is warned about (CI containers often run as root; elsewhere nothing to see).
    assert_eq!(
        log.contains("running_as_root"),
        refreshd::hardening::running_as_root(),
        "{log}"
    );
    // What refreshd created itself is private.
    for path in [app.db.clone(), k.with_file_name("refreshd.db-wal")] {
        if let Ok(m) = std::fs::metadata(&path) {
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", path.display());
        }
    }
}

/// A daemon refreshing every account (the sandbox rotates each refresh token) while
/// `rekey` encrypts the store in place in small batches, on two connections to one file:
/// afterwards every stored refresh token is the provider's current one (no rotation lost)
/// and every row is sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_beside_a_refreshing_daemon_loses_no_rotation() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let clear_cfg = config(&app, "");
    let names: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = open(&app, Keyring::default()).await.unwrap();
    let ids = app.import(&store, &clear_cfg, &names, None).await;
    let clear = tokens(&store, &ids).await;
    store.close().await;

    // Both processes already run with the new key.
    let k = key(&app, "k");
    let cfg = config(
        &app,
        &format!("encryption_key_file = {:?}", k.display().to_string()),
    );
    let daemon = open(&app, cfg.store.keyring.clone()).await.unwrap();
    let rekey = open(&app, cfg.store.keyring.clone()).await.unwrap();
    app.clock.advance(Duration::from_secs(3 * 3600));
    let settings = std::sync::Arc::new(refreshd::engine::Settings::new(cfg.clone()).unwrap());
    let (_tx, rx) = tokio::sync::watch::channel(settings);
    let engine = refreshd::engine::Engine::new(daemon.clone(), app.clock.clone(), rx);
    let refreshing = tokio::spawn({
        let e = engine.clone();
        async move { e.run_due(tokio_util::sync::CancellationToken::new()).await }
    });
    let report = store::rekey(&rekey, 7, |_| {}).await.unwrap();
    refreshing.await.unwrap().unwrap();
    assert_eq!(engine.stats().snapshot().rotated, 200);
    assert_eq!(report.remaining, 0, "{report:?}");
    assert_eq!(rekey.count_to_rekey().await.unwrap(), 0);
    for (id, name) in ids.iter().zip(&names) {
        let a = rekey.get(*id).await.unwrap().unwrap();
        assert_eq!(
            Some(a.refresh_token.expose_secret().to_string()),
            app.sandbox.current_refresh_token(name),
            "account {id}"
        );
    }
    let rotated = tokens(&rekey, &ids).await;
    daemon.close().await;
    rekey.close().await;
    let all: Vec<String> = clear.into_iter().chain(rotated).collect();
    assert_no_clear_token(&app.db, &all);
}

//! Token file sinks through the daemon (`lifecycle::run`) on the manual clock: written at
//! start-up, replaced atomically after each rotation, never another account's token.

use crate::helpers::{self, TestApp};
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Status;
use refreshd::sandbox::SandboxConfig;
use refreshd::store::Store;
use secrecy::ExposeSecret;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio_util::sync::CancellationToken;

async fn access_token(store: &Store, id: i64) -> String {
    let a = store.get(id).await.unwrap().expect("account");
    a.access_token.expose_secret().to_string()
}

fn read_json(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Reads `path` in a loop on its own thread until stopped; counts reads and torn contents
/// (a file that exists but is not a whole JSON document).
struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    torn: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Reader {
    fn start(path: PathBuf) -> Reader {
        let (stop, reads, torn) = Default::default();
        let (s, r, t): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            (Arc::clone(&stop), Arc::clone(&reads), Arc::clone(&torn));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        r.fetch_add(1, Ordering::Relaxed);
                        let whole = serde_json::from_slice::<serde_json::Value>(&bytes)
                            .is_ok_and(|v| v["access_token"].is_string());
                        if !whole {
                            t.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        t.fetch_add(1, Ordering::Relaxed); // a rename never leaves a gap
                    }
                }
            }
        });
        Reader {
            stop,
            reads,
            torn,
            thread,
        }
    }

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (
            self.reads.load(Ordering::Relaxed),
            self.torn.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_files_written_at_start_and_replaced_atomically_after_rotation() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let ids = app
        .import(&store, &app.config(""), &["u1", "u2", "gone"], None)
        .await;
    let ids: [i64; 3] = ids.try_into().unwrap();
    let dir = app.dir.path();
    let (json, token, stale, missing) = (
        dir.join("u1.json"),
        dir.join("u2.token"),
        dir.join("gone.json"),
        dir.join("missing.json"),
    );
    let config = app.config(&format!(
        r#"
[[sink]]
account = {u1}
path = {json:?}

[[sink]]
provider = "tiktok"
subject = "u2"
path = {token:?}
format = "token"
mode = "0640"

[[sink]]
account = {gone}
provider = "tiktok"
subject = "gone"
path = {stale:?}

[[sink]]
account = 999999
path = {missing:?}
"#,
        u1 = ids[0],
        gone = ids[2],
    ));
    app.sandbox.revoke("gone");

    let shutdown = CancellationToken::new();
    let written_when_ready = Arc::new(AtomicBool::new(false));
    let daemon = {
        let (config, clock, s) = (config.clone(), app.clock.clone(), shutdown.clone());
        let (flag, json) = (written_when_ready.clone(), json.clone());
        let opts = RunOptions {
            on_ready: Some(Box::new(move |_, _, _| {
                flag.store(json.exists(), Ordering::SeqCst)
            })),
            ..RunOptions::new(clock)
        };
        tokio::spawn(async move { lifecycle::run(config, opts, s).await })
    };

    // Start-up: every sink whose account can be used is written, before the daemon is ready.
    let first = access_token(&store, ids[0]).await;
    let (j, t, st) = (&json, &token, &stale);
    assert!(
        helpers::eventually(5, || async move { j.exists() && t.exists() && st.exists() }).await,
        "sinks not written at start-up"
    );
    let w = &written_when_ready;
    assert!(helpers::eventually(5, || async move { w.load(Ordering::SeqCst) }).await);
    let doc = read_json(&json).unwrap();
    assert_eq!(doc["access_token"], first.as_str());
    assert_eq!(doc["account_id"], ids[0]);
    assert_eq!(doc["provider"], "tiktok");
    assert_eq!(doc["subject"], "u1");
    assert_eq!(doc["scope"], "user.info.basic,video.list");
    let expires = store.get(ids[0]).await.unwrap().unwrap().access_expires_at;
    assert_eq!(
        doc["expires_at"],
        refreshd::clock::rfc3339(expires).as_str()
    );
    assert_eq!(
        std::fs::read_to_string(&token).unwrap(),
        access_token(&store, ids[1]).await,
        "token format: the bare token, no newline"
    );
    let meta = std::fs::metadata(&json).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let stale_before = std::fs::read(&stale).unwrap();
    assert!(
        !missing.exists(),
        "a sink of a missing account writes nothing"
    );

    // Rotation: the file is replaced (new inode) and a reader never sees a torn file.
    let reader = Reader::start(json.clone());
    let mut due = i64::MIN;
    for &id in &ids {
        due = due.max(store.get(id).await.unwrap().unwrap().next_refresh_at);
    }
    app.clock.set(due);
    let (s, j, f) = (&store, &json, &first);
    let rotated = helpers::eventually(5, || async move {
        let now = access_token(s, ids[0]).await;
        now != *f && read_json(j).is_some_and(|d| d["access_token"] == now.as_str())
    })
    .await;
    let (reads, torn) = reader.finish();
    assert!(rotated, "sink not rewritten after the rotation");
    assert!(reads > 0);
    assert_eq!(
        torn, 0,
        "{torn} of {reads} reads saw a missing or partial file"
    );
    let after = std::fs::metadata(&json).unwrap();
    assert_ne!(
        after.ino(),
        meta.ino(),
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(after.permissions().mode() & 0o777, 0o600);
    let (s, t) = (&store, &token);
    assert!(
        helpers::eventually(5, || async move {
            std::fs::read_to_string(t).unwrap() == access_token(s, ids[1]).await
        })
        .await
    );

    // The revoked account is flagged; its file stays as it was, no other token in it.
    let flagged = helpers::eventually(5, || async move {
        s.get(ids[2]).await.unwrap().unwrap().status == Status::NeedsReauth
    })
    .await;
    assert!(flagged);
    shutdown.cancel();
    daemon.await.unwrap().expect("daemon run");
    assert_eq!(std::fs::read(&stale).unwrap(), stale_before);
    assert!(!missing.exists());
    // No temp file is left in the directory.
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn run_once_writes_sinks_too() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let id = app.import(&store, &app.config(""), &["u1"], None).await[0];
    let path = app.dir.path().join("t");
    let config = app.config(&format!(
        "[[sink]]\naccount = {id}\npath = {path:?}\nformat = \"token\"\n"
    ));
    lifecycle::run(
        config,
        RunOptions {
            once: true,
            ..RunOptions::new(app.clock.clone())
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        access_token(&store, id).await
    );
}

#[tokio::test]
async fn sink_follows_an_account_imported_and_replaced_by_another_process() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let path = app.dir.path().join("late.json");
    let toml = helpers::config_toml(
        &app.db,
        &app.sandbox.token_url(),
        &format!("[[sink]]\nprovider = \"tiktok\"\nsubject = \"late\"\npath = {path:?}\n"),
    )
    .replace("max_idle = \"1s\"", "max_idle = \"50ms\"")
    // The daemon starts first, on a store nothing has created yet.
    .replace("[store]\n", "[store]\ncreate = true\n");
    let config = refreshd::config::Config::from_toml_str(&toml).unwrap();
    let shutdown = CancellationToken::new();
    let daemon = {
        let (config, clock, s) = (config.clone(), app.clock.clone(), shutdown.clone());
        tokio::spawn(async move { lifecycle::run(config, RunOptions::new(clock), s).await })
    };
    // The account does not exist yet: nothing is written.
    let store = app.store().await;
    assert!(store.find("tiktok", "late").await.unwrap().is_none());
    assert!(!path.exists());

    // Imported by another process (the CLI): no event here, the periodic check finds it.
    let id = app.import(&store, &config, &["late"], None).await[0];
    let (s, p) = (&store, &path);
    let follows = || async move {
        let now = access_token(s, id).await;
        read_json(p).is_some_and(|d| d["access_token"] == now.as_str())
    };
    if !helpers::eventually(5, follows).await {
        shutdown.cancel();
        panic!(
            "imported account's sink not written; daemon: {:?}",
            daemon.await
        );
    }
    let first = access_token(&store, id).await;

    // New tokens from another process (a re-import): the file follows.
    app.import(&store, &config, &["late"], None).await;
    assert_ne!(access_token(&store, id).await, first);
    assert!(helpers::eventually(5, follows).await, "sink not rewritten");
    shutdown.cancel();
    daemon.await.unwrap().expect("daemon run");
}

#[test]
fn check_names_a_sink_whose_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("t.json");
    let bad = dir.path().join("no-such-dir/t.json");
    let cfg = dir.path().join("refreshd.toml");
    std::fs::write(
        &cfg,
        helpers::config_toml(
            &dir.path().join("refreshd.db"),
            "http://127.0.0.1:9/token",
            &format!(
                "[[sink]]\naccount = 1\npath = {good:?}\n[[sink]]\naccount = 2\npath = {bad:?}\nformat = \"token\"\n[notify.webhook]\nurl = \"https://hooks.example.com/T0/SECRET-PATH\"\nsecret = \"s\"\n"
            ),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(helpers::bin())
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .env_remove("REFRESHD_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "sink {}: ok, account 1, format json, mode 0600",
            good.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("sink {}: FAILED", bad.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("webhook: ok, POST to https://hooks.example.com/…"),
        "{stdout}"
    );
    assert!(!stdout.contains("SECRET-PATH"), "{stdout}");
    assert!(!good.exists(), "check writes no token file");
}

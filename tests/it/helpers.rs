//! Shared set-up, written once for every test module: temp database, sandbox provider on
//! loopback, a config pointing at both, opening a store, importing accounts, reading one
//! back, running the binary.

#![allow(dead_code)]

use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::model::Account;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use refreshd::store::{Store, StoreOptions};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;
use tempfile::TempDir;

/// Logs to the test output only when TEST_LOG is set.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber_init();
        }
    });
}

fn tracing_subscriber_init() -> Option<()> {
    refreshd::telemetry::init(&refreshd::config::LogConfig {
        format: refreshd::config::LogFormat::Pretty,
        level: std::env::var("TEST_LOG")
            .ok()
            .filter(|l| l != "1")
            .unwrap_or_else(|| "debug".into()),
        ..Default::default()
    });
    Some(())
}

pub const CLIENT_KEY: &str = "sandbox-client-key";
pub const CLIENT_SECRET: &str = "sandbox-client-secret";

/// A config TOML for tests: short timings, the given token URL and database. `extra` is
/// appended (later tables/keys may not repeat earlier ones).
pub fn config_toml(db: &Path, token_url: &str, extra: &str) -> String {
    format!(
        r#"
[store]
path = {db:?}
lease = "30s"
busy_timeout = "2s"

[refresh]
lead = "10m"
lead_fraction = 0.1
jitter = "0s"
min_interval = "1m"
backoff_base = "30s"
backoff_max = "30m"
request_timeout = "5s"
connect_timeout = "2s"
max_idle = "1s"
concurrency = 16

[providers.tiktok]
client_key = "{CLIENT_KEY}"
client_secret = "{CLIENT_SECRET}"
token_url = {token_url:?}
rate_limit = 600000
burst = 1000
{extra}
"#,
        db = db.display().to_string(),
    )
}

/// A test world: temp dir with a database path, a sandbox on loopback and a manual clock
/// shared by both (so days can pass in milliseconds).
pub struct TestApp {
    pub dir: TempDir,
    pub db: PathBuf,
    pub clock: Clock,
    pub sandbox: Sandbox,
}

/// Unix time the manual clocks start at (2026-11-25T00:00:00Z).
pub const T0: i64 = 1_795_564_800;

impl TestApp {
    pub async fn start(sandbox: SandboxConfig) -> TestApp {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("refreshd.db");
        let clock = Clock::manual(T0);
        let sandbox = Sandbox::start(sandbox, clock.clone())
            .await
            .expect("sandbox");
        TestApp {
            dir,
            db,
            clock,
            sandbox,
        }
    }

    pub fn config(&self, extra: &str) -> Config {
        Config::from_toml_str(&config_toml(&self.db, &self.sandbox.token_url(), extra))
            .expect("test config")
    }

    pub fn config_path(&self, extra: &str) -> PathBuf {
        let p = self.dir.path().join("refreshd.toml");
        std::fs::write(&p, config_toml(&self.db, &self.sandbox.token_url(), extra))
            .expect("write config");
        p
    }

    pub async fn store(&self) -> Store {
        open_store(&self.db, Duration::from_secs(2)).await
    }

    /// One import line for a fresh sandbox grant of `open_id`.
    pub fn grant_line(&self, open_id: &str, refresh_ttl: Option<Duration>) -> String {
        let mut g = self
            .sandbox
            .grant(open_id, "user.info.basic,video.list", refresh_ttl);
        g["provider"] = "tiktok".into();
        g["label"] = format!("label of {open_id}").into();
        g["obtained_at"] = self.clock.now().into();
        g.to_string()
    }

    /// Imports fresh grants for `open_ids` through the real import path; returns their ids.
    pub async fn import(
        &self,
        store: &Store,
        config: &Config,
        open_ids: &[&str],
        refresh_ttl: Option<Duration>,
    ) -> Vec<i64> {
        let text: String = open_ids
            .iter()
            .map(|o| self.grant_line(o, refresh_ttl) + "\n")
            .collect();
        import_text(store, config, "test", &text, self.clock.now()).await
    }
}

/// Options for the SQLite store at `db`, tokens in the clear.
pub fn sqlite_options(db: &Path, busy_timeout: Duration) -> StoreOptions {
    StoreOptions {
        path: db.to_path_buf(),
        busy_timeout,
        keyring: Default::default(),
        postgres: None,
    }
}

/// Opens (creating and migrating when new) the SQLite store at `db`, tokens in the clear.
pub async fn open_store(db: &Path, busy_timeout: Duration) -> Store {
    Store::open(sqlite_options(db, busy_timeout))
        .await
        .expect("open store")
}

/// One stored account, which must exist.
pub async fn account(store: &Store, id: i64) -> Account {
    store
        .get(id)
        .await
        .expect("read account")
        .expect("account exists")
}

/// A fresh sandbox grant of `open_id` as an import line of provider `tiktok`, obtained at
/// `obtained_at`.
pub fn sandbox_line(sandbox: &Sandbox, open_id: &str, scope: &str, obtained_at: i64) -> String {
    let mut g = sandbox.grant(open_id, scope, None);
    g["provider"] = "tiktok".into();
    g["obtained_at"] = obtained_at.into();
    g.to_string() + "\n"
}

/// Imports JSON lines through the real import rules (the config's providers and timing) at
/// `now`, in one upsert; the accounts' ids, in line order.
pub async fn import_text(
    store: &Store,
    config: &Config,
    source: &str,
    text: &str,
    now: i64,
) -> Vec<i64> {
    let records = refreshd::import::parse_with(
        source,
        text,
        now,
        &config.refresh.timing(),
        config.reauth.window,
        |p| config.credential_of(p),
    )
    .expect("valid import");
    store
        .upsert(records, now)
        .await
        .expect("upsert")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Log lines captured as JSON, for tests that search what the daemon logged: install
/// `subscriber()` on the test's thread (`set_default`) or on a future (`with_subscriber`).
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A JSON subscriber at DEBUG writing into these logs.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let writer = self.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish()
    }
}

/// Tests that keep both cores busy for many seconds (the interop harness, the bench smokes)
/// take turns: together they starved the timing-sensitive tests beside
/// them (a store open past its busy timeout, a harness retry past its window).
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 20 ms for up to `secs` seconds of real time.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The path of the built binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_refreshd")
}

/// What one run of the binary printed and how it ended.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to the end off the async threads (the sandbox serves on them), feeding it
/// `stdin`; kills it and fails the test after `timeout`.
pub async fn run_to_end(
    mut cmd: std::process::Command,
    stdin: Option<String>,
    timeout: Duration,
) -> Out {
    use std::io::Write;
    let mut child = cmd.spawn().expect("spawn refreshd");
    let pid = child.id();
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(timeout, waiting).await {
        Ok(out) => out.expect("join").expect("wait for refreshd"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("refreshd did not finish within {timeout:?}");
        }
    };
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Reads a child's pipe line by line into `into` on a thread of its own, until it closes.
pub fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    })
}

/// HMAC-SHA256 of `message` under `key`, in lower-case hex: how webhooks and signed
/// redirects are signed.
pub fn hmac_sha256_hex(key: &str, message: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---- Set-up shared across the test folders (engine/, providers/, cli/, postgres/) ----

/// `refreshd run --once` with `config` at `clock`'s current time: refreshes everything due,
/// sweeps, and closes its store.
pub async fn run_once(config: &Config, clock: Clock) -> refreshd::lifecycle::RunReport {
    refreshd::lifecycle::run(
        config.clone(),
        refreshd::lifecycle::RunOptions {
            once: true,
            ..refreshd::lifecycle::RunOptions::new(clock)
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("run --once")
}

/// The system clock's unix second: for tests that run the real binary, which has no manual
/// clock.
pub fn now() -> i64 {
    Clock::system().now()
}

/// Starts a daemon (the library, ops server on loopback) against a fresh sandbox, lets it
/// rotate two accounts and flag a third, so that every labelled metric family has a series,
/// and returns one scrape of its `/metrics`.
pub async fn scrape_after_refreshes() -> String {
    use refreshd::engine::Engine;
    use refreshd::lifecycle::{self, RunOptions};
    use tokio_util::sync::CancellationToken;

    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("\n[server]\nlisten = \"127.0.0.1:0\"\n");
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["u1", "u2", "gone"], None)
        .await;
    let mut due = i64::MAX;
    for &id in &ids {
        due = due.min(store.get(id).await.unwrap().unwrap().next_refresh_at);
    }
    store.close().await;
    app.sandbox.revoke("gone");

    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opts = RunOptions {
        on_ready: Some(Box::new(move |_: &Store, engine: &Engine, addr| {
            let _ = tx.send((engine.clone(), addr));
        })),
        ..RunOptions::new(app.clock.clone())
    };
    let task = tokio::spawn(lifecycle::run(config, opts, shutdown.clone()));
    let (engine, addr) = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("daemon ready in time")
        .expect("daemon started");
    let addr = addr.expect("the ops server listens");
    app.clock.set(due + 60);
    engine.waker().notify_one();
    assert!(
        eventually(10, || async {
            let s = engine.stats().snapshot();
            s.rotated == 2 && s.flagged == 1
        })
        .await,
        "the accounts were refreshed"
    );
    // Store gauges are cached for 10 s of the clock: step past it.
    app.clock.advance(Duration::from_secs(11));
    let scrape = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .unwrap();
    shutdown.cancel();
    task.await.unwrap().expect("clean stop");
    scrape
}

/// The browser at an authorization URL the sandbox approves, without following its
/// redirect: the `code` read off the `Location` (asserting a 302).
pub async fn authorization_code(authorize_url: &str) -> String {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(authorize_url)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("a code in the redirect")
}

/// Flags account `id` `needs_reauth` (`invalid_grant`) the way a rejected refresh does.
pub async fn flag_invalid_grant(store: &Store, id: i64) {
    let a = store.get(id).await.unwrap().expect("the account");
    store
        .record(refreshd::store::Outcome::Rejected {
            owner: None,
            account_id: id,
            generation: a.generation,
            reason: refreshd::model::ReauthReason::InvalidGrant,
            at: T0,
            error: "invalid_grant: revoked".into(),
            http_status: Some(400),
            duration_ms: 1,
        })
        .await
        .unwrap();
}

/// When account `id` got new tokens (its `rotated` log entries), oldest first.
pub async fn rotation_times(store: &Store, id: i64) -> Vec<i64> {
    let log = store.log_entries(id, 1_000).await.unwrap();
    let mut times: Vec<i64> = log
        .into_iter()
        .filter(|e| e.outcome == "rotated")
        .map(|e| e.at)
        .collect();
    times.sort();
    times
}

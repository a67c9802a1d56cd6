//! Shared set-up: temp database, sandbox provider on loopback, a config pointing at both.

#![allow(dead_code)]

use refreshd::clock::Clock;
use refreshd::config::Config;
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
        Store::open(StoreOptions {
            path: self.db.clone(),
            busy_timeout: Duration::from_secs(2),
            keyring: Default::default(),
            postgres: None,
        })
        .await
        .expect("open store")
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
        let now = self.clock.now();
        let records = refreshd::import::parse(
            "test",
            &text,
            now,
            &config.refresh.timing(),
            config.reauth.window,
            |p| config.providers.contains_key(p),
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

//! The refresh engine driven through the library: `lifecycle::run` with `once` and the
//! continuous `Engine::run`, against the sandbox provider (or wiremock for exact answers) on
//! loopback and a real SQLite file. Time is the manual clock shared by the sandbox and the
//! engine, so days pass in milliseconds; real waiting is limited to 20 ms polls. This file
//! holds the timing constants and the set-up the themes below share.

use crate::helpers::{self, TestApp, account};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::engine::{Engine, EngineError, Settings};
use refreshd::lifecycle::RunReport;
use refreshd::model::Account;
use refreshd::store::{Store, StoreError};
use secrecy::ExposeSecret;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod concurrency;
mod durability;
mod events;
mod failures;
mod lead;
mod reauth;
mod reload;
mod rotation;
mod shutdown;

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// The sandbox's access tokens live 2 h; with `lead = 10m, lead_fraction = 0.1` (the
/// helpers' config) the lead is 12 min, so a token is refreshed 108 min after it was issued.
const ACCESS_TTL: i64 = 2 * HOUR;
const LEAD: i64 = 12 * MINUTE;
const INTERVAL: i64 = ACCESS_TTL - LEAD;
/// The helpers' `refresh.backoff_base` and `refresh.backoff_max`, in seconds.
const BACKOFF_BASE: i64 = 30;
const BACKOFF_MAX: i64 = 1800;

/// A TikTok-shaped success body.
fn token_body(open_id: &str) -> serde_json::Value {
    serde_json::json!({
        "access_token": "act.from-wiremock",
        "expires_in": 7200,
        "refresh_token": "rft.from-wiremock",
        "refresh_expires_in": 86_400 * 100,
        "open_id": open_id,
        "scope": "user.info.basic",
        "token_type": "Bearer",
    })
}

/// Answers the token endpoint on `server` with `body` after 30 s of real time, so a request
/// hangs past a test's end and its account's lease stays to be read (`up_to`: that many
/// requests, else all).
async fn mount_hanging_answer(
    server: &wiremock::MockServer,
    body: serde_json::Value,
    up_to: Option<u64>,
) {
    use wiremock::matchers::{method, path};
    let mock = wiremock::Mock::given(method("POST"))
        .and(path(refreshd::sandbox::TOKEN_PATH))
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(body)
                .set_delay(std::time::Duration::from_secs(30)),
        );
    match up_to {
        Some(n) => mock.up_to_n_times(n).mount(server).await,
        None => mock.mount(server).await,
    }
}

/// The helpers' test config with keys replaced or added: `(section, key, value)`, where a
/// section may be dotted (`providers.tiktok`).
fn config_with(app: &TestApp, token_url: &str, overrides: &[(&str, &str, toml::Value)]) -> Config {
    try_config_with(app, token_url, overrides).expect("test config")
}

fn try_config_with(
    app: &TestApp,
    token_url: &str,
    overrides: &[(&str, &str, toml::Value)],
) -> Result<Config, refreshd::config::ConfigError> {
    let mut table: toml::Table = helpers::config_toml(&app.db, token_url, "")
        .parse()
        .expect("the helpers' TOML parses");
    for (section, key, value) in overrides {
        let mut t = &mut table;
        for part in section.split('.') {
            t = t
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a table");
        }
        t.insert(key.to_string(), value.clone());
    }
    Config::from_toml_str(&table.to_string())
}

/// `refreshd run --once` at the clock's current time: refreshes everything due, sweeps, and
/// closes its store.
async fn run_once(app: &TestApp, config: &Config) -> RunReport {
    helpers::run_once(config, app.clock.clone()).await
}

/// An engine on `store`. The settings sender is returned because the engine's idle wait also
/// watches for new settings: it must outlive the engine.
fn engine(store: &Store, clock: &Clock, config: &Config) -> (Engine, watch::Sender<Arc<Settings>>) {
    let settings = Arc::new(Settings::new(config.clone()).expect("providers"));
    let (tx, rx) = watch::channel(settings);
    (Engine::new(store.clone(), clock.clone(), rx), tx)
}

fn refresh_token(a: &Account) -> &str {
    a.refresh_token.expose_secret()
}

fn access_token(a: &Account) -> &str {
    a.access_token.expose_secret()
}

/// The refresh log's outcomes for one account, newest first.
async fn outcomes(store: &Store, id: i64) -> Vec<String> {
    store
        .log_entries(id, 10_000)
        .await
        .expect("read log")
        .into_iter()
        .map(|e| e.outcome)
        .collect()
}

/// `(lease_owner, lease_expires_at)` of one account.
async fn lease(store: &Store, id: i64) -> (Option<String>, Option<i64>) {
    store
        .call(move |c| {
            c.query_row(
                "SELECT lease_owner, lease_expires_at FROM accounts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|source| StoreError::Sqlite {
                context: "test query",
                source,
            })
        })
        .await
        .expect("read lease")
}

/// The latest `next_refresh_at` among `ids`: once the clock is there, all of them are due.
async fn all_due_at(store: &Store, ids: &[i64]) -> i64 {
    let mut due = i64::MIN;
    for &id in ids {
        due = due.max(account(store, id).await.next_refresh_at);
    }
    due
}

/// Drains what has been emitted so far.
fn drain(
    rx: &mut tokio::sync::broadcast::Receiver<refreshd::events::Event>,
) -> Vec<refreshd::events::Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Imports `n` sandbox users named `user-0` .. (zero-padded to the widest number); their
/// subjects and ids, in order.
async fn import_users(
    app: &TestApp,
    store: &Store,
    config: &Config,
    n: usize,
) -> (Vec<String>, Vec<i64>) {
    let width = (n - 1).to_string().len();
    let subjects: Vec<String> = (0..n).map(|i| format!("user-{i:0width$}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(store, config, &refs, None).await;
    (subjects, ids)
}

/// Runs `engine` on a task until `shutdown`.
fn spawn_run(
    engine: &Engine,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), EngineError>> {
    let (e, s) = (engine.clone(), shutdown.clone());
    tokio::spawn(async move { e.run(s).await })
}

/// Waits until `engine` has looked at the store at the clock's current time (nothing was
/// due, so it now waits for the clock).
async fn wait_until_idle(engine: &Engine, clock: &Clock) {
    let stats = engine.stats();
    let looked =
        || async { stats.heartbeat.load(std::sync::atomic::Ordering::Relaxed) == clock.now() };
    assert!(helpers::eventually(5, looked).await);
}

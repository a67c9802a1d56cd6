//! `refreshd demo`: the real daemon against the sandbox provider and a temporary store, so a
//! newcomer sees refreshes, rotations, backoff and reauth flags within a minute.

use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::engine::StatsSnapshot;
use crate::import::{self, ImportError};
use crate::lifecycle::{self, DaemonError, RunOptions};
use crate::model::Status;
use crate::sandbox::{Faults, Sandbox, SandboxConfig, SandboxStats};
use crate::store::{Store, StoreError};
use rand::Rng;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub accounts: usize,
    /// Stop after this long; None: until the shutdown token is cancelled (Ctrl-C).
    pub duration: Option<Duration>,
    pub access_ttl: Duration,
    pub faults: bool,
    /// Keep the database here instead of in a temporary directory that is removed.
    pub keep_dir: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            accounts: 200,
            duration: None,
            access_ttl: Duration::from_secs(30),
            faults: true,
            keep_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Config(#[from] ConfigError),
    #[error("demo: {0}")]
    Import(#[from] ImportError),
    #[error("demo: {0}")]
    Store(#[from] StoreError),
    #[error("demo: {0}")]
    Daemon(#[from] DaemonError),
    #[error("demo: --accounts must be between 1 and 2000000, got {0}")]
    Accounts(usize),
    #[error("demo: --access-ttl must be at least 4s, got {0:?}")]
    AccessTtl(Duration),
}

/// What the demo did, printed as a table at the end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoSummary {
    pub accounts: usize,
    pub elapsed_secs: f64,
    pub engine: StatsSnapshot,
    pub sandbox: SandboxStats,
    pub by_status: Vec<(Status, i64)>,
    pub store: PathBuf,
}

impl DemoSummary {
    pub fn refreshes_per_sec(&self) -> f64 {
        self.engine.rotated as f64 / self.elapsed_secs.max(0.001)
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<38} {v}\n"));
        row("accounts", self.accounts.to_string());
        row("ran for", format!("{:.1}s", self.elapsed_secs));
        row(
            "refreshes committed (rotations)",
            self.engine.rotated.to_string(),
        );
        row(
            "refreshes per second",
            format!("{:.1}", self.refreshes_per_sec()),
        );
        row(
            "transient failures (backed off)",
            self.engine.transient.to_string(),
        );
        row(
            "provider configuration errors",
            self.engine.config_errors.to_string(),
        );
        row(
            "newly flagged by refreshes",
            self.engine.flagged.to_string(),
        );
        row(
            "commits deferred to recovery file",
            self.engine.deferred.to_string(),
        );
        row("sandbox requests", self.sandbox.requests.to_string());
        row(
            "sandbox faults injected",
            self.sandbox.faults_injected.to_string(),
        );
        row(
            "used refresh token presented again",
            self.sandbox.reuse_rejected.to_string(),
        );
        for (s, n) in &self.by_status {
            row(&format!("accounts {s}"), n.to_string());
        }
        row("database", self.store.display().to_string());
        format!("refreshd demo summary\n{t}")
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// The daemon config the demo runs with: timings scaled to the short access tokens.
pub fn demo_config(
    db: &std::path::Path,
    sandbox: &Sandbox,
    sb: &SandboxConfig,
    access_ttl: Duration,
) -> Result<Config, ConfigError> {
    let toml = format!(
        r#"
[store]
path = {db:?}
lease = "15s"

[refresh]
lead = "{lead}"
lead_fraction = 0.25
jitter = "{jitter}"
min_interval = "1s"
batch = 256
concurrency = 64
backoff_base = "1s"
backoff_max = "{backoff_max}"
config_error_retry = "30s"
request_timeout = "5s"
connect_timeout = "2s"
max_idle = "5s"

[reauth]
window = "7d"
sweep_cron = "*/10 * * * * *"
digest_cron = "*/30 * * * * *"

[providers.tiktok]
client_key = {ck:?}
client_secret = {cs:?}
token_url = {url:?}
rate_limit = 6000000
burst = 10000
"#,
        db = db.display().to_string(),
        lead = human(access_ttl / 3),
        jitter = human(access_ttl / 10),
        backoff_max = human((access_ttl / 2).max(Duration::from_secs(1))),
        ck = sb.client_key,
        cs = sb.client_secret,
        url = sandbox.token_url(),
    );
    Config::from_toml_str(&toml)
}

/// Runs the demo until `opts.duration` passes or `shutdown` is cancelled.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<DemoSummary, DemoError> {
    if opts.accounts == 0 || opts.accounts > 2_000_000 {
        return Err(DemoError::Accounts(opts.accounts));
    }
    if opts.access_ttl < Duration::from_secs(4) {
        return Err(DemoError::AccessTtl(opts.access_ttl));
    }
    let clock = Clock::system();
    let (tmp, dir) = match &opts.keep_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let db = dir.join("refreshd-demo.db");
    let faults = if opts.faults {
        Faults {
            server_error: 0.04,
            rate_limited: 0.02,
            retry_after_secs: 2,
            error_in_200: 0.02,
            slow: 0.02,
            slow_delay: Duration::from_millis(400),
            ..Faults::default()
        }
    } else {
        Faults::default()
    };
    let sb_config = SandboxConfig {
        access_ttl: opts.access_ttl,
        faults,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::start(sb_config.clone(), clock.clone()).await?;
    let config = demo_config(&db, &sandbox, &sb_config, opts.access_ttl)?;

    // Accounts: most healthy; some with nearly spent refresh tokens, some that run out
    // during the demo, some revoked by their user.
    let now = clock.now();
    let mut lines = String::new();
    let mut rng = rand::rng();
    let (mut expiring, mut ending, mut revoked) = (0, 0, 0);
    for i in 0..opts.accounts {
        let open_id = format!("demo-user-{i:06}");
        let refresh_ttl = match i % 50 {
            1 | 26 => {
                expiring += 1;
                Some(Duration::from_secs(3 * 86_400))
            }
            7 => {
                ending += 1;
                Some(opts.access_ttl + Duration::from_secs(15))
            }
            _ => None,
        };
        let mut grant = sandbox.grant(&open_id, "user.info.basic,video.list", refresh_ttl);
        if i % 50 == 13 {
            sandbox.revoke(&open_id);
            revoked += 1;
        }
        // Spread the first expiries so refreshes start right away and keep coming.
        let age = rng.random_range(0..=(opts.access_ttl.as_secs() * 2 / 3));
        grant["provider"] = "tiktok".into();
        grant["label"] = format!("demo account {i}").into();
        grant["obtained_at"] = (now - age as i64).into();
        lines.push_str(&grant.to_string());
        lines.push('\n');
    }
    let records = import::parse(
        "demo accounts",
        &lines,
        now,
        &config.refresh.timing(),
        config.reauth.window,
        |p| p == "tiktok",
    )?;
    {
        let store = Store::open(lifecycle::store_options(&config)).await?;
        let ids = store.upsert(records.clone(), now).await?;
        store.close().await;
        // The demo has no webhook: the log events are the announcement.
        import::announce_flagged(&config, &records, &ids, &Default::default());
    }
    tracing::info!(event = "demo_started", accounts = opts.accounts, expiring, refresh_ending_soon = ending, revoked,
        sandbox = %sandbox.token_url(), store = %db.display(),
        "demo: {} accounts ({expiring} with nearly spent refresh tokens, {ending} whose refresh token ends during the demo, {revoked} revoked); Ctrl-C stops and prints a summary",
        opts.accounts);

    if let Some(d) = opts.duration {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    let started = Instant::now();
    let report = lifecycle::run(config.clone(), RunOptions::new(clock.clone()), shutdown).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let store = Store::open(lifecycle::store_options(&config)).await?;
    let mut by_status: Vec<(Status, i64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
    for (_, s, n) in store.counts().await? {
        if let Some(e) = by_status.iter_mut().find(|(x, _)| *x == s) {
            e.1 += n;
        }
    }
    store.close().await;
    let summary = DemoSummary {
        accounts: opts.accounts,
        elapsed_secs: elapsed,
        engine: report.stats,
        sandbox: sandbox.stats(),
        by_status,
        store: if tmp.is_some() {
            PathBuf::from("(temporary, removed)")
        } else {
            db
        },
    };
    sandbox.shutdown().await;
    drop(tmp);
    Ok(summary)
}

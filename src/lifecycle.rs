//! Running the daemon: open the store, start the engine and the periodic jobs, translate
//! signals (SIGTERM/SIGINT drain, SIGHUP reload) and tell systemd where we are
//! (READY, WATCHDOG, STATUS, STOPPING). The caller owns the shutdown token, so tests drive
//! start and stop without signals. This file is `run`: start, the loop over checks, reloads
//! and a lost store, and the stop; `reload.rs` re-reads the config, `signals.rs` installs
//! the signal handlers, `systemd.rs` notifies systemd and pings its watchdog.

mod reload;
mod signals;
mod systemd;

pub use signals::{install_signals, install_stop_signals};

use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Engine, EngineError, Settings, StatsSnapshot};
use crate::events::Events;
use crate::jobs;
use crate::provider::ProviderError;
use crate::store::{CheckHook, Store, StoreError, StoreOptions};
use crate::telemetry::LogHandle;
use crate::{notify, sink};
use reload::reload_settings;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use systemd::{notify_systemd, spawn_watchdog};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot start the periodic jobs: {0}")]
    Jobs(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    ExposedFiles(#[from] crate::hardening::ExposedFiles),
    #[error(
        "stopped with the rotated tokens of {count} account(s) only in the recovery file {path} (fsynced there; the database refused them): keep that file; the next start commits them"
    )]
    PendingRotations { count: usize, path: String },
    #[error(
        "stopped with the rotated tokens of account(s) {accounts:?} NOT durable anywhere (neither the database nor the recovery file could take them): {where_}. See docs/src/durability.md"
    )]
    RotationsNotDurable { accounts: Vec<i64>, where_: String },
    #[error(
        "database {path} does not exist: `refreshd run` does not create a store where it expected one. Check store.path; for a first start set store.create = true (or import accounts first). See docs/src/durability.md"
    )]
    NoStore { path: String },
    #[error(transparent)]
    StoreLost(StoreError),
}

/// What a run did, for `--once`'s exit code and the demo's summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub stats: StatsSnapshot,
    /// Accounts the reauth sweep newly flagged (run --once).
    pub swept_expiring: usize,
    pub swept_expired: usize,
}

impl RunReport {
    /// Accounts that newly need a human during this run.
    pub fn newly_flagged(&self) -> u64 {
        self.stats.flagged + (self.swept_expiring + self.swept_expired) as u64
    }
}

/// A callback given the open store, the running engine and the ops server's TCP address.
pub type OnReady = Box<dyn FnOnce(&Store, &Engine, Option<std::net::SocketAddr>) + Send>;

/// Options of one daemon run.
pub struct RunOptions {
    pub clock: Clock,
    pub log: LogHandle,
    /// Where SIGHUP re-reads the config from (None: the default lookup).
    pub config_file: Option<PathBuf>,
    /// Refresh what is due, sweep, and return.
    pub once: bool,
    /// Reload requests (SIGHUP). None: reload is off.
    pub reload: Option<mpsc::Receiver<()>>,
    /// Called once the store is open and the engine runs, with the store and engine.
    pub on_ready: Option<OnReady>,
    /// Run before the store's start-up checks, on their thread (tests hold them with it).
    pub before_store_checks: Option<CheckHook>,
}

impl RunOptions {
    pub fn new(clock: Clock) -> Self {
        RunOptions {
            clock,
            log: LogHandle::none(),
            config_file: None,
            once: false,
            reload: None,
            on_ready: None,
            before_store_checks: None,
        }
    }
}

fn pg_options(url: secrecy::SecretString, config: &Config) -> crate::store::PgOptions {
    crate::store::PgOptions {
        url,
        pool_size: config.store.pool_size,
    }
}

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        path: config.store.path.clone(),
        busy_timeout: config.store.busy_timeout,
        keyring: config.store.keyring.clone(),
        postgres: config.store.url.clone().map(|url| pg_options(url, config)),
    }
}

/// After `close`: rotations still only in the recovery file make the run fail, naming the
/// accounts, so that nobody deletes that file (a pod's emptyDir, a cleaned temp dir).
/// Rotations in memory only are handed to the operator (`store.handoff_dir`, stdout when
/// asked) and named: durability is claimed only where an fsync returned.
fn check_pending(store: &Store, config: &Config) -> Result<(), DaemonError> {
    let volatile = store.volatile_rotations();
    if !volatile.is_empty() {
        let mut where_ = Vec::new();
        if let Some(dir) = &config.store.handoff_dir {
            match store.hand_off(dir) {
                Ok(path) => {
                    tracing::error!(event = "rotations_handed_off", accounts = ?volatile, path = %path.display(),
                        "rotated tokens no store could take are fsynced in this hand-off file (mode 0600): move it beside the database as <db>.recovery.handoff before the next start, which commits it");
                    where_.push(format!("fsynced in the hand-off file {}: move it beside the database as <database>.recovery.handoff, then start refreshd", path.display()));
                }
                Err(e) => {
                    tracing::error!(event = "handoff_failed", accounts = ?volatile, dir = %dir.display(), error = %e,
                        "cannot write the hand-off file either");
                    where_.push(format!(
                        "the hand-off file in {} failed: {e}",
                        dir.display()
                    ));
                }
            }
        }
        if config.store.handoff_stdout {
            use std::io::Write;
            let printed = store.hand_off_lines().and_then(|lines| {
                let mut out = std::io::stdout().lock();
                out.write_all(&lines)?;
                out.flush()
            });
            where_.push(match printed {
                Ok(()) => "printed to stdout as recovery-file lines (save them as <database>.recovery.handoff)".into(),
                Err(e) => format!("printing to stdout failed: {e}"),
            });
        }
        if where_.is_empty() {
            where_.push("no store.handoff_dir is set and store.handoff_stdout is off: these accounts will need re-authorization".into());
        }
        let where_ = where_.join("; ");
        tracing::error!(event = "stopped_with_rotations_not_durable", accounts = ?volatile, handoff = %where_,
            "stopping with rotated tokens that are NOT durable in the database or the recovery file");
        return Err(DaemonError::RotationsNotDurable {
            accounts: volatile,
            where_,
        });
    }
    let pending = store.pending_rotations();
    if pending.is_empty() {
        return Ok(());
    }
    let path = store
        .own_recovery_path(&config.store.path)
        .display()
        .to_string();
    tracing::error!(event = "stopped_with_pending_rotations", accounts = ?pending, path = %path,
        "stopping with rotated tokens the database has not taken yet; they are fsynced in the recovery file only");
    Err(DaemonError::PendingRotations {
        count: pending.len(),
        path,
    })
}

/// `run` never creates a store silently where it expected one: a missing SQLite file is
/// an error unless `store.create` is set, and then its creation is logged at WARN.
fn check_store_exists(config: &Config) -> Result<(), DaemonError> {
    let path = &config.store.path;
    if config.store.url.is_some() || path.exists() {
        return Ok(());
    }
    if !config.store.create {
        return Err(DaemonError::NoStore {
            path: path.display().to_string(),
        });
    }
    tracing::warn!(event = "store_created", path = %path.display(),
        "creating a new, empty database (store.create = true): if accounts were expected here, stop and check store.path");
    Ok(())
}

/// Resolves when the store reports it cannot be used any more (its file vanished).
async fn store_lost(store: &Store) -> String {
    loop {
        if let Some(m) = store.lost() {
            return m;
        }
        tokio::time::sleep(crate::store::WATCH_EVERY).await;
    }
}

/// Runs the daemon until `shutdown` is cancelled (or, with `once`, until due work is done).
pub async fn run(
    config: Config,
    mut opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<RunReport, DaemonError> {
    crate::hardening::warn_if_root();
    crate::hardening::check_files(&config)?;
    check_store_exists(&config)?;
    // The daemon is ready before the store's start-up checks end; nothing writes before
    // they pass (`after_checks`). `--once` has nothing to be ready for: it waits for them.
    let store = if opts.once {
        Store::open(store_options(&config)).await?
    } else {
        Store::open_gated(store_options(&config), opts.before_store_checks.take()).await?
    };
    let stop_config = config.clone();
    let settings = Arc::new(Settings::new(config)?);
    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    let engine = Engine::new(store.clone(), opts.clock.clone(), settings_rx.clone());
    let cfg = &settings.config;
    // Before anything can emit: sinks and webhooks miss no state change, and the token files
    // are written before the daemon reports ready.
    let sinks = sink::start(
        cfg.sink.clone(),
        store.clone(),
        &engine.events(),
        opts.clock.clone(),
        cfg.refresh.max_idle,
    )
    .await;
    let notifier = notify::spawn(
        cfg,
        &engine.events(),
        opts.clock.clone(),
        shutdown.clone(),
        cfg.shutdown.grace,
    );
    tracing::info!(event = "starting", store = %store.describe(), owner = engine.owner(),
        providers = ?settings.providers.names().collect::<Vec<_>>(), once = opts.once, "refreshd starting");
    for (name, p) in &cfg.providers {
        if !p.enabled {
            tracing::info!(event = "provider_disabled", provider = %name, "provider is disabled in the config");
        }
    }

    if opts.once {
        sync_apps(&store, cfg, opts.clock.now()).await?;
        let refreshed = engine.run_due(shutdown.clone()).await;
        let swept = match refreshed {
            Ok(_) => Some(jobs::sweep(&store, &opts.clock, cfg, &engine.events()).await),
            Err(_) => None,
        };
        if let Some(cb) = opts.on_ready.take() {
            cb(&store, &engine, None);
        }
        sinks.stop().await;
        notifier.stop().await;
        store.close().await;
        // Rotations left only in the recovery file matter most: said first, whatever failed.
        check_pending(&store, &stop_config)?;
        refreshed?;
        let report = swept.unwrap_or_else(|| Ok(Default::default()))?;
        let r = RunReport {
            stats: engine.stats().snapshot(),
            swept_expiring: report.expiring.len(),
            swept_expired: report.expired.len(),
        };
        tracing::info!(
            event = "run_once_done",
            rotated = r.stats.rotated,
            transient = r.stats.transient,
            newly_flagged = r.newly_flagged(),
            "refreshed everything due"
        );
        return Ok(r);
    }

    let mut scheduler = jobs::start(
        store.clone(),
        opts.clock.clone(),
        settings_rx.clone(),
        engine.events(),
    )
    .await
    .map_err(|e| DaemonError::Jobs(format!("{e:?}")))?;

    let engine_running = Arc::new(AtomicBool::new(true));
    let engine_task = {
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        let running = engine_running.clone();
        tokio::spawn(async move {
            let r = engine.run(shutdown).await;
            running.store(false, Ordering::Relaxed);
            r
        })
    };
    let server = crate::server::spawn(
        crate::server::AppState {
            store: store.clone(),
            clock: opts.clock.clone(),
            engine: engine.clone(),
            settings: settings_rx.clone(),
            engine_running: engine_running.clone(),
            started_at: opts.clock.now(),
        },
        cfg,
        shutdown.clone(),
    )
    .await;
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            shutdown.cancel();
            let _ = engine_task.await;
            let _ = scheduler.shutdown().await;
            store.close().await;
            return Err(e.into());
        }
    };
    if let Some(cb) = opts.on_ready.take() {
        cb(&store, &engine, server.as_ref().and_then(|s| s.local_addr));
    }
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("refreshing"),
    ]);
    tracing::info!(event = "ready", "refreshd is running");
    let watchdog = spawn_watchdog(
        engine.clone(),
        store.clone(),
        settings_rx.clone(),
        shutdown.clone(),
    );

    let mut reload = opts.reload.take();
    let mut lost = None;
    let (checks_clock, events) = (opts.clock.clone(), engine.events());
    let checks = after_checks(&store, &checks_clock, cfg, &events);
    tokio::pin!(checks);
    let (mut checked, mut checks_failed) = (false, None);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = &mut checks, if !checked => {
                checked = true;
                if let Err(e) = r {
                    checks_failed = Some(e);
                    shutdown.cancel();
                    break;
                }
                // The app tokens just synced are due now.
                engine.waker().notify_one();
            }
            m = store_lost(&store) => {
                lost = Some(m);
                shutdown.cancel();
                break;
            }
            Some(()) = async { match reload.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                let old = settings_tx.borrow().clone();
                match reload_settings(&old, opts.config_file.as_deref(), &opts.log) {
                    Ok(Some(new)) => {
                        let crons_changed = old.config.reauth.sweep_cron != new.config.reauth.sweep_cron
                            || old.config.reauth.digest_cron != new.config.reauth.digest_cron
                            || old.config.store.prune_cron != new.config.store.prune_cron;
                        if let Err(e) = sync_apps(&store, &new.config, opts.clock.now()).await {
                            tracing::error!(event = "config_apps_failed", error = %e, "the config's app tokens could not be applied; they are applied again at the next reload");
                        }
                        settings_tx.send_replace(Arc::new(new));
                        if crons_changed {
                            let _ = scheduler.shutdown().await;
                            match jobs::start(store.clone(), opts.clock.clone(), settings_rx.clone(), engine.events()).await {
                                Ok(s) => scheduler = s,
                                Err(e) => tracing::error!(event = "reload_jobs_failed", error = ?e, "periodic jobs could not be restarted with the new schedule"),
                            }
                        }
                        engine.waker().notify_one();
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(event = "reload_rejected", error = %e, "config reload rejected; the running config stays in force"),
                }
            }
        }
    }

    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    tracing::info!(
        event = "stopping",
        "shutdown requested: no new claims, finishing in-flight refreshes"
    );
    // Not ready from now on: a load balancer stops sending token requests.
    engine_running.store(false, Ordering::Relaxed);
    let _ = scheduler.shutdown().await;
    let result = engine_task.await;
    watchdog.abort();
    // After the server: a token request's refresh may still have rotated a sink's account.
    if let Some(server) = server {
        server.join().await;
    }
    sinks.stop().await;
    notifier.stop().await;
    store.close().await;
    check_pending(&store, &stop_config)?;
    if let Some(e) = checks_failed {
        return Err(e);
    }
    if let Some(message) = lost {
        return Err(DaemonError::StoreLost(StoreError::Lost {
            path: stop_config.store.path.clone(),
            message,
        }));
    }
    let report = RunReport {
        stats: engine.stats().snapshot(),
        ..Default::default()
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => {
            tracing::error!(event = "engine_panicked", error = %e, "the refresh loop panicked")
        }
    }
    tracing::info!(
        event = "stopped",
        rotated = report.stats.rotated,
        transient = report.stats.transient,
        flagged = report.stats.flagged,
        "refreshd stopped"
    );
    Ok(report)
}

/// The label of the app tokens added from the config, so a later start can tell which
/// ones the config dropped.
const CONFIG_APP_LABEL: &str = "config";

/// What waits for the store's start-up checks (the daemon is ready before): their end is
/// logged with how long they took; then the config's app tokens are applied and the
/// start-up sweep flags accounts that ran into the reauth window while we were down (both
/// write). An error stops the daemon.
async fn after_checks(
    store: &Store,
    clock: &Clock,
    config: &Config,
    events: &Events,
) -> Result<(), DaemonError> {
    match store.checks_settled().await {
        Ok(took) => tracing::info!(
            event = "store_checked",
            took_ms = took.as_millis() as u64,
            "the store passed its start-up checks (quick_check, sealing keys): writing and refreshing start now"
        ),
        Err(e) => {
            tracing::error!(event = "store_checks_failed", error = %e,
                "the store failed its start-up checks: nothing was written to it; stopping");
            return Err(e.into());
        }
    }
    sync_apps(store, config, clock.now()).await?;
    jobs::sweep(store, clock, config, events).await?;
    Ok(())
}

/// Adds each `[providers.NAME.apps.APP]` (kept when present, rescoped and due now when its
/// scope changed), and warns about app tokens the config added once but no longer lists:
/// they are left (removing tokens on a config typo is worse) until `refreshd apps remove`.
/// An app the store refuses (its subject is a user's account) is logged, the others go on.
async fn sync_apps(store: &Store, config: &Config, now: i64) -> Result<(), StoreError> {
    use crate::model::{APP_SUBJECT_PREFIX, Grant};
    use crate::store::{AppAdded, ListFilter, NewApp};
    for (provider, pc) in &config.providers {
        for (name, app) in &pc.apps {
            let new = NewApp {
                provider: provider.clone(),
                name: name.clone(),
                scope: app.scope.clone(),
                label: Some(CONFIG_APP_LABEL.into()),
            };
            match store.add_app(new, now).await {
                Ok(AppAdded::Kept {
                    rescoped: false, ..
                }) => {}
                Ok(added) => tracing::info!(event = "config_app_applied", provider = %provider,
                    app = %name, account_id = added.id(), created = matches!(added, AppAdded::Created(_)),
                    "app token of providers.{provider}.apps.{name} added or rescoped; due now"),
                Err(StoreError::Refused(e)) => tracing::error!(event = "config_app_rejected",
                    provider = %provider, app = %name, error = %e,
                    "providers.{provider}.apps.{name} cannot be kept: {e}"),
                Err(e) => return Err(e),
            }
        }
    }
    let filter = ListFilter {
        grant: Some(Grant::ClientCredentials),
        ..ListFilter::default()
    };
    let mut after = 0;
    loop {
        let page = store.list(filter.clone(), after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for a in page
            .iter()
            .filter(|a| a.label.as_deref() == Some(CONFIG_APP_LABEL))
        {
            let name = a
                .subject
                .strip_prefix(APP_SUBJECT_PREFIX)
                .unwrap_or(&a.subject);
            let listed = config
                .providers
                .get(&a.provider)
                .is_some_and(|p| p.apps.contains_key(name));
            if !listed {
                tracing::warn!(event = "config_app_unlisted", provider = %a.provider, app = %name,
                    account_id = a.id,
                    "app token {}/{name} was added from the config, which no longer lists it; it is still kept: remove it with `refreshd apps remove {} {name}`",
                    a.provider, a.provider);
            }
        }
    }
    Ok(())
}

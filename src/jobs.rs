//! Periodic jobs on tokio-cron-scheduler: the reauth sweep, the daily digest of accounts
//! that need a human, and pruning of the refresh log. The per-account refresh schedule is
//! not here: it lives in the store.

use crate::clock::{Clock, rfc3339};
use crate::engine::Settings;
use crate::events::{Event, Events};
use crate::store::{Store, StoreError, SweepReport};
use crate::telemetry;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

/// Flags accounts whose refresh token ends within the window (or has ended) and emits one
/// `reauth_required` event per account whose state changed.
pub async fn sweep(
    store: &Store,
    clock: &Clock,
    config: &crate::config::Config,
    events: &Events,
) -> Result<SweepReport, StoreError> {
    let report = store.sweep(clock.now(), config.reauth.window).await?;
    for (a, reason) in report
        .expired
        .iter()
        .map(|a| (a, "refresh_token_expired"))
        .chain(
            report
                .expiring
                .iter()
                .map(|a| (a, "refresh_token_expiring")),
        )
    {
        telemetry::reauth_required(
            a.id,
            &a.provider,
            &a.subject,
            a.label.as_deref(),
            reason,
            a.refresh_expires_at,
            crate::connect::web_reconnect_url(config, &a.provider, a.id).as_deref(),
        );
        events.emit(Event::ReauthRequired {
            account_id: a.id,
            provider: a.provider.clone(),
            subject: a.subject.clone(),
            label: a.label.clone(),
            reason: reason.to_string(),
            refresh_expires_at: a.refresh_expires_at,
        });
    }
    tracing::info!(
        event = "reauth_sweep",
        newly_expiring = report.expiring.len(),
        newly_expired = report.expired.len(),
        "reauth sweep done"
    );
    Ok(report)
}

/// Most ids listed per status in the digest event.
const DIGEST_IDS: usize = 1000;

/// One event listing every account that needs a human (count and ids).
pub async fn digest(store: &Store) -> Result<usize, StoreError> {
    let flagged = store.flagged_ids().await?;
    let needs_reauth: Vec<i64> = flagged
        .iter()
        .filter(|(_, s)| *s == crate::model::Status::NeedsReauth)
        .map(|(id, _)| *id)
        .collect();
    let expiring: Vec<i64> = flagged
        .iter()
        .filter(|(_, s)| *s == crate::model::Status::Expiring)
        .map(|(id, _)| *id)
        .collect();
    // The first ids only: a log line must stay readable with a million flagged accounts.
    let ids = |v: &[i64]| {
        let mut s = v
            .iter()
            .take(DIGEST_IDS)
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if v.len() > DIGEST_IDS {
            s.push_str(&format!(",… ({} more)", v.len() - DIGEST_IDS));
        }
        s
    };
    if flagged.is_empty() {
        tracing::info!(
            event = "reauth_digest",
            count = 0,
            "no account needs re-authorization"
        );
    } else {
        tracing::warn!(
            event = "reauth_digest",
            count = flagged.len(),
            needs_reauth = needs_reauth.len(),
            expiring = expiring.len(),
            needs_reauth_ids = %ids(&needs_reauth),
            expiring_ids = %ids(&expiring),
            "{} account(s) need re-authorization (`refreshd accounts list --needs-reauth`)",
            flagged.len()
        );
    }
    Ok(flagged.len())
}

pub async fn prune(
    store: &Store,
    clock: &Clock,
    retention: std::time::Duration,
) -> Result<usize, StoreError> {
    let before = clock.now() - retention.as_secs() as i64;
    let n = store.prune_log(before).await?;
    tracing::info!(event = "refresh_log_pruned", deleted = n, before = %rfc3339(before), "pruned the refresh log");
    Ok(n)
}

/// Starts the scheduler with the three jobs; each reads the current settings when it runs.
pub async fn start(
    store: Store,
    clock: Clock,
    settings: watch::Receiver<Arc<Settings>>,
    events: Events,
) -> Result<JobScheduler, JobSchedulerError> {
    let sched = JobScheduler::new().await?;
    let cfg = settings.borrow().config.clone();
    {
        let (store, clock, settings) = (store.clone(), clock.clone(), settings.clone());
        sched
            .add(Job::new_async(cfg.reauth.sweep_cron.as_str(), move |_, _| {
                let (store, clock, events) = (store.clone(), clock.clone(), events.clone());
                let config = settings.borrow().config.clone();
                Box::pin(async move {
                    if let Err(e) = sweep(&store, &clock, &config, &events).await {
                        tracing::error!(event = "reauth_sweep_failed", error = %e, "reauth sweep failed; it runs again on schedule");
                    }
                })
            })?)
            .await?;
    }
    {
        let store = store.clone();
        sched
            .add(Job::new_async(cfg.reauth.digest_cron.as_str(), move |_, _| {
                let store = store.clone();
                Box::pin(async move {
                    if let Err(e) = digest(&store).await {
                        tracing::error!(event = "reauth_digest_failed", error = %e, "digest failed");
                    }
                })
            })?)
            .await?;
    }
    {
        sched
            .add(Job::new_async(cfg.store.prune_cron.as_str(), move |_, _| {
                let (store, clock) = (store.clone(), clock.clone());
                let retention = settings.borrow().config.store.log_retention;
                Box::pin(async move {
                    if let Err(e) = prune(&store, &clock, retention).await {
                        tracing::error!(event = "refresh_log_prune_failed", error = %e, "pruning failed");
                    }
                })
            })?)
            .await?;
    }
    sched.start().await?;
    Ok(sched)
}

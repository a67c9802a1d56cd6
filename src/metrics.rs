//! Prometheus metrics: counters and histograms the engine updates as it works, and gauges
//! read from the store when `/metrics` is scraped (cached briefly, so a scrape storm cannot
//! load the database).

use crate::store::{Store, StoreError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Store gauges are re-read at most this often (seconds).
const GAUGE_TTL: i64 = 10;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    provider: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    provider: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    provider: String,
    reason: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 5 ms .. ~20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    refreshes: Family<OutcomeLabels, Counter>,
    latency: Family<ProviderLabel, Histogram, fn() -> Histogram>,
    lateness: Histogram,
    provider_failures: Family<ProviderLabel, Gauge>,
    provider_rejecting: Family<ProviderLabel, Gauge>,
    circuit_open: Family<ProviderLabel, Gauge>,
    parked_past_expiry: Family<ProviderLabel, Counter>,
    accounts: Family<StatusLabels, Gauge>,
    flagged: Family<ReasonLabels, Gauge>,
    access_expired: Family<ProviderLabel, Gauge>,
    refresh_expiry: Family<ProviderLabel, FloatGauge>,
    last_pass_age: FloatGauge,
    /// Clock second of the last store read, so scrapes share it.
    gauges_read_at: Mutex<Option<i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("refreshd");
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Refresh attempts by provider and outcome (rotated, transient, config_error, rejected, superseded, released)",
            refreshes.clone(),
        );
        let latency: Family<ProviderLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "refresh_duration",
            "Time the provider took to answer a refresh request",
            Unit::Seconds,
            latency.clone(),
        );
        let lateness = Histogram::new([0.0, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0]);
        registry.register_with_unit(
            "schedule_lateness",
            "Actual minus planned start of a refresh (0 when on time)",
            Unit::Seconds,
            lateness.clone(),
        );
        let provider_failures = Family::<ProviderLabel, Gauge>::default();
        registry.register(
            "provider_consecutive_failures",
            "Transient refresh failures in a row per provider (0 after a success): its backoff state",
            provider_failures.clone(),
        );
        let provider_rejecting = Family::<ProviderLabel, Gauge>::default();
        registry.register(
            "provider_credentials_rejected",
            "1 while the provider refuses our client credentials (invalid_client and the like)",
            provider_rejecting.clone(),
        );
        let circuit_open = Family::<ProviderLabel, Gauge>::default();
        registry.register(
            "provider_circuit_open",
            "1 while the provider's circuit is open (its accounts wait; one probe request per second at most)",
            circuit_open.clone(),
        );
        let parked_past_expiry = Family::<ProviderLabel, Counter>::default();
        registry.register(
            "parked_past_expiry",
            "Transient failures whose retry comes after the account's access token expires",
            parked_past_expiry.clone(),
        );
        let accounts = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "accounts",
            "Accounts by provider and status",
            accounts.clone(),
        );
        let flagged = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "accounts_needing_reauth",
            "Accounts flagged needs_reauth or expiring, by provider and reason",
            flagged.clone(),
        );
        let access_expired = Family::<ProviderLabel, Gauge>::default();
        registry.register(
            "active_accounts_access_expired",
            "Refreshable accounts whose access token has already expired (should stay 0)",
            access_expired.clone(),
        );
        let refresh_expiry = Family::<ProviderLabel, FloatGauge>::default();
        registry.register_with_unit(
            "refresh_token_soonest_expiry",
            "Time until the soonest refresh-token expiry among refreshable accounts, per provider (negative: already past)",
            Unit::Seconds,
            refresh_expiry.clone(),
        );
        let last_pass_age = FloatGauge::default();
        registry.register_with_unit(
            "engine_last_pass_age",
            "Time since the refresh loop last completed a look at the store",
            Unit::Seconds,
            last_pass_age.clone(),
        );
        Metrics {
            registry,
            refreshes,
            latency,
            lateness,
            provider_failures,
            provider_rejecting,
            circuit_open,
            parked_past_expiry,
            accounts,
            flagged,
            access_expired,
            refresh_expiry,
            last_pass_age,
            gauges_read_at: Mutex::new(None),
        }
    }

    fn provider(p: &str) -> ProviderLabel {
        ProviderLabel {
            provider: p.to_string(),
        }
    }

    /// One finished refresh attempt. `duration_secs` is None when no request was sent.
    pub fn refresh(&self, provider: &str, outcome: &str, duration_secs: Option<f64>) {
        self.refreshes
            .get_or_create(&OutcomeLabels {
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(d) = duration_secs {
            self.latency
                .get_or_create(&Self::provider(provider))
                .observe(d);
        }
        let failures = self
            .provider_failures
            .get_or_create(&Self::provider(provider));
        match outcome {
            "transient" => {
                failures.inc();
            }
            "rotated" | "rejected" => {
                failures.set(0);
            }
            _ => {}
        }
    }

    /// Gives each configured provider its per-provider series at 0, so an alert on them sees
    /// a value before anything went wrong (an absent series alerts on nothing).
    pub fn providers_known<'a>(&self, providers: impl Iterator<Item = &'a str>) {
        for provider in providers {
            let label = Self::provider(provider);
            let _ = self.provider_rejecting.get_or_create(&label);
            let _ = self.circuit_open.get_or_create(&label);
            let _ = self.parked_past_expiry.get_or_create(&label);
        }
    }

    /// Whether the provider's circuit is open.
    pub fn circuit_open(&self, provider: &str, open: bool) {
        self.circuit_open
            .get_or_create(&Self::provider(provider))
            .set(i64::from(open));
    }

    /// A transient failure parked an account past its access token's expiry.
    pub fn parked_past_expiry(&self, provider: &str) {
        self.parked_past_expiry
            .get_or_create(&Self::provider(provider))
            .inc();
    }

    /// Whether the provider refuses our configuration (set on its state's changes only).
    pub fn provider_rejecting(&self, provider: &str, rejecting: bool) {
        self.provider_rejecting
            .get_or_create(&Self::provider(provider))
            .set(i64::from(rejecting));
    }

    /// A refresh started `secs` after it was planned.
    pub fn lateness(&self, secs: f64) {
        self.lateness.observe(secs.max(0.0));
    }

    /// Re-reads the store gauges (unless read within the last few seconds) and encodes all
    /// metrics in the Prometheus text format.
    pub async fn render(
        self: &Arc<Self>,
        store: &Store,
        now: i64,
        last_pass: i64,
    ) -> Result<String, StoreError> {
        let stale = self
            .gauges_read_at
            .lock()
            .expect("not poisoned")
            .is_none_or(|t| now - t >= GAUGE_TTL || now < t);
        if stale {
            let g = store.gauges(now).await?;
            let providers: std::collections::BTreeSet<String> =
                g.by_status.iter().map(|(p, _, _)| p.clone()).collect();
            self.accounts.clear();
            for (provider, status, n) in g.by_status {
                self.accounts
                    .get_or_create(&StatusLabels {
                        provider,
                        status: status.as_str().to_string(),
                    })
                    .set(n);
            }
            self.flagged.clear();
            for (provider, reason, n) in g.flagged {
                self.flagged
                    .get_or_create(&ReasonLabels { provider, reason })
                    .set(n);
            }
            // Providers with none expired report 0 explicitly, so alerts see the series.
            self.access_expired.clear();
            for provider in &providers {
                self.access_expired
                    .get_or_create(&Self::provider(provider))
                    .set(0);
            }
            for (provider, n) in g.access_expired {
                self.access_expired
                    .get_or_create(&Self::provider(&provider))
                    .set(n);
            }
            self.refresh_expiry.clear();
            for (provider, at) in g.soonest_refresh_expiry {
                self.refresh_expiry
                    .get_or_create(&Self::provider(&provider))
                    .set((at - now) as f64);
            }
            *self.gauges_read_at.lock().expect("not poisoned") = Some(now);
        }
        self.last_pass_age.set((now - last_pass).max(0) as f64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        Ok(out)
    }
}

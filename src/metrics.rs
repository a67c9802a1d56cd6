//! Prometheus metrics: counters and histograms the engine updates as it works, gauges read
//! from the store when `/metrics` is scraped (cached briefly, so a scrape storm cannot load
//! the database), the build's identity, and the process's own resource use (`process`).

mod process;

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

/// Outcomes are a fixed set of names: a static label costs no allocation per refresh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    provider: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    provider: String,
    reason: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The commit this binary was built from: `REFRESHD_GIT_COMMIT` at build time (the
/// packager's, e.g. `git rev-parse HEAD`; deploy/Dockerfile takes it as a build argument),
/// else "unknown". Nothing is fetched at build time.
pub const BUILD_COMMIT: &str = match option_env!("REFRESHD_GIT_COMMIT") {
    Some(c) if !c.is_empty() => c,
    _ => "unknown",
};

/// Upper bounds of the schedule-lateness buckets, from 1 ms: on time is a few ms late (the
/// loop wakes at the due second and claims), so p99 <= 10 ms must be tellable from 99 ms;
/// the long tail (a stopped daemon catching up) ends at half an hour.
pub const LATENESS_BUCKETS: [f64; 17] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0,
];

fn latency_histogram() -> Histogram {
    // 5 ms .. ~20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    refreshes: Family<OutcomeLabels, Counter>,
    proxy_requests: Family<OutcomeLabels, Counter>,
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
    last_pass_at: Gauge,
    last_rotation_at: Family<ProviderLabel, Gauge>,
    last_commit_at: Gauge,
    next_due_at: Gauge,
    refresh_expiry_at: Family<ProviderLabel, Gauge>,
    pending_rotations: Gauge,
    process: ProcessMetrics,
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
        let proxy_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Token proxy requests by provider and outcome (forwarded, retried, refused, too_large, upstream_failed)",
            proxy_requests.clone(),
        );
        let latency: Family<ProviderLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "refresh_duration",
            "Time the provider took to answer a refresh request",
            Unit::Seconds,
            latency.clone(),
        );
        let lateness = Histogram::new(LATENESS_BUCKETS);
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
        let last_pass_at = Gauge::default();
        registry.register_with_unit(
            "engine_last_pass_timestamp",
            "When the refresh loop last completed a look at the store (Unix time)",
            Unit::Seconds,
            last_pass_at.clone(),
        );
        let last_rotation_at = Family::<ProviderLabel, Gauge>::default();
        registry.register_with_unit(
            "last_rotation_timestamp",
            "When a refresh of this provider last succeeded and was stored (Unix time)",
            Unit::Seconds,
            last_rotation_at.clone(),
        );
        let last_commit_at = Gauge::default();
        registry.register_with_unit(
            "store_last_commit_timestamp",
            "When the store last committed a refresh outcome (Unix time; 0: none since start)",
            Unit::Seconds,
            last_commit_at.clone(),
        );
        let next_due_at = Gauge::default();
        registry.register_with_unit(
            "next_refresh_timestamp",
            "When the soonest refreshable account is due (Unix time; 0: none)",
            Unit::Seconds,
            next_due_at.clone(),
        );
        let refresh_expiry_at = Family::<ProviderLabel, Gauge>::default();
        registry.register_with_unit(
            "refresh_token_soonest_expiry_timestamp",
            "When the soonest refresh token among refreshable accounts ends, per provider (Unix time)",
            Unit::Seconds,
            refresh_expiry_at.clone(),
        );
        let pending_rotations = Gauge::default();
        registry.register(
            "store_pending_rotations",
            "Rotated tokens this process holds only in its recovery file or memory, not yet committed to the database",
            pending_rotations.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the labels say which version and commit is running",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                commit: BUILD_COMMIT.to_string(),
            })
            .set(1);
        Metrics {
            registry,
            refreshes,
            proxy_requests,
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
            last_pass_at,
            last_rotation_at,
            last_commit_at,
            next_due_at,
            refresh_expiry_at,
            pending_rotations,
            process: ProcessMetrics::new(),
            gauges_read_at: Mutex::new(None),
        }
    }

    fn provider(p: &str) -> ProviderLabel {
        ProviderLabel {
            provider: p.to_string(),
        }
    }

    /// One finished refresh attempt, its outcome stored at `now` (unless `record_failed`).
    /// `duration_secs` is None when no request was sent.
    pub fn refresh(
        &self,
        provider: &str,
        outcome: &'static str,
        duration_secs: Option<f64>,
        now: i64,
    ) {
        // Once per refresh: the provider's label is built once and moved into the last use.
        let label = Self::provider(provider);
        if let Some(d) = duration_secs {
            self.latency.get_or_create(&label).observe(d);
        }
        {
            let failures = self.provider_failures.get_or_create(&label);
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
        if outcome == "rotated" {
            self.last_rotation_at.get_or_create(&label).set(now);
        }
        if outcome != "record_failed" {
            self.last_commit_at.set(now);
        }
        self.refreshes
            .get_or_create(&OutcomeLabels {
                provider: label.provider,
                outcome,
            })
            .inc();
    }

    /// One request through the token proxy and what it came to.
    pub fn proxy_request(&self, provider: &str, outcome: &'static str) {
        self.proxy_requests
            .get_or_create(&OutcomeLabels {
                provider: provider.to_string(),
                outcome,
            })
            .inc();
    }

    /// Gives each configured provider its per-provider series at 0, so an alert on them sees
    /// a value before anything went wrong (an absent series alerts on nothing).
    pub fn providers_known<'a>(&self, providers: impl Iterator<Item = &'a str>) {
        for provider in providers {
            let label = Self::provider(provider);
            let _ = self.provider_rejecting.get_or_create(&label);
            let _ = self.circuit_open.get_or_create(&label);
            let _ = self.parked_past_expiry.get_or_create(&label);
            let _ = self.last_rotation_at.get_or_create(&label);
            let _ = self.proxy_requests.get_or_create(&OutcomeLabels {
                provider: provider.to_string(),
                outcome: "forwarded",
            });
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
            self.refresh_expiry_at.clear();
            for (provider, at) in g.soonest_refresh_expiry {
                let label = Self::provider(&provider);
                self.refresh_expiry
                    .get_or_create(&label)
                    .set((at - now) as f64);
                self.refresh_expiry_at.get_or_create(&label).set(at);
            }
            let next = store.next_due_except(now, Vec::new()).await?;
            self.next_due_at.set(next.unwrap_or(0));
            *self.gauges_read_at.lock().expect("not poisoned") = Some(now);
        }
        self.last_pass_age.set((now - last_pass).max(0) as f64);
        self.last_pass_at.set(last_pass);
        self.pending_rotations
            .set((store.pending_rotations().len() + store.volatile_rotations().len()) as i64);
        self.process.update();
        let mut out = String::new();
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.process.registry))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        Ok(out)
    }
}

/// The `process_*` metrics (unprefixed, as every exporter names them), set from a fresh
/// /proc reading at each scrape. Where there is no /proc, nothing is registered.
struct ProcessMetrics {
    registry: Registry,
    cpu: Counter<f64, AtomicU64>,
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    fn new() -> ProcessMetrics {
        let mut registry = Registry::with_prefix("process");
        let m = ProcessMetrics {
            registry: Registry::default(),
            cpu: Counter::default(),
            resident: Gauge::default(),
            virtual_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time: Gauge::default(),
        };
        if process::sample().is_none() {
            return m;
        }
        registry.register_with_unit(
            "cpu",
            "User and system CPU time spent by the process",
            Unit::Seconds,
            m.cpu.clone(),
        );
        registry.register_with_unit(
            "resident_memory",
            "Resident memory size",
            Unit::Bytes,
            m.resident.clone(),
        );
        registry.register_with_unit(
            "virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            m.virtual_memory.clone(),
        );
        registry.register("open_fds", "Open file descriptors", m.open_fds.clone());
        registry.register(
            "max_fds",
            "Soft limit of open file descriptors (-1: unlimited)",
            m.max_fds.clone(),
        );
        registry.register_with_unit(
            "start_time",
            "When the process started (Unix time)",
            Unit::Seconds,
            m.start_time.clone(),
        );
        ProcessMetrics { registry, ..m }
    }

    fn update(&self) {
        let Some(s) = process::sample() else { return };
        // The counter only goes up: add what the kernel counted since the last scrape.
        let delta = s.cpu_seconds - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.resident.set(as_i64(s.resident_memory_bytes));
        self.virtual_memory.set(as_i64(s.virtual_memory_bytes));
        self.open_fds.set(as_i64(s.open_fds));
        self.max_fds.set(s.max_fds.map_or(-1, as_i64));
        self.start_time.set(as_i64(s.start_time_seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn a_stored_rotation_sets_its_timestamps_and_a_failed_record_does_not() {
        let m = Metrics::new();
        m.refresh("tiktok", "rotated", Some(0.2), 1_700_000_000);
        m.refresh("tiktok", "transient", Some(0.1), 1_700_000_100);
        let text = encoded(&m);
        assert!(
            text.contains(
                "refreshd_last_rotation_timestamp_seconds{provider=\"tiktok\"} 1700000000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("refreshd_store_last_commit_timestamp_seconds 1700000100\n"),
            "{text}"
        );
        m.refresh("tiktok", "record_failed", Some(0.1), 1_700_000_200);
        assert!(
            encoded(&m).contains("refreshd_store_last_commit_timestamp_seconds 1700000100\n"),
            "a refused commit is no commit"
        );
    }

    #[test]
    fn lateness_tells_one_millisecond_from_ten() {
        let m = Metrics::new();
        m.lateness(0.0008);
        m.lateness(0.009);
        let text = encoded(&m);
        for (le, count) in [("0.001", 1), ("0.005", 1), ("0.01", 2), ("1800.0", 2)] {
            let line =
                format!("refreshd_schedule_lateness_seconds_bucket{{le=\"{le}\"}} {count}\n");
            assert!(text.contains(&line), "no {line:?} in {text}");
        }
    }

    #[test]
    fn build_info_names_the_version_and_commit() {
        let text = encoded(&Metrics::new());
        let line = format!(
            "refreshd_build_info{{version=\"{}\",commit=\"{BUILD_COMMIT}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
    }
}

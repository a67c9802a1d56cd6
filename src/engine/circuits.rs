//! The engine's side of the per-provider circuit breakers (`crate::circuit`): which
//! providers' accounts are held back, whether a request may go now, and the announcements
//! (log, metric, wake-up) when a circuit opens or closes.

use super::Engine;
use crate::circuit::{self, Circuit, Permit};
use crate::model::Account;
use std::time::Duration;

impl Engine {
    /// Providers whose circuit holds their accounts back now: not claimed.
    pub(super) fn held_providers(&self) -> Vec<String> {
        let now = self.clock.now_millis();
        let circuits = self.circuits.lock().expect("not poisoned");
        circuits
            .iter()
            .filter(|(_, c)| c.holding(now))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The earliest probe time of an open circuit (clock ms).
    pub(super) fn next_probe(&self) -> Option<i64> {
        let circuits = self.circuits.lock().expect("not poisoned");
        circuits.values().filter_map(Circuit::probe_at).min()
    }

    /// Asks the account's provider circuit whether its request may be sent now.
    pub(super) fn circuit_admits(&self, account: &Account) -> bool {
        let now = self.clock.now_millis();
        let mut circuits = self.circuits.lock().expect("not poisoned");
        let circuit = circuits.entry(account.provider.clone()).or_default();
        match circuit.permit(now) {
            Permit::Send => true,
            Permit::Probe => {
                tracing::info!(event = "provider_circuit_probe", account = account.id, provider = %account.provider,
                    "the provider's circuit is open: this refresh is the probe");
                true
            }
            Permit::Wait { .. } => false,
        }
    }

    /// Reports a transient failure to the account's provider circuit; true while it is open.
    pub(super) fn circuit_failure(&self, account: &Account, retry_after: Option<Duration>) -> bool {
        let now = self.clock.now_millis();
        let mut circuits = self.circuits.lock().expect("not poisoned");
        let circuit = circuits.entry(account.provider.clone()).or_default();
        if circuit.failure(now, retry_after) == Some(circuit::Change::Opened) {
            self.metrics.circuit_open(&account.provider, true);
            tracing::warn!(event = "provider_circuit_open", provider = %account.provider,
                failures = circuit::THRESHOLD, probe_every_ms = circuit::PROBE_INTERVAL.as_millis() as u64,
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                "the provider keeps failing: its accounts wait while one probe request per interval checks it");
        }
        circuit.is_open()
    }

    /// Reports a proper answer of `provider`: its circuit closes.
    pub(super) fn circuit_answered(&self, provider: &str) {
        let closed = {
            let mut circuits = self.circuits.lock().expect("not poisoned");
            circuits.entry(provider.to_string()).or_default().answered()
        };
        if closed == Some(circuit::Change::Closed) {
            self.metrics.circuit_open(provider, false);
            tracing::info!(
                event = "provider_circuit_closed",
                provider,
                "the provider answers again: its waiting accounts are refreshed within its rate limit"
            );
            self.wake.notify_one();
        }
    }
}

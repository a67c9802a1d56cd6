//! The engine's side of the per-provider circuit breakers (`crate::circuit`): which
//! providers' accounts are held back, whether a request may go now, and the announcements
//! (log, metric, wake-up) when a circuit opens or closes; what the admin page shows of each
//! provider's circuit and configuration state.

use super::Engine;
use crate::circuit::{self, Circuit, Permit, Phase};
use crate::model::Account;
use std::collections::HashMap;
use std::time::Duration;

/// What this process knows of one provider's health, for the admin page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProviderHealth {
    pub circuit: Phase,
    /// The provider refuses our client configuration (`provider_config_error`).
    pub rejecting: bool,
}

impl Engine {
    /// The circuit and configuration state of `provider` in this process (closed and
    /// accepted until a request says otherwise).
    pub fn provider_health(&self, provider: &str) -> ProviderHealth {
        let circuit = (self.circuits.lock().expect("not poisoned"))
            .get(provider)
            .map_or(Phase::Closed, Circuit::phase);
        let rejecting = (self.provider_states.lock().expect("not poisoned"))
            .get(provider)
            .is_some_and(|s| s.rejecting());
        ProviderHealth { circuit, rejecting }
    }

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
        let circuit = entry_of(&mut circuits, &account.provider);
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
        let circuit = entry_of(&mut circuits, &account.provider);
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
            entry_of(&mut circuits, provider).answered()
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

/// The value of provider `name` in a per-provider map, created with its default: the name
/// is copied only the first time, not on every refresh as `entry` would.
pub(super) fn entry_of<'m, V: Default>(map: &'m mut HashMap<String, V>, name: &str) -> &'m mut V {
    if !map.contains_key(name) {
        map.insert(name.to_string(), V::default());
    }
    map.get_mut(name).expect("inserted above")
}

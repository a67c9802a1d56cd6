//! A per-provider circuit breaker: after consecutive transient failures across accounts the
//! provider is left alone, except for one probe request per interval, until a probe gets a
//! proper answer. Pure: times are clock milliseconds passed in; the engine asks before each
//! request and reports each answer.
//!
//! Closed -> (THRESHOLD transient failures in a row) -> Open -> (probe time) -> Probing ->
//! (a proper answer) -> Closed, or (another transient failure) -> Open.

use std::time::Duration;

/// Transient failures in a row, whichever accounts they were for, that open the circuit.
pub const THRESHOLD: u32 = 5;
/// Time between probes while open: at most one request per second reaches a provider that
/// is down.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    /// No request until `probe_at` (clock ms).
    Open {
        probe_at: i64,
    },
    /// One probe in flight; nothing else is sent until its answer.
    Probing,
}

/// What the engine may do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Closed: send.
    Send,
    /// Open and due: send this one request as the probe.
    Probe,
    /// Do not send; the next probe is at this clock time (ms), or after the probe in flight.
    Wait { until: Option<i64> },
}

/// A change of the circuit to announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `provider_circuit_open`.
    Opened,
    /// `provider_circuit_closed`.
    Closed,
}

/// Where a circuit stands, as the admin page shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Closed,
    /// Requests wait; the next probe goes at `probe_at` (clock ms).
    Open {
        probe_at: i64,
    },
    /// One probe request is in flight.
    Probing,
}

#[derive(Clone, Debug)]
pub struct Circuit {
    state: State,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Circuit {
    /// Whether a request may be sent at `now` (ms). A `Probe` answer moves the circuit to
    /// probing: the caller must send the request and report its answer.
    pub fn permit(&mut self, now: i64) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Send,
            State::Open { probe_at } if now >= probe_at => {
                self.state = State::Probing;
                Permit::Probe
            }
            State::Open { probe_at } => Permit::Wait {
                until: Some(probe_at),
            },
            State::Probing => Permit::Wait { until: None },
        }
    }

    /// True while accounts of this provider should not be claimed at `now` (ms).
    pub fn holding(&self, now: i64) -> bool {
        match self.state {
            State::Closed { .. } => false,
            State::Open { probe_at } => now < probe_at,
            State::Probing => true,
        }
    }

    /// The next probe time (ms), while open.
    pub fn probe_at(&self) -> Option<i64> {
        match self.state {
            State::Open { probe_at } => Some(probe_at),
            _ => None,
        }
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Closed { .. } => Phase::Closed,
            State::Open { probe_at } => Phase::Open { probe_at },
            State::Probing => Phase::Probing,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }

    /// A transient failure (5xx, 429, timeout, broken answer) at `now`; `retry_after` is the
    /// provider's own wish, honoured for the next probe.
    pub fn failure(&mut self, now: i64, retry_after: Option<Duration>) -> Option<Change> {
        let wait = retry_after.unwrap_or_default().max(PROBE_INTERVAL);
        let reopen = State::Open {
            probe_at: now + wait.as_millis() as i64,
        };
        match self.state {
            State::Closed { failures } if failures + 1 >= THRESHOLD => {
                self.state = reopen;
                Some(Change::Opened)
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            // A failed probe, or a request sent before the circuit opened.
            State::Probing | State::Open { .. } => {
                if let State::Open { probe_at } = self.state
                    && probe_at > now + wait.as_millis() as i64
                {
                    return None;
                }
                self.state = reopen;
                None
            }
        }
    }

    /// Any proper answer (tokens, or an OAuth error about the grant or our client): the
    /// provider is up.
    pub fn answered(&mut self) -> Option<Change> {
        let was_open = self.is_open();
        self.state = State::Closed { failures: 0 };
        was_open.then_some(Change::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_failures_across_accounts() {
        let mut c = Circuit::default();
        for _ in 1..THRESHOLD {
            assert_eq!(c.failure(0, None), None);
            assert_eq!(c.permit(0), Permit::Send);
        }
        assert_eq!(c.failure(0, None), Some(Change::Opened));
        assert_eq!(c.permit(10), Permit::Wait { until: Some(1000) });
    }

    #[test]
    fn its_phase_follows_closed_open_probing_closed() {
        let mut c = Circuit::default();
        assert_eq!(c.phase(), Phase::Closed);
        for _ in 0..THRESHOLD {
            c.failure(0, None);
        }
        assert_eq!(c.phase(), Phase::Open { probe_at: 1000 });
        assert_eq!(c.permit(1000), Permit::Probe);
        assert_eq!(c.phase(), Phase::Probing);
        c.answered();
        assert_eq!(c.phase(), Phase::Closed);
    }

    #[test]
    fn a_success_between_failures_keeps_it_closed() {
        let mut c = Circuit::default();
        for _ in 0..10 {
            for _ in 1..THRESHOLD {
                c.failure(0, None);
            }
            assert_eq!(c.answered(), None);
        }
        assert_eq!(c.permit(0), Permit::Send);
    }

    #[test]
    fn one_probe_per_interval_at_most_one_per_second() {
        let mut c = Circuit::default();
        for _ in 0..THRESHOLD {
            c.failure(0, None);
        }
        // 100 s of asking every 10 ms while the provider stays down.
        let mut probes = Vec::new();
        for now in (0..100_000).step_by(10) {
            if c.permit(now) == Permit::Probe {
                probes.push(now);
                // The probe fails 300 ms later.
                assert_eq!(c.failure(now + 300, None), None);
            }
        }
        assert!(probes.len() >= 70, "{}", probes.len());
        for w in probes.windows(2) {
            assert!(w[1] - w[0] >= 1000, "{w:?}");
        }
    }

    #[test]
    fn a_good_probe_closes_and_retry_after_is_honoured() {
        let mut c = Circuit::default();
        for _ in 0..THRESHOLD - 1 {
            c.failure(0, None);
        }
        assert_eq!(
            c.failure(0, Some(Duration::from_secs(30))),
            Some(Change::Opened)
        );
        assert_eq!(
            c.permit(29_999),
            Permit::Wait {
                until: Some(30_000)
            }
        );
        assert!(c.holding(29_999));
        assert_eq!(c.permit(30_000), Permit::Probe);
        assert_eq!(c.permit(30_001), Permit::Wait { until: None });
        assert_eq!(c.answered(), Some(Change::Closed));
        assert_eq!(c.permit(30_002), Permit::Send);
        assert!(!c.holding(30_002));
    }

    #[test]
    fn late_failures_of_requests_sent_before_it_opened_do_not_shorten_a_retry_after() {
        let mut c = Circuit::default();
        for _ in 0..THRESHOLD - 1 {
            c.failure(0, None);
        }
        c.failure(0, Some(Duration::from_secs(60)));
        assert_eq!(c.failure(100, None), None);
        assert_eq!(c.probe_at(), Some(60_000));
    }
}

//! The write gate: whether a store's start-up checks (SQLite's `quick_check`, the
//! sealing-key check) have passed. The daemon opens its store before they end, so it can
//! answer reads at once; the SQLite worker holds every write (claim, outcome, import,
//! sweep, replay of a recovery file, ...) until the gate opens, and refuses them for good
//! when a check failed. Checked stores (every other open) start with the gate open.

use crate::store::error::StoreError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// Called on the checks' thread before they run (tests hold the checks with it).
pub type CheckHook = Box<dyn FnOnce() + Send>;

/// Where a store's start-up checks are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checks {
    /// Still running: reads are answered, writes wait.
    Pending,
    /// Passed, after this long: writes go through.
    Passed(Duration),
    /// Failed (the message names the file and what to do): nothing is ever written.
    Failed(String),
}

/// Shared by the worker (which opens or fails it) and every `Store` handle.
#[derive(Debug)]
pub(crate) struct Gate {
    state: watch::Sender<Checks>,
    /// The failure itself, handed once to whoever stops the daemon with it.
    failure: Mutex<Option<StoreError>>,
    /// Writes (claims included) held while the checks ran: tests see a write reach the
    /// gate without waiting for it blindly.
    held: AtomicUsize,
}

impl Default for Gate {
    /// Open: the checks ran before the store was handed out.
    fn default() -> Self {
        Gate {
            state: watch::Sender::new(Checks::Passed(Duration::ZERO)),
            failure: Mutex::new(None),
            held: AtomicUsize::new(0),
        }
    }
}

impl Gate {
    /// Closes the gate until `pass` or `fail`.
    pub fn hold(&self) {
        self.state.send_replace(Checks::Pending);
    }

    pub fn pass(&self, took: Duration) {
        self.state.send_replace(Checks::Passed(took));
    }

    pub fn fail(&self, error: StoreError) {
        self.state.send_replace(Checks::Failed(error.to_string()));
        *self.failure.lock().expect("not poisoned") = Some(error);
    }

    pub fn state(&self) -> Checks {
        self.state.borrow().clone()
    }

    /// A write arrived while the checks run and waits for their end.
    pub fn note_held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// How many writes arrived while the checks ran (they wait, or were refused).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits for the checks to end: how long they took, or why they failed (the error
    /// itself the first time, its message after).
    pub async fn settled(&self) -> Result<Duration, StoreError> {
        let mut rx = self.state.subscribe();
        let end = rx
            .wait_for(|s| *s != Checks::Pending)
            .await
            .map(|s| s.clone())
            .unwrap_or(Checks::Passed(Duration::ZERO));
        match end {
            Checks::Passed(took) => Ok(took),
            Checks::Failed(message) => Err(self
                .failure
                .lock()
                .expect("not poisoned")
                .take()
                .unwrap_or(StoreError::ChecksFailed { message })),
            Checks::Pending => unreachable!("waited for the end"),
        }
    }

    /// The error a write held at a failed gate is answered with.
    pub fn refusal(&self) -> Option<StoreError> {
        match self.state() {
            Checks::Failed(message) => Some(StoreError::ChecksFailed { message }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_default_gate_is_open_and_a_held_one_settles_when_passed() {
        let gate = Gate::default();
        assert_eq!(gate.settled().await.unwrap(), Duration::ZERO);
        gate.hold();
        assert_eq!(gate.state(), Checks::Pending);
        assert!(gate.refusal().is_none());
        assert_eq!(gate.held(), 0);
        gate.note_held();
        assert_eq!(gate.held(), 1);
        gate.pass(Duration::from_millis(7));
        assert_eq!(gate.settled().await.unwrap(), Duration::from_millis(7));
    }

    #[tokio::test]
    async fn a_failed_gate_hands_out_its_error_once_then_its_message() {
        let gate = Gate::default();
        gate.hold();
        gate.fail(StoreError::Damaged {
            path: "/x/db".into(),
            problems: "page 2 is bad".into(),
        });
        let first = gate.settled().await.unwrap_err();
        assert!(matches!(first, StoreError::Damaged { .. }), "{first}");
        let again = gate.settled().await.unwrap_err().to_string();
        assert!(again.contains("/x/db is damaged"), "{again}");
        assert!(
            gate.refusal()
                .unwrap()
                .to_string()
                .contains("page 2 is bad")
        );
    }
}

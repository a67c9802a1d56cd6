//! State changes announced inside the daemon process, for whoever listens: token sinks,
//! webhook notifications, the ops server. Logs stay the admin's record; these are for code.
//!
//! A broadcast channel: emitting never blocks or slows a refresh, and a listener that falls
//! behind loses the oldest events (it sees `RecvError::Lagged` and should resynchronise from
//! the store). Events carry ids and reasons, never a token.

use tokio::sync::broadcast;

/// Events kept for a slow listener before it starts losing the oldest.
const CAPACITY: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// New tokens for this account are durable (a refresh, or a connect in this process).
    TokensChanged {
        account_id: i64,
        provider: String,
        subject: String,
    },
    /// The account now needs a human (newly `needs_reauth` or `expiring`).
    ReauthRequired {
        account_id: i64,
        provider: String,
        subject: String,
        label: Option<String>,
        reason: String,
        refresh_expires_at: Option<i64>,
    },
    /// A failing account refreshes fine again (`account_recovered`): after transient
    /// failures in a row, after a flag that a refresh renewed or a forced refresh fixed, or
    /// reconnected through the web.
    Recovered {
        account_id: i64,
        provider: String,
        subject: String,
    },
    /// The provider refused our client credentials (first failure after a success or start).
    ProviderRejected { provider: String, error: String },
    /// A provider that refused our client credentials accepts them again.
    ProviderRecovered { provider: String },
}

impl Event {
    /// The stable name used in logs, webhooks and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::TokensChanged { .. } => "tokens_changed",
            Event::ReauthRequired { .. } => "reauth_required",
            Event::Recovered { .. } => "account_recovered",
            Event::ProviderRejected { .. } => "provider_rejected",
            Event::ProviderRecovered { .. } => "provider_recovered",
        }
    }
}

/// Cheap to clone; all clones share one channel.
#[derive(Clone, Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Never blocks; without listeners the event is dropped.
    pub fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// `emit` of the event `make` builds, built only when someone listens: a refresh
    /// allocates nothing for an event no one reads.
    pub fn emit_with(&self, make: impl FnOnce() -> Event) {
        if self.tx.receiver_count() > 0 {
            self.emit(make());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_get_events_emitted_after_they_subscribe() {
        let events = Events::default();
        events.emit(Event::ProviderRecovered {
            provider: "early".into(),
        });
        let mut rx = events.subscribe();
        let e = Event::ProviderRejected {
            provider: "tiktok".into(),
            error: "invalid_client".into(),
        };
        events.clone().emit(e.clone());
        assert_eq!(rx.recv().await.unwrap(), e);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn emit_with_builds_the_event_only_for_listeners() {
        let events = Events::default();
        let built = std::cell::Cell::new(0);
        let make = || {
            built.set(built.get() + 1);
            Event::ProviderRecovered {
                provider: "tiktok".into(),
            }
        };
        events.emit_with(make);
        assert_eq!(built.get(), 0, "no listener: nothing built");
        let mut rx = events.subscribe();
        events.emit_with(make);
        assert_eq!(built.get(), 1);
        assert!(rx.try_recv().is_ok());
    }
}

//! The one source of "now" for scheduling. Production uses the system clock; tests use a
//! manual clock they move by hand, so days of schedule run in milliseconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Unix time in milliseconds.
pub type UnixMillis = i64;

/// A cheaply cloneable clock. Every clone shares the same time source.
#[derive(Clone)]
pub struct Clock(Arc<Inner>);

enum Inner {
    System,
    Manual(watch::Sender<UnixMillis>),
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Inner::System => f.write_str("Clock::System"),
            Inner::Manual(tx) => write!(f, "Clock::Manual({})", *tx.borrow()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(Inner::System))
    }

    /// A clock that stands still at `start` (unix seconds) until moved with `advance`/`set`.
    pub fn manual(start_secs: i64) -> Self {
        let (tx, _) = watch::channel(start_secs * 1000);
        Clock(Arc::new(Inner::Manual(tx)))
    }

    pub fn is_manual(&self) -> bool {
        matches!(&*self.0, Inner::Manual(_))
    }

    pub fn now_millis(&self) -> UnixMillis {
        match &*self.0 {
            Inner::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            Inner::Manual(tx) => *tx.borrow(),
        }
    }

    /// Unix seconds: the unit of every time stored in the database.
    pub fn now(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }

    /// Moves a manual clock forward. Panics on the system clock: only tests move time.
    pub fn advance(&self, by: Duration) {
        match &*self.0 {
            Inner::System => panic!("the system clock cannot be advanced"),
            Inner::Manual(tx) => tx.send_modify(|t| *t += by.as_millis() as i64),
        }
    }

    /// Sets a manual clock to `secs` (unix seconds). Panics on the system clock.
    pub fn set(&self, secs: i64) {
        match &*self.0 {
            Inner::System => panic!("the system clock cannot be set"),
            Inner::Manual(tx) => tx.send_modify(|t| *t = secs * 1000),
        }
    }

    /// Sleeps until the clock reads `deadline` (unix milliseconds). On a manual clock this
    /// returns as soon as a test moves time past the deadline.
    pub async fn sleep_until_millis(&self, deadline: UnixMillis) {
        match &*self.0 {
            Inner::System => {
                let wait = deadline - self.now_millis();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
            }
            Inner::Manual(tx) => {
                let mut rx = tx.subscribe();
                // The sender lives as long as `self`, so this only ends at the deadline.
                let _ = rx.wait_for(|now| *now >= deadline).await;
            }
        }
    }

    /// Sleeps until unix second `deadline`.
    pub async fn sleep_until(&self, deadline_secs: i64) {
        self.sleep_until_millis(deadline_secs.saturating_mul(1000))
            .await
    }
}

/// RFC 3339 rendering of a unix-seconds timestamp, as used in logs and CLI output.
pub fn rfc3339(secs: i64) -> String {
    Rfc3339(secs).to_string()
}

/// `rfc3339` as a `Display` value: a log field formats it in place, without a `String`
/// per line.
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub i64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Years 0..=9999 in UTC need 20 bytes ("2026-11-30T12:00:00Z").
        let mut buf = [0u8; 32];
        let mut out = &mut buf[..];
        let written = time::OffsetDateTime::from_unix_timestamp(self.0)
            .ok()
            .and_then(|t| {
                t.format_into(&mut out, &time::format_description::well_known::Rfc3339)
                    .ok()
            });
        match written.and_then(|n| std::str::from_utf8(&buf[..n]).ok()) {
            Some(s) => f.write_str(s),
            None => write!(f, "@{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now(), 1_000);
        c.advance(Duration::from_secs(86_400));
        assert_eq!(c.now(), 87_400);
        c.set(5);
        assert_eq!(c.now_millis(), 5_000);
    }

    #[tokio::test]
    async fn manual_sleep_wakes_when_time_passes_deadline() {
        let c = Clock::manual(0);
        let c2 = c.clone();
        let sleeper = tokio::spawn(async move { c2.sleep_until(3_600).await });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        c.advance(Duration::from_secs(3_599));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        c.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000), "2026-11-30T00:53:20Z");
        // Out of the formatter's range: the raw number, never a panic.
        assert_eq!(rfc3339(i64::MAX), format!("@{}", i64::MAX));
        assert_eq!(Rfc3339(0).to_string(), rfc3339(0));
    }
}

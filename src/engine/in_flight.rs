//! The refreshes in flight as the loop sees them: how many, and a wake-up as each ends.
//! Kept apart from the loop's other wake-ups (an import, a `refresh` request, a reload) so
//! an idle loop can tell them apart: once a claim found nothing due, a refresh ending
//! frees a slot but rarely makes anything due, and looking again after one cost a claim
//! and a next-due query, each walking past every account still in flight (2-4 such looks
//! a second at ~139 refreshes a second).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(super) struct InFlight {
    count: AtomicUsize,
    /// Refreshes ended since start: tells the loop whether one ended since it looked.
    ends: AtomicU64,
    ended: Notify,
}

impl InFlight {
    /// A refresh task is about to start; it ends when the returned guard is dropped (also
    /// when its task unwinds).
    pub(super) fn start(self: &Arc<Self>) -> Running {
        self.count.fetch_add(1, Ordering::AcqRel);
        Running(self.clone())
    }

    /// How many refreshes ended so far: read before a claim, it tells `all_ended` whether
    /// one ended after (its outcome perhaps unseen by that claim).
    pub(super) fn ends(&self) -> u64 {
        self.ends.load(Ordering::Acquire)
    }

    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves when a refresh ends (or ended since the last wait).
    pub(super) async fn one_ended(&self) {
        self.ended.notified().await;
    }

    /// Resolves once none is in flight. With none in flight at the call, it resolves at
    /// once if one ended since `ends_before` (`ends()` read before the loop last looked at
    /// the store), and never otherwise: an idle loop with nothing in flight sleeps on its
    /// other wake-ups only.
    pub(super) async fn all_ended(&self, ends_before: u64) {
        if self.count() == 0 && self.ends() == ends_before {
            return std::future::pending().await;
        }
        while self.count() > 0 {
            self.ended.notified().await;
        }
    }
}

/// One refresh in flight: counted until dropped, then the loop is woken.
pub(super) struct Running(Arc<InFlight>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.ends.fetch_add(1, Ordering::AcqRel);
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SOON: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn all_ended_waits_for_the_last_refresh_not_the_first() {
        let f = Arc::new(InFlight::default());
        let (a, b) = (f.start(), f.start());
        let before = f.ends();
        drop(a);
        assert!(
            tokio::time::timeout(SOON, f.all_ended(before))
                .await
                .is_err(),
            "one of two still in flight"
        );
        drop(b);
        assert!(
            tokio::time::timeout(SOON, f.all_ended(before))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn with_nothing_in_flight_all_ended_resolves_only_if_one_ended_since() {
        let f = Arc::new(InFlight::default());
        let before = f.ends();
        assert!(
            tokio::time::timeout(SOON, f.all_ended(before))
                .await
                .is_err()
        );
        // One ended after the loop last looked: look again at once.
        drop(f.start());
        assert!(
            tokio::time::timeout(SOON, f.all_ended(before))
                .await
                .is_ok()
        );
        assert!(
            tokio::time::timeout(SOON, f.all_ended(f.ends()))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn one_ended_resolves_for_each_refresh_that_ends() {
        let f = Arc::new(InFlight::default());
        let (a, _b) = (f.start(), f.start());
        drop(a);
        assert!(tokio::time::timeout(SOON, f.one_ended()).await.is_ok());
        assert_eq!(f.count(), 1);
    }
}

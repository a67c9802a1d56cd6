//! The refreshes in flight as the loop sees them: when each one's account is due again,
//! and a wake-up as each ends. Kept apart from the loop's other wake-ups (an import,
//! a `refresh` request, a reload) so an idle loop can tell them apart: once a claim found
//! nothing due, a refresh ending rarely makes anything due before the loop wakes anyway (a
//! rotation is due again hours later), and looking again after each one cost a claim and
//! a next-due query, each walking past every account still in flight. Only an end whose
//! account is due again before the loop's wake-up (a retry, an account given back) or
//! whose next due time is unknown makes the idle loop look again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::Notify;

/// `earliest` when no refresh ended since the loop last looked.
const NONE_ENDED: i64 = i64::MAX;
/// `earliest` when a refresh ended whose account's next due time is unknown.
const UNKNOWN: i64 = i64::MIN;

#[derive(Debug)]
pub(super) struct InFlight {
    /// The earliest due second (unix) of the accounts whose refreshes ended since the loop
    /// last looked (`NONE_ENDED`, `UNKNOWN`).
    earliest: AtomicI64,
    ended: Notify,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            earliest: AtomicI64::new(NONE_ENDED),
            ended: Notify::new(),
        }
    }
}

/// What the refreshes that ended since the loop last looked ask of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    None,
    /// The earliest second one of their accounts is due again.
    DueAgainAt(i64),
    /// One ended whose account's next due time is not known: look again.
    Unknown,
}

impl InFlight {
    /// A refresh task is about to start; it ends when the returned guard is dropped (also
    /// when its task unwinds), its account's next due time unknown unless `Running::ended`
    /// said it.
    pub(super) fn start(self: &Arc<Self>) -> Running {
        Running {
            in_flight: self.clone(),
            due_again: None,
        }
    }

    /// The loop is about to look at the store: ends from here on are news to it.
    pub(super) fn looking(&self) {
        self.earliest.store(NONE_ENDED, Ordering::Release);
    }

    /// What ended since the loop last looked (`looking`).
    pub(super) fn since_looked(&self) -> Ended {
        match self.earliest.load(Ordering::Acquire) {
            NONE_ENDED => Ended::None,
            UNKNOWN => Ended::Unknown,
            at => Ended::DueAgainAt(at),
        }
    }

    /// Resolves when a refresh ends (or ended since the last wait).
    pub(super) async fn one_ended(&self) {
        self.ended.notified().await;
    }

    /// Resolves once a refresh ended since the loop last looked whose account is due again
    /// before `wake_at` (unix ms; `wake_for` turns a due second into the loop's wake-up) or
    /// whose next due time is unknown.
    pub(super) async fn due_before(&self, wake_at: i64, wake_for: impl Fn(i64) -> i64) {
        loop {
            match self.since_looked() {
                Ended::Unknown => return,
                Ended::DueAgainAt(t) if wake_for(t) < wake_at => return,
                _ => {}
            }
            self.ended.notified().await;
        }
    }
}

/// One refresh in flight: when dropped, its due time is noted and the loop woken.
pub(super) struct Running {
    in_flight: Arc<InFlight>,
    /// The second its account is due again, once known.
    due_again: Option<i64>,
}

impl Running {
    /// The refresh ended; its account is due again at `due_again` (unix seconds), if known.
    pub(super) fn ended(mut self, due_again: Option<i64>) {
        self.due_again = due_again;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let f = &self.in_flight;
        f.earliest
            .fetch_min(self.due_again.unwrap_or(UNKNOWN), Ordering::AcqRel);
        f.ended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Paused time: a wait that never ends times out at once.
    const SOON: Duration = Duration::from_millis(50);
    /// A due second's wake-up, as `policy::wake_for_due` without the lead.
    fn at_ms(t: i64) -> i64 {
        t * 1000
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotation_due_after_the_wake_up_lets_the_idle_loop_sleep() {
        let f = Arc::new(InFlight::default());
        f.looking();
        f.start().ended(Some(7200));
        assert_eq!(f.since_looked(), Ended::DueAgainAt(7200));
        let waited = tokio::time::timeout(SOON, f.due_before(at_ms(60), at_ms)).await;
        assert!(waited.is_err(), "due two hours on: no need to look");
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_due_before_the_wake_up_or_unknown_makes_the_loop_look_again() {
        let f = Arc::new(InFlight::default());
        f.looking();
        let (rotated, retry) = (f.start(), f.start());
        rotated.ended(Some(7200));
        retry.ended(Some(5));
        assert_eq!(f.since_looked(), Ended::DueAgainAt(5));
        assert!(
            tokio::time::timeout(SOON, f.due_before(at_ms(60), at_ms))
                .await
                .is_ok(),
            "a retry due at 5 s comes before the wake-up at 60 s"
        );
        f.looking();
        drop(f.start());
        assert_eq!(f.since_looked(), Ended::Unknown);
        assert!(
            tokio::time::timeout(SOON, f.due_before(at_ms(60), at_ms))
                .await
                .is_ok(),
            "an end without a due time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_while_the_loop_sleeps_wakes_it_and_looking_forgets_earlier_ends() {
        let f = Arc::new(InFlight::default());
        drop(f.start());
        f.looking();
        assert_eq!(f.since_looked(), Ended::None);
        let running = f.start();
        let waiter = {
            let f = f.clone();
            tokio::spawn(async move { f.due_before(at_ms(60), at_ms).await })
        };
        tokio::task::yield_now().await;
        running.ended(Some(30));
        tokio::time::timeout(SOON, waiter)
            .await
            .expect("woken by the end")
            .unwrap();
    }
}

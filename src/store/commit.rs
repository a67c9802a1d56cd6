//! The group-commit policy, the same on both backends: how many outcomes share one commit,
//! how long a commit waits for a lock before its rotations go to the recovery file, what a
//! failed group does (one bad outcome must not hold the others hostage), and how often
//! deferred rotations are retried, what a worker's stop leaves behind, and how a committed
//! group's answers reach their callers (`Answers`: sent on drop, never lost). Each
//! backend's worker only runs the transactions.

use super::deferred::Deferrals;
use super::error::StoreError;
use super::instance::{Instance, StoreLock};
use super::recovery::RecoveryLog;
use super::types::{Outcome, Recorded, Reply};
use std::path::Path;
use std::time::Duration;

/// Most outcomes written by one commit.
pub(crate) const MAX_GROUP: usize = 1024;
/// How often `close` tries to commit deferred rotations, `CLOSE_RETRY_EVERY` apart, before
/// leaving them to the recovery file (a short blip at shutdown loses nothing either way).
pub(crate) const CLOSE_RETRIES: usize = 5;
pub(crate) const CLOSE_RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often deferred (recovery-file) commits are retried while any are pending.
pub(crate) const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long a commit of outcomes waits for another writer's lock before its rotations go
/// to the recovery file: answers are not held in memory for the whole busy timeout.
pub(crate) const COMMIT_WAIT: Duration = Duration::from_millis(100);

/// Answers a group's outcomes from its commit's result. A failure that is not transient
/// (not a locked, full or unreachable database, which fails every outcome alike) may be
/// one bad outcome: then the group comes back, to be committed one outcome at a time.
/// `lost`: the store is gone, so retrying each alone would not help either. A committed
/// group's answers go to `deliver` (`answer` sends them at once; the SQLite worker hands
/// them to the runtime, `answer_on`).
#[must_use = "a group that comes back must be committed one outcome at a time"]
pub(crate) fn settle(
    deferrals: &mut Deferrals,
    batch: Vec<(Outcome, Reply)>,
    result: Result<Vec<Recorded>, StoreError>,
    lost: bool,
    deliver: impl FnOnce(Answers),
) -> Option<Vec<(Outcome, Reply)>> {
    match result {
        Err(e) if split(batch.len(), &e, lost) => Some(batch),
        Ok(results) => {
            deferrals.commit_ok();
            deliver(Answers(
                batch
                    .into_iter()
                    .map(|(_, reply)| reply)
                    .zip(results)
                    .collect(),
            ));
            None
        }
        Err(e) => {
            deferrals.settle_failed(batch, &e);
            None
        }
    }
}

/// A committed group's answers: each caller's reply with what its outcome did. Whatever
/// is not sent when it is dropped is sent then, so a task that carries it and never runs
/// (its runtime shut down) still answers every caller rather than leave them an error for
/// a committed write.
pub(crate) struct Answers(Vec<(Reply, Recorded)>);

impl Drop for Answers {
    fn drop(&mut self) {
        for (reply, r) in self.0.drain(..) {
            let _ = reply.send(Ok(r));
        }
    }
}

/// Sends a committed group's answers (only ever after its commit returned).
pub(crate) fn answer(answers: Answers) {
    drop(answers);
}

/// Sends a committed group's answers from a task on `runtime`, handed over in one message:
/// waking each caller's task from the worker thread took a remote wake-up per outcome (a
/// tenth of the SQLite worker's CPU in a burst), where a runtime worker queues them as
/// local tasks. Without a runtime, they are sent at once.
pub(crate) fn answer_on(runtime: Option<&tokio::runtime::Handle>, answers: Answers) {
    match runtime {
        Some(rt) => drop(rt.spawn(async move { answer(answers) })),
        None => answer(answers),
    }
}

/// Whether a failed group is retried one outcome at a time.
fn split(len: usize, e: &StoreError, lost: bool) -> bool {
    len > 1 && !e.is_transient() && !lost
}

/// Takes a retry of the deferred rotations: committed (the refused ones quarantined), or
/// failed again.
pub(crate) fn settle_retry(
    deferrals: &mut Deferrals,
    result: Result<(usize, Vec<(Outcome, String)>), StoreError>,
) {
    match result {
        Ok((_, refused)) => deferrals.committed(&refused),
        Err(e) => deferrals.retry_failed(&e),
    }
}

/// A worker's stop, the same on both backends: its own recovery file goes only when nothing
/// is deferred (what is waits there for the next start), then its instance lock on `db` is
/// released. A second call does nothing.
pub(crate) fn stop(instance: &mut Option<Instance>, deferrals: &mut Deferrals, db: &Path) {
    let Some(me) = instance.take() else {
        return;
    };
    let path = deferrals.log.path().to_path_buf();
    let log = std::mem::replace(&mut deferrals.log, RecoveryLog::unopened(path));
    if deferrals.is_empty() {
        log.remove();
    }
    if let Ok(lock) = StoreLock::acquire(db) {
        me.release(&lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_group_failing_for_good_is_split() {
        let refused = StoreError::NotFound(1);
        let busy = StoreError::PgPool {
            context: "commit",
            message: "down".into(),
        };
        assert!(split(2, &refused, false));
        assert!(!split(1, &refused, false), "one outcome is already alone");
        assert!(
            !split(2, &busy, false),
            "a transient failure fails every outcome alike"
        );
        assert!(
            !split(2, &refused, true),
            "a lost store fails every outcome alike"
        );
    }
}

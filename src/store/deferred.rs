//! Rotations waiting for the database (both backends): what a failed group commit does with
//! its rotated tokens, what is durable where, and the health the engine reads to decide
//! whether it may send refreshes at all. Durability is claimed only after an fsync.

use super::error::StoreError;
use super::recovery::RecoveryLog;
use super::types::{Outcome, Recorded, Reply};
use crate::crypto::Keyring;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

/// Shared by the worker and every `Store` handle.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Accounts whose rotated tokens are not committed: never claimed meanwhile, or they
    /// would be refreshed again with the refresh token the provider just retired.
    pub ids: Mutex<HashSet<i64>>,
    /// Rotations held in memory only: neither the database nor the recovery file took them.
    pub volatile: Mutex<Vec<Outcome>>,
    /// The last commit failed.
    pub store_failing: AtomicBool,
    /// The recovery file has room reserved (or the file system cannot reserve).
    pub recovery_ready: AtomicBool,
    /// Outcomes sent to the worker and not answered yet: answers not durable anywhere.
    pub waiting: AtomicUsize,
    /// Why the store cannot be used any more (its file vanished or was replaced).
    pub lost: Mutex<Option<String>>,
    /// Processes found dead whose leases the next claim ends.
    pub dead_owners: Mutex<Vec<String>>,
    /// PostgreSQL: this replica's liveness lock is gone (its connection was lost), so
    /// others may take its leases: nothing is claimed until it is re-acquired.
    pub liveness_lost: AtomicBool,
    /// The `now` of the last claim (the engine's clock), for telling live leases.
    pub claim_now: AtomicI64,
    /// PostgreSQL: looks for dead replicas run so far, which tests wait on.
    #[cfg(test)]
    pub liveness_checks: std::sync::atomic::AtomicU64,
    /// Whether the start-up checks passed: the SQLite worker writes nothing before.
    pub checks: crate::store::gate::Gate,
}

impl Health {
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().expect("not poisoned").clone()
    }

    pub fn volatile_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .volatile
            .lock()
            .expect("not poisoned")
            .iter()
            .map(Outcome::account_id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether a claimed account's request may be sent: its lease still holds (the store is
    /// there, and on PostgreSQL this process still holds its liveness lock) and its rotated
    /// token has somewhere durable to go.
    pub fn may_send(&self) -> bool {
        self.lost().is_none()
            && !self.liveness_lost.load(Ordering::Relaxed)
            && self.volatile.lock().expect("not poisoned").is_empty()
            && (!self.store_failing.load(Ordering::Relaxed)
                || self.recovery_ready.load(Ordering::Relaxed))
    }

    /// Whether new accounts may be claimed: `may_send`, and earlier answers are not piling
    /// up in memory beyond `max_waiting`.
    pub fn may_refresh(&self, max_waiting: usize) -> bool {
        self.may_send() && self.waiting.load(Ordering::Relaxed) <= max_waiting
    }
}

/// The worker's side: the own recovery file and the rotations not committed yet.
pub(crate) struct Deferrals {
    pub log: RecoveryLog,
    keys: Keyring,
    /// Every rotation not committed yet (in the recovery file, or volatile).
    pub pending: Vec<Outcome>,
    pub health: std::sync::Arc<Health>,
}

impl Deferrals {
    pub fn new(log: RecoveryLog, keys: Keyring, health: std::sync::Arc<Health>) -> Self {
        health.recovery_ready.store(log.ready(), Ordering::Relaxed);
        Deferrals {
            log,
            keys,
            pending: Vec::new(),
            health,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn commit_ok(&self) {
        self.health.store_failing.store(false, Ordering::Relaxed);
    }

    /// After a failed group commit: rotated tokens go to the recovery file and wait here
    /// (their accounts not claimed); the other outcomes fail with the error (their leases
    /// run out and the accounts are retried).
    pub fn settle_failed(&mut self, batch: Vec<(Outcome, Reply)>, e: &StoreError) {
        self.health.store_failing.store(true, Ordering::Relaxed);
        let message = e.to_string();
        let (rotated, others): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(o, _)| matches!(o, Outcome::Rotated { .. }));
        if !rotated.is_empty() {
            let outcomes: Vec<Outcome> = rotated.iter().map(|(o, _)| o.clone()).collect();
            let saved = self.log.append(&self.keys, &outcomes);
            self.health
                .ids
                .lock()
                .expect("not poisoned")
                .extend(outcomes.iter().map(Outcome::account_id));
            self.pending.extend(outcomes.iter().cloned());
            if saved.is_err() {
                self.health
                    .volatile
                    .lock()
                    .expect("not poisoned")
                    .extend(outcomes);
            }
            for (_, reply) in rotated {
                let _ = reply.send(match &saved {
                    Ok(()) => Ok(Recorded::Deferred),
                    // Held in memory and retried, but not crash-safe: say so.
                    Err(e) => Err(StoreError::Recovery {
                        path: self.log.path().to_path_buf(),
                        message: format!(
                            "{e}; commit failed too: {message}. The rotated tokens are in memory only, NOT durable; no new refreshes are sent until the database or this file takes them"
                        ),
                    }),
                });
            }
        }
        self.health
            .recovery_ready
            .store(self.log.ready(), Ordering::Relaxed);
        for (_, reply) in others {
            let _ = reply.send(Err(StoreError::NotStored {
                message: message.clone(),
            }));
        }
    }

    /// The pending rotations are committed (`refused` ones quarantined): empty the file.
    pub fn committed(&mut self, refused: &[(Outcome, String)]) {
        if let Err(e) = super::recovery::quarantine(self.log.path(), &self.keys, refused) {
            // The recovery file (kept as is) and memory hold the only copies of the refused
            // rotations: keep them pending, and their accounts out of claims, and retry.
            tracing::error!(event = "quarantine_failed", path = %self.log.path().display(), error = %e,
                "refused rotations cannot be moved to the quarantine file; they stay in the recovery file and are retried");
            let kept: HashSet<i64> = refused.iter().map(|(o, _)| o.account_id()).collect();
            self.pending.retain(|o| kept.contains(&o.account_id()));
            *self.health.ids.lock().expect("not poisoned") = kept.clone();
            self.health
                .volatile
                .lock()
                .expect("not poisoned")
                .retain(|o| kept.contains(&o.account_id()));
            return;
        }
        self.pending.clear();
        self.health.ids.lock().expect("not poisoned").clear();
        self.health.volatile.lock().expect("not poisoned").clear();
        self.commit_ok();
        match self.log.clear() {
            Err(e) => {
                tracing::error!(event = "recovery_cleanup_failed", path = %self.log.path().display(), error = %e,
                    "deferred tokens are committed but the recovery file could not be emptied; it is replayed harmlessly at next start");
            }
            Ok(()) => {
                tracing::info!(event = "recovery_committed", path = %self.log.path().display(), "deferred token rotations are now committed");
            }
        }
        self.health
            .recovery_ready
            .store(self.log.ready(), Ordering::Relaxed);
    }

    /// A retry failed: rotations held in memory only get another chance at the file, and
    /// the log says exactly how many are durable.
    pub fn retry_failed(&mut self, e: &StoreError) {
        self.health.store_failing.store(true, Ordering::Relaxed);
        let volatile: Vec<Outcome> = self.health.volatile.lock().expect("not poisoned").clone();
        if !volatile.is_empty() && self.log.append(&self.keys, &volatile).is_ok() {
            self.health.volatile.lock().expect("not poisoned").clear();
        }
        let ready = self.log.reserve();
        self.health.recovery_ready.store(ready, Ordering::Relaxed);
        let memory_only = self.health.volatile.lock().expect("not poisoned").len();
        let fsynced = self.pending.len() - memory_only;
        if memory_only == 0 {
            tracing::warn!(event = "recovery_retry_failed", pending = self.pending.len(), fsynced, memory_only, path = %self.log.path().display(), error = %e,
                "rotated tokens still waiting to be committed; they are fsynced in the recovery file");
        } else {
            tracing::error!(event = "recovery_retry_failed", pending = self.pending.len(), fsynced, memory_only, accounts = ?self.health.volatile_ids(), path = %self.log.path().display(), error = %e,
                "rotated tokens still waiting to be committed; some are in memory only (NOT durable): free disk space or fix the database; no new refreshes are sent meanwhile");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Health {
        let h = Health::default();
        h.recovery_ready.store(true, Ordering::Relaxed);
        h
    }

    #[test]
    fn refreshes_stop_only_when_no_store_can_take_a_rotation() {
        let h = healthy();
        assert!(h.may_refresh(4));
        // The database fails, the recovery file has room: go on (rotations go there).
        h.store_failing.store(true, Ordering::Relaxed);
        assert!(h.may_refresh(4));
        // Neither can take a write: stop.
        h.recovery_ready.store(false, Ordering::Relaxed);
        assert!(!h.may_refresh(4));
        // The database takes writes again: go on.
        h.store_failing.store(false, Ordering::Relaxed);
        assert!(h.may_refresh(4));
    }

    #[test]
    fn a_rotation_held_in_memory_only_stops_refreshes() {
        let h = healthy();
        h.volatile.lock().unwrap().push(Outcome::Released {
            account_id: 7,
            owner: "o:1".into(),
        });
        assert!(!h.may_refresh(4));
        assert_eq!(h.volatile_ids(), vec![7]);
    }

    #[test]
    fn answers_waiting_for_their_commit_beyond_the_bound_stop_refreshes() {
        let h = healthy();
        h.waiting.store(4, Ordering::Relaxed);
        assert!(h.may_refresh(4));
        h.waiting.store(5, Ordering::Relaxed);
        assert!(!h.may_refresh(4));
    }

    #[test]
    fn a_lost_store_stops_refreshes() {
        let h = healthy();
        *h.lost.lock().unwrap() = Some("deleted".into());
        assert!(!h.may_refresh(4));
    }
}

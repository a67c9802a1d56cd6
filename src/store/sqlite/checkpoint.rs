//! WAL checkpoints off the writer: a thread of its own, on a connection of its own, copies
//! the WAL into the database file with PASSIVE checkpoints (which never wait for the writer,
//! nor make it wait), at most every `CHECKPOINT_EVERY` while the worker commits fast, less
//! often while it commits slowly. The writer keeps SQLite's automatic checkpoint only as the
//! WAL's bound (`WAL_BOUND_PAGES`): a WAL is started over only once every frame in it is
//! copied, which a checkpoint running beside a busy writer rarely sees; by then this thread
//! has copied nearly all of it, so the writer's own checkpoint copies a short tail and the
//! next transaction starts the WAL over.

use super::open::connect_existing;
use crate::store::error::StoreError;
use crate::store::types::StoreOptions;
use rusqlite::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The writer checkpoints itself once the WAL holds this many pages (16 MiB of 4 KiB pages;
/// SQLite's default, 1,000, would have the writer copy most of the pages itself).
pub(super) const WAL_BOUND_PAGES: u32 = 4000;
/// At most one checkpoint this often: each one fsyncs the WAL and the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// The longest wait between checkpoints while commits arrive slowly.
const CHECKPOINT_EVERY_AT_MOST: Duration = Duration::from_secs(2);
/// Fewer new WAL frames than this since the last checkpoint (SQLite's own automatic
/// checkpoint threshold) and the next wait doubles: at a daemon's everyday pace (~139
/// refreshes a second at 1M accounts) a checkpoint every 100 ms cost more CPU, in its
/// fsyncs, than the writer's own checkpoints it replaced.
const FRAMES_WORTH_A_CHECKPOINT: i64 = 1000;

/// The writer's handle on the checkpoint thread; dropping it stops and joins the thread.
pub(super) struct Checkpointer {
    /// Set by a commit, cleared by the thread before it checkpoints: a commit wakes the
    /// thread only when no checkpoint is pending already (one atomic per commit).
    pending: Arc<AtomicBool>,
    wake: Option<std_mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on its own connection to `opts.path`, then raises the writer's
    /// automatic checkpoint (`writer`) to the WAL's bound. When either fails, the writer
    /// keeps checkpointing as before.
    pub(super) fn start(opts: &StoreOptions, writer: &Connection) -> Result<Self, StoreError> {
        let conn = connect_existing(opts)?;
        let (wake, rx) = std_mpsc::channel();
        let pending = Arc::new(AtomicBool::new(false));
        let flag = pending.clone();
        let thread = std::thread::Builder::new()
            .name("refreshd-checkpoint".into())
            .spawn(move || run(&conn, &rx, &flag))
            .map_err(|source| StoreError::Create {
                path: opts.path.clone(),
                source,
            })?;
        let me = Checkpointer {
            pending,
            wake: Some(wake),
            thread: Some(thread),
        };
        writer
            .pragma_update(None, "wal_autocheckpoint", WAL_BOUND_PAGES)
            .map_err(|source| StoreError::Sqlite {
                context: "raise the writer's automatic checkpoint to the WAL's bound",
                source,
            })?;
        Ok(me)
    }

    /// A commit added pages to the WAL.
    pub(super) fn committed(&self) {
        if !self.pending.swap(true, Ordering::AcqRel)
            && let Some(wake) = &self.wake
        {
            let _ = wake.send(());
        }
    }
}

impl Drop for Checkpointer {
    /// Stops the thread (a checkpoint under way finishes) and closes its connection before
    /// the writer's, so the writer's stays the last one and SQLite's close does the rest.
    fn drop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for a commit, lets the current interval pass (commits meanwhile only set
/// `pending`), then checkpoints everything committed so far; ends when the writer drops its
/// handle. The interval follows the pace of commits (`next_interval`).
fn run(conn: &Connection, wake: &std_mpsc::Receiver<()>, pending: &AtomicBool) {
    let mut every = CHECKPOINT_EVERY;
    let mut last_log = 0;
    while wake.recv().is_ok() {
        if let Err(std_mpsc::RecvTimeoutError::Disconnected) = wake.recv_timeout(every) {
            return;
        }
        pending.store(false, Ordering::Release);
        match passive(conn) {
            Ok(log) => {
                // A WAL started over since (shorter than before) counts from its start.
                let new_frames = if log >= last_log { log - last_log } else { log };
                every = next_interval(every, new_frames);
                last_log = log;
            }
            Err(source) => {
                // The writer's own checkpoint still bounds the WAL.
                tracing::debug!(event = "checkpoint_failed", error = %source, "a WAL checkpoint off the writer failed; the writer checkpoints once the WAL reaches its bound");
            }
        }
    }
}

/// The wait before the next checkpoint, after one that found `new_frames` frames added to
/// the WAL since the one before: back to the shortest while commits pour in, doubled (up to
/// `CHECKPOINT_EVERY_AT_MOST`) while they trickle.
fn next_interval(every: Duration, new_frames: i64) -> Duration {
    if new_frames >= FRAMES_WORTH_A_CHECKPOINT {
        CHECKPOINT_EVERY
    } else {
        (every * 2).min(CHECKPOINT_EVERY_AT_MOST)
    }
}

/// One PASSIVE checkpoint: copies what it can without waiting for anyone. Returns the
/// frames in the WAL.
fn passive(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_doubles_while_commits_trickle_and_resets_when_they_pour_in() {
        let mut every = CHECKPOINT_EVERY;
        for expected in [200, 400, 800, 1600, 2000, 2000] {
            every = next_interval(every, FRAMES_WORTH_A_CHECKPOINT - 1);
            assert_eq!(every, Duration::from_millis(expected));
        }
        assert_eq!(
            next_interval(every, FRAMES_WORTH_A_CHECKPOINT),
            CHECKPOINT_EVERY
        );
    }
}

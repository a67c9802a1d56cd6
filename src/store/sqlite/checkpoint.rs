//! WAL checkpoints off the writer: a thread of its own, on a connection of its own, copies
//! the WAL into the database file with PASSIVE checkpoints (which never wait for the writer,
//! nor make it wait), at most every `CHECKPOINT_EVERY` while the worker commits fast, and
//! while it commits slowly once about `FRAMES_PER_CHECKPOINT` frames gathered at its pace
//! (`next_interval`), `URGENT_COMMITS` commits cutting a long wait short when the pace
//! picks up. The writer keeps SQLite's automatic checkpoint only as the
//! WAL's bound (`WAL_BOUND_PAGES`): a WAL is started over only once every frame in it is
//! copied, which a checkpoint running beside a busy writer rarely sees; by then this thread
//! has copied nearly all of it, so the writer's own checkpoint copies a short tail and the
//! next transaction starts the WAL over.

use super::open::connect_existing;
use crate::store::error::StoreError;
use crate::store::types::StoreOptions;
use rusqlite::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The writer checkpoints itself once the WAL holds this many pages (16 MiB of 4 KiB pages;
/// SQLite's default, 1,000, would have the writer copy most of the pages itself).
pub(super) const WAL_BOUND_PAGES: u32 = 4000;
/// At most one checkpoint this often: each one fsyncs the WAL and the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// The longest wait between checkpoints while commits arrive slowly.
const CHECKPOINT_EVERY_AT_MOST: Duration = Duration::from_secs(10);
/// The new WAL frames a checkpoint waits for while commits arrive slowly (SQLite's own
/// automatic checkpoint threshold; 4 MiB of 4 KiB pages). Each checkpoint costs two fsyncs
/// here and a third on the writer (the header of the WAL started over after it), and pages
/// written again meanwhile (the refresh log's last page, the accounts' index pages) are
/// copied once: at a daemon's everyday pace (~139 refreshes a second at 1M accounts, about
/// 175 frames a second) a checkpoint every 2 s took a twentieth of the daemon's CPU.
const FRAMES_PER_CHECKPOINT: i64 = 1000;
/// Commits since the last checkpoint that end a long wait at once: commits pouring in after
/// a quiet spell are not left to fill the WAL to its bound (and the writer to copy it).
const URGENT_COMMITS: u32 = 64;

/// The writer's handle on the checkpoint thread; dropping it stops and joins the thread.
pub(super) struct Checkpointer {
    /// Set by a commit, cleared by the thread before it checkpoints: a commit wakes the
    /// thread only when no checkpoint is pending already (one atomic per commit).
    pending: Arc<AtomicBool>,
    /// Commits since the thread last checkpointed (`URGENT_COMMITS`).
    commits: Arc<AtomicU32>,
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
        let commits = Arc::new(AtomicU32::new(0));
        let (flag, count) = (pending.clone(), commits.clone());
        let thread = std::thread::Builder::new()
            .name("refreshd-checkpoint".into())
            .spawn(move || run(&conn, &rx, &flag, &count))
            .map_err(|source| StoreError::Create {
                path: opts.path.clone(),
                source,
            })?;
        let me = Checkpointer {
            pending,
            commits,
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

    /// A commit added pages to the WAL: the first since the last checkpoint starts the
    /// thread's wait, the `URGENT_COMMITS`th ends it.
    pub(super) fn committed(&self) {
        let n = self.commits.fetch_add(1, Ordering::AcqRel) + 1;
        if (!self.pending.swap(true, Ordering::AcqRel) || n == URGENT_COMMITS)
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
/// `pending`, until `URGENT_COMMITS` of them end the wait), then checkpoints everything
/// committed so far; ends when the writer drops its handle. The interval follows the pace
/// of the WAL's frames (`next_interval`).
fn run(
    conn: &Connection,
    wake: &std_mpsc::Receiver<()>,
    pending: &AtomicBool,
    commits: &AtomicU32,
) {
    let mut every = CHECKPOINT_EVERY;
    let (mut last_log, mut last_complete) = (0, true);
    while wake.recv().is_ok() {
        // From the first commit since the last checkpoint: the pace of the frames.
        let first_commit = std::time::Instant::now();
        if let Err(std_mpsc::RecvTimeoutError::Disconnected) = wake.recv_timeout(every) {
            return;
        }
        let waited = first_commit.elapsed();
        commits.store(0, Ordering::Release);
        pending.store(false, Ordering::Release);
        match passive(conn) {
            Ok((log, copied)) => {
                every = next_interval(waited, frames_since(log, last_log, last_complete));
                (last_log, last_complete) = (log, copied >= log);
            }
            Err(source) => {
                // The writer's own checkpoint still bounds the WAL.
                tracing::debug!(event = "checkpoint_failed", error = %source, "a WAL checkpoint off the writer failed; the writer checkpoints once the WAL reaches its bound");
            }
        }
    }
}

/// The wait before the next checkpoint, after one that found `new_frames` frames added to
/// the WAL in the `every` waited before it: about the time the same pace takes to add
/// `FRAMES_PER_CHECKPOINT` frames, between `CHECKPOINT_EVERY` (commits pouring in) and
/// `CHECKPOINT_EVERY_AT_MOST` (a trickle).
fn next_interval(every: Duration, new_frames: i64) -> Duration {
    let frames = new_frames.max(1) as u128;
    let at_pace = every.as_micros() * FRAMES_PER_CHECKPOINT as u128 / frames;
    let at_pace = Duration::from_micros(at_pace.min(u64::MAX as u128) as u64);
    at_pace.clamp(CHECKPOINT_EVERY, CHECKPOINT_EVERY_AT_MOST)
}

/// The frames added to the WAL since the last checkpoint, which found `last_log` frames in
/// it (all of them copied: `last_complete`), where this one finds `log`. After a complete
/// checkpoint the writer's next commit starts the WAL over, so every frame in it is new,
/// even where it is as long as before; a WAL shorter than before started over too. (A
/// reader can keep a complete WAL from starting over: then this counts the old frames too,
/// and the next wait comes out shorter, never longer.)
fn frames_since(log: i64, last_log: i64, last_complete: bool) -> i64 {
    if last_complete || log < last_log {
        log
    } else {
        log - last_log
    }
}

/// One PASSIVE checkpoint: copies what it can without waiting for anyone. Returns the
/// frames in the WAL and how many of them are copied into the database file.
fn passive(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
        .query_row([], |r| Ok((r.get(1)?, r.get(2)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_gathers_a_checkpoints_frames_at_the_pace_seen() {
        // The realistic pace: ~175 frames a second.
        let every = next_interval(CHECKPOINT_EVERY, 17);
        assert_eq!(every, Duration::from_micros(5_882_352));
        assert_eq!(
            next_interval(every, 1029),
            Duration::from_micros(5_716_571),
            "steady at that pace"
        );
        assert_eq!(
            next_interval(Duration::from_secs(2), 350),
            Duration::from_micros(5_714_285)
        );
        assert_eq!(
            next_interval(every, 0),
            CHECKPOINT_EVERY_AT_MOST,
            "nothing new: the longest wait"
        );
        assert_eq!(
            next_interval(CHECKPOINT_EVERY, 5000),
            CHECKPOINT_EVERY,
            "commits pouring in: the shortest"
        );
        assert_eq!(
            next_interval(Duration::from_secs(10), 2000),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn frames_since_the_last_checkpoint_count_a_restarted_wal_whole() {
        assert_eq!(
            frames_since(1029, 1029, true),
            1029,
            "started over after a complete checkpoint, as long as before: all new"
        );
        assert_eq!(frames_since(900, 1029, true), 900);
        assert_eq!(
            frames_since(1500, 1029, false),
            471,
            "not all copied last time: the WAL grew on"
        );
        assert_eq!(
            frames_since(300, 1029, false),
            300,
            "shorter than before: started over"
        );
    }

    /// A real WAL: a checkpoint with no reader in the way reports every frame copied (what
    /// `frames_since` reads as complete), and the writer's next commits start the WAL over.
    #[test]
    fn a_complete_checkpoint_reports_every_frame_copied_and_the_wal_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE t(x); INSERT INTO t VALUES (1);",
            )
            .unwrap();
        let reader = Connection::open(&path).unwrap();
        let (first, copied) = passive(&reader).unwrap();
        assert!(first > 0 && copied == first, "{first} {copied}");
        // The same transactions again: the WAL starts over and ends as long as before.
        writer
            .execute_batch("CREATE TABLE u(x); INSERT INTO u VALUES (1);")
            .unwrap();
        let (second, _) = passive(&reader).unwrap();
        assert!(
            second > 0 && second <= first,
            "started over: {second} of {first}"
        );
        assert_eq!(
            frames_since(second, first, copied >= first),
            second,
            "every frame of a restarted WAL is new"
        );
    }

    /// The handle without its thread, and what it sends the thread.
    fn handle() -> (Checkpointer, std_mpsc::Receiver<()>) {
        let (wake, rx) = std_mpsc::channel();
        let me = Checkpointer {
            pending: Arc::default(),
            commits: Arc::default(),
            wake: Some(wake),
            thread: None,
        };
        (me, rx)
    }

    #[test]
    fn the_first_commit_starts_the_wait_and_a_flood_of_them_ends_it() {
        let (me, rx) = handle();
        me.committed();
        assert_eq!(
            rx.try_iter().count(),
            1,
            "the first commit wakes the thread"
        );
        for _ in 1..URGENT_COMMITS - 1 {
            me.committed();
        }
        assert_eq!(rx.try_iter().count(), 0, "later ones only count");
        me.committed();
        assert_eq!(rx.try_iter().count(), 1, "the urgent one ends the wait");
        me.committed();
        assert_eq!(rx.try_iter().count(), 0);
    }
}

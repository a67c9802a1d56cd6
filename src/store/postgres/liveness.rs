//! PostgreSQL replica liveness: each replica holds a session-level advisory lock for its
//! life on one dedicated connection (not from the pool), keyed by a 64-bit number that its
//! owner name carries (`pglive.<16 hex>.<host>:<pid>:<rand>`). A lease whose owner has that
//! marker and whose lock is free belongs to a dead replica, on any host. Owners without the
//! marker (older versions) hold no such lock: their leases still run out after `store.lease`.

use crate::store::deferred::Health;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_postgres::Client;

/// The marker of owners that hold a liveness lock.
pub const MARKER: &str = "pglive.";

/// `pglive.` and the key's 16 hex digits: one replica's leases share it.
const KEYED_PREFIX_LEN: usize = MARKER.len() + 16;

/// How far ahead of this host's clock another host's claim may be dated.
const CLOCK_SLACK_SECS: i64 = 300;

/// How often dead replicas are looked for, and a lost lock re-acquired. The library's
/// tests look every 50 ms, so that they wait for checks, not for seconds of real time (no
/// injectable clock reaches a server's lock table).
const CHECK_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(1)
};

/// A look for dead replicas reads every due row's lease (no index holds the lease owner:
/// one would make each claim rewrite every index), so in a burst over a large store it
/// costs the server tenths of a second; after one, the looks pause this many times as long
/// as it took, keeping them under a twentieth of one server core. A small or quiet store is
/// looked at every second; the lock's connection is probed every second whatever the looks
/// cost.
const SPACING: u32 = 20;

/// The longest pause between looks, however long the last one took (a slow server or
/// network): well under the default `store.lease` (5 minutes), so a dead replica's leases
/// are taken over by a look, not left to run out.
const MOST_PAUSE: Duration = Duration::from_secs(10);

/// How long the looks pause after one that took `took` (ticks in between only probe the
/// lock's connection).
fn pause_after(took: Duration) -> Duration {
    took.saturating_mul(SPACING).min(MOST_PAUSE)
}

/// Opens a new dedicated connection (its I/O task spawned).
pub type Connect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Client, tokio_postgres::Error>> + Send>>
        + Send
        + Sync,
>;

/// A new owner name carrying a fresh random lock key.
pub fn new_owner(base: &str) -> String {
    format!("{MARKER}{:016x}.{base}", rand::random::<u64>())
}

/// The lock key an owner (or a lease owner `<owner>:<n>`) carries, if it has the marker.
pub fn key_of(owner: &str) -> Option<i64> {
    let hex = owner
        .strip_prefix(MARKER)?
        .get(..KEYED_PREFIX_LEN - MARKER.len())?;
    u64::from_str_radix(hex, 16).ok().map(|k| k as i64)
}

/// The owner part of a lease owner `<owner>:<claim number>`.
fn owner_of(lease_owner: &str) -> &str {
    lease_owner.rsplit_once(':').map_or(lease_owner, |(o, _)| o)
}

/// Connects and takes the lock `key` for the session's life.
async fn acquire(connect: &Connect, key: i64) -> Result<Client, String> {
    let client = connect()
        .await
        .map_err(|e| super::errors::describe_error(&e))?;
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| super::errors::describe_error(&e))?;
    if got {
        Ok(client)
    } else {
        Err(format!(
            "liveness lock {key:016x} is held by another session"
        ))
    }
}

/// This replica's liveness lock and its watch over the others'.
pub struct Liveness {
    connect: Connect,
    owner: String,
    /// The database, for log lines.
    store: String,
    key: i64,
    client: Option<Client>,
    health: Arc<Health>,
    /// Dead owners already handed to the claim, not announced again.
    judged: HashSet<String>,
}

impl Liveness {
    /// Takes the lock of `owner` (which must carry the marker) on a dedicated connection.
    pub async fn start(
        connect: Connect,
        owner: &str,
        store: &str,
        health: Arc<Health>,
    ) -> Result<Liveness, String> {
        let key = key_of(owner).ok_or_else(|| format!("owner {owner} has no liveness key"))?;
        let client = acquire(&connect, key).await?;
        Ok(Liveness {
            connect,
            owner: owner.to_string(),
            store: store.to_string(),
            key,
            client: Some(client),
            health,
            judged: HashSet::new(),
        })
    }

    /// Runs until the store closes (`stop` fires): the lock goes with the connection.
    pub async fn run(mut self, stop: tokio::sync::oneshot::Receiver<()>) {
        tokio::pin!(stop);
        let mut next_look = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = &mut stop => return,
            }
            let look = tokio::time::Instant::now() >= next_look;
            if let Some(took) = self.tick(look).await {
                next_look = tokio::time::Instant::now() + pause_after(took);
                // Tests wait for whole looks, not for ticks that only probed.
                #[cfg(test)]
                self.health.liveness_checks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Re-acquires a lost lock, then looks for dead replicas when `look`, else probes the
    /// lock's connection; how long the look took (None when there was none; a failed look
    /// is retried at the next tick).
    async fn tick(&mut self, look: bool) -> Option<Duration> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            if self.client.take().is_some() {
                self.health.liveness_lost.store(true, Ordering::Relaxed);
                tracing::error!(event = "liveness_lock_lost", owner = %self.owner,
                    "the connection holding this replica's liveness lock is gone: not claiming until it is re-acquired (other replicas may take its leases over meanwhile)");
            }
            match acquire(&self.connect, self.key).await {
                Ok(c) => {
                    self.client = Some(c);
                    self.health.liveness_lost.store(false, Ordering::Relaxed);
                    tracing::warn!(event = "liveness_lock_regained", owner = %self.owner,
                        "liveness lock re-acquired: claiming again");
                }
                Err(e) => {
                    tracing::debug!(event = "liveness_lock_retry", error = %e, "cannot re-acquire the liveness lock yet");
                    return None;
                }
            }
        }
        if !look {
            // Some breaks show only when something is written (a moved address answers with
            // a reset): an empty query finds them within a second, as a look would. A write
            // that fails on the socket ends the connection, so the next tick reports the
            // lock lost; a connection that never answers stays a blind spot (as before).
            if let Some(client) = &self.client
                && let Err(e) = client.simple_query("").await
            {
                tracing::debug!(event = "liveness_probe_failed", error = %e, "the liveness lock's connection did not answer");
            }
            return None;
        }
        let started = tokio::time::Instant::now();
        if let Err(e) = self.find_dead().await {
            tracing::debug!(event = "liveness_check_failed", error = %e, "cannot look for dead replicas now; retried in a second");
            return None;
        }
        Some(started.elapsed())
    }

    /// Hands owners whose lock is free to the next claim, which ends their leases.
    async fn find_dead(&mut self) -> Result<(), tokio_postgres::Error> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let now = self.health.claim_now.load(Ordering::Relaxed);
        // A lease worth taking over was claimed on a due row, so only due rows are read
        // (the `accounts_due` index, not the whole table). The bound allows for a claim not
        // made yet here and for other hosts' clocks running a little ahead; the wall clock
        // only widens this range, it decides nothing.
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let due_by = now.max(wall) + CLOCK_SLACK_SECS;
        let rows = client
            .query(
                "SELECT DISTINCT ON (left(lease_owner, $3)) lease_owner FROM accounts
                 WHERE status IN ('active', 'expiring') AND next_refresh_at <= $2
                   AND lease_owner LIKE 'pglive.%' AND lease_expires_at > $1",
                &[&now, &due_by, &(KEYED_PREFIX_LEN as i32)],
            )
            .await?;
        let mut seen = HashSet::new();
        let mut dead = Vec::new();
        for row in rows {
            let lease_owner: String = row.try_get(0)?;
            let owner = owner_of(&lease_owner).to_string();
            let Some(key) = key_of(&owner) else { continue };
            // Our own session holds our key: trying it would succeed (locks are re-entrant).
            if key == self.key || !seen.insert(owner.clone()) || self.judged.contains(&owner) {
                continue;
            }
            let free: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?
                .try_get(0)?;
            if free {
                client
                    .execute("SELECT pg_advisory_unlock($1)", &[&key])
                    .await?;
                tracing::warn!(event = "dead_owner_taken_over", owner = %owner, store = %self.store,
                    "a replica using this store died; its leases are taken over now and its accounts refreshed again (flagged refresh_interrupted where an answer may have been lost)");
                dead.push(owner);
            }
        }
        self.judged.retain(|o| seen.contains(o));
        self.judged.extend(dead.iter().cloned());
        self.health
            .dead_owners
            .lock()
            .expect("not poisoned")
            .extend(dead);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_back_from_owners_and_lease_owners_with_the_marker_only() {
        let owner = new_owner("h:1:aa");
        let key = key_of(&owner).unwrap();
        assert_eq!(key_of(&format!("{owner}:7")), Some(key));
        assert_eq!(owner_of(&format!("{owner}:7")), owner);
        assert_eq!(key_of("h:1:aa"), None);
        assert_eq!(key_of("pglive.zz"), None);
    }

    #[test]
    fn a_costly_look_pauses_the_next_ones_and_a_cheap_one_keeps_the_pace() {
        // A cheap look (a small or quiet store): the next tick looks again.
        assert!(pause_after(Duration::from_millis(2)) < CHECK_EVERY);
        // A 400 ms look (1,000,000 due rows in a burst) pauses the looks for 8 s.
        assert_eq!(
            pause_after(Duration::from_millis(400)),
            Duration::from_secs(8)
        );
        // A 15 s look (a slow server) pauses them for 10 s, not 5 minutes (the default
        // store.lease, after which the leases would have run out anyway).
        assert_eq!(pause_after(Duration::from_secs(15)), MOST_PAUSE);
    }
}

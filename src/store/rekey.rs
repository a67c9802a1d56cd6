//! `refreshd rekey`: re-seals every account's tokens under the primary key, in batches
//! through the facade, so a running daemon keeps working meanwhile.

use super::{RekeyReport, Store, StoreError};

/// Re-seals every account's tokens under the primary key, `batch` accounts per transaction
/// (the write lock is never held for long, so a running daemon keeps working). Resumable:
/// rows already under the primary key are skipped by the query, so an interrupted run just
/// starts again. `progress` gets the number of accounts re-sealed by each batch.
pub async fn rekey(
    store: &Store,
    batch: usize,
    mut progress: impl FnMut(u64),
) -> Result<RekeyReport, StoreError> {
    let mut report = RekeyReport::default();
    // Rows rewritten under an older key by a concurrent writer fall behind the cursor: a
    // few more passes catch them; what remains after that is reported, never looped on.
    for _pass in 0..3 {
        let mut after = 0;
        while let Some(last) = {
            let b = store.rekey_batch(after, batch.max(1)).await?;
            report.resealed += b.resealed as u64;
            progress(b.resealed as u64);
            b.last_id
        } {
            after = last;
        }
        report.remaining = store.count_to_rekey().await?;
        if report.remaining == 0 {
            break;
        }
    }
    // The WAL still holds page images with the values just replaced: fold it into the
    // database (whose free space secure_delete zeroes) and truncate it. A running daemon's
    // reads can keep it from truncating; SQLite deletes it when the last connection closes.
    if store.is_postgres() {
        return Ok(report);
    }
    store
        .call(|c| {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(|source| StoreError::Sqlite {
                    context: "checkpoint the WAL after rekey",
                    source,
                })
        })
        .await?;
    Ok(report)
}

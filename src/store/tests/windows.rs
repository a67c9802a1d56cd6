//! The crash window: a lease not given back (a lost answer, a dead process) is recorded by
//! the next claim (`interrupted_at`), and stays on record until an answer settles the token.

use super::*;

async fn transient_with_a_lost_answer_keeps_the_lease_until_the_retry_and_records_the_window() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let retry = NOW + 30;
    let mut lost = transient(id, OWNER, NOW);
    if let Outcome::Transient { answer_lost, .. } = &mut lost {
        *answer_lost = true;
    }
    assert_eq!(store.record(lost).await.unwrap(), Recorded::Applied);
    assert_eq!(lease(&store, id).await, (Some(OWNER.into()), Some(retry)));
    // The engine still wakes for the retry, and nobody claims the account before it.
    assert_eq!(store.next_due(NOW + 1).await.unwrap(), Some(retry));
    assert!(
        store
            .claim_due("other", retry - 1, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.claim_due("other", retry, LEASE, 10).await.unwrap();
    assert_eq!(again[0].interrupted_at, Some(retry));

    // A plain transient failure right after keeps the window on record too...
    store.record(transient(id, "other", retry)).await.unwrap();
    let third = store.claim_due(OWNER, retry + 30, LEASE, 10).await.unwrap();
    assert_eq!(third[0].interrupted_at, Some(retry + 30));
    // ...until an attempt ends otherwise: a rotation gives the lease back for good.
    store
        .record(rotated(
            id,
            third[0].generation,
            "at-2",
            Some("rt-2"),
            retry + 31,
        ))
        .await
        .unwrap();
    assert_eq!(lease(&store, id).await, (None, None));
}

/// A claim that took over a lapsed lease and then gives the account back unsent (shutdown,
/// a lease too short to send, an open circuit) or after a configuration error must keep
/// the first lease's crash window on record: the next claimant's `invalid_grant` is still
/// the loss of a rotated token (`refresh_interrupted`), not a revoked grant. Found when a
/// replica released a dead one's account and another then flagged it `invalid_grant`.
async fn a_takeover_given_back_unsent_keeps_the_crash_window_on_record() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    // OWNER sent the refresh and died: its lease lapses and "taker" takes the account over.
    let window_end = NOW + LEASE.as_secs() as i64;
    let taken = store
        .claim_due("taker", window_end, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(taken[0].interrupted_at, Some(window_end));

    // Given back unsent: the account is free at once, and the window is still on record.
    let released = Outcome::Released {
        account_id: id,
        owner: "taker".into(),
    };
    assert_eq!(store.record(released).await.unwrap(), Recorded::Applied);
    assert_eq!(store.next_due(window_end).await.unwrap(), Some(NOW));
    let again = store
        .claim_due("third", window_end, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(
        ids(&again),
        [id],
        "free at once, not held until a lease ends"
    );
    assert_eq!(again[0].interrupted_at, Some(window_end));

    // A configuration error answered no refresh of this token: the window stays too.
    let retry = window_end + 3600;
    let config_error = Outcome::ConfigError {
        account_id: id,
        owner: "third".into(),
        at: window_end + 1,
        next_refresh_at: retry,
        error: "invalid_client".into(),
        http_status: Some(401),
        duration_ms: 3,
    };
    assert_eq!(store.record(config_error).await.unwrap(), Recorded::Applied);
    assert!(
        store
            .claim_due("fourth", retry - 1, LEASE, 10)
            .await
            .unwrap()
            .is_empty(),
        "postponed to its retry"
    );
    let fourth = store.claim_due("fourth", retry, LEASE, 10).await.unwrap();
    assert_eq!(fourth[0].interrupted_at, Some(window_end));

    // An answer that rotated ends the window: the next claim takes over nothing.
    let next = retry + 6000;
    store
        .record(rotated(
            id,
            fourth[0].generation,
            "at-2",
            Some("rt-2"),
            retry,
        ))
        .await
        .unwrap();
    let fifth = store.claim_due(OWNER, next, LEASE, 10).await.unwrap();
    assert_eq!(fifth[0].interrupted_at, None);
    // And a claim that took over nothing gives the lease back entirely.
    let released = Outcome::Released {
        account_id: id,
        owner: OWNER.into(),
    };
    store.record(released).await.unwrap();
    assert_eq!(lease(&store, id).await, (None, None));
}

on_both_backends!(
    transient_with_a_lost_answer_keeps_the_lease_until_the_retry_and_records_the_window,
    a_takeover_given_back_unsent_keeps_the_crash_window_on_record,
);

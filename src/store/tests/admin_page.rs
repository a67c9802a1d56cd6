//! What the admin page reads: the newest refresh outcomes of all accounts, bounded, with
//! the account they were for.

use super::*;

async fn recent_outcomes_are_the_newest_first_bounded() {
    let (_dir, store) = temp_store().await;
    let made = insert(
        &store,
        vec![
            new_account("tiktok", "first", NOW - 10),
            new_account("google", "second", NOW - 10),
        ],
    )
    .await;
    let (first, second) = (made[0], made[1]);
    store
        .record(rotated(first, 0, "at-1", Some("rt-1"), NOW + 1))
        .await
        .unwrap();
    store
        .record(transient(second, OWNER, NOW + 2))
        .await
        .unwrap();
    store
        .record(rotated(first, 1, "at-2", Some("rt-2"), NOW + 3))
        .await
        .unwrap();

    let recent = store.recent_outcomes(3).await.unwrap();
    let seen: Vec<(i64, i64, &str)> = recent
        .iter()
        .map(|r| (r.account_id, r.entry.at, r.entry.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (first, NOW + 3, "rotated"),
            (second, NOW + 2, "transient"),
            (first, NOW + 1, "rotated"),
        ]
    );
    assert_eq!(recent[1].provider.as_deref(), Some("google"));
    assert_eq!(recent[1].subject.as_deref(), Some("second"));
    assert_eq!(recent[1].entry.http_status, Some(503));
    assert_eq!(recent[1].entry.error.as_deref(), Some("HTTP 503"));
    // Bounded: the oldest rows (the imports) are left out.
    assert_eq!(store.recent_outcomes(1).await.unwrap().len(), 1);

    // A removed account's rows go with it.
    store
        .remove(second, NOW + 2, &super::admin(), None)
        .await
        .unwrap();
    let after = store.recent_outcomes(10).await.unwrap();
    assert!(after.iter().all(|r| r.account_id == first), "{after:?}");
}

/// Newest means written last: a row stamped by a clock that stepped back comes first all
/// the same (the listing walks the rowid, not `at`, which has no index on SQLite).
async fn recent_outcomes_follow_the_writes_when_the_clock_steps_back() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW - 10)]).await[0];
    store.record(transient(id, OWNER, NOW + 20)).await.unwrap();
    store.record(transient(id, OWNER, NOW + 18)).await.unwrap();
    let recent = store.recent_outcomes(2).await.unwrap();
    let at: Vec<i64> = recent.iter().map(|r| r.entry.at).collect();
    assert_eq!(at, [NOW + 18, NOW + 20]);
}

on_both_backends!(
    recent_outcomes_are_the_newest_first_bounded,
    recent_outcomes_follow_the_writes_when_the_clock_steps_back
);

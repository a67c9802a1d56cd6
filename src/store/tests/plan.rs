//! What `accounts plan` reads: due refreshes per provider and minute (the backlog in the
//! minute before the window), and the soonest refresh-token ends of refreshable accounts.

use super::*;

async fn plan_rows_count_due_minutes_and_list_the_soonest_ends() {
    let (_dir, store) = temp_store().await;
    let start = NOW - NOW % 60;
    let ending = |provider: &str, subject: &str, next: i64, end: Option<i64>, status| NewAccount {
        status,
        tokens: TokenSet {
            refresh_expires_in: end.map(|e| e - NOW),
            ..tokens("at", Some("rt"))
        },
        ..new_account(provider, subject, next)
    };
    let ids = insert(
        &store,
        vec![
            ending(
                "tiktok",
                "late",
                start - 500,
                Some(NOW + 9_000),
                Status::Active,
            ),
            ending(
                "tiktok",
                "m0a",
                start + 5,
                Some(NOW + 5_000),
                Status::Active,
            ),
            ending("tiktok", "m0b", start + 59, None, Status::Expiring),
            ending(
                "tiktok",
                "m2",
                start + 150,
                Some(NOW + 7_000),
                Status::Active,
            ),
            ending(
                "tiktok",
                "after",
                start + 3_600,
                Some(NOW + 100),
                Status::Active,
            ),
            ending(
                "tiktok",
                "flagged",
                start + 10,
                Some(NOW + 50),
                Status::NeedsReauth,
            ),
            ending("google", "g", start + 61, Some(NOW + 6_000), Status::Active),
        ],
    )
    .await;
    let query = |provider: Option<&str>, soonest| PlanQuery {
        start,
        end: start + 3_600,
        provider: provider.map(str::to_string),
        soonest,
    };
    let minute = start / 60;
    let due = |provider: &str, m: i64, count| DueMinute {
        provider: provider.into(),
        minute: m,
        count,
    };
    let rows = store.plan_rows(query(None, 3)).await.unwrap();
    assert_eq!(
        rows.due,
        [
            due("google", minute + 1, 1),
            due("tiktok", minute - 1, 1),
            due("tiktok", minute, 2),
            due("tiktok", minute + 2, 1),
        ],
        "the window's end and flagged accounts are left out"
    );
    let ends: Vec<(i64, i64)> = rows
        .refresh_ends
        .iter()
        .map(|e| (e.account_id, e.refresh_expires_at))
        .collect();
    assert_eq!(
        ends,
        [
            (ids[4], NOW + 100),
            (ids[1], NOW + 5_000),
            (ids[6], NOW + 6_000)
        ]
    );
    assert_eq!(rows.refresh_ends[0].subject, "after");
    assert_eq!(rows.refresh_ends[0].status, Status::Active);
    // One provider only.
    let google = store.plan_rows(query(Some("google"), 10)).await.unwrap();
    assert_eq!(google.due, [due("google", minute + 1, 1)]);
    assert_eq!(google.refresh_ends.len(), 1);
    assert_eq!(google.refresh_ends[0].provider, "google");
    let none = store.plan_rows(query(Some("nope"), 10)).await.unwrap();
    assert_eq!(none, PlanRows::default());
}

on_both_backends!(plan_rows_count_due_minutes_and_list_the_soonest_ends);

//! What an admin does to one account besides refreshing it: disable and enable (also
//! through a late rotation and a re-import).

use super::*;

async fn a_disabled_account_is_never_claimed_and_keeps_its_status_through_a_late_rotation() {
    let (_dir, store) = temp_store().await;
    let made = insert(
        &store,
        vec![
            new_account("tiktok", "in-flight", NOW - 10),
            new_account("tiktok", "idle", NOW - 10),
        ],
    )
    .await;
    let (in_flight, idle) = (made[0], made[1]);
    // One refresh is in flight when the admin disables both.
    let claimed = store.claim_due(OWNER, NOW, LEASE, 1).await.unwrap();
    assert_eq!(ids(&claimed), [in_flight]);
    for id in [in_flight, idle] {
        let (was, now) = store
            .set_disabled(id, true, NOW + 1, &admin())
            .await
            .unwrap();
        assert_eq!((was, now), (Status::Active, Some(Status::Disabled)));
    }
    // Disabling again changes nothing.
    assert_eq!(
        store
            .set_disabled(idle, true, NOW + 2, &admin())
            .await
            .unwrap(),
        (Status::Disabled, None)
    );
    // The provider already rotated: the tokens are stored, the account stays disabled.
    store
        .record(rotated(in_flight, 0, "at-new", Some("rt-new"), NOW + 3))
        .await
        .unwrap();
    let a = get(&store, in_flight).await;
    assert_eq!(a.access_token.expose_secret(), "at-new");
    assert_eq!(a.status, Status::Disabled);
    // Nothing disabled is ever due, however late.
    assert!(
        store
            .claim_due(OWNER, NOW + 10_000_000, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.next_due(NOW + 10_000_000).await.unwrap(), None);
    // A re-import stores its tokens and leaves it disabled.
    store
        .upsert(vec![new_account("tiktok", "idle", NOW - 10)], NOW + 5)
        .await
        .unwrap();
    assert_eq!(get(&store, idle).await.status, Status::Disabled);
    assert_eq!(
        log_outcomes(&store, idle).await,
        ["imported", "disabled", "imported"]
    );

    // Enabling makes it due now.
    assert_eq!(
        store
            .set_disabled(idle, false, NOW + 20, &admin())
            .await
            .unwrap(),
        (Status::Disabled, Some(Status::Active))
    );
    assert_eq!(
        store
            .set_disabled(idle, false, NOW + 21, &admin())
            .await
            .unwrap(),
        (Status::Active, None)
    );
    let claimed = store.claim_due(OWNER, NOW + 20, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed), [idle]);
    assert_eq!(
        log_outcomes(&store, idle).await,
        ["enabled", "imported", "disabled", "imported"]
    );
    assert!(matches!(
        store.set_disabled(999, true, NOW, &admin()).await,
        Err(StoreError::NotFound(999))
    ));
}

async fn enabling_an_account_flagged_while_disabled_leaves_it_needing_a_human() {
    let (_dir, store) = temp_store().await;
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        reauth_reason: Some(ReauthReason::InvalidGrant),
        ..new_account("tiktok", "flagged", NOW - 10)
    };
    let id = insert(&store, vec![flagged]).await[0];
    store.set_disabled(id, true, NOW, &admin()).await.unwrap();
    assert_eq!(
        store
            .set_disabled(id, false, NOW + 1, &admin())
            .await
            .unwrap(),
        (Status::Disabled, Some(Status::NeedsReauth))
    );
    assert_eq!(get(&store, id).await.status, Status::NeedsReauth);
}

on_both_backends!(
    a_disabled_account_is_never_claimed_and_keeps_its_status_through_a_late_rotation,
    enabling_an_account_flagged_while_disabled_leaves_it_needing_a_human,
);

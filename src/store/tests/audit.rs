//! The audit trail: admin changes are recorded with the change itself (or not at all), and
//! the rows outlive the account.

use super::*;

fn trail(entries: &[AuditEntry]) -> Vec<(i64, &str, Option<&str>)> {
    entries
        .iter()
        .map(|e| (e.at, e.action.as_str(), e.detail.as_deref()))
        .collect()
}

async fn admin_changes_are_kept_in_the_audit_trail_after_removal() {
    let (_dir, store) = temp_store().await;
    let made = insert(
        &store,
        vec![
            new_account("tiktok", "gone", NOW),
            new_account("tiktok", "kept", NOW),
        ],
    )
    .await;
    let (gone, kept) = (made[0], made[1]);
    store
        .set_disabled(gone, true, NOW + 1, &admin())
        .await
        .unwrap();
    // No change, no row.
    store
        .set_disabled(gone, true, NOW + 2, &admin())
        .await
        .unwrap();
    store
        .set_disabled(gone, false, NOW + 3, &admin())
        .await
        .unwrap();
    let answer = "provider tiktok answered HTTP 200";
    store
        .remove(
            gone,
            NOW + 4,
            &admin(),
            Some((AuditAction::Revoked, answer)),
        )
        .await
        .unwrap();
    assert!(store.get(gone).await.unwrap().is_none());

    let entries = store.audit_entries(gone).await.unwrap();
    assert_eq!(
        trail(&entries),
        [
            (NOW + 4, "removed", None),
            (NOW + 4, "revoked", Some(answer)),
            (NOW + 3, "enabled", None),
            (NOW + 1, "disabled", None),
        ]
    );
    for e in &entries {
        assert_eq!(
            (e.account_id, e.provider.as_str(), e.subject.as_str()),
            (gone, "tiktok", "gone")
        );
        assert_eq!(
            (e.who.as_str(), e.via.as_str()),
            ("tester (uid 1000)", "accounts test")
        );
    }
    assert!(store.audit_entries(kept).await.unwrap().is_empty());

    // A refused revocation is recorded alone; the account stays.
    store
        .audit(
            kept,
            NOW + 5,
            AuditAction::RevokeFailed,
            &admin(),
            "HTTP 400",
        )
        .await
        .unwrap();
    assert!(store.get(kept).await.unwrap().is_some());
    assert_eq!(
        trail(&store.audit_entries(kept).await.unwrap()),
        [(NOW + 5, "revoke_failed", Some("HTTP 400"))]
    );
}

async fn a_failed_removal_leaves_no_audit_row() {
    let (_dir, store) = temp_store().await;
    assert!(matches!(
        store.remove(999, NOW, &admin(), None).await,
        Err(StoreError::NotFound(999))
    ));
    assert!(matches!(
        store.set_disabled(999, true, NOW, &admin()).await,
        Err(StoreError::NotFound(999))
    ));
    assert!(store.audit_entries(999).await.unwrap().is_empty());
}

on_both_backends!(
    admin_changes_are_kept_in_the_audit_trail_after_removal,
    a_failed_removal_leaves_no_audit_row,
);

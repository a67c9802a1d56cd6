//! Claims and refresh outcomes: leases, generation-guarded writes, group commit.

use super::*;

// ---- claim_due ----

async fn claim_due_takes_due_refreshable_accounts_in_order() {
    let (_dir, store) = temp_store().await;
    let accounts = vec![
        new_account("tiktok", "late", NOW - 10),
        new_account("tiktok", "early", NOW - 30),
        new_account("tiktok", "exactly-now", NOW),
        new_account("tiktok", "future", NOW + 1),
        NewAccount {
            status: Status::Expiring,
            reauth_reason: Some(ReauthReason::RefreshTokenExpiring),
            ..new_account("tiktok", "expiring", NOW - 20)
        },
        NewAccount {
            status: Status::NeedsReauth,
            reauth_reason: Some(ReauthReason::InvalidGrant),
            ..new_account("tiktok", "flagged", NOW - 100)
        },
        NewAccount {
            status: Status::Disabled,
            ..new_account("tiktok", "disabled", NOW - 100)
        },
    ];
    let id = insert(&store, accounts).await;
    let (late, early, exact, future, expiring, flagged, disabled) =
        (id[0], id[1], id[2], id[3], id[4], id[5], id[6]);

    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed), [early, expiring, late, exact]);
    for a in &claimed {
        assert_eq!(
            lease(&store, a.id).await,
            (Some(OWNER.to_string()), Some(NOW + 60))
        );
    }
    for id in [future, flagged, disabled] {
        assert_eq!(lease(&store, id).await, (None, None));
    }
    // Nothing else is due, and flagged or disabled accounts never are.
    assert!(
        store
            .claim_due("owner-b", NOW, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let much_later = store
        .claim_due("owner-b", NOW + 30, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&much_later), [future]);
}

async fn claim_due_except_leaves_out_saturated_providers() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("linkedin", "a", NOW - 30),
            new_account("x", "b", NOW - 20),
            new_account("google", "c", NOW - 10),
            new_account("linkedin", "d", NOW + 50),
            new_account("google", "e", NOW + 60),
        ],
    )
    .await;
    let skip = vec!["linkedin".to_string(), "x".to_string()];
    assert_eq!(
        store.next_due_except(NOW, skip.clone()).await.unwrap(),
        Some(NOW - 10)
    );
    let claimed = store
        .claim_due_except(OWNER, NOW, NOW, LEASE, 10, skip.clone())
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [id[2]]);
    // The skipped providers' due accounts stay unleased for a later claim.
    assert_eq!(lease(&store, id[0]).await, (None, None));
    assert_eq!(
        store.next_due_except(NOW, skip).await.unwrap(),
        Some(NOW + 60)
    );
    let rest = store
        .claim_due_except(OWNER, NOW, NOW, LEASE, 10, Vec::new())
        .await
        .unwrap();
    assert_eq!(ids(&rest), [id[0], id[1]]);
}

async fn claim_due_respects_limit() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("tiktok", "a", NOW - 1),
            new_account("tiktok", "b", NOW - 3),
            new_account("tiktok", "c", NOW - 2),
        ],
    )
    .await;
    let first = store.claim_due(OWNER, NOW, LEASE, 2).await.unwrap();
    assert_eq!(ids(&first), [id[1], id[2]]);
    let rest = store.claim_due(OWNER, NOW, LEASE, 2).await.unwrap();
    assert_eq!(ids(&rest), [id[0]]);
}

async fn claim_due_lease_blocks_other_owners_until_it_expires() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    assert_eq!(
        ids(&store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap()),
        [id]
    );
    assert!(
        store
            .claim_due("owner-b", NOW, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_due("owner-b", NOW + 59, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let taken = store
        .claim_due("owner-b", NOW + 61, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&taken), [id]);
    assert_eq!(
        lease(&store, id).await,
        (Some("owner-b".to_string()), Some(NOW + 61 + 60))
    );
}

/// The engine's claim lead: a claim may take accounts due ahead of `now`, but judges every
/// lease (expired or not, the new one's end) by `now`.
async fn a_claim_ahead_of_now_takes_due_accounts_but_judges_leases_by_now() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("tiktok", "leased", NOW - 1),
            new_account("tiktok", "due", NOW),
            new_account("tiktok", "later", NOW + 1),
        ],
    )
    .await;
    let lease_secs = LEASE.as_secs() as i64;
    // "leased" is held until exactly NOW.
    let held = store
        .claim_due_except(
            "owner-a:1",
            NOW - lease_secs,
            NOW - 1,
            LEASE,
            10,
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(ids(&held), [id[0]]);
    assert_eq!(lease(&store, id[0]).await.1, Some(NOW));

    // Less than a second early: "due" is taken, "later" is not due by NOW, and the lease
    // ending at NOW is not taken over before NOW.
    let early = store
        .claim_due_except("owner-b:1", NOW - 1, NOW, LEASE, 10, Vec::new())
        .await
        .unwrap();
    assert_eq!(ids(&early), [id[1]]);
    assert_eq!(
        lease(&store, id[1]).await,
        (Some("owner-b:1".to_string()), Some(NOW - 1 + lease_secs))
    );
    let at_due = store
        .claim_due_except("owner-b:2", NOW, NOW, LEASE, 10, Vec::new())
        .await
        .unwrap();
    assert_eq!(ids(&at_due), [id[0]]);
}

// ---- record: Rotated ----

async fn rotated_applies_when_generation_matches() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    // A failure first, so there is something to reset.
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(
        store.record(transient(id, OWNER, NOW)).await.unwrap(),
        Recorded::Applied
    );
    let claimed = store.claim_due(OWNER, NOW + 30, LEASE, 10).await.unwrap();
    assert_eq!(claimed[0].generation, 0);
    assert_eq!(claimed[0].failures, 1);

    let at = NOW + 40;
    let outcome = Outcome::Rotated {
        account_id: id,
        generation: 0,
        tokens: TokenSet {
            expires_in: 7200,
            refresh_expires_in: Some(86_400),
            scope: Some("user.info video.list".into()),
            ..tokens("at-new", None)
        },
        at,
        next_refresh_at: at + 6000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 33,
    };
    assert_eq!(store.record(outcome).await.unwrap(), Recorded::Applied);
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-new");
    assert_eq!(
        a.refresh_token.expose_secret(),
        "rt-u1",
        "COALESCE keeps it"
    );
    assert_eq!(a.access_expires_at, at + 7200);
    assert_eq!(a.refresh_expires_at, Some(at + 86_400));
    assert_eq!(a.next_refresh_at, at + 6000);
    assert_eq!(a.scope, "user.info video.list");
    assert_eq!(a.failures, 0);
    assert_eq!(a.last_error, None);
    assert_eq!(a.last_refreshed_at, Some(at));
    assert_eq!(a.generation, 1);
    assert_eq!(lease(&store, id).await, (None, None));
    let log = store.log_entries(id, 1).await.unwrap();
    assert_eq!(log[0].outcome, "rotated");
    assert_eq!(log[0].at, at);
    assert_eq!(log[0].http_status, Some(200));
    assert_eq!(log[0].duration_ms, Some(33));

    // A new refresh token replaces the stored one.
    assert_eq!(
        store
            .record(rotated(id, 1, "at-3", Some("rt-3"), at + 100))
            .await
            .unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.refresh_token.expose_secret(), "rt-3");
    assert_eq!(a.generation, 2);
}

async fn rotated_is_superseded_when_generation_moved() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(claimed[0].generation, 0);
    // Meanwhile (our lease having run out) the account is re-imported.
    let mut reimport = new_account("tiktok", "u1", NOW + 500);
    reimport.tokens = tokens("at-import", Some("rt-import"));
    store.upsert(vec![reimport], NOW + 61).await.unwrap();
    let before = get(&store, id).await;

    let r = store
        .record(rotated(id, 0, "at-stale", Some("rt-stale"), NOW + 62))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Superseded);
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "at-import");
    assert_eq!(a.refresh_token.expose_secret(), "rt-import");
    assert_eq!(a.generation, before.generation);
    assert_eq!(a.updated_at, before.updated_at);
    assert_eq!(a.last_refreshed_at, None);
    assert_eq!(log_outcomes(&store, id).await[0], "superseded");
}

// ---- record: Rejected ----

async fn rejected_flags_needs_reauth_when_generation_matches() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let r = store
        .record(Outcome::Rejected {
            owner: Some(OWNER.into()),
            account_id: id,
            generation: 0,
            reason: ReauthReason::InvalidGrant,
            at: NOW + 1,
            error: "invalid_grant: revoked".into(),
            http_status: Some(400),
            duration_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(r, Recorded::Applied);
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    assert_eq!(a.reauth_flagged_at, Some(NOW + 1));
    assert_eq!(a.last_error.as_deref(), Some("invalid_grant: revoked"));
    assert_eq!(a.failures, 1);
    assert_eq!(a.access_token.expose_secret(), "at-u1", "tokens untouched");
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(log_outcomes(&store, id).await[0], "reauth_required");
    assert!(
        store
            .claim_due(OWNER, NOW + 10_000, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn rejected_after_a_rotation_elsewhere_is_superseded() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let generation = claimed[0].generation;
    // Another process rotated the account while our refresh was in flight, so the provider
    // rejects the token we sent: it is already replaced.
    assert_eq!(
        store
            .record(rotated(
                id,
                generation,
                "at-other",
                Some("rt-other"),
                NOW + 1
            ))
            .await
            .unwrap(),
        Recorded::Applied
    );
    let r = store
        .record(Outcome::Rejected {
            owner: Some(OWNER.into()),
            account_id: id,
            generation,
            reason: ReauthReason::InvalidGrant,
            at: NOW + 2,
            error: "invalid_grant".into(),
            http_status: Some(400),
            duration_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(r, Recorded::Superseded);
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.reauth_flagged_at, None);
    assert_eq!(a.failures, 0);
    assert_eq!(a.access_token.expose_secret(), "at-other");
    assert_eq!(log_outcomes(&store, id).await[0], "superseded");
}

/// The replica flake (tests/it/postgres/replicas.rs): a live attempt stalls past its lease,
/// another claim takes the account over and refreshes it, and the stalled attempt's
/// `invalid_grant` (for the token the takeover rotated away) arrives before the takeover's
/// rotation is stored. It must not flag the account: the lease is no longer its own.
async fn a_rejection_from_an_attempt_whose_lease_was_taken_over_is_superseded() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    let stalled = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let generation = stalled[0].generation;
    let later = NOW + LEASE.as_secs() as i64 + 1;
    let takeover = store
        .claim_due("owner-b:1", later, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(ids(&takeover), [id]);
    assert!(takeover[0].interrupted_at.is_some());
    let r = store
        .record(Outcome::Rejected {
            owner: Some(OWNER.into()),
            account_id: id,
            generation,
            reason: ReauthReason::InvalidGrant,
            at: later + 1,
            error: "invalid_grant: Refresh token has already been used.".into(),
            http_status: Some(400),
            duration_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        Recorded::Superseded,
        "a stale rejection flagged the account"
    );
    let a = get(&store, id).await;
    assert_eq!((a.status, a.reauth_reason), (Status::Active, None));
    assert_eq!(
        lease(&store, id).await,
        (Some("owner-b:1".to_string()), Some(later + 60))
    );
    // The takeover's rotation is stored as usual.
    let r = store
        .record(rotated(id, generation, "at-b", Some("rt-b"), later + 2))
        .await
        .unwrap();
    assert_eq!(r, Recorded::Applied);
    assert_eq!(get(&store, id).await.status, Status::Active);
}

/// A rejection at `at` of generation 0, from `owner`'s attempt.
fn revoked(id: i64, owner: Option<&str>, at: i64) -> Outcome {
    Outcome::Rejected {
        owner: owner.map(str::to_owned),
        account_id: id,
        generation: 0,
        reason: ReauthReason::InvalidGrant,
        at,
        error: "invalid_grant: revoked".into(),
        http_status: Some(400),
        duration_ms: 5,
    }
}

/// Records `rejection` and asserts that it flagged its account (not superseded).
async fn assert_flags(store: &Store, rejection: Outcome) {
    let Outcome::Rejected { account_id: id, .. } = rejection else {
        panic!("not a rejection: {rejection:?}")
    };
    let r = store.record(rejection).await.unwrap();
    assert_eq!(r, Recorded::Applied, "the guard took the refusal for stale");
    let a = get(store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    assert_eq!(log_outcomes(store, id).await[0], "reauth_required");
}

async fn a_rejection_whose_own_lease_expired_without_a_takeover_still_flags() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    // Past its lease, but nobody claimed the account meanwhile: still its lease owner.
    let later = NOW + LEASE.as_secs() as i64 + 1;
    assert_flags(&store, revoked(id, Some(OWNER), later)).await;
}

async fn a_rejection_without_an_owner_flags_whoever_holds_the_lease() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due("owner-b:1", NOW, LEASE, 10).await.unwrap();
    assert_flags(&store, revoked(id, None, NOW + 1)).await;
}

// ---- record: Transient, ConfigError, Released ----

async fn transient_counts_failure_and_releases_lease() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(
        store.record(transient(id, OWNER, NOW + 1)).await.unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.failures, 1);
    assert_eq!(a.next_refresh_at, NOW + 31);
    assert_eq!(a.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(a.generation, 0);
    assert_eq!(a.status, Status::Active);
    assert_eq!(lease(&store, id).await, (None, None));
    let log = store.log_entries(id, 1).await.unwrap();
    assert_eq!(log[0].outcome, "transient");
    assert_eq!(log[0].http_status, Some(503));
    assert_eq!(log[0].error.as_deref(), Some("HTTP 503"));

    // Due again at the new time, and failures keep counting.
    assert!(
        store
            .claim_due(OWNER, NOW + 30, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.claim_due(OWNER, NOW + 31, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW + 32)).await.unwrap();
    assert_eq!(get(&store, id).await.failures, 2);
}

async fn transient_with_lost_lease_leaves_row_to_new_owner() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    // Our lease ran out and another owner took the account.
    store
        .claim_due("owner-b", NOW + 100, LEASE, 10)
        .await
        .unwrap();
    let r = store.record(transient(id, OWNER, NOW + 101)).await.unwrap();
    assert_eq!(r, Recorded::LeaseLost);
    let a = get(&store, id).await;
    assert_eq!(a.failures, 0);
    assert_eq!(a.next_refresh_at, NOW);
    assert_eq!(a.last_error, None);
    assert_eq!(
        lease(&store, id).await,
        (Some("owner-b".to_string()), Some(NOW + 160))
    );
    assert_eq!(
        log_outcomes(&store, id).await[0],
        "transient",
        "still logged"
    );
}

async fn config_error_and_release_need_the_lease() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let config_error = |owner: &str| Outcome::ConfigError {
        account_id: id,
        owner: owner.into(),
        at: NOW + 1,
        next_refresh_at: NOW + 3600,
        error: "invalid_client".into(),
        http_status: Some(401),
        duration_ms: 3,
    };
    assert_eq!(
        store.record(config_error("intruder")).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));
    assert_eq!(
        store.record(config_error(OWNER)).await.unwrap(),
        Recorded::Applied
    );
    let a = get(&store, id).await;
    assert_eq!(a.failures, 0, "never counted against the account");
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.next_refresh_at, NOW + 3600);
    assert_eq!(a.last_error.as_deref(), Some("invalid_client"));
    assert_eq!(lease(&store, id).await, (None, None));

    store.claim_due(OWNER, NOW + 3600, LEASE, 10).await.unwrap();
    let release = |owner: &str| Outcome::Released {
        account_id: id,
        owner: owner.into(),
    };
    store.record(release("intruder")).await.unwrap();
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));
    store.record(release(OWNER)).await.unwrap();
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(
        ids(&store
            .claim_due("owner-b", NOW + 3600, LEASE, 10)
            .await
            .unwrap()),
        [id]
    );
}

// ---- group commit ----

async fn concurrent_records_are_all_committed() {
    let (_dir, store) = temp_store().await;
    let accounts = (0..200)
        .map(|i| new_account("tiktok", &format!("u{i}"), NOW))
        .collect();
    let ids = insert(&store, accounts).await;
    let claimed = store.claim_due(OWNER, NOW, LEASE, 500).await.unwrap();
    assert_eq!(claimed.len(), 200);

    let tasks: Vec<_> = claimed
        .iter()
        .map(|a| {
            let store = store.clone();
            let outcome = rotated(a.id, a.generation, &format!("new-{}", a.id), None, NOW + 1);
            tokio::spawn(async move { store.record(outcome).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Recorded::Applied);
    }
    for id in ids {
        let a = get(&store, id).await;
        assert_eq!(a.access_token.expose_secret(), format!("new-{id}"));
        assert_eq!(a.generation, 1);
    }
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM accounts WHERE lease_owner IS NULL AND generation = ?1",
            1
        )
        .await,
        Some(200)
    );
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM refresh_log WHERE outcome = 'rotated' AND ?1 = ?1",
            0
        )
        .await,
        Some(200)
    );
}

/// A group mixing fresh and stale rotations, failures, and two rotations of one account:
/// each outcome ends as it would alone (PostgreSQL writes a group's rotations of accounts
/// named once as one batch, the rest one by one). The test runtime is single-threaded, so
/// on PostgreSQL every outcome reaches the group-commit task before it runs: one group.
async fn a_mixed_group_ends_each_outcome_as_it_would_alone() {
    let (_dir, store) = temp_store().await;
    let accounts = (0..60)
        .map(|i| new_account("tiktok", &format!("u{i}"), NOW))
        .collect();
    let ids = insert(&store, accounts).await;
    let claimed = store.claim_due(OWNER, NOW, LEASE, 100).await.unwrap();
    assert_eq!(claimed.len(), 60);
    // ids[0..20] fresh rotations, ids[20..40] stale ones (a generation that moved),
    // ids[40..50] failures, ids[50] rotated twice at once (one applies, one is superseded).
    let mut outcomes = Vec::new();
    for (i, &id) in ids.iter().enumerate().take(51) {
        let access = format!("new-{id}");
        outcomes.push(match i {
            0..20 => rotated(id, 0, &access, Some(&format!("rt-{id}")), NOW + 1),
            20..40 => rotated(id, 7, &access, Some("rt-stale"), NOW + 1),
            40..50 => transient(id, OWNER, NOW + 1),
            _ => rotated(id, 0, &access, None, NOW + 1),
        });
    }
    outcomes.push(rotated(ids[50], 0, "twin", None, NOW + 1));
    let tasks: Vec<_> = outcomes
        .into_iter()
        .map(|o| {
            let store = store.clone();
            tokio::spawn(async move { store.record(o).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for (i, &id) in ids.iter().enumerate().take(50) {
        let a = get(&store, id).await;
        match i {
            0..20 => {
                assert_eq!(results[i], Recorded::Applied);
                assert_eq!(a.access_token.expose_secret(), format!("new-{id}"));
                assert_eq!(a.refresh_token.expose_secret(), format!("rt-{id}"));
                assert_eq!((a.generation, a.last_refreshed_at), (1, Some(NOW + 1)));
                assert_eq!(log_outcomes(&store, id).await[0], "rotated");
            }
            20..40 => {
                assert_eq!(results[i], Recorded::Superseded);
                assert_ne!(a.access_token.expose_secret(), format!("new-{id}"));
                assert_eq!(a.generation, 0);
                assert_eq!(log_outcomes(&store, id).await[0], "superseded");
            }
            _ => {
                assert_eq!(results[i], Recorded::Applied);
                assert_eq!((a.failures, a.generation), (1, 0));
                assert_eq!(log_outcomes(&store, id).await[0], "transient");
            }
        }
    }
    let mut twins = vec![results[50], results[51]];
    twins.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(twins, [Recorded::Applied, Recorded::Superseded]);
    assert_eq!(get(&store, ids[50]).await.generation, 1);
    let mut log = log_outcomes(&store, ids[50]).await;
    log.retain(|o| o != "imported");
    log.sort();
    assert_eq!(log, ["rotated", "superseded"]);
    // Untouched: the nine accounts no outcome named keep their lease.
    for &id in &ids[51..] {
        assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));
    }
}

mod concurrent_records_are_all_committed {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        super::POSTGRES
            .scope(None, super::concurrent_records_are_all_committed())
            .await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        let test = "store::tests::concurrent_records_are_all_committed::postgres";
        if let Some(url) = refreshd_testkit::postgres_schema(test).await {
            super::POSTGRES
                .scope(Some(url), super::concurrent_records_are_all_committed())
                .await
        }
    }
}

on_both_backends!(
    claim_due_takes_due_refreshable_accounts_in_order,
    claim_due_except_leaves_out_saturated_providers,
    claim_due_respects_limit,
    claim_due_lease_blocks_other_owners_until_it_expires,
    a_claim_ahead_of_now_takes_due_accounts_but_judges_leases_by_now,
    rotated_applies_when_generation_matches,
    rotated_is_superseded_when_generation_moved,
    rejected_flags_needs_reauth_when_generation_matches,
    rejected_after_a_rotation_elsewhere_is_superseded,
    a_rejection_from_an_attempt_whose_lease_was_taken_over_is_superseded,
    a_rejection_whose_own_lease_expired_without_a_takeover_still_flags,
    a_rejection_without_an_owner_flags_whoever_holds_the_lease,
    transient_counts_failure_and_releases_lease,
    transient_with_lost_lease_leaves_row_to_new_owner,
    config_error_and_release_need_the_lease,
    a_mixed_group_ends_each_outcome_as_it_would_alone,
);

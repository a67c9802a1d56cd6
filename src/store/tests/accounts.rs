//! Accounts as admins and imports change them: upsert, sweep, mark_due, remove, list, counts, the log, connect states.

use super::*;

// ---- upsert ----

async fn upsert_inserts_then_updates_by_provider_and_subject() {
    let (_dir, store) = temp_store().await;
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        reauth_reason: Some(ReauthReason::InvalidGrant),
        tokens: TokenSet {
            refresh_expires_in: Some(1000),
            ..tokens("at-1", Some("rt-1"))
        },
        label: Some("Shop".into()),
        ..new_account("tiktok", "u1", NOW)
    };
    let first = store
        .upsert(vec![flagged, new_account("other", "u1", NOW)], NOW)
        .await
        .unwrap();
    assert!(first[0].1 && first[1].1);
    assert_ne!(
        first[0].0, first[1].0,
        "same subject, other provider: a new account"
    );
    let id = first[0].0;
    let a = get(&store, id).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_flagged_at, Some(NOW));
    assert_eq!(a.generation, 0);
    assert_eq!(a.refresh_expires_at, Some(NOW + 1000));

    // Second import: new access token, no refresh token, active again.
    let again = NewAccount {
        tokens: tokens("at-2", None),
        obtained_at: NOW + 10,
        ..new_account("tiktok", "u1", NOW + 500)
    };
    let second = store.upsert(vec![again], NOW + 10).await.unwrap();
    assert_eq!(second, vec![(id, false)]);
    let a = get(&store, id).await;
    assert_eq!(a.generation, 1);
    assert_eq!(a.access_token.expose_secret(), "at-2");
    assert_eq!(a.refresh_token.expose_secret(), "rt-1", "kept");
    assert_eq!(a.access_expires_at, NOW + 10 + 3600);
    assert_eq!(a.next_refresh_at, NOW + 500);
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(a.reauth_flagged_at, None);
    assert_eq!(
        a.label.as_deref(),
        Some("Shop"),
        "label kept when none given"
    );
    // The kept refresh token keeps its known expiry.
    assert_eq!(a.refresh_expires_at, Some(NOW + 1000));

    // Third import with a refresh token replaces it.
    let third = NewAccount {
        tokens: tokens("at-3", Some("rt-3")),
        ..new_account("tiktok", "u1", NOW)
    };
    assert_eq!(
        store.upsert(vec![third], NOW + 20).await.unwrap(),
        vec![(id, false)]
    );
    let a = get(&store, id).await;
    assert_eq!(a.generation, 2);
    assert_eq!(a.refresh_token.expose_secret(), "rt-3");
    assert_eq!(
        a.refresh_expires_at, None,
        "a new refresh token of unknown lifetime"
    );
    assert_eq!(log_outcomes(&store, id).await, ["imported"; 3]);
}

async fn upsert_refused_under_a_live_lease_then_clears_lease_and_failures() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW)).await.unwrap();
    store.claim_due(OWNER, NOW + 30, LEASE, 10).await.unwrap();
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));

    // A refresh may be in flight: its rotation must not be superseded by an import.
    let err = store
        .upsert(vec![new_account("tiktok", "u1", NOW)], NOW + 31)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("being refreshed"), "{err}");
    assert_eq!(lease(&store, id).await.0.as_deref(), Some(OWNER));

    // Once the lease has run out (its holder died), the import goes through.
    store
        .upsert(vec![new_account("tiktok", "u1", NOW)], NOW + 30 + 61)
        .await
        .unwrap();
    let a = get(&store, id).await;
    assert_eq!(lease(&store, id).await, (None, None));
    assert_eq!(a.failures, 0);
    assert_eq!(a.last_error, None);
}

async fn upsert_is_all_or_nothing() {
    let (_dir, store) = temp_store().await;
    // The second record is refused (its account is being refreshed): the first is not
    // stored either.
    insert(&store, vec![new_account("tiktok", "u2", NOW)]).await;
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    let logged = query(&store, "SELECT COUNT(*) FROM refresh_log WHERE ?1 = ?1", 0).await;
    let err = store
        .upsert(
            vec![
                new_account("tiktok", "u1", NOW),
                new_account("tiktok", "u2", NOW),
            ],
            NOW + 1,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("being refreshed"), "{err}");
    assert!(store.find("tiktok", "u1").await.unwrap().is_none());
    assert_eq!(
        query(&store, "SELECT COUNT(*) FROM refresh_log WHERE ?1 = ?1", 0).await,
        logged
    );
}

// ---- sweep ----

async fn sweep_flags_expiring_and_expired_refresh_tokens_once() {
    let (_dir, store) = temp_store().await;
    let with_refresh_life = |subject: &str, status: Status, obtained_at: i64, life: i64| {
        let mut a = new_account("tiktok", subject, NOW + 5000);
        a.status = status;
        a.obtained_at = obtained_at;
        a.tokens.refresh_expires_in = Some(life);
        a
    };
    let id = insert(
        &store,
        vec![
            with_refresh_life("soon", Status::Active, NOW, 1000),
            with_refresh_life("over", Status::Active, NOW - 100, 99),
            new_account("tiktok", "no-lifetime", NOW + 5000),
            with_refresh_life("far", Status::Active, NOW, 100_000),
            with_refresh_life("was-expiring", Status::Expiring, NOW - 100, 50),
            with_refresh_life("disabled", Status::Disabled, NOW - 100, 50),
        ],
    )
    .await;
    let (soon, over, none, far, was_expiring, disabled) =
        (id[0], id[1], id[2], id[3], id[4], id[5]);
    let window = Duration::from_secs(3600);

    let report = store.sweep(NOW, window).await.unwrap();
    let summary_ids = |v: &[AccountSummary]| {
        let mut ids: Vec<i64> = v.iter().map(|a| a.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(summary_ids(&report.expiring), [soon]);
    assert_eq!(summary_ids(&report.expired), [over, was_expiring]);
    assert_eq!(report.expiring[0].status, Status::Expiring);

    let a = get(&store, soon).await;
    assert_eq!(a.status, Status::Expiring);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
    assert_eq!(a.reauth_flagged_at, Some(NOW));
    for id in [over, was_expiring] {
        let a = get(&store, id).await;
        assert_eq!(a.status, Status::NeedsReauth);
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
        // The error shown is the one that decided the status.
        assert_eq!(
            a.last_error,
            Some(format!(
                "refresh token expired at {}",
                crate::clock::rfc3339(a.refresh_expires_at.unwrap())
            ))
        );
        assert_eq!(log_outcomes(&store, id).await[0], "reauth_required");
    }
    for id in [none, far] {
        let a = get(&store, id).await;
        assert_eq!(a.status, Status::Active);
        assert_eq!(a.reauth_reason, None);
        assert_eq!(log_outcomes(&store, id).await, ["imported"]);
    }
    assert_eq!(get(&store, disabled).await.status, Status::Disabled);
    assert_eq!(
        log_outcomes(&store, soon).await,
        ["reauth_required", "imported"]
    );

    let again = store.sweep(NOW + 1, window).await.unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(log_outcomes(&store, soon).await.len(), 2);

    // Once its refresh token has ended, the expiring account is reported as expired.
    let later = store.sweep(NOW + 1000, window).await.unwrap();
    assert_eq!(summary_ids(&later.expired), [soon]);
    assert!(later.expiring.is_empty());
    assert_eq!(
        store.flagged_ids().await.unwrap(),
        [
            (soon, Status::NeedsReauth),
            (over, Status::NeedsReauth),
            (was_expiring, Status::NeedsReauth)
        ]
    );
}

// ---- admin operations ----

async fn mark_due_needs_force_for_flagged_accounts() {
    let (_dir, store) = temp_store().await;
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        reauth_reason: Some(ReauthReason::InvalidGrant),
        ..new_account("tiktok", "flagged", NOW + 5000)
    };
    let id = insert(
        &store,
        vec![flagged, new_account("tiktok", "ok", NOW + 5000)],
    )
    .await;
    let (flagged, ok) = (id[0], id[1]);

    let err = store.mark_due(flagged, NOW, false).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(get(&store, flagged).await.status, Status::NeedsReauth);
    assert_eq!(get(&store, flagged).await.next_refresh_at, NOW + 5000);

    assert_eq!(
        store.mark_due(flagged, NOW, true).await.unwrap(),
        Status::NeedsReauth
    );
    let a = get(&store, flagged).await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.failures, 0, "a forced retry starts a fresh failure count");
    // The flag's reason stays until the refresh answers: a rejection again is not a new
    // flag (no second announcement), a success is the account's recovery.
    assert_eq!(a.reauth_reason, Some(ReauthReason::InvalidGrant));
    assert_eq!(a.next_refresh_at, NOW);
    assert_eq!(log_outcomes(&store, flagged).await[0], "marked_due");

    assert_eq!(
        store.mark_due(ok, NOW, false).await.unwrap(),
        Status::Active
    );
    assert_eq!(get(&store, ok).await.next_refresh_at, NOW);
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed).len(), 2);

    assert!(matches!(
        store.mark_due(9999, NOW, true).await,
        Err(StoreError::NotFound(9999))
    ));
}

async fn remove_deletes_account_and_its_log() {
    let (_dir, store) = temp_store().await;
    let id = insert(
        &store,
        vec![
            new_account("tiktok", "u1", NOW),
            new_account("tiktok", "u2", NOW),
        ],
    )
    .await;
    store.remove(id[0], NOW, &admin(), None).await.unwrap();
    assert!(store.get(id[0]).await.unwrap().is_none());
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM refresh_log WHERE account_id = ?1",
            id[0]
        )
        .await,
        Some(0)
    );
    assert_eq!(
        log_outcomes(&store, id[1]).await,
        ["imported"],
        "others kept"
    );
    assert!(store.get(id[1]).await.unwrap().is_some());

    let err = store.remove(id[0], NOW, &admin(), None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(i) if i == id[0]),
        "{err:?}"
    );
}

async fn list_pages_and_filters() {
    let (_dir, store) = temp_store().await;
    let with_status = |provider: &str, subject: &str, status: Status| NewAccount {
        status,
        ..new_account(provider, subject, NOW)
    };
    let id = insert(
        &store,
        vec![
            with_status("tiktok", "a", Status::Active),
            with_status("tiktok", "b", Status::NeedsReauth),
            with_status("other", "c", Status::Expiring),
            with_status("tiktok", "d", Status::Disabled),
            with_status("tiktok", "e", Status::Active),
        ],
    )
    .await;
    let list = |filter: ListFilter, after: i64, page: usize| {
        let store = store.clone();
        async move {
            let v = store.list(filter, after, page).await.unwrap();
            v.into_iter().map(|a| a.id).collect::<Vec<_>>()
        }
    };

    assert_eq!(list(ListFilter::default(), 0, 2).await, [id[0], id[1]]);
    assert_eq!(list(ListFilter::default(), id[1], 2).await, [id[2], id[3]]);
    assert_eq!(list(ListFilter::default(), id[3], 2).await, [id[4]]);
    assert!(list(ListFilter::default(), id[4], 2).await.is_empty());

    let tiktok = ListFilter {
        provider: Some("tiktok".into()),
        ..Default::default()
    };
    assert_eq!(
        list(tiktok.clone(), 0, 100).await,
        [id[0], id[1], id[3], id[4]]
    );
    assert_eq!(list(tiktok.clone(), id[1], 1).await, [id[3]]);
    let active = ListFilter {
        status: Some(Status::Active),
        ..Default::default()
    };
    assert_eq!(list(active, 0, 100).await, [id[0], id[4]]);
    let human = ListFilter {
        needs_reauth: true,
        ..Default::default()
    };
    assert_eq!(list(human, 0, 100).await, [id[1], id[2]]);
    let tiktok_human = ListFilter {
        needs_reauth: true,
        ..tiktok
    };
    assert_eq!(list(tiktok_human, 0, 100).await, [id[1]]);

    let page = store.list(ListFilter::default(), 0, 1).await.unwrap();
    assert_eq!(page[0].subject, "a");
    assert_eq!(page[0].provider, "tiktok");
    assert_eq!(page[0].scope, "user.info");
    assert_eq!(page[0].access_expires_at, NOW + 3600);
}

async fn log_entries_are_newest_first() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store.record(transient(id, OWNER, NOW + 10)).await.unwrap();
    store.claim_due(OWNER, NOW + 40, LEASE, 10).await.unwrap();
    store
        .record(rotated(id, 0, "at-2", None, NOW + 50))
        .await
        .unwrap();
    // Same second as the rotation: the later entry still comes first.
    store.mark_due(id, NOW + 50, false).await.unwrap();

    let log = store.log_entries(id, 10).await.unwrap();
    let seen: Vec<(&str, i64)> = log.iter().map(|e| (e.outcome.as_str(), e.at)).collect();
    assert_eq!(
        seen,
        [
            ("marked_due", NOW + 50),
            ("rotated", NOW + 50),
            ("transient", NOW + 10),
            ("imported", NOW)
        ]
    );
    assert_eq!(store.log_entries(id, 2).await.unwrap().len(), 2);
    assert!(store.log_entries(id + 1, 10).await.unwrap().is_empty());
}

async fn counts_group_by_provider_and_status() {
    let (_dir, store) = temp_store().await;
    assert!(store.counts().await.unwrap().is_empty());
    let with_status = |provider: &str, subject: &str, status: Status| NewAccount {
        status,
        ..new_account(provider, subject, NOW)
    };
    insert(
        &store,
        vec![
            with_status("tiktok", "a", Status::Active),
            with_status("tiktok", "b", Status::Active),
            with_status("tiktok", "c", Status::NeedsReauth),
            with_status("other", "d", Status::Active),
        ],
    )
    .await;
    assert_eq!(
        store.counts().await.unwrap(),
        [
            ("other".to_string(), Status::Active, 1),
            ("tiktok".to_string(), Status::Active, 2),
            ("tiktok".to_string(), Status::NeedsReauth, 1),
        ]
    );
}

async fn next_due_skips_held_leases_and_flagged_accounts() {
    let (_dir, store) = temp_store().await;
    assert_eq!(store.next_due(NOW).await.unwrap(), None);
    let flagged = NewAccount {
        status: Status::NeedsReauth,
        ..new_account("tiktok", "flagged", NOW + 10)
    };
    insert(
        &store,
        vec![
            new_account("tiktok", "later", NOW + 100),
            new_account("tiktok", "sooner", NOW + 50),
            flagged,
        ],
    )
    .await;
    assert_eq!(store.next_due(NOW).await.unwrap(), Some(NOW + 50));

    // Another process holds "sooner" until NOW + 110.
    let held = store
        .claim_due("owner-b", NOW + 50, LEASE, 10)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(store.next_due(NOW + 60).await.unwrap(), Some(NOW + 100));
    // Once that lease has run out, it counts again.
    assert_eq!(store.next_due(NOW + 110).await.unwrap(), Some(NOW + 50));
}

async fn prune_log_deletes_older_entries() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.record(transient(id, OWNER, NOW + 10)).await.unwrap();
    store.record(transient(id, OWNER, NOW + 20)).await.unwrap();
    let left = |store: Store| async move {
        let log = store.log_entries(id, 10).await.unwrap();
        log.iter().map(|e| e.at).collect::<Vec<_>>()
    };
    // Strictly older than the cutoff only.
    assert_eq!(store.prune_log(NOW + 10).await.unwrap(), 1);
    assert_eq!(left(store.clone()).await, [NOW + 20, NOW + 10]);
    assert_eq!(store.prune_log(NOW + 15).await.unwrap(), 1);
    assert_eq!(left(store.clone()).await, [NOW + 20]);
    assert_eq!(store.prune_log(NOW + 15).await.unwrap(), 0);
    assert!(store.get(id).await.unwrap().is_some(), "accounts untouched");
}

/// A clock that stepped back between two writes: no row at or after the cutoff is ever
/// pruned, and an older row stamped after a newer one goes at the latest with the rows
/// written before it (SQLite walks the rowid, PostgreSQL its `at` index).
async fn prune_log_never_takes_a_newer_row_when_the_clock_stepped_back() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    for at in [NOW + 10, NOW + 20, NOW + 12, NOW + 30] {
        store.record(transient(id, OWNER, at)).await.unwrap();
    }
    let left = |store: Store| async move {
        let log = store.log_entries(id, 10).await.unwrap();
        let mut at: Vec<i64> = log.iter().map(|e| e.at).collect();
        at.sort();
        at
    };
    store.prune_log(NOW + 15).await.unwrap();
    let kept = left(store.clone()).await;
    assert!(
        !kept.contains(&NOW) && !kept.contains(&(NOW + 10)),
        "{kept:?}"
    );
    assert!(kept.ends_with(&[NOW + 20, NOW + 30]), "{kept:?}");
    // Once the cutoff passes the newer row, the older one after it goes too.
    store.prune_log(NOW + 25).await.unwrap();
    assert_eq!(left(store.clone()).await, [NOW + 30]);
}

async fn mark_due_never_reenables_a_disabled_account() {
    let (_dir, store) = temp_store().await;
    let disabled = NewAccount {
        status: Status::Disabled,
        ..new_account("tiktok", "off", NOW + 5000)
    };
    let id = insert(&store, vec![disabled]).await[0];
    for force in [false, true] {
        let err = store.mark_due(id, NOW, force).await.unwrap_err();
        assert!(err.to_string().contains("disabled"), "{err}");
        assert_eq!(get(&store, id).await.status, Status::Disabled);
    }
}

async fn upsert_refuses_tokens_older_than_the_last_refresh() {
    let (_dir, store) = temp_store().await;
    let id = insert(&store, vec![new_account("tiktok", "u1", NOW)]).await[0];
    store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    store
        .record(rotated(id, 0, "at-new", Some("rt-new"), NOW + 100))
        .await
        .unwrap();
    // An export taken before that rotation.
    let mut old = new_account("tiktok", "u1", NOW);
    old.obtained_at = NOW + 50;
    let err = store.upsert(vec![old], NOW + 200).await.unwrap_err();
    assert!(err.to_string().contains("refreshed after"), "{err}");
    assert_eq!(
        get(&store, id).await.refresh_token.expose_secret(),
        "rt-new"
    );
}

async fn connect_states_are_single_use_expire_and_any_handle_takes_them() {
    let (dir, store) = temp_store().await;
    // Another process on the same store: the callback may reach any replica.
    let other = Store::open(options(&dir)).await.unwrap();
    let pending = |provider: &str, expires_at: i64| PendingConnect {
        provider: provider.into(),
        verifier: Some(SecretString::from("verifier-1")),
        label: Some("shop".into()),
        account: Some(7),
        scopes: vec!["user.info.basic".into(), "video.list".into()],
        expires_at,
    };
    for k in ["k1", "k2", "k3"] {
        assert!(
            store
                .connect_state_put(k, pending("tiktok", 100), 0, 10)
                .await
                .unwrap()
        );
    }
    let taken = other
        .connect_state_take("k1", "tiktok", 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.verifier.unwrap().expose_secret(), "verifier-1");
    assert_eq!(
        (taken.label.as_deref(), taken.account),
        (Some("shop"), Some(7))
    );
    assert_eq!(taken.scopes, ["user.info.basic", "video.list"]);
    let problem = |r: Result<PendingConnect, StateProblem>| r.err();
    assert_eq!(
        problem(store.connect_state_take("k1", "tiktok", 50).await.unwrap()),
        Some(StateProblem::Replayed)
    );
    assert_eq!(
        problem(store.connect_state_take("k2", "tiktok", 101).await.unwrap()),
        Some(StateProblem::Expired)
    );
    assert_eq!(
        problem(store.connect_state_take("nope", "tiktok", 0).await.unwrap()),
        Some(StateProblem::Unknown)
    );
    assert_eq!(
        problem(other.connect_state_take("k3", "google", 0).await.unwrap()),
        Some(StateProblem::WrongProvider)
    );
    // A state refused once is spent: the right provider cannot use it afterwards.
    assert_eq!(
        problem(store.connect_state_take("k3", "tiktok", 0).await.unwrap()),
        Some(StateProblem::Replayed)
    );
    // At most `max_open` in progress; spent and expired ones do not count.
    assert!(
        store
            .connect_state_put("k4", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    assert!(
        store
            .connect_state_put("k5", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .connect_state_put("k6", pending("tiktok", 100), 0, 2)
            .await
            .unwrap()
    );
    // Long after expiry they are forgotten (a replay then reads as unknown).
    let later = 100 + CONNECT_REMEMBER + 1;
    assert!(
        store
            .connect_state_put("k7", pending("tiktok", later + 100), later, 2)
            .await
            .unwrap()
    );
    assert_eq!(
        problem(
            store
                .connect_state_take("k1", "tiktok", later)
                .await
                .unwrap()
        ),
        Some(StateProblem::Unknown)
    );
    other.close().await;
}

/// A sweep larger than one chunk flags every account, each once, over several transactions.
async fn a_sweep_larger_than_a_chunk_flags_everything_once() {
    let (_dir, store) = temp_store().await;
    let n = crate::store::SWEEP_CHUNK * 2 + 7;
    let accounts = (0..n + 3)
        .map(|i| {
            let mut a = new_account("tiktok", &format!("u{i}"), NOW + 5000);
            // The first three have ended; the others end within the window.
            a.obtained_at = NOW - 100;
            a.tokens.refresh_expires_in = Some(if i < 3 { 50 } else { 1000 });
            a
        })
        .collect();
    insert(&store, accounts).await;
    let report = store.sweep(NOW, Duration::from_secs(3600)).await.unwrap();
    let mut expiring: Vec<i64> = report.expiring.iter().map(|a| a.id).collect();
    expiring.sort();
    expiring.dedup();
    assert_eq!((report.expiring.len(), expiring.len()), (n, n));
    assert_eq!(report.expired.len(), 3);
    assert_eq!(
        query(
            &store,
            "SELECT COUNT(*) FROM accounts WHERE status = 'active' AND ?1 = ?1",
            0
        )
        .await,
        Some(0)
    );
    let again = store
        .sweep(NOW + 1, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
}

/// One chunk holding both kinds, with more ended refresh tokens than the chunk takes: each
/// account is flagged once, with its own reason (an ended token left for the next chunk is
/// not flagged `expiring` meanwhile), and PostgreSQL locks both kinds in one statement.
async fn a_sweep_chunk_flags_each_account_once_with_its_reason() {
    let (_dir, store) = temp_store().await;
    let ended = crate::store::SWEEP_CHUNK + 5;
    let accounts = (0..ended + 4)
        .map(|i| {
            let mut a = new_account("tiktok", &format!("u{i}"), NOW + 5000);
            a.obtained_at = NOW - 100;
            // The last four end within the window; the others have ended.
            a.tokens.refresh_expires_in = Some(if i < ended { 50 } else { 1000 });
            a
        })
        .collect();
    let ids = insert(&store, accounts).await;
    let report = store.sweep(NOW, Duration::from_secs(3600)).await.unwrap();
    let expired: Vec<i64> = report.expired.iter().map(|a| a.id).collect();
    let expiring: Vec<i64> = report.expiring.iter().map(|a| a.id).collect();
    assert_eq!(expiring, ids[ended..], "only the four that have not ended");
    let mut sorted = expired.clone();
    sorted.sort();
    assert_eq!(sorted, ids[..ended], "every ended one, once");
    for (i, id) in ids.iter().enumerate() {
        let a = get(&store, *id).await;
        let want = if i < ended {
            (Status::NeedsReauth, ReauthReason::RefreshTokenExpired)
        } else {
            (Status::Expiring, ReauthReason::RefreshTokenExpiring)
        };
        assert_eq!((a.status, a.reauth_reason), (want.0, Some(want.1)), "u{i}");
        let flags = log_outcomes(&store, *id).await;
        let flags = flags.iter().filter(|o| *o == "reauth_required").count();
        assert_eq!(flags, 1, "u{i} flagged once");
    }
}

on_both_backends!(
    connect_states_are_single_use_expire_and_any_handle_takes_them,
    upsert_inserts_then_updates_by_provider_and_subject,
    upsert_refused_under_a_live_lease_then_clears_lease_and_failures,
    upsert_is_all_or_nothing,
    sweep_flags_expiring_and_expired_refresh_tokens_once,
    a_sweep_larger_than_a_chunk_flags_everything_once,
    a_sweep_chunk_flags_each_account_once_with_its_reason,
    mark_due_needs_force_for_flagged_accounts,
    remove_deletes_account_and_its_log,
    list_pages_and_filters,
    log_entries_are_newest_first,
    counts_group_by_provider_and_status,
    next_due_skips_held_leases_and_flagged_accounts,
    prune_log_deletes_older_entries,
    prune_log_never_takes_a_newer_row_when_the_clock_stepped_back,
    mark_due_never_reenables_a_disabled_account,
    upsert_refuses_tokens_older_than_the_last_refresh,
);

//! App tokens in the store: a row of grant `client_credentials` with no token yet, due at
//! once, claimed and rotated like any account, kept apart from the users' accounts.

use super::*;
use crate::model::Grant;

fn app(name: &str, scope: &str) -> NewApp {
    NewApp {
        provider: "tiktok".into(),
        name: name.into(),
        scope: scope.into(),
        label: Some("providers.tiktok.apps".into()),
    }
}

async fn an_app_is_added_due_now_claimed_rotated_and_listed_apart() {
    let (_dir, store) = temp_store().await;
    let user = insert(&store, vec![new_account("tiktok", "u1", NOW + 3600)]).await[0];
    let added = store
        .add_app(app("research", "research.data.basic"), NOW)
        .await;
    let AppAdded::Created(id) = added.unwrap() else {
        panic!("a new app is created")
    };
    let a = get(&store, id).await;
    assert_eq!(
        (a.grant, a.subject.as_str()),
        (Grant::ClientCredentials, "app:research")
    );
    assert_eq!(
        (a.scope.as_str(), a.next_refresh_at),
        ("research.data.basic", NOW)
    );
    assert_eq!(a.refresh_expires_at, None);
    assert_eq!(get(&store, user).await.grant, Grant::RefreshToken);
    // Due at once: the next claim takes it, and its first token is stored like a rotation.
    let claimed = store.claim_due(OWNER, NOW, LEASE, 10).await.unwrap();
    assert_eq!(ids(&claimed), [id]);
    assert_eq!(claimed[0].grant, Grant::ClientCredentials);
    let mut first = rotated(id, 0, "clt.ONE", None, NOW);
    if let Outcome::Rotated { tokens, .. } = &mut first {
        tokens.scope = None; // as `decide` stores an app token's answer
    }
    assert_eq!(store.record(first).await.unwrap(), Recorded::Applied);
    let a = get(&store, id).await;
    assert_eq!(a.access_token.expose_secret(), "clt.ONE");
    assert_eq!((a.next_refresh_at, a.status), (NOW + 6000, Status::Active));
    // Adding it again keeps it; a new scope makes it due now.
    let again = store.add_app(app("research", "research.data.basic"), NOW + 5);
    assert_eq!(
        again.await.unwrap(),
        AppAdded::Kept {
            id,
            rescoped: false
        }
    );
    let rescoped = store.add_app(app("research", "research.data.vm"), NOW + 6);
    assert_eq!(
        rescoped.await.unwrap(),
        AppAdded::Kept { id, rescoped: true }
    );
    let a = get(&store, id).await;
    assert_eq!(
        (a.scope.as_str(), a.next_refresh_at),
        ("research.data.vm", NOW + 6)
    );
    // Listed apart from the users' accounts.
    let apps = ListFilter {
        grant: Some(Grant::ClientCredentials),
        ..Default::default()
    };
    let listed = store.list(apps, 0, 100).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [id]);
    assert_eq!(listed[0].grant, Grant::ClientCredentials);
    let users = ListFilter {
        grant: Some(Grant::RefreshToken),
        ..Default::default()
    };
    let listed = store.list(users, 0, 100).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [user]);
    assert_eq!(
        log_outcomes(&store, id).await[1..],
        ["app_added".to_string()]
    );
}

async fn a_users_account_is_never_turned_into_an_app() {
    let (_dir, store) = temp_store().await;
    let user = insert(
        &store,
        vec![new_account("tiktok", "app:research", NOW + 3600)],
    )
    .await[0];
    let e = store.add_app(app("research", ""), NOW).await.unwrap_err();
    assert!(e.to_string().contains("not an app token"), "{e}");
    let a = get(&store, user).await;
    assert_eq!(
        (a.grant, a.next_refresh_at),
        (Grant::RefreshToken, NOW + 3600)
    );
}

on_both_backends!(
    an_app_is_added_due_now_claimed_rotated_and_listed_apart,
    a_users_account_is_never_turned_into_an_app,
);

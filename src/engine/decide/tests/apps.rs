//! The decisions for app tokens: asked for with the client credentials, never flagged for a
//! human, scheduled ahead of their expiry like accounts.

use super::*;
use crate::model::Grant;

fn app() -> Account {
    Account {
        subject: "app:research".into(),
        access_token: SecretString::from(""),
        refresh_token: SecretString::from(""),
        scope: "research.data.basic".into(),
        refresh_expires_at: None,
        last_refreshed_at: None,
        grant: Grant::ClientCredentials,
        ..account()
    }
}

/// A client token answer: 2 hours, no refresh token, no user.
fn client_token() -> Answer {
    Answer {
        granted: Granted::Tokens(TokenSet {
            access_token: SecretString::from("clt.NEW"),
            refresh_token: None,
            expires_in: 7200,
            refresh_expires_in: Some(365 * DAY),
            subject: Some("someone".into()),
            scope: Some("research.data.basic,other".into()),
            token_type: "Bearer".into(),
        }),
        problems: vec![],
        rotation_missing: false,
    }
}

#[test]
fn an_app_is_asked_for_with_the_client_credentials_and_its_scope() {
    for profile in [refreshing(), extending()] {
        let a = Account {
            access_expires_at: NOW - 5,
            ..app()
        };
        match before_request(&a, configured(profile), &rules(), "o", NOW * 1000) {
            Before::Send {
                credential: Presented::ClientCredentials { scope },
                ..
            } => assert_eq!(scope, "research.data.basic"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_app_token_is_stored_without_a_refresh_token_end_and_refreshed_ahead_of_expiry() {
    let after = answered(&app(), refreshing(), &client_token());
    assert_eq!(after.provider, ProviderSignal::Accepted);
    match after.outcome {
        Outcome::Rotated {
            tokens,
            next_refresh_at,
            status,
            reauth_reason,
            ..
        } => {
            assert_eq!(tokens.access_token.expose_secret(), "clt.NEW");
            assert!(tokens.refresh_token.is_none());
            assert!(tokens.scope.is_none(), "the scope asked for is kept");
            assert_eq!(tokens.refresh_expires_in, None);
            assert_eq!((status, reauth_reason), (Status::Active, None));
            // 2 hours, lead max(600 s, 10 %) = 720 s: due 12 minutes before the end.
            assert_eq!(next_refresh_at, NOW + 7200 - 720);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_app_is_the_providers_configuration_never_a_flag() {
    for class in [
        FailureClass::Rejected(ReauthReason::InvalidGrant),
        FailureClass::Config,
    ] {
        let after = after_answer(
            &app(),
            refreshing(),
            &rules(),
            Err(&failure(class, None)),
            attempt(false),
            &mut rng(),
        );
        // invalid_client is the provider's configuration; one app's refusal is its own.
        let provider_wide = matches!(after.provider, ProviderSignal::ConfigError(_));
        let this_app = matches!(after.provider, ProviderSignal::Unexpected(_));
        match class {
            FailureClass::Config => assert!(provider_wide, "{:?}", after.provider),
            _ => assert!(this_app, "{:?}", after.provider),
        }
        match after.outcome {
            Outcome::ConfigError {
                next_refresh_at, ..
            } => assert_eq!(next_refresh_at, NOW + 3600),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_users_account_refused_the_same_way_is_still_flagged() {
    let f = failure(FailureClass::Rejected(ReauthReason::InvalidGrant), None);
    let after = failed(&account(), &f, false);
    assert!(matches!(after.outcome, Outcome::Rejected { .. }));
}

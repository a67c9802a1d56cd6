//! The signed redirect back to the app: signed with the app's ref, state bound to the browser,
//! failures before the ref is verified, and the book's verification example.

use super::{REDIRECT_SECRET, Web, verified};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_redirect_is_signed_with_the_apps_ref_and_state_is_bound_to_the_browser() {
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nfailure_url = \"https://app.example/failed\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    w.consent("signed-user", None);
    let (status, location, _) = w.connect_flow("?ref=session-7.abc_~").await;
    assert_eq!(status, 303, "{location}");
    let q = verified(&location);
    assert_eq!(q["ref"], "session-7.abc_~");
    let a =
        w.d.store
            .find("tiktok", "signed-user")
            .await
            .unwrap()
            .expect("stored");
    assert_eq!(q["account_id"], a.id.to_string());
    assert!((q["ts"].parse::<i64>().unwrap() - w.app.clock.now()).abs() <= 1);
    // A forged success link: another account id under the same signature does not verify.
    let forged = location.replace(&format!("account_id={}", a.id), "account_id=4242");
    assert!(std::panic::catch_unwind(|| verified(&forged)).is_err());

    // The binding cookie: HttpOnly, SameSite=Lax, scoped to the callback, short-lived.
    let r =
        w.d.http
            .get(w.d.url("/connect/tiktok/start"))
            .send()
            .await
            .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "HttpOnly",
        "SameSite=Lax",
        "Path=/connect/tiktok/callback",
        "Max-Age=600",
    ] {
        assert!(set.contains(part), "{set}");
    }

    // Login CSRF: the attacker starts, consents as themselves, and has the victim open the
    // callback link. The victim's browser lacks the attacker's cookie: refused, nothing stored.
    w.consent("attacker", None);
    let authorize = w.start_url("").await;
    let attacker_cookies = w.cookies();
    let link = w.provider_redirect(&authorize).await;
    let (status, location) = w.callback_from(&link, "").await;
    assert_eq!(status, 303);
    assert_eq!(verified(&location)["error"], "invalid_state", "{location}");
    assert!(
        w.d.store
            .find("tiktok", "attacker")
            .await
            .unwrap()
            .is_none()
    );
    // A cookie whose ref was altered does not match either.
    let tampered = attacker_cookies.replace(".", ".x");
    let (_, location) = w.callback_from(&link, &tampered).await;
    assert_eq!(verified(&location)["error"], "invalid_state", "{location}");
    // The browser that started it finishes it.
    let (status, location) = w.callback_from(&link, &attacker_cookies).await;
    assert_eq!(status, 303);
    assert!(verified(&location).contains_key("account_id"), "{location}");

    // A bad ref is refused at start.
    let r =
        w.d.http
            .get(w.d.url("/connect/tiktok/start?ref=a%20b"))
            .send()
            .await
            .unwrap();
    let to = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(verified(&to)["error"], "bad_request", "{to}");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_failures_before_the_ref_is_verified_are_signed_with_an_empty_ref() {
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nfailure_url = \"https://app.example/failed\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    // An unknown provider at start: anyone could ask with a victim's ref.
    let r =
        w.d.http
            .get(w.d.url("/connect/nosuch/start?ref=victim-ref"))
            .send()
            .await
            .unwrap();
    let to = r.headers()["location"].to_str().unwrap().to_string();
    let q = verified(&to);
    assert_eq!(q["error"], "unknown_provider", "{to}");
    assert_eq!(q["ref"], "", "{to}");
    // A refused (replayed) state: the cookie's ref is not trusted.
    w.consent("replayed", None);
    let authorize = w.start_url("?ref=victim-ref").await;
    let cookies = w.cookies();
    let link = w.provider_redirect(&authorize).await;
    let (_, location) = w.callback_from(&link, &cookies).await;
    assert_eq!(verified(&location)["ref"], "victim-ref", "{location}");
    let (_, location) = w.callback_from(&link, &cookies).await;
    let q = verified(&location);
    assert_eq!(q["error"], "invalid_state", "{location}");
    assert_eq!(q["ref"], "", "{location}");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_verification_example_verifies_a_real_redirect() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src/web-connect-security.md"),
    )
    .unwrap();
    let example = doc
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a js example in the docs");
    const TEST: &str = "server::the_docs_verification_example_verifies_a_real_redirect";
    if !refreshd_testkit::tool(
        TEST,
        "node",
        &["node", "--version"],
        "apt-get install nodejs",
    ) {
        return;
    }
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    w.consent("docs-user", None);
    let (status, location, _) = w.connect_flow("?ref=session-42").await;
    assert_eq!(status, 303, "{location}");
    let script = w.app.dir.path().join("verify-refreshd-redirect.js");
    std::fs::write(&script, example).unwrap();
    let now = w.app.clock.now().to_string();
    let run = |url: &str, secret: &str, now: &str| {
        std::process::Command::new("node")
            .arg(&script)
            .args([url, secret, now])
            .output()
            .unwrap()
    };
    let ok = run(&location, REDIRECT_SECRET, &now);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id = verified(&location)["account_id"].clone();
    assert!(
        out.contains(&format!("\"accountId\":\"{id}\"")) && out.contains("\"ref\":\"session-42\""),
        "{out}"
    );
    // Forged, signed under another key, or stale: refused.
    let forged = location.replace(&format!("account_id={id}"), "account_id=4242");
    let later = (w.app.clock.now() + 3600).to_string();
    for (url, secret, at) in [
        (forged.as_str(), REDIRECT_SECRET, now.as_str()),
        (location.as_str(), "another-secret-0123456789", now.as_str()),
        (location.as_str(), REDIRECT_SECRET, later.as_str()),
    ] {
        assert!(
            !run(url, secret, at).status.success(),
            "{url} {secret} {at}"
        );
    }
    w.d.stop().await;
}

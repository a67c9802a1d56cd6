//! The admin page (`GET /admin`, docs/src/admin-page.md) of a daemon running against the
//! sandbox: over plain HTTP (off by default, the bearer secret, escaping, no secret in the
//! body), then in a real headless Chromium at a phone's size, as a person sees it, with a
//! screenshot kept in `target/test-artifacts/admin-page.png`.

use crate::helpers::{CLIENT_SECRET, TestApp, eventually};
use crate::server::{API_TOKEN, Daemon, free_port, server_config};
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use refreshd::config::Config;
use refreshd::model::ReauthReason;
use refreshd::sandbox::SandboxConfig;
use refreshd::store::{Outcome, Store};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

/// A server with the bearer secret and `server` (more `[server]` keys) after it.
fn admin_config(app: &TestApp, server: &str) -> Config {
    let token_file = app.dir.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    server_config(
        app,
        &format!(
            "api_token_file = {:?}\n{server}",
            token_file.display().to_string()
        ),
    )
}

/// GET `path`, with `bearer` if given: status, headers and body.
async fn fetch(
    d: &Daemon,
    path: &str,
    bearer: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = d.http.get(d.url(path));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.expect("request");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// Every token of every account, the bearer secret and the client secret: none may appear.
async fn secrets(store: &Store, ids: &[i64]) -> Vec<String> {
    let mut all = vec![API_TOKEN.to_string(), CLIENT_SECRET.to_string()];
    for &id in ids {
        let a = store.get(id).await.unwrap().expect("the account");
        all.push(a.access_token.expose_secret().to_string());
        all.push(a.refresh_token.expose_secret().to_string());
    }
    all
}

fn assert_no_secret(page: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!page.contains(s.as_str()), "a secret is on the page");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_is_off_by_default() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = admin_config(&app, "");
    assert!(!config.server.admin_page);
    let d = Daemon::start(&app, config).await;
    assert_eq!(fetch(&d, "/admin", Some(API_TOKEN)).await.0, 404);
    // The token API beside it is on: only the page is off.
    assert_eq!(fetch(&d, "/v1/accounts/1/token", None).await.0, 401);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_needs_the_bearer_secret_escapes_what_it_shows_and_holds_no_secret() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = admin_config(&app, "admin_page = true");
    let store = app.store().await;
    let hostile = "<script>alert(\"subject\")</script>";
    let ids = app.import(&store, &config, &["u1", hostile], None).await;
    // The provider's own words land in the refresh log: hostile too.
    let a = store.get(ids[1]).await.unwrap().unwrap();
    store
        .record(Outcome::Rejected {
            owner: None,
            account_id: ids[1],
            generation: a.generation,
            reason: ReauthReason::InvalidGrant,
            at: app.clock.now(),
            error: "invalid_grant: <img src=x onerror=alert(1)>".into(),
            http_status: Some(400),
            duration_ms: 3,
        })
        .await
        .unwrap();
    let secrets = secrets(&store, &ids).await;
    store.close().await;
    let d = Daemon::start(&app, config).await;

    for bearer in [None, Some("wrong"), Some(&API_TOKEN[1..])] {
        let (status, headers, body) = fetch(&d, "/admin", bearer).await;
        assert_eq!(status, 401, "{bearer:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(headers["cache-control"], "no-store");
        assert!(!body.contains("u1"), "{body}");
    }

    let (status, headers, page) = fetch(&d, "/admin", Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{headers:?}"
    );
    assert_eq!(headers["cache-control"], "no-store");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    // The subject, the label made of it and the error are text, never markup.
    let lower = page.to_lowercase();
    assert!(
        !lower.contains("<script") && !lower.contains("<img"),
        "{page}"
    );
    assert!(
        page.contains("&lt;script&gt;alert(&quot;subject&quot;)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        page.contains("invalid_grant: &lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    assert!(page.contains("needs_reauth") && page.contains("invalid_grant"));
    assert_no_secret(&page, &secrets);
    d.stop().await;
}

/// A ChromeDriver command that runs one DevTools protocol method (`goog/cdp/execute`).
#[derive(Debug)]
struct Cdp(&'static str, Value);

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!(
            "session/{}/goog/cdp/execute",
            session.unwrap_or("")
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        let body = json!({"cmd": self.0, "params": self.1});
        (axum::http::Method::POST, Some(body.to_string()))
    }
}

/// The phone the page is looked at on (an iPhone 12-14's CSS pixels).
const PHONE: (u32, u32) = (390, 844);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_in_a_headless_chromium_at_phone_width() {
    let test = "admin_page::the_admin_page_in_a_headless_chromium_at_phone_width";
    let Some(driver) = refreshd_testkit::browser::Chromedriver::start(test) else {
        return;
    };
    let app = TestApp::start(SandboxConfig::default()).await;
    // Web connect on, so flagged accounts carry their reconnect link.
    let port = free_port();
    let extra = format!(
        "authorize_url = {:?}\nredirect_uri = \"http://127.0.0.1:{port}/connect/tiktok/callback\"\n\n[server]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = {:?}\nadmin_page = true\n\n[connect]\nenabled = true\n",
        app.sandbox.authorize_url(),
        app.dir.path().join("api-token").display().to_string(),
    );
    std::fs::write(app.dir.path().join("api-token"), API_TOKEN).unwrap();
    let config = app.config(&extra);
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["u1", "u2", "gone"], None)
        .await;
    let due = store.get(ids[0]).await.unwrap().unwrap().next_refresh_at;
    store.close().await;
    app.sandbox.revoke("gone");
    let d = Daemon::start(&app, config).await;
    app.clock.set(due + 60);
    d.engine.waker().notify_one();
    assert!(
        eventually(10, || async {
            let s = d.engine.stats().snapshot();
            s.rotated == 2 && s.flagged == 1
        })
        .await,
        "two accounts refreshed, one flagged"
    );
    let secrets = secrets(&d.store, &ids).await;

    let mut caps = Capabilities::new();
    caps.insert("browserName".into(), "chrome".into());
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": refreshd_testkit::browser::CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={},{}", PHONE.0, PHONE.1)],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = fantoccini::ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session");
    let seen = look(&browser, &d, ids[2], port).await;
    browser.close().await.expect("the browser closes");
    let (html, png) = seen;
    assert_no_secret(&html, &secrets);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin-page.png"), &png).unwrap();
    d.stop().await;
}

/// Opens the page as a phone with the bearer secret, asserts what a person sees, and
/// returns the page's HTML and a full-page screenshot (PNG).
async fn look(b: &fantoccini::Client, d: &Daemon, flagged: i64, port: u16) -> (String, Vec<u8>) {
    let cdp = |m, p| b.issue_cmd(Cdp(m, p));
    cdp("Network.enable", json!({})).await.unwrap();
    let auth = json!({"headers": {"Authorization": format!("Bearer {API_TOKEN}")}});
    cdp("Network.setExtraHTTPHeaders", auth).await.unwrap();
    let phone =
        json!({"width": PHONE.0, "height": PHONE.1, "deviceScaleFactor": 1, "mobile": true});
    cdp("Emulation.setDeviceMetricsOverride", phone)
        .await
        .unwrap();
    b.goto(&d.url("/admin")).await.unwrap();
    let js = |script: &'static str| async move { b.execute(script, vec![]).await.unwrap() };

    assert_eq!(js("return document.title").await, "refreshd admin");
    assert_eq!(js("return document.querySelectorAll('h1').length").await, 1);
    // The counts: tiktok has two active accounts and one needing reauth.
    let rows = js(
        "return [...document.getElementById('counts-c').closest('table').tBodies[0].rows]
        .map(r => [...r.cells].map(c => c.textContent.trim()))",
    )
    .await;
    let want = json!([
        ["tiktok", "2", "0", "1", "0", "3"],
        ["all providers", "2", "0", "1", "0", "3"]
    ]);
    assert_eq!(rows, want);
    // The flagged account: its reason and the reconnect link the webhook carries.
    let human = js("return document.getElementById('human-c').closest('table').innerText").await;
    let human = human.as_str().unwrap();
    assert!(
        human.contains("gone") && human.contains("invalid_grant"),
        "{human}"
    );
    assert!(human.contains("needs_reauth"), "{human}");
    let link =
        js("return [...document.querySelectorAll('#human-c ~ tbody a')].map(a => a.href)").await;
    let reconnect = format!("http://127.0.0.1:{port}/connect/tiktok/start?account={flagged}");
    assert_eq!(link, json!([reconnect]));
    // The provider's state, in words.
    let provider = js("return document.getElementById('providers-c').closest('table').tBodies[0].rows[0].innerText").await;
    let provider = provider.as_str().unwrap();
    assert!(
        provider.contains("tiktok") && provider.contains("closed") && provider.contains("accepted"),
        "{provider}"
    );
    let recent = js("return document.getElementById('recent-c').closest('table').innerText").await;
    assert!(recent.as_str().unwrap().contains("rotated"), "{recent}");
    // A phone's width, and nothing wider: the page never scrolls sideways.
    let widths = js("return [window.innerWidth, document.documentElement.scrollWidth]").await;
    assert_eq!(widths[0], PHONE.0, "{widths}");
    assert!(
        widths[1].as_u64() <= widths[0].as_u64(),
        "the page scrolls sideways: {widths}"
    );
    // No script on the page.
    assert_eq!(js("return document.scripts.length").await, 0);

    let html = js("return document.documentElement.outerHTML").await;
    let shot = json!({"format": "png", "captureBeyondViewport": true});
    let shot = cdp("Page.captureScreenshot", shot).await.unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .unwrap();
    (html.as_str().unwrap().to_string(), png)
}

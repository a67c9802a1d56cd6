//! Provider profiles against wiremock on loopback: the exact request each built-in profile
//! sends and how each documented answer is classified (fixtures shaped as docs/src/providers/
//! describes), the generic profile, connect's identification of the user, and the engine with
//! several providers at once. This file holds the shared set-up: configs with providers on a
//! wiremock server and the exact-request matcher.

use crate::helpers;
use refreshd::config::Config;
use refreshd::provider::profile::Profile;
use refreshd::store::Store;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use wiremock::{Match, Request};

mod connect;
mod generic;
mod profiles;
mod several;

const CLIENT_ID: &str = "cid-123";
const CLIENT_SECRET: &str = "csecret-456";
const DAY: i64 = 86_400;

/// The path of a built-in profile's refresh endpoint: the test serves it on loopback.
fn refresh_path(kind: &str) -> String {
    let p = Profile::built_in(kind).expect("built in");
    url::Url::parse(p.refresh_endpoint())
        .expect("url")
        .path()
        .to_string()
}

/// `[providers.NAME]` of `kind` with credentials, both endpoints on `server`, and `extra`.
fn provider_toml(name: &str, kind: &str, server: &str, extra: &str) -> String {
    let path = refresh_path(kind);
    format!(
        "[providers.{name}]\nkind = \"{kind}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{server}{path}\"\nrefresh_url = \"{server}{path}\"\nrate_limit = 600000\nburst = 1000\n{extra}\n"
    )
}

fn config(db: &Path, refresh_extra: &str, providers: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
[store]
path = {db:?}
lease = "30s"

[refresh]
lead = "10m"
jitter = "0s"
min_interval = "1m"
request_timeout = "1s"
connect_timeout = "1s"
max_idle = "1s"
{refresh_extra}

[shutdown]
grace = "10s"

{providers}
"#,
        db = db.display().to_string()
    ))
    .expect("test config")
}

/// Matches a request whose parameters (query and form body together) are exactly
/// `params`, and whose Authorization header is HTTP Basic with our client iff `basic`.
struct Exact {
    params: BTreeMap<String, String>,
    basic: bool,
}

impl Match for Exact {
    fn matches(&self, req: &Request) -> bool {
        let mut got: BTreeMap<String, String> = req.url.query_pairs().into_owned().collect();
        if req
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("form-urlencoded"))
        {
            got.extend(url::form_urlencoded::parse(&req.body).into_owned());
        } else if !req.body.is_empty() {
            return false;
        }
        let auth = req
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let want_auth = self.basic.then(|| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
            )
        });
        got == self.params && auth == want_auth
    }
}

const RT: &str = "RT-OLD";
const AT: &str = "AT-OLD";

async fn open_store(db: &Path) -> Store {
    helpers::open_store(db, Duration::from_secs(2)).await
}

fn ok_body(access: &str) -> Value {
    json!({"access_token": access, "expires_in": 3600, "token_type": "Bearer"})
}

//! The effective profile of a configured provider: its kind's base (a built-in profile, or
//! the generic one) with every profile key of `[providers.NAME]` applied, then checked as a
//! whole. Errors are (key leaf, problem) pairs that validation names `providers.NAME.KEY`.

use super::types::ProviderConfig;
use crate::provider::builtin::{BUILT_IN, GENERIC};
use crate::provider::profile::{Method, ParamsIn, Profile, RefreshTtl, Upgrade};

impl ProviderConfig {
    /// The resolved profile. Validated at load, so this fails only on a hand-built config.
    pub fn profile(&self, name: &str) -> Result<Profile, String> {
        resolve(name, self).map_err(|errs| {
            errs.into_iter()
                .map(|(k, m)| format!("providers.{name}.{k}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// The profile of `[providers.NAME]`: its kind's base with every configured key applied.
/// Errors are (key leaf, problem) pairs.
pub(super) fn resolve(name: &str, p: &ProviderConfig) -> Result<Profile, Vec<(String, String)>> {
    let mut errs = Vec::new();
    let kind = p.kind(name);
    let mut prof = match kind {
        GENERIC => Profile::generic(),
        k => match Profile::built_in(k) {
            Some(b) => b,
            None => {
                let why = if p.kind.is_none() {
                    format!(
                        "[providers.{name}] is not a built-in provider: set kind to one of {}, or \"generic\" and describe it (token_url, ...)",
                        BUILT_IN.join(", ")
                    )
                } else {
                    format!(
                        "unknown provider kind {k:?}; built-in kinds: {}, or \"generic\"",
                        BUILT_IN.join(", ")
                    )
                };
                return Err(vec![("kind".into(), why)]);
            }
        },
    };
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = &p.$field {
                prof.$field = v.clone();
            }
        };
        ($field:ident, opt) => {
            if let Some(v) = &p.$field {
                prof.$field = Some(v.clone()).filter(|x: &String| !x.is_empty());
            }
        };
    }
    if let Some(u) = &p.token_url {
        prof.token_url = u.clone();
    }
    set!(authorize_url, opt);
    set!(refresh_url, opt);
    set!(revoke_url, opt);
    set!(api_base, opt);
    set!(method);
    set!(params_in);
    set!(client_auth);
    set!(send_client_id);
    set!(client_id_param);
    set!(client_secret_param);
    set!(credential);
    set!(credential_param);
    set!(grant_type);
    set!(scope_separator);
    set!(pkce);
    set!(expires_in_field);
    set!(expires_at_field, opt);
    set!(refresh_expires_in_field, opt);
    set!(refresh_expires_at_field, opt);
    set!(subject_field, opt);
    set!(userinfo_url, opt);
    set!(userinfo_subject_field);
    match (&mut prof.upgrade, &p.upgrade_url, &p.upgrade_grant_type) {
        (Some(Upgrade::Exchange { url, grant_type }), u, g) => {
            if let Some(u) = u {
                *url = u.clone();
            }
            if let Some(g) = g {
                *grant_type = g.clone();
            }
        }
        (_, Some(u), Some(g)) => {
            prof.upgrade = Some(Upgrade::Exchange {
                url: u.clone(),
                grant_type: g.clone(),
            })
        }
        (_, None, None) => {}
        (_, _, _) => errs.push((
            "upgrade_url".to_string(),
            "give upgrade_url and upgrade_grant_type together".to_string(),
        )),
    }
    set!(min_token_age);
    set!(rotation);
    set!(refresh_ttl);
    if let Some(d) = p.refresh_token_lifetime {
        prof.refresh_token_lifetime = Some(d);
    }
    if let Some(d) = p.refresh_at_least_every {
        prof.refresh_at_least_every = Some(d);
    }
    let map = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    if let Some(m) = &p.refresh_params {
        prof.refresh_params = map(m);
    }
    if let Some(m) = &p.authorize_params {
        prof.authorize_params = map(m);
    }
    if let Some(m) = &p.headers {
        prof.headers = map(m);
    }
    if let Some(v) = &p.reauth_errors {
        prof.errors.reauth = v.clone();
    }
    if let Some(v) = &p.reauth_messages {
        prof.errors.reauth_messages = v.clone();
    }
    if let Some(v) = &p.config_errors {
        prof.errors.config = v.clone();
    }
    if let Some(v) = &p.transient_errors {
        prof.errors.transient = v.clone();
    }

    let mut bad = |k: &str, m: String| errs.push((k.to_string(), m));
    if prof.token_url.is_empty() {
        bad(
            "token_url",
            "missing: a generic provider needs its token endpoint, e.g. \"https://auth.example.com/oauth/token\"".into(),
        );
    }
    for (k, v) in [
        ("client_id_param", &prof.client_id_param),
        ("client_secret_param", &prof.client_secret_param),
        ("credential_param", &prof.credential_param),
        ("grant_type", &prof.grant_type),
        ("expires_in_field", &prof.expires_in_field),
        ("userinfo_subject_field", &prof.userinfo_subject_field),
    ] {
        if v.trim().is_empty() {
            bad(k, "must not be empty".into());
        }
    }
    if let Some(d) = prof.refresh_token_lifetime {
        if d.as_secs() == 0 {
            bad("refresh_token_lifetime", "must be at least 1s".into());
        } else if prof.refresh_ttl == RefreshTtl::None {
            bad(
                "refresh_token_lifetime",
                "say how it counts: refresh_ttl = \"fixed\" (from the first grant) or \"sliding\" (from each refresh)".into(),
            );
        }
    }
    if prof.scope_separator.is_empty() {
        bad(
            "scope_separator",
            "must not be empty (e.g. \" \" or \",\")".into(),
        );
    }
    if prof.method == Method::Get && prof.params_in == ParamsIn::Form {
        bad(
            "params_in",
            "a GET request has no body: use params_in = \"query\" with method = \"get\"".into(),
        );
    }
    for (k, _) in &prof.headers {
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            bad("headers", format!("{k:?} is not a valid HTTP header name"));
        }
    }
    if let Some((k, _)) = prof
        .headers
        .iter()
        .find(|(_, v)| reqwest::header::HeaderValue::from_str(v).is_err())
    {
        bad(
            "headers",
            format!("the value of {k:?} is not a valid HTTP header value"),
        );
    }
    if prof
        .errors
        .reauth_messages
        .iter()
        .any(|m| m.trim().is_empty())
    {
        bad("reauth_messages", "matchers must not be empty".into());
    }
    if errs.is_empty() { Ok(prof) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::provider::profile::Rotation;
    use std::time::Duration;

    fn resolved(toml: &str) -> Profile {
        let c = Config::from_toml_str(toml).unwrap();
        let (name, p) = c.providers.iter().next().unwrap();
        resolve(name, p).unwrap()
    }

    /// The keys `resolve` names for `[providers.own]` holding `toml` (not validated first).
    fn problem_keys(toml: &str) -> Vec<String> {
        use figment::providers::{Format, Toml};
        let p: ProviderConfig = figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap();
        resolve("own", &p)
            .unwrap_err()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn every_built_in_resolves_with_credentials_only() {
        for kind in BUILT_IN {
            let p = resolved(&format!(
                "[providers.{kind}]\nclient_key = \"id\"\nclient_secret = \"sec\"\n"
            ));
            assert_eq!(p.kind, *kind);
            assert!(p.token_url.starts_with("https://"), "{kind}");
            assert!(p.authorize_url.is_some(), "{kind}");
            let base = p.api_base.as_deref().expect(kind);
            assert!(
                crate::config::check_api_base(base).is_ok(),
                "{kind}: {base}"
            );
            assert!(base.starts_with("https://"), "{kind}");
        }
    }

    #[test]
    fn overrides_apply_to_built_ins() {
        let p = resolved(
            "[providers.yt]\nkind = \"google\"\nclient_key = \"id\"\nclient_secret = \"s\"\ntoken_url = \"http://127.0.0.1:9/t\"\napi_base = \"http://127.0.0.1:9/api\"\nrotation = \"always\"\nrefresh_params = { foo = \"bar\" }\nmin_token_age = \"1h\"\n",
        );
        assert_eq!(p.kind, "google");
        assert_eq!(p.token_url, "http://127.0.0.1:9/t");
        assert_eq!(p.api_base.as_deref(), Some("http://127.0.0.1:9/api"));
        assert_eq!(
            Profile::built_in("tiktok").unwrap().api_base.as_deref(),
            Some("https://open.tiktokapis.com")
        );
        assert_eq!(p.rotation, Rotation::Always);
        assert_eq!(p.refresh_params, vec![("foo".into(), "bar".into())]);
        assert_eq!(p.min_token_age, Duration::from_secs(3600));
        assert_eq!(p.errors.reauth, ["invalid_grant", "admin_policy_enforced"]);
    }

    #[test]
    fn problems_are_named_by_their_key() {
        let generic = "kind = \"generic\"\nclient_key = \"k\"\n";
        let with_url = format!("{generic}token_url = \"https://auth.example/t\"\n");
        assert_eq!(problem_keys("client_key = \"k\"\n"), ["kind"]);
        assert_eq!(problem_keys(generic), ["token_url"]);
        assert_eq!(
            problem_keys(&format!("{with_url}method = \"get\"\n")),
            ["params_in"]
        );
        assert_eq!(
            problem_keys(&format!(
                "{with_url}upgrade_url = \"https://auth.example/u\"\n"
            )),
            ["upgrade_url"]
        );
        assert_eq!(
            problem_keys(&format!("{with_url}refresh_token_lifetime = \"30d\"\n")),
            ["refresh_token_lifetime"]
        );
        assert_eq!(
            problem_keys(&format!("{with_url}headers = {{ \"bad name\" = \"v\" }}\n")),
            ["headers"]
        );
    }
}

//! The import format, read by `accounts import` and written by `accounts export`: JSON
//! lines, each a token response as TikTok returns it plus `provider`, optional `label` and
//! optional `obtained_at`. Parsing is all-or-nothing: every line is checked before anything
//! is written, and each problem names its line. Accounts that arrive flagged are announced
//! once, after the commit (`announce_flagged`).

use crate::clock::rfc3339;
use crate::events::Event;
use crate::model::{Account, Status, TokenSet};
use crate::policy::{self, RefreshTiming};
use crate::provider::profile::Credential;
use crate::store::NewAccount;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

/// At most this many problems are listed; the file is rejected either way.
const MAX_REPORTED: usize = 20;

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {} problem(s), nothing imported:\n{}", .problems.len(), .problems.iter().map(|(l, m)| format!("  line {l}: {m}")).collect::<Vec<_>>().join("\n"))]
pub struct ImportError {
    pub source_name: String,
    /// (line number, what is wrong), at most `MAX_REPORTED`.
    pub problems: Vec<(usize, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    provider: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    obtained_at: Option<Value>,
    /// Absent from an export without `--include-tokens`: such a line is refused.
    #[serde(default)]
    access_token: Option<String>,
    expires_in: Value,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    refresh_expires_in: Option<Value>,
    #[serde(default)]
    open_id: Option<String>,
    /// Providers other than TikTok call it the subject.
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    /// TikTok returns it on some answers; kept for nothing.
    #[serde(default)]
    #[allow(dead_code)]
    log_id: Option<String>,
}

fn secs(v: &Value, field: &str) -> Result<i64, String> {
    // The same bounds as a provider's answer: a whole number of seconds up to 10 years.
    crate::provider::response::seconds(Some(v), field)?
        .ok_or_else(|| format!("`{field}` must be a whole number of seconds"))
}

fn obtained_at(v: &Value, now: i64) -> Result<i64, String> {
    let t = match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or("`obtained_at` must be unix seconds or RFC 3339")?,
        Value::String(s) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    format!(
                        "`obtained_at` {s:?} is not RFC 3339 ({e}), e.g. \"2026-11-25T09:00:00Z\""
                    )
                })?
                .unix_timestamp()
        }
        _ => return Err("`obtained_at` must be unix seconds or an RFC 3339 string".into()),
    };
    if t > now + 300 {
        return Err(format!("`obtained_at` {} is in the future", rfc3339(t)));
    }
    Ok(t)
}

/// Parses and validates an import file. `known_provider` says whether a provider name is
/// configured; every record needs a refresh token.
pub fn parse(
    source_name: &str,
    text: &str,
    now: i64,
    timing: &RefreshTiming,
    window: Duration,
    known_provider: impl Fn(&str) -> bool,
) -> Result<Vec<NewAccount>, ImportError> {
    parse_with(source_name, text, now, timing, window, |p| {
        known_provider(p).then_some(Credential::RefreshToken)
    })
}

/// Like `parse`; `credential` says what a configured provider refreshes with (None: not
/// configured). Records of providers that extend the access token itself (Instagram,
/// Facebook, Threads) need no refresh token.
pub fn parse_with(
    source_name: &str,
    text: &str,
    now: i64,
    timing: &RefreshTiming,
    window: Duration,
    credential: impl Fn(&str) -> Option<Credential>,
) -> Result<Vec<NewAccount>, ImportError> {
    let mut importer = Importer::new(source_name, now, timing.clone(), window, credential);
    let out: Vec<NewAccount> = text
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| importer.line(i + 1, raw))
        .collect();
    importer.finish().map(|_| out)
}

/// Checks an import one line at a time, so a file of any size streams through in constant
/// memory (`accounts import`): each good line becomes a record, each problem is kept with
/// its line number, and `finish` says whether the whole file may be committed.
pub struct Importer<C> {
    source_name: String,
    now: i64,
    timing: RefreshTiming,
    window: Duration,
    credential: C,
    /// Each provider's keep-alive (`refresh_at_least_every`), where set.
    keep_alive: HashMap<String, Duration>,
    rng: rand::rngs::ThreadRng,
    problems: Vec<(usize, String)>,
    /// (hash of provider and subject, line) of every record: 12 bytes a line instead of
    /// the names, sorted by `finish` to find duplicates.
    keys: Vec<(u64, u32)>,
    records: usize,
}

impl<C: Fn(&str) -> Option<Credential>> Importer<C> {
    pub fn new(
        source_name: &str,
        now: i64,
        timing: RefreshTiming,
        window: Duration,
        credential: C,
    ) -> Self {
        Importer {
            source_name: source_name.to_string(),
            now,
            timing,
            window,
            credential,
            keep_alive: HashMap::new(),
            rng: rand::rng(),
            problems: Vec::new(),
            keys: Vec::new(),
            records: 0,
        }
    }

    /// Schedules each provider's records with its keep-alive (`refresh_at_least_every`):
    /// an imported set is refreshed no later than that after its `obtained_at`.
    pub fn with_keep_alive(mut self, by_provider: HashMap<String, Duration>) -> Self {
        self.keep_alive = by_provider;
        self
    }

    /// Whether a problem was found: the import will be refused, later records need not be
    /// written anywhere.
    pub fn failed(&self) -> bool {
        !self.problems.is_empty()
    }

    /// Checks line `n`: the record, or None (a blank line, or a problem kept for `finish`).
    pub fn line(&mut self, n: usize, raw: &str) -> Option<NewAccount> {
        if raw.trim().is_empty() {
            return None;
        }
        let (now, timing, window) = (self.now, &self.timing, self.window);
        let credential = &self.credential;
        let keep_alive = &self.keep_alive;
        let rng = &mut self.rng;
        let line: Line = match serde_json::from_str(raw) {
            Ok(l) => l,
            Err(e) => {
                // serde_json's message names the field, never the value of a token.
                self.problems
                    .push((n, format!("not a valid import record: {e}")));
                return None;
            }
        };
        let result = (|| -> Result<NewAccount, String> {
            let provider = line.provider.trim().to_string();
            if provider.is_empty() {
                return Err("`provider` is empty".into());
            }
            let Some(credential) = credential(&provider) else {
                return Err(format!(
                    "provider {provider:?} is not configured: add [providers.{provider}] to the config first"
                ));
            };
            let subject = line
                .open_id
                .or(line.subject)
                .filter(|s| !s.trim().is_empty())
                .ok_or("`open_id` (the provider's user id) is missing or empty")?;
            // An import must not overwrite an app token's row.
            if subject.starts_with(crate::model::APP_SUBJECT_PREFIX) {
                return Err(format!(
                    "subject {subject:?} names an app token, which is not imported: app tokens are added with `refreshd apps add {provider} NAME` (or the config's [providers.{provider}.apps.NAME])"
                ));
            }
            let Some(access_token) = line.access_token else {
                return Err(format!(
                    "account {provider}/{subject} has no `access_token` (an `accounts export` without --include-tokens?): nothing to keep alive; export it with --include-tokens, or reconnect it with `refreshd connect {provider}`"
                ));
            };
            if access_token.trim().is_empty() {
                return Err("`access_token` is empty".into());
            }
            let refresh_token = line.refresh_token.filter(|t| !t.trim().is_empty());
            if refresh_token.is_none() && credential == Credential::RefreshToken {
                return Err(
                    "`refresh_token` is missing or empty: refreshd cannot keep this account alive"
                        .into(),
                );
            }
            let expires_in = secs(&line.expires_in, "expires_in")?;
            let refresh_expires_in = line
                .refresh_expires_in
                .as_ref()
                .filter(|v| !v.is_null())
                .map(|v| secs(v, "refresh_expires_in"))
                .transpose()?;
            let obtained = match &line.obtained_at {
                Some(v) if !v.is_null() => obtained_at(v, now)?,
                _ => now,
            };
            let token_type = line.token_type.unwrap_or_else(|| "Bearer".into());
            if !token_type.eq_ignore_ascii_case("bearer") {
                return Err(format!(
                    "`token_type` {token_type:?} is not supported (expected Bearer)"
                ));
            }
            let schedule = policy::schedule(
                &policy::Fresh {
                    obtained_at: obtained,
                    access: policy::Access::Issued { expires_in },
                    refresh_expires_in,
                    origin: policy::Origin::FirstGrant,
                    keep_alive: keep_alive.get(&provider).copied(),
                },
                timing,
                window,
                now,
                rng,
            );
            Ok(NewAccount {
                provider,
                subject,
                label: line.label.as_deref().and_then(crate::connect::clean_label),
                tokens: TokenSet {
                    access_token: SecretString::from(access_token),
                    refresh_token: refresh_token.map(SecretString::from),
                    expires_in,
                    refresh_expires_in,
                    subject: None,
                    scope: line.scope,
                    token_type: "Bearer".into(),
                },
                obtained_at: obtained,
                next_refresh_at: schedule.next_refresh_at,
                status: schedule.status,
                reauth_reason: schedule.reauth_reason,
            })
        })();
        match result {
            Ok(a) => {
                let mut h = std::hash::DefaultHasher::new();
                (&a.provider, &a.subject).hash(&mut h);
                self.keys.push((h.finish(), n as u32));
                self.records += 1;
                Some(a)
            }
            Err(m) => {
                self.problems.push((n, m));
                None
            }
        }
    }

    /// The records checked so far.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Ok(number of records) when every line was good and no account appears twice; else
    /// the problems (at most `MAX_REPORTED`, by line).
    pub fn finish(mut self) -> Result<usize, ImportError> {
        self.keys.sort_unstable();
        for pair in self.keys.windows(2) {
            if pair[0].0 == pair[1].0 {
                // Equal hashes: the same provider and subject (two different accounts share
                // a 64-bit hash about once in 10^7 million-line files; that file is refused).
                self.problems.push((
                    pair[1].1 as usize,
                    format!(
                        "duplicate of line {}: the same provider and open_id appear twice",
                        pair[0].1
                    ),
                ));
            }
        }
        if self.records == 0 && self.problems.is_empty() {
            self.problems.push((0, "the file holds no records".into()));
        }
        if self.problems.is_empty() {
            return Ok(self.records);
        }
        self.problems.sort_by_key(|(l, _)| *l);
        self.problems.truncate(MAX_REPORTED);
        Err(ImportError {
            source_name: self.source_name,
            problems: self.problems,
        })
    }
}

/// One `accounts export` line: `a` in the import format as of `now` (the lifetimes count
/// from it), with its tokens only when `with_tokens`. Imported back, it gives the same
/// account and tokens; its status and flag are not part of the format.
pub fn export_line(a: &Account, now: i64, with_tokens: bool) -> Value {
    let mut v = serde_json::json!({
        "provider": a.provider,
        "subject": a.subject,
        "obtained_at": rfc3339(now),
        "expires_in": (a.access_expires_at - now).max(0),
        "scope": a.scope,
        "token_type": a.token_type,
    });
    if let Some(label) = &a.label {
        v["label"] = label.as_str().into();
    }
    if let Some(end) = a.refresh_expires_at {
        v["refresh_expires_in"] = (end - now).max(0).into();
    }
    if with_tokens {
        v["access_token"] = a.access_token.expose_secret().into();
        let refresh = a.refresh_token.expose_secret();
        if !refresh.is_empty() {
            v["refresh_token"] = refresh.into();
        }
    }
    v
}

/// Whether importing `r` flags its account anew: it arrives flagged, and the account was not
/// already flagged with that status before the import (`before`: its status then, for the
/// accounts that were flagged). A re-import of a flagged account is not a new flag.
pub fn newly_flagged(r: &NewAccount, before: Option<Status>) -> bool {
    r.reauth_reason.is_some() && before != Some(r.status)
}

/// Announces each imported account that arrived newly flagged (see [`newly_flagged`];
/// `flagged_before` holds the accounts flagged before the import, by id) like any other
/// flag: the `reauth_required` log event now, and the returned events for the webhook
/// (`notify::send_now`). Call after the commit, once per import.
pub fn announce_flagged(
    config: &crate::config::Config,
    records: &[NewAccount],
    ids: &[(i64, bool)],
    flagged_before: &std::collections::HashMap<i64, Status>,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (r, (id, _)) in records.iter().zip(ids) {
        if !newly_flagged(r, flagged_before.get(id).copied()) {
            continue;
        }
        if let Some(reason) = r.reauth_reason {
            let refresh_expires_at = r.tokens.refresh_expires_in.map(|s| r.obtained_at + s);
            crate::telemetry::reauth_required(
                *id,
                &r.provider,
                &r.subject,
                r.label.as_deref(),
                reason.as_str(),
                refresh_expires_at,
                crate::connect::web_reconnect_url(config, &r.provider, *id).as_deref(),
            );
            events.push(Event::ReauthRequired {
                account_id: *id,
                provider: r.provider.clone(),
                subject: r.subject.clone(),
                label: r.label.clone(),
                reason: reason.as_str().to_string(),
                refresh_expires_at,
            });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> RefreshTiming {
        RefreshTiming {
            lead: Duration::from_secs(600),
            lead_fraction: 0.1,
            jitter: Duration::ZERO,
            min_interval: Duration::ZERO,
        }
    }
    const WEEK: Duration = Duration::from_secs(7 * 86_400);
    const GOOD: &str = r#"{"provider":"tiktok","access_token":"act.A","expires_in":86400,"open_id":"u1","refresh_expires_in":31536000,"refresh_token":"rft.R","scope":"user.info.basic","token_type":"Bearer"}"#;

    fn p(text: &str) -> Result<Vec<NewAccount>, ImportError> {
        parse("f.jsonl", text, 1_000_000, &timing(), WEEK, |p| {
            p == "tiktok"
        })
    }

    #[test]
    fn a_line_without_tokens_is_refused_naming_the_account_and_the_way_out() {
        let line = GOOD
            .replace(r#""access_token":"act.A","#, "")
            .replace(r#""refresh_token":"rft.R","#, "");
        let e = p(&line).unwrap_err();
        let (n, msg) = &e.problems[0];
        assert_eq!(*n, 1);
        assert!(msg.contains("tiktok/u1 has no `access_token`"), "{msg}");
        assert!(msg.contains("--include-tokens"), "{msg}");
    }

    #[test]
    fn an_app_tokens_subject_is_refused_naming_the_way_to_add_one() {
        let e = p(&GOOD.replace(r#""u1""#, r#""app:research""#)).unwrap_err();
        let (n, msg) = &e.problems[0];
        assert_eq!(*n, 1);
        assert!(msg.contains("refreshd apps add tiktok"), "{msg}");
        assert!(e.to_string().contains("f.jsonl"), "{e}");
    }

    #[test]
    fn an_export_line_reads_back_as_the_same_account() {
        let a = Account {
            id: 7,
            provider: "tiktok".into(),
            subject: "u1".into(),
            label: Some("Shop".into()),
            access_token: SecretString::from("act.A"),
            refresh_token: SecretString::from("rft.R"),
            scope: "user.info.basic".into(),
            token_type: "Bearer".into(),
            access_expires_at: 1_000_000 + 3600,
            refresh_expires_at: Some(1_000_000 + 30 * 86_400),
            next_refresh_at: 0,
            status: Status::Active,
            reauth_reason: None,
            reauth_flagged_at: None,
            failures: 0,
            last_error: None,
            last_refreshed_at: None,
            generation: 3,
            created_at: 0,
            updated_at: 0,
            interrupted_at: None,
            grant: crate::model::Grant::RefreshToken,
        };
        let bare = export_line(&a, 1_000_000, false).to_string();
        assert!(!bare.contains("act.A") && !bare.contains("rft.R"), "{bare}");
        let line = export_line(&a, 1_000_000, true).to_string();
        let r = &p(&line).unwrap()[0];
        assert_eq!((r.provider.as_str(), r.subject.as_str()), ("tiktok", "u1"));
        assert_eq!(r.label.as_deref(), Some("Shop"));
        assert_eq!(r.tokens.access_token.expose_secret(), "act.A");
        assert_eq!(
            r.tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
            Some("rft.R")
        );
        assert_eq!(r.obtained_at, 1_000_000);
        assert_eq!(r.obtained_at + r.tokens.expires_in, a.access_expires_at);
        assert_eq!(
            r.tokens.refresh_expires_in.map(|s| r.obtained_at + s),
            a.refresh_expires_at
        );
        assert_eq!(r.tokens.scope.as_deref(), Some("user.info.basic"));
    }

    #[test]
    fn good_line() {
        let v = p(GOOD).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, "u1");
        assert_eq!(v[0].status, Status::Active);
        assert_eq!(v[0].next_refresh_at, 1_000_000 + 86_400 - 8_640);
    }

    #[test]
    fn a_providers_keep_alive_schedules_the_record_from_obtained_at() {
        let keep = HashMap::from([("tiktok".to_string(), Duration::from_secs(3_600))]);
        let mut importer = Importer::new("f.jsonl", 1_000_000, timing(), WEEK, |p: &str| {
            (p == "tiktok").then_some(Credential::RefreshToken)
        })
        .with_keep_alive(keep);
        let line = GOOD.replace("{\"provider\"", "{\"obtained_at\":999000,\"provider\"");
        let record = importer.line(1, &line).unwrap();
        assert_eq!(record.next_refresh_at, 999_000 + 3_600);
        assert!(importer.finish().is_ok());
    }

    #[test]
    fn bad_lines_named_and_nothing_returned() {
        let text = format!(
            "{GOOD}\n{{\"provider\":\"tiktok\",\"access_token\":\"a\",\"expires_in\":\"x\",\"open_id\":\"u2\",\"refresh_token\":\"r\"}}\nnot json\n{}\n",
            GOOD.replace("tiktok", "myspace")
        );
        let e = p(&text).unwrap_err();
        let lines: Vec<usize> = e.problems.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [2, 3, 4]);
        let msg = e.to_string();
        assert!(
            msg.contains("f.jsonl") && msg.contains("expires_in") && msg.contains("myspace"),
            "{msg}"
        );
        assert!(!msg.contains("rft.R") && !msg.contains("act.A"), "{msg}");
    }

    #[test]
    fn duplicate_and_unknown_field() {
        let e = p(&format!("{GOOD}\n{GOOD}")).unwrap_err();
        assert!(e.problems[0].1.contains("duplicate of line 1"));
        let e = p(&GOOD.replace("\"scope\"", "\"scopes\"")).unwrap_err();
        assert!(e.problems[0].1.contains("scopes"), "{:?}", e.problems);
    }

    #[test]
    fn expiring_and_expired_refresh_tokens_flagged_on_import() {
        let v = p(&GOOD.replace("31536000", "86400")).unwrap();
        assert_eq!(v[0].status, Status::Expiring);
        let old = GOOD
            .replace("31536000", "100")
            .replace("\"provider\"", "\"obtained_at\":999000,\"provider\"");
        let v = p(&old).unwrap();
        assert_eq!(v[0].status, Status::NeedsReauth);
    }

    #[test]
    fn only_a_flag_the_import_changes_is_new() {
        let expiring = p(&GOOD.replace("31536000", "86400")).unwrap().remove(0);
        assert!(newly_flagged(&expiring, None));
        assert!(!newly_flagged(&expiring, Some(Status::Expiring)));
        assert!(newly_flagged(&expiring, Some(Status::NeedsReauth)));
        let fine = p(GOOD).unwrap().remove(0);
        assert!(!newly_flagged(&fine, None));
    }

    #[test]
    fn obtained_at_rfc3339_and_future_rejected() {
        let l = GOOD.replace(
            "\"provider\"",
            "\"obtained_at\":\"1970-01-12T13:46:40Z\",\"provider\"",
        );
        assert_eq!(p(&l).unwrap()[0].obtained_at, 1_000_000);
        let l = GOOD.replace("\"provider\"", "\"obtained_at\":9999999999,\"provider\"");
        assert!(p(&l).unwrap_err().problems[0].1.contains("future"));
    }

    #[test]
    fn absurd_lifetime_rejected_without_overflow() {
        let e = p(&GOOD.replace("86400", "9223372036854775807")).unwrap_err();
        assert!(e.problems[0].1.contains("expires_in"), "{:?}", e.problems);
        let e = p(&GOOD.replace("86400", "-5")).unwrap_err();
        assert!(e.problems[0].1.contains("expires_in"), "{:?}", e.problems);
    }

    #[test]
    fn empty_file_rejected() {
        assert!(p("\n\n").is_err());
    }
}

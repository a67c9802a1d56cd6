//! The admin page as HTML (maud: every value is escaped by construction). No JavaScript and
//! no outside asset: one inline style sheet that keeps the page within a phone's width
//! (wide tables scroll inside their own region). Times are `<time datetime>` with words;
//! statuses are words, colour only repeats them.

use super::gather::{AdminView, CountTable, Flagged, ProviderRow, circuit_words};
use crate::circuit::Phase;
use crate::clock::rfc3339;
use crate::model::Status;
use crate::store::RecentOutcome;
use maud::{DOCTYPE, Markup, PreEscaped, html};

const CSS: &str = "\
*,*::before,*::after{box-sizing:border-box}\
html{-webkit-text-size-adjust:100%}\
body{margin:0;font:16px/1.5 system-ui,sans-serif;color:#1b1b1b;background:#fff}\
header,main{max-width:75rem;margin:0 auto;padding:0 1rem}\
header{border-bottom:1px solid #767676}\
h1{font-size:1.5rem;margin:.75rem 0 .25rem}\
h2{font-size:1.2rem;margin:1.75rem 0 .25rem}\
p{overflow-wrap:anywhere}\
.scroll{overflow-x:auto;max-width:100%}\
.scroll:focus{outline:2px solid #0b57d0;outline-offset:2px}\
table{border-collapse:collapse;min-width:100%}\
caption{text-align:left;font-weight:600;padding:.25rem 0}\
th,td{border-bottom:1px solid #c4c4c4;padding:.35rem .5rem;text-align:left;vertical-align:top;white-space:nowrap}\
td.text{white-space:normal;min-width:14rem;max-width:24rem;overflow-wrap:break-word}\
.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;padding:0 .4rem;border:1px solid;border-radius:.25rem;white-space:nowrap}\
.ok{color:#0d5a1f;background:#e8f5eb}\
.warn{color:#6b4400;background:#fff4d6}\
.bad{color:#8a1010;background:#fdecec}\
.muted{color:#555}\
a{color:#0b57d0}\
code{overflow-wrap:anywhere}";

pub fn page(v: &AdminView) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="robots" content="noindex";
                title { "refreshd admin" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    h1 { "refreshd admin" }
                    p.muted {
                        "Read-only, as of " (when(v.now, v.now)) ". Reload the page to update it."
                    }
                }
                main {
                    (counts(&v.counts))
                    (needs_human(&v.needs_human, v.counts.needing_a_human(), v.now))
                    (providers(&v.providers, v.now))
                    (recent(&v.recent, v.now))
                }
            }
        }
    }
}

/// A table in a region of its own that scrolls sideways on a narrow screen (focusable, so a
/// keyboard can scroll it too).
fn scroll(id: &str, caption: &str, head: Markup, body: Markup) -> Markup {
    html! {
        div.scroll role="region" aria-labelledby=(id) tabindex="0" {
            table {
                caption id=(id) { (caption) }
                thead { (head) }
                tbody { (body) }
            }
        }
    }
}

/// A section titled by its h2 (`<id>-h`).
fn section(id: &str, title: &str, body: Markup) -> Markup {
    let heading = format!("{id}-h");
    html! {
        section aria-labelledby=(heading) {
            h2 id=(heading) { (title) }
            (body)
        }
    }
}

/// The table, or a sentence saying why there is none.
fn table_or(table: Option<Markup>, empty: &str) -> Markup {
    match table {
        Some(t) => t,
        None => html! { p { (empty) } },
    }
}

/// A header row of column headings.
fn columns(names: &[&str]) -> Markup {
    html! { tr { @for n in names { th scope="col" { (n) } } } }
}

fn counts(t: &CountTable) -> Markup {
    let all: i64 = t.totals.iter().sum();
    let head = html! {
        tr {
            th scope="col" { "Provider" }
            @for s in Status::ALL { th.num scope="col" { (s.as_str()) } }
            th.num scope="col" { "all" }
        }
    };
    let body = html! {
        @for (provider, n) in &t.rows {
            tr {
                th scope="row" { (provider) }
                @for c in n { td.num { (c) } }
                td.num { (n.iter().sum::<i64>()) }
            }
        }
        tr {
            th scope="row" { "all providers" }
            @for c in t.totals { td.num { (c) } }
            td.num { (all) }
        }
    };
    let summary = html! { p { (all) " accounts; " (t.needing_a_human()) " need a human." } };
    let table = scroll("counts-c", "Accounts by provider and status", head, body);
    section("accounts", "Accounts", html! { (summary) (table) })
}

fn needs_human(rows: &[Flagged], total: i64, now: i64) -> Markup {
    let head = columns(&[
        "Account",
        "Status",
        "Reason",
        "Flagged",
        "Refresh token ends",
        "Reconnect",
    ]);
    let body = html! {
        @for f in rows {
            @let a = &f.account;
            tr {
                th scope="row" {
                    (a.id) " " (a.provider) "/" (a.subject)
                    @if let Some(l) = &a.label { br; span.muted { (l) } }
                }
                td { (status(a.status)) }
                td { (a.reauth_reason.map_or("unknown", |r| r.as_str())) }
                td { (maybe_when(a.reauth_flagged_at, now)) }
                td { (maybe_when(a.refresh_expires_at, now)) }
                td {
                    @if let Some(url) = &f.reconnect_url {
                        a href=(url) rel="noreferrer" { "Reconnect " (a.provider) " account " (a.id) }
                        br;
                    }
                    code { (f.reconnect_command) }
                }
            }
        }
    };
    let caption = format!(
        "Accounts needing a human (the first {} of {total})",
        rows.len()
    );
    let table = (!rows.is_empty()).then(|| scroll("human-c", &caption, head, body));
    let none = "None: every account refreshes by itself.";
    section("human", "Accounts needing a human", table_or(table, none))
}

fn providers(rows: &[ProviderRow], now: i64) -> Markup {
    let head = columns(&[
        "Provider",
        "Circuit",
        "Configuration",
        "Rate limit",
        "Slots free",
    ]);
    let body = html! {
        @for p in rows {
            tr {
                th scope="row" { (p.name) }
                td { (circuit(p.health.circuit, now)) }
                td {
                    @if !p.configured {
                        span.badge.warn { "not configured" }
                    } @else if p.health.rejecting {
                        span.badge.bad { "rejected by the provider" }
                    } @else {
                        span.badge.ok { "accepted" }
                    }
                }
                td {
                    @if let Some((per_minute, burst)) = p.rate_limit {
                        (per_minute) " per minute, burst " (burst)
                    } @else { "none" }
                }
                td.num {
                    @if let Some((free, all)) = p.slots { (free) " of " (all) } @else { "none" }
                }
            }
        }
    };
    let table = scroll("providers-c", "Provider state in this process", head, body);
    section("providers", "Providers", table)
}

fn circuit(phase: Phase, now: i64) -> Markup {
    let words = circuit_words(phase);
    html! {
        @match phase {
            Phase::Closed => span.badge.ok { (words) },
            Phase::Probing => span.badge.warn { (words) },
            Phase::Open { probe_at } => {
                span.badge.bad { (words) }
                " next probe " (when(probe_at.div_euclid(1000), now))
            }
        }
    }
}

fn recent(rows: &[RecentOutcome], now: i64) -> Markup {
    let head = columns(&["When", "Account", "Outcome", "HTTP", "Error", "ms"]);
    let body = html! {
        @for r in rows {
            tr {
                td { (when(r.entry.at, now)) }
                th scope="row" {
                    (r.account_id)
                    @if let (Some(p), Some(s)) = (&r.provider, &r.subject) { " " (p) "/" (s) }
                }
                td { span class={"badge " (outcome_class(&r.entry.outcome))} { (r.entry.outcome) } }
                td.num { @if let Some(h) = r.entry.http_status { (h) } }
                td.text { @if let Some(e) = &r.entry.error { (e) } }
                td.num { @if let Some(d) = r.entry.duration_ms { (d) } }
            }
        }
    };
    let caption = format!(
        "The latest {} refresh log entries, newest first",
        rows.len()
    );
    let table = (!rows.is_empty()).then(|| scroll("recent-c", &caption, head, body));
    section(
        "recent",
        "Latest refresh outcomes",
        table_or(table, "No refresh yet."),
    )
}

fn status(s: Status) -> Markup {
    let class = match s {
        Status::Active => "ok",
        Status::Expiring | Status::Disabled => "warn",
        Status::NeedsReauth => "bad",
    };
    html! { span class={"badge " (class)} { (s.as_str()) } }
}

/// The colour that repeats an outcome's word.
fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "rotated" | "imported" | "enabled" => "ok",
        "reauth_required" | "config_error" => "bad",
        _ => "warn",
    }
}

fn maybe_when(at: Option<i64>, now: i64) -> Markup {
    match at {
        Some(at) => when(at, now),
        None => html! { span.muted { "never" } },
    }
}

/// A moment for machines (`datetime`) and people (date, time and how far from now).
fn when(at: i64, now: i64) -> Markup {
    html! {
        time datetime=(rfc3339(at)) { (utc_minute(at)) " (" (relative(at - now)) ")" }
    }
}

/// `2026-11-25 10:00 UTC`.
fn utc_minute(at: i64) -> String {
    let t = rfc3339(at);
    match (t.get(..10), t.get(11..16)) {
        (Some(day), Some(minute)) if t.len() >= 16 => format!("{day} {minute} UTC"),
        _ => t,
    }
}

/// `in 5 min`, `3 h ago`, `now`: the largest whole unit.
fn relative(delta: i64) -> String {
    let d = delta.unsigned_abs();
    let (n, unit) = match d {
        0..60 => return "now".into(),
        60..3600 => (d / 60, "min"),
        3600..86_400 => (d / 3600, "h"),
        _ => (d / 86_400, "d"),
    };
    if delta > 0 {
        format!("in {n} {unit}")
    } else {
        format!("{n} {unit} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_a_utc_minute_and_a_distance_from_now() {
        assert_eq!(utc_minute(1_795_564_800 + 3660), "2026-11-25 01:01 UTC");
        assert_eq!(relative(0), "now");
        assert_eq!(relative(-59), "now");
        assert_eq!(relative(300), "in 5 min");
        assert_eq!(relative(-7200), "2 h ago");
        assert_eq!(relative(3 * 86_400 + 5), "in 3 d");
        let t = when(1_795_564_800, 1_795_564_800 - 120).into_string();
        assert_eq!(
            t,
            "<time datetime=\"2026-11-25T00:00:00Z\">2026-11-25 00:00 UTC (in 2 min)</time>"
        );
    }

    #[test]
    fn statuses_and_outcomes_are_words_with_a_colour_beside() {
        let s = status(Status::NeedsReauth).into_string();
        assert!(s.contains(">needs_reauth<") && s.contains("bad"), "{s}");
        assert_eq!(outcome_class("rotated"), "ok");
        assert_eq!(outcome_class("reauth_required"), "bad");
        assert_eq!(outcome_class("transient"), "warn");
    }
}

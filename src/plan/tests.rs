use super::*;
use crate::model::Status;
use crate::store::DueMinute;

/// 2026-11-25T10:00:30Z: half a minute into the window's first minute.
const NOW: i64 = 1_795_600_830;
const START: i64 = NOW - 30;

fn due(provider: &str, offset_minutes: i64, count: i64) -> DueMinute {
    DueMinute {
        provider: provider.into(),
        minute: START / 60 + offset_minutes,
        count,
    }
}

fn limits(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(p, l)| (p.to_string(), *l)).collect()
}

fn end(id: i64, provider: &str, in_secs: i64) -> RefreshEnd {
    RefreshEnd {
        account_id: id,
        provider: provider.into(),
        subject: format!("user-{id}"),
        status: Status::Active,
        refresh_expires_at: NOW + in_secs,
    }
}

#[test]
fn the_query_covers_whole_minutes_from_nows() {
    let q = query(NOW, 60, Some("tiktok".into()), 5);
    assert_eq!((q.start, q.end), (START, START + 3_600));
    assert_eq!((q.provider.as_deref(), q.soonest), (Some("tiktok"), 5));
}

#[test]
fn minutes_backlog_peak_and_the_rate_limit() {
    let rows = PlanRows {
        due: vec![
            due("google", 3, 2),
            due("tiktok", -1, 40),
            due("tiktok", 0, 5),
            due("tiktok", 7, 700),
            due("tiktok", 8, 601),
            due("tiktok", 9, 600),
            due("tiktok", 59, 1),
        ],
        refresh_ends: vec![end(4, "tiktok", 3 * 86_400)],
    };
    let plan = build(NOW, 60, rows, &limits(&[("tiktok", 600), ("idle", 10)]));
    let names: Vec<&str> = plan.providers.iter().map(|p| p.provider.as_str()).collect();
    assert_eq!(
        names,
        ["google", "idle", "tiktok"],
        "configured or due, sorted"
    );
    let [google, idle, tiktok] = &plan.providers[..] else {
        panic!()
    };
    assert_eq!((tiktok.backlog, tiktok.due), (40, 5 + 700 + 601 + 600 + 1));
    assert_eq!((tiktok.per_minute[0], tiktok.per_minute[59]), (5, 1));
    assert_eq!((tiktok.peak, tiktok.peak_at), (700, START + 7 * 60));
    // 600 is within a 600/min limit; 601 and 700 exceed it.
    assert_eq!(tiktok.minutes_over_limit, 2);
    assert_eq!(tiktok.first_over_limit_at, Some(START + 7 * 60));
    assert_eq!(
        (idle.due, idle.rate_limit, idle.first_over_limit_at),
        (0, Some(10), None)
    );
    assert_eq!(
        (google.due, google.rate_limit, google.minutes_over_limit),
        (2, None, 0)
    );
    assert_eq!(plan.refresh_ends, [end(4, "tiktok", 3 * 86_400)]);
}

#[test]
fn the_text_fits_80_columns_and_marks_the_minutes_over_the_limit() {
    let rows = PlanRows {
        due: vec![
            due("tiktok", 0, 1),
            due("tiktok", 30, 900),
            due("tiktok", 59, 450),
        ],
        refresh_ends: vec![end(12, "tiktok", 2 * 86_400 + 5), end(3, "tiktok", 40 * 60)],
    };
    let text = build(NOW, 60, rows, &limits(&[("tiktok", 600)])).render();
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} chars: {line:?}",
            line.chars().count()
        );
    }
    assert!(
        text.contains("tiktok: 1351 due, 0 overdue (backlog); peak 900/min at 10:30"),
        "{text}"
    );
    assert!(
        text.contains("EXCEEDS the limit of 600/min in 1 minute(s), first at 10:30"),
        "{text}"
    );
    let chart = text.lines().find(|l| l.starts_with("  |")).expect(&text);
    let bars: Vec<char> = chart.trim_matches([' ', '|']).chars().collect();
    assert_eq!(bars.len(), 60);
    assert_eq!((bars[0], bars[30], bars[59], bars[1]), ('▁', '█', '▄', '.'));
    let marks = text.lines().find(|l| l.contains('!')).expect(&text);
    assert_eq!(
        marks.find('!'),
        Some(3 + 30),
        "under the 31st column: {marks:?}"
    );
    assert!(
        text.contains(
            "      12  tiktok     user-12              active   2026-11-27T10:00:35Z (in 2d)"
        ),
        "{text}"
    );
    assert!(text.contains("(in 40m)"), "{text}");
}

#[test]
fn a_day_groups_minutes_into_columns_of_their_busiest_minute() {
    let rows = PlanRows {
        due: vec![
            due("tiktok", 0, 3),
            due("tiktok", 23, 9),
            due("tiktok", 24, 1),
            due("tiktok", 1_439, 2),
        ],
        refresh_ends: vec![],
    };
    let plan = build(NOW, 1_440, rows, &limits(&[("tiktok", 600)]));
    let p = &plan.providers[0];
    assert_eq!(p.per_minute.len(), 1_440);
    let columns = p.columns(24);
    assert_eq!(columns.len(), 60);
    assert_eq!((columns[0], columns[1], columns[59]), (9, 1, 2));
    let text = plan.render();
    assert!(text.contains("one column = 24 min"), "{text}");
    assert!(text.contains("within the limit of 600/min"), "{text}");
    assert!(text.contains("(none known)"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
}

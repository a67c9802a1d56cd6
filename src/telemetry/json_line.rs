//! The JSON log line, written straight into the line buffer: the same text as
//! tracing-subscriber's flattened JSON format (`timestamp`, `level`, the fields, `target`),
//! without its serde machinery, which cost a refresh more than the rest of its line.
//! Lines it does not own (inside a span, or bridged from other crates' `log` records) go to
//! that format itself.

use std::fmt::{self, Write};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format of `log.format = "json"`.
pub struct JsonLine {
    /// The same format through serde, for the lines this one leaves to it.
    full: Format<Json, SystemTime>,
}

impl JsonLine {
    pub fn new() -> Self {
        JsonLine {
            full: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Ours and outside any span: the span's fields would need the full format.
        let own = meta.target().starts_with("refreshd")
            && event.parent().is_none()
            && ctx.lookup_current().is_none();
        if !own {
            return self.full.format_event(ctx, w, event);
        }
        #[cfg(test)]
        tests::OWN_LINES.with(|n| n.set(n.get() + 1));
        w.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut w)?;
        write!(w, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        quoted(&mut w, format_args!("{}", meta.target()))?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`, as serde_json would write the value.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: fmt::Arguments<'_>, as_string: bool) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.w.write_char(',')?;
            quoted(self.w, format_args!("{}", field.name()))?;
            self.w.write_char(':')?;
            if as_string {
                quoted(self.w, value)
            } else {
                self.w.write_fmt(value)
            }
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, format_args!("{value:?}"), true);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, format_args!("{value}"), true);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, format_args!("{value}"), false);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, format_args!("{value}"), false);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, format_args!("{value}"), false);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's own float text; it writes what is not finite as null.
        match serde_json::Number::from_f64(value) {
            Some(n) => self.entry(field, format_args!("{n}"), false),
            None => self.entry(field, format_args!("null"), false),
        }
    }
}

/// `text` as a JSON string, escaped exactly as serde_json escapes.
fn quoted(w: &mut Writer<'_>, text: fmt::Arguments<'_>) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_fmt(text)?;
    w.write_char('"')
}

struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let short = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if short.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(short)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::capture::Captured;
    use tracing_subscriber::layer::SubscriberExt;

    thread_local! {
        /// Lines this thread wrote by hand, not through the serde format.
        pub(super) static OWN_LINES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// What `events` logs through `lean` or through the serde format, each line without
    /// its timestamp (the one part that differs between two runs).
    fn logged(lean: bool) -> Vec<String> {
        let buf = Captured::default();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(buf.clone());
        let sub = tracing_subscriber::registry();
        if lean {
            let sub = sub.with(layer.event_format(JsonLine::new()));
            tracing::subscriber::with_default(sub, events);
        } else {
            tracing::subscriber::with_default(sub.with(layer), events);
        }
        let text = buf.text();
        text.lines()
            .map(|l| {
                let (stamp, rest) = l.split_once("\",").expect(l);
                assert!(stamp.starts_with("{\"timestamp\":\"20"), "{l}");
                rest.to_string()
            })
            .collect()
    }

    fn events() {
        let odd = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \0 del \u{7f} é ✓";
        tracing::info!(event = "refresh", account = 7_i64, provider = "tiktok",
            outcome = "rotated", duration_ms = 12_i64, new_refresh_token = true,
            commit = "committed", next_refresh_at = %"2026-11-30T18:00:00Z", "refreshed");
        tracing::warn!(event = "malformed_token_response", text = odd, debug = ?odd, big = u64::MAX,
            small = i64::MIN, half = 0.5_f64, tiny = 1e-7_f64, huge = 1e300_f64,
            nan = f64::NAN, "message with {odd} in it");
        tracing::error!(
            wide = 170141183460469231731687303715884105727_i128,
            "no event field"
        );
        let span = tracing::info_span!("refresh", account = 9_i64, provider = "x");
        span.in_scope(|| tracing::info!(event = "refresh", "inside a span"));
    }

    #[test]
    fn lines_match_the_serde_format_byte_for_byte() {
        OWN_LINES.with(|n| n.set(0));
        let lean = logged(true);
        assert_eq!(lean.len(), 4);
        // The three lines outside a span took the hand-written path, not the fallback.
        assert_eq!(OWN_LINES.with(|n| n.get()), 3);
        assert_eq!(lean, logged(false));
        let json = |l: &str| serde_json::from_str::<serde_json::Value>(&format!("{{{l}")).unwrap();
        assert_eq!(json(&lean[0])["account"], 7);
        assert_eq!(json(&lean[1])["nan"], serde_json::Value::Null);
        assert_eq!(json(&lean[3])["span"]["account"], 9, "{}", lean[3]);
    }
}

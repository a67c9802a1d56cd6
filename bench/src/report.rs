//! What the benchmark found: rows (figure, measured, target, met?), printed as the table and
//! written into the JSON with the details of every run.

use serde_json::Value;

/// One line of the table.
#[derive(serde::Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) figure: String,
    /// None when the figure could not be measured (`skipped` says why).
    pub(crate) measured: Option<f64>,
    pub(crate) unit: &'static str,
    pub(crate) target: Option<String>,
    pub(crate) met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) skipped: Option<String>,
}

/// How a target moves with the machine's speed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scale {
    /// A rate to reach (>=): a machine half as fast reaches half of it.
    Rate,
    /// A share of one CPU to stay under (<=): each refresh costs twice the CPU time on a
    /// machine half as fast, so the share doubles.
    CpuShare,
}

/// One absolute target met or missed as written, kept for its scaled row
/// (scaled.rs).
pub(crate) struct Absolute {
    pub(crate) scenario: String,
    pub(crate) figure: String,
    pub(crate) measured: f64,
    pub(crate) unit: &'static str,
    pub(crate) target: f64,
    pub(crate) scale: Scale,
}

/// The rows and the per-scenario details of one run.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) details: serde_json::Map<String, Value>,
    /// The absolute targets met or missed so far (see scaled.rs).
    pub(crate) absolute: Vec<Absolute>,
}

impl Report {
    /// A measured figure; `target` is its text and whether it was met.
    pub(crate) fn row(
        &mut self,
        scenario: &str,
        figure: &str,
        measured: f64,
        unit: &'static str,
        target: Option<(&str, bool)>,
    ) {
        self.rows.push(Row {
            scenario: scenario.to_string(),
            figure: figure.to_string(),
            measured: Some(measured),
            unit,
            target: target.map(|(t, _)| t.to_string()),
            met: target.map(|(_, m)| m),
            skipped: None,
        });
    }

    /// A target that could not be measured here, and why.
    pub(crate) fn not_run(&mut self, scenario: &str, figure: &str, target: &str, why: &str) {
        self.rows.push(Row {
            scenario: scenario.to_string(),
            figure: figure.to_string(),
            measured: None,
            unit: "",
            target: Some(target.to_string()),
            met: None,
            skipped: Some(why.to_string()),
        });
    }

    /// The table: a header line (`heading`), then one line per row.
    pub(crate) fn table(&self, heading: &str) -> String {
        let mut t = format!("{heading}\n");
        t.push_str(&format!(
            "{:<11} {:<46} {:>14}  {:<22} {}\n",
            "scenario", "figure", "measured", "target", "met?"
        ));
        for r in &self.rows {
            let v = match r.measured {
                None => "NOT RUN".to_string(),
                Some(m) if m.abs() >= 1000.0 || m == m.trunc() => format!("{m:.0} {}", r.unit),
                Some(m) if m.abs() >= 10.0 => format!("{m:.1} {}", r.unit),
                Some(m) => format!("{m:.3} {}", r.unit),
            };
            let met = match (r.met, &r.skipped) {
                (_, Some(why)) => why.as_str(),
                (Some(true), _) => "yes",
                (Some(false), _) => "NO",
                (None, _) => "",
            };
            let line = format!(
                "{:<11} {:<46} {:>14}  {:<22} {}",
                r.scenario,
                r.figure,
                v,
                r.target.as_deref().unwrap_or(""),
                met
            );
            t.push_str(line.trim_end());
            t.push('\n');
        }
        t
    }
}

/// The median of `values` (the upper one of an even count); 0 when empty.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `150000.0` as "150,000".
pub(crate) fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_met_missed_and_not_run() {
        let mut r = Report::default();
        r.row("burst", "ratio to limit", 0.75, "x", Some((">= 0.7", true)));
        r.row(
            "steady",
            "lateness p99",
            0.025,
            "s",
            Some(("<= 10 ms", false)),
        );
        r.not_run(
            "pg-burst",
            "committed refreshes per second",
            ">= 15,000/s",
            "skipped: no PostgreSQL",
        );
        let t = r.table("head");
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[2].ends_with("yes") && lines[2].contains("0.750 x"),
            "{t}"
        );
        assert!(lines[3].ends_with("NO"), "{t}");
        assert!(
            lines[4].contains("NOT RUN") && lines[4].ends_with("skipped: no PostgreSQL"),
            "{t}"
        );
    }

    #[test]
    fn median_takes_the_middle_value() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(150_000.0), "150,000");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
    }
}

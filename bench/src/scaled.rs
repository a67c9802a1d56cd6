//! Absolute targets read against this machine: issue 15 set its rates and CPU shares on a
//! machine whose bare limit was `ISSUE_LIMIT` refreshes per second. This run's own limit
//! says how much faster or slower this machine is, and the same target moves with it. The
//! targets as written stay in the table; these rows come after them, never instead.

use crate::report::{Absolute, Report, Scale, thousands};

/// The bare limit (`refreshd-bench limit`, median) on the machine the issue's targets were
/// set on.
pub(crate) const ISSUE_LIMIT: f64 = 57_000.0;

/// The target as it reads on a machine `speed` times as fast as the issue's.
pub(crate) fn scaled_target(target: f64, scale: Scale, speed: f64) -> f64 {
    match scale {
        Scale::Rate => target * speed,
        Scale::CpuShare => target / speed,
    }
}

/// Whether `measured` meets `target` read as `scale` says.
fn meets(measured: f64, target: f64, scale: Scale) -> bool {
    match scale {
        Scale::Rate => measured >= target,
        Scale::CpuShare => measured <= target,
    }
}

impl Report {
    /// The rows of every absolute target recorded so far, scaled by this run's bare
    /// `limit`, after a row that states the machine's speed. Nothing without a limit.
    pub(crate) fn scale_to(&mut self, limit: Option<f64>) {
        let Some(limit) = limit.filter(|l| *l > 0.0) else {
            return;
        };
        if self.absolute.is_empty() {
            return;
        }
        let speed = limit / ISSUE_LIMIT;
        let figure = format!("speed: limit / the issue's {}/s", thousands(ISSUE_LIMIT));
        self.row("machine", &figure, speed, "x", None);
        let absolute = std::mem::take(&mut self.absolute);
        for a in &absolute {
            let target = scaled_target(a.target, a.scale, speed);
            let text = match a.scale {
                Scale::Rate => format!(">= {}/s scaled", thousands(target)),
                Scale::CpuShare => format!("<= {target:.2}{} scaled", a.unit),
            };
            let figure = format!("{}, target scaled", a.figure);
            let met = meets(a.measured, target, a.scale);
            self.row(&a.scenario, &figure, a.measured, a.unit, Some((&text, met)));
        }
        self.absolute = absolute;
    }

    /// A measured figure against an absolute target of the issue (`text` as written);
    /// `scale_to` adds its scaled row at the end.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn absolute_row(
        &mut self,
        scenario: &str,
        figure: &str,
        measured: f64,
        unit: &'static str,
        text: &str,
        target: f64,
        scale: Scale,
    ) {
        self.row(
            scenario,
            figure,
            measured,
            unit,
            Some((text, meets(measured, target, scale))),
        );
        self.absolute.push(Absolute {
            scenario: scenario.to_string(),
            figure: figure.to_string(),
            measured,
            unit,
            target,
            scale,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slower_machine_lowers_rates_and_raises_cpu_shares() {
        assert_eq!(scaled_target(150_000.0, Scale::Rate, 0.5), 75_000.0);
        assert_eq!(scaled_target(1.0, Scale::CpuShare, 0.5), 2.0);
    }

    #[test]
    fn scaled_rows_follow_the_written_ones_and_judge_against_the_scaled_target() {
        let mut r = Report::default();
        let rate = Scale::Rate;
        r.absolute_row(
            "seed",
            "import",
            60_000.0,
            "/s",
            ">= 150,000/s",
            150_000.0,
            rate,
        );
        let share = Scale::CpuShare;
        r.absolute_row("realistic", "daemon CPU", 2.0, "%", "<= 1%", 1.0, share);
        r.scale_to(Some(ISSUE_LIMIT * 0.3));
        let rows: Vec<_> = r.rows.iter().map(|x| (x.figure.as_str(), x.met)).collect();
        assert_eq!(
            rows,
            [
                ("import", Some(false)),
                ("daemon CPU", Some(false)),
                ("speed: limit / the issue's 57,000/s", None),
                ("import, target scaled", Some(true)),
                ("daemon CPU, target scaled", Some(true)),
            ]
        );
        assert_eq!(r.rows[3].target.as_deref(), Some(">= 45,000/s scaled"));
        assert_eq!(r.rows[4].target.as_deref(), Some("<= 3.33% scaled"));
    }

    #[test]
    fn without_a_limit_nothing_is_scaled() {
        let mut r = Report::default();
        r.absolute_row("seed", "import", 1.0, "/s", ">= 2/s", 2.0, Scale::Rate);
        r.scale_to(None);
        assert_eq!(r.rows.len(), 1);
    }
}

//! The plots the benchmark draws of its own figures, as SVG (plotters' SVG backend: text is
//! left to the viewer's fonts, nothing to install): throughput and CPU per refresh across
//! concurrency, limit beside burst in each round, the lateness distribution, ready time and
//! RSS against accounts, SQLite beside PostgreSQL. Each is drawn when its scenario ran.

use crate::histogram::per_bucket;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const LIMIT: RGBColor = RGBColor(0x4c, 0x72, 0xb0);
const BURST: RGBColor = RGBColor(0xdd, 0x84, 0x52);
const TARGET: RGBColor = RGBColor(0xc4, 0x4e, 0x52);
const SIZE: (u32, u32) = (760, 420);

/// A limit and a burst at one refresh.concurrency.
pub(crate) struct ConcurrencyPoint {
    pub(crate) concurrency: usize,
    pub(crate) limit_rate: f64,
    pub(crate) burst_rate: f64,
    /// CPU per refresh, µs: the bare client's, the daemon's.
    pub(crate) client_us: f64,
    pub(crate) daemon_us: f64,
}

/// Start-up at one store size.
pub(crate) struct ScalePoint {
    pub(crate) accounts: usize,
    pub(crate) ready_secs: f64,
    pub(crate) rss_mib: f64,
}

/// One backend's import and burst rates.
#[derive(Default)]
pub(crate) struct BackendRates {
    pub(crate) name: &'static str,
    pub(crate) import_rate: Option<f64>,
    pub(crate) burst_rate: Option<f64>,
}

/// What the scenarios measured that the plots show.
#[derive(Default)]
pub(crate) struct PlotData {
    pub(crate) concurrency: Vec<ConcurrencyPoint>,
    /// (limit, burst) of each round.
    pub(crate) rounds: Vec<(f64, f64)>,
    /// Cumulative lateness buckets of steady: (upper bound, count).
    pub(crate) lateness: Vec<(f64, f64)>,
    pub(crate) scale: Vec<ScalePoint>,
    pub(crate) backends: Vec<BackendRates>,
}

/// A named line of points.
struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

impl PlotData {
    /// The rates of `name`'s backend, added on first use.
    pub(crate) fn backend(&mut self, name: &'static str) -> &mut BackendRates {
        if let Some(i) = self.backends.iter().position(|b| b.name == name) {
            return &mut self.backends[i];
        }
        self.backends.push(BackendRates {
            name,
            ..Default::default()
        });
        self.backends.last_mut().expect("just pushed")
    }

    /// Draws every plot there is data for into `dir`; returns the files written. `label`
    /// (accounts, build, machine, load) goes under each title, so a plot says how it was
    /// measured.
    pub(crate) fn write(&self, dir: &Path, label: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the plots directory {}", dir.display()))?;
        let mut written = Vec::new();
        let mut draw = |name: &str, f: &dyn Fn(&Area) -> Result<()>| -> Result<()> {
            let path = dir.join(name);
            {
                let root = SVGBackend::new(&path, SIZE).into_drawing_area();
                root.fill(&WHITE)?;
                let (body, foot) = root.split_vertically(SIZE.1 - 18);
                foot.draw_text(
                    label,
                    &("sans-serif", 11).into_font().color(&BLACK.mix(0.6)),
                    (8, 2),
                )?;
                f(&body)?;
                root.present()?;
            }
            written.push(path);
            Ok(())
        };
        if !self.concurrency.is_empty() {
            let pts = |f: fn(&ConcurrencyPoint) -> f64| -> Vec<(f64, f64)> {
                self.concurrency
                    .iter()
                    .map(|p| (p.concurrency as f64, f(p)))
                    .collect()
            };
            draw("throughput.svg", &|a| {
                line_chart(
                    a,
                    "Refreshes per second across refresh.concurrency",
                    ("refresh.concurrency", "refreshes/s"),
                    &[
                        Series {
                            name: "limit (no store)",
                            color: LIMIT,
                            points: pts(|p| p.limit_rate),
                        },
                        Series {
                            name: "burst (committed)",
                            color: BURST,
                            points: pts(|p| p.burst_rate),
                        },
                    ],
                    None,
                )
            })?;
            draw("cpu-per-refresh.svg", &|a| {
                line_chart(
                    a,
                    "CPU per refresh across refresh.concurrency",
                    ("refresh.concurrency", "µs of CPU per refresh"),
                    &[
                        Series {
                            name: "bare client (limit)",
                            color: LIMIT,
                            points: pts(|p| p.client_us),
                        },
                        Series {
                            name: "daemon (burst)",
                            color: BURST,
                            points: pts(|p| p.daemon_us),
                        },
                    ],
                    Some((25.0, "target 25 µs")),
                )
            })?;
        }
        if !self.rounds.is_empty() {
            let bars: Vec<(String, f64, RGBColor)> = self
                .rounds
                .iter()
                .enumerate()
                .flat_map(|(i, &(l, b))| {
                    [
                        (format!("limit {}", i + 1), l, LIMIT),
                        (format!("burst {}", i + 1), b, BURST),
                    ]
                })
                .collect();
            draw("rounds.svg", &|a| {
                bar_chart(
                    a,
                    "Limit beside burst, round by round",
                    "refreshes/s",
                    &bars,
                    None,
                )
            })?;
        }
        if !self.lateness.is_empty() {
            let total = self.lateness.last().map(|b| b.1).unwrap_or(0.0).max(1.0);
            let bars: Vec<(String, f64, RGBColor)> = per_bucket(&self.lateness)
                .into_iter()
                .map(|(le, n)| (bound(le), n / total * 100.0, LIMIT))
                .collect();
            draw("lateness.svg", &|a| {
                bar_chart(
                    a,
                    "Schedule lateness at 300 due per second (bucket upper bounds)",
                    "% of refreshes",
                    &bars,
                    None,
                )
            })?;
        }
        if !self.scale.is_empty() {
            let pts = |f: fn(&ScalePoint) -> f64| -> Vec<(f64, f64)> {
                self.scale
                    .iter()
                    .map(|p| (p.accounts as f64, f(p)))
                    .collect()
            };
            draw("scale.svg", &|a| {
                let (left, right) = a.split_horizontally(SIZE.0 / 2);
                line_chart(
                    &left,
                    "Spawn to ready",
                    ("accounts", "seconds"),
                    &[Series {
                        name: "ready",
                        color: LIMIT,
                        points: pts(|p| p.ready_secs),
                    }],
                    Some((0.1, "target 0.1 s")),
                )?;
                line_chart(
                    &right,
                    "Peak RSS at ready",
                    ("accounts", "MiB"),
                    &[Series {
                        name: "RSS",
                        color: BURST,
                        points: pts(|p| p.rss_mib),
                    }],
                    Some((32.0, "target 32 MiB")),
                )
            })?;
        }
        if !self.backends.is_empty() {
            let rates = |f: fn(&BackendRates) -> Option<f64>| -> Vec<(String, f64, RGBColor)> {
                self.backends
                    .iter()
                    .zip([LIMIT, BURST])
                    .filter_map(|(b, c)| f(b).map(|v| (b.name.to_string(), v, c)))
                    .collect()
            };
            draw("backends.svg", &|a| {
                let (left, right) = a.split_horizontally(SIZE.0 / 2);
                bar_chart(
                    &left,
                    "accounts import",
                    "accounts/s",
                    &rates(|b| b.import_rate),
                    None,
                )?;
                bar_chart(
                    &right,
                    "burst",
                    "committed refreshes/s",
                    &rates(|b| b.burst_rate),
                    None,
                )
            })?;
        }
        Ok(written)
    }
}

/// A histogram bound as a short label: 0.001 as "1ms", 2.5 as "2.5s".
fn bound(le: f64) -> String {
    if le.is_infinite() {
        "more".into()
    } else if le < 1.0 {
        format!("{}ms", (le * 1000.0 * 1000.0).round() / 1000.0)
    } else {
        format!("{le}s")
    }
}

/// Lines over a logarithmic x axis (concurrency, accounts), with an optional target line.
fn line_chart(
    area: &Area,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
    target: Option<(f64, &str)>,
) -> Result<()> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (x_min, x_max) = all.clone().fold((f64::MAX, 0.0_f64), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let y_max = all
        .map(|p| p.1)
        .chain(target.map(|t| t.0))
        .fold(0.0_f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x_min / 1.5..x_max * 1.5).log_scale(),
            0.0..y_max * 1.15 + 1e-9,
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if let Some((y, name)) = target {
        chart
            .draw_series(LineSeries::new(
                [(x_min / 1.5, y), (x_max * 1.5, y)],
                TARGET.stroke_width(1),
            ))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], TARGET));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// One bar per (label, value, colour), with an optional target line.
fn bar_chart(
    area: &Area,
    title: &str,
    y_desc: &str,
    bars: &[(String, f64, RGBColor)],
    target: Option<f64>,
) -> Result<()> {
    let y_max = bars
        .iter()
        .map(|b| b.1)
        .chain(target)
        .fold(0.0_f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (0..bars.len().max(1)).into_segmented(),
            0.0..y_max * 1.15 + 1e-9,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| {
            let i = match v {
                SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => *i,
                SegmentValue::Last => return String::new(),
            };
            bars.get(i).map(|b| b.0.clone()).unwrap_or_default()
        })
        .draw()?;
    chart.draw_series(
        Histogram::vertical(&chart)
            .margin(6)
            .style_func(|v, _| {
                let i = match v {
                    SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => *i,
                    SegmentValue::Last => 0,
                };
                bars.get(i).map(|b| b.2).unwrap_or(LIMIT).filled()
            })
            .data(bars.iter().enumerate().map(|(i, b)| (i, b.1))),
    )?;
    if let Some(y) = target {
        chart.draw_series(LineSeries::new(
            [(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
            TARGET.stroke_width(1),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_read_as_milliseconds_below_a_second() {
        assert_eq!(bound(0.001), "1ms");
        assert_eq!(bound(0.025), "25ms");
        assert_eq!(bound(2.5), "2.5s");
        assert_eq!(bound(f64::INFINITY), "more");
    }

    #[test]
    fn every_plot_is_written_as_svg() {
        let dir = tempfile_dir();
        let mut d = PlotData {
            concurrency: [16, 128]
                .map(|c| ConcurrencyPoint {
                    concurrency: c,
                    limit_rate: 1000.0 * c as f64,
                    burst_rate: 500.0 * c as f64,
                    client_us: 16.0,
                    daemon_us: 40.0,
                })
                .into(),
            ..Default::default()
        };
        d.rounds = vec![(50_000.0, 20_000.0)];
        d.lateness = vec![(0.001, 10.0), (0.01, 90.0), (f64::INFINITY, 100.0)];
        d.scale = vec![ScalePoint {
            accounts: 10_000,
            ready_secs: 0.05,
            rss_mib: 20.0,
        }];
        d.backend("SQLite").burst_rate = Some(20_000.0);
        d.backend("PostgreSQL").import_rate = Some(9_000.0);
        let files = d.write(&dir, "test data").unwrap();
        assert_eq!(files.len(), 6);
        for f in files {
            let svg = std::fs::read_to_string(&f).unwrap();
            assert!(
                svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{}",
                f.display()
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        std::env::temp_dir().join(format!("refreshd-bench-plots-{}", std::process::id()))
    }
}

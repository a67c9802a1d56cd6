//! The daemon's schedule-lateness histogram as /metrics serves it, and what may be read from
//! it: quantiles as bucket bounds, counts per bucket for the plot.

/// The cumulative buckets of `refreshd_schedule_lateness_seconds`: (upper bound, count).
pub(crate) fn lateness_histogram(metrics: &str) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("refreshd_schedule_lateness_seconds_bucket{le=\"")
        else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"}") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count = count.trim().parse().unwrap_or(0.0);
        out.push((le, count));
    }
    out
}

/// The upper bound of the bucket holding quantile `q`: the histogram cannot say more
/// (interpolating inside a bucket would invent precision). Infinite past the last bound.
pub(crate) fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return 0.0;
    }
    let rank = q * total;
    buckets
        .iter()
        .find(|&&(_, count)| count >= rank)
        .map(|&(le, _)| le)
        .unwrap_or(f64::INFINITY)
}

/// Refreshes in each bucket alone (not cumulative), for the distribution plot.
pub(crate) fn per_bucket(buckets: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut below = 0.0;
    buckets
        .iter()
        .map(|&(le, count)| {
            let n = count - below;
            below = count;
            (le, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "refreshd_schedule_lateness_seconds_bucket{le=\"0.001\"} 10\n\
        refreshd_schedule_lateness_seconds_bucket{le=\"0.01\"} 98\n\
        refreshd_schedule_lateness_seconds_bucket{le=\"0.1\"} 100\n\
        refreshd_schedule_lateness_seconds_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn quantiles_are_the_bound_of_their_bucket() {
        let h = lateness_histogram(SCRAPE);
        assert_eq!(h.len(), 4);
        assert_eq!(quantile(&h, 0.05), 0.001);
        assert_eq!(quantile(&h, 0.5), 0.01);
        assert_eq!(quantile(&h, 0.99), 0.1);
        assert_eq!(quantile(&[], 0.99), 0.0);
    }

    #[test]
    fn per_bucket_counts_undo_the_cumulation() {
        let counts: Vec<f64> = per_bucket(&lateness_histogram(SCRAPE))
            .iter()
            .map(|b| b.1)
            .collect();
        assert_eq!(counts, [10.0, 88.0, 2.0, 0.0]);
    }
}

//! Continuous per-vCPU dirty rates from the harvested counts, updated on every reap: what
//! progress lines, `x-query-vcpu-counters`, `query-vcpu-dirty-limit`'s current rate and the
//! limiter's series show.
//!
//! The dirty-limit controller does not decide from these: it charges the exact harvested
//! counts against each vCPU's quota at its own cadence (an estimate's error would become the
//! limit's error), and shows the rates from here like everyone else.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::units::pages_to_mibps;

/// Time constant of the smoothed estimate.
const SMOOTHING_TAU: Duration = Duration::from_millis(250);
/// Reaps closer together than this are folded into the next update: a rate over a few
/// hundred microseconds is mostly noise.
const MIN_ESTIMATE_INTERVAL: Duration = Duration::from_millis(5);

/// The trailing window of [`RateEstimate::trailing_mibps`].
pub const TRAILING_WINDOW: Duration = Duration::from_secs(1);

/// A vCPU's dirty rate as the tracker sees it: entries harvested per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RateEstimate {
    /// Over the last interval between updates, MiB/s.
    pub last_mibps: f64,
    /// Exponentially smoothed (time constant 250 ms), MiB/s.
    pub smoothed_mibps: f64,
    /// Over the last second (the reference controller's period), MiB/s.
    pub trailing_mibps: f64,
}

/// Continuous per-vCPU rate estimates from harvested counts, updated on every reap.
#[derive(Debug)]
pub struct RateEstimator {
    /// The counts at each update of the last [`TRAILING_WINDOW`], oldest first; the newest
    /// is the last update.
    history: VecDeque<(Instant, Vec<u64>)>,
    estimates: Vec<RateEstimate>,
}

impl RateEstimator {
    /// Estimates for `vcpus` vCPUs, all zero.
    pub fn new(vcpus: usize) -> RateEstimator {
        RateEstimator {
            history: VecDeque::from([(Instant::now(), vec![0; vcpus])]),
            estimates: vec![RateEstimate::default(); vcpus],
        }
    }

    /// Folds in the harvested counts (cumulative, per vCPU) seen at `now`.
    pub fn update(&mut self, now: Instant, counts: impl IntoIterator<Item = u64>) {
        let (at, last) = self.history.back().expect("never empty");
        let dt = now.saturating_duration_since(*at);
        if dt < MIN_ESTIMATE_INTERVAL {
            return;
        }
        let counts: Vec<u64> = counts.into_iter().collect();
        let secs = dt.as_secs_f64();
        let alpha = 1.0 - (-secs / SMOOTHING_TAU.as_secs_f64()).exp();
        for ((estimate, &count), &before) in self.estimates.iter_mut().zip(&counts).zip(last) {
            estimate.last_mibps = pages_to_mibps(count.saturating_sub(before), secs);
            estimate.smoothed_mibps += alpha * (estimate.last_mibps - estimate.smoothed_mibps);
        }
        while self
            .history
            .get(1)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= TRAILING_WINDOW)
        {
            self.history.pop_front();
        }
        let (oldest_at, oldest) = self.history.front().expect("never empty");
        let span = now.saturating_duration_since(*oldest_at).as_secs_f64();
        for ((estimate, &count), &before) in self.estimates.iter_mut().zip(&counts).zip(oldest) {
            estimate.trailing_mibps = pages_to_mibps(count.saturating_sub(before), span);
        }
        self.history.push_back((now, counts));
    }

    /// The estimates, by vCPU id.
    pub fn estimates(&self) -> &[RateEstimate] {
        &self.estimates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_the_harvested_counts() {
        let t0 = Instant::now();
        let mut estimator = RateEstimator::new(2);
        estimator.history[0].0 = t0;
        // 2560 pages in 100 ms = 100 MiB/s for vCPU 0; nothing for vCPU 1.
        estimator.update(t0 + Duration::from_millis(100), [2560, 0]);
        let e = estimator.estimates()[0];
        assert!((e.last_mibps - 100.0).abs() < 1e-9);
        let alpha = 1.0 - (-0.1f64 / 0.25).exp();
        assert!((e.smoothed_mibps - 100.0 * alpha).abs() < 1e-9);
        assert_eq!(estimator.estimates()[1], RateEstimate::default());
        // Too soon: folded into the next update.
        estimator.update(t0 + Duration::from_millis(101), [9999, 0]);
        assert!((estimator.estimates()[0].last_mibps - 100.0).abs() < 1e-9);
        // A steady rate converges.
        for i in 2..40 {
            estimator.update(t0 + Duration::from_millis(100 * i), [2560 * i, 0]);
        }
        assert!((estimator.estimates()[0].smoothed_mibps - 100.0).abs() < 0.1);
        assert!((estimator.estimates()[0].trailing_mibps - 100.0).abs() < 1e-9);
        // The trailing rate looks one second back: half a second at 300 MiB/s after it.
        for i in 40..45 {
            estimator.update(
                t0 + Duration::from_millis(100 * i),
                [2560 * 39 + 7680 * (i - 39), 0],
            );
        }
        let trailing = estimator.estimates()[0].trailing_mibps;
        assert!((trailing - 200.0).abs() < 1e-9, "{trailing}");
    }
}

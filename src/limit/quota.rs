//! dirtyvm's dirty-limit algorithm: a per-vCPU quota of dirty pages, refilled at the limit,
//! charged with every page harvested from the vCPU's ring, and enforced by kicking the vCPU
//! out of the guest just before the quota runs out.
//!
//! Each step (the controller reaps first, so the counts are exact up to now):
//!
//! 1. `tokens += limit × elapsed − dirtied`, capped at `limit × 100 ms`: a vCPU cannot save
//!    up for a long burst, yet a sleep that ends a little late loses it nothing; a vCPU that
//!    only reads keeps a full quota and is never stopped.
//! 2. The vCPU's dirty rate while running (`run_rate`, pages per second of running time) and
//!    the kick-to-exit latency are tracked, so the controller can project the quota *at the
//!    moment the vCPU would actually stop* if kicked now: `tokens − (run_rate − limit) × latency`.
//! 3. Projected quota exhausted: kick it, and let it sleep until the quota is refilled to
//!    `R = limit × 25 ms`: for `(R − projected) / limit`. Otherwise: look again when the
//!    projection says it will be exhausted, at most 20 ms on.
//! 4. While it sleeps, re-time the sleep from the pages it actually dirtied (what it dirtied
//!    between the kick and its exit arrives with the next reaps): it wakes when its quota,
//!    as counted, is back to `R`, looked at again at least every 20 ms.
//!
//! The projections only decide when to kick and how long to sleep at first; within 20 ms the
//! sleep follows the pages counted, so a misjudged rate or latency can make a burst longer
//! but never a sleep: an estimate that only updates while the vCPU runs cannot keep it
//! asleep. The accounting is exact: overshoot is debt that lengthens the sleep, so the
//! long-run rate is the limit, and the bursts stay about `R` long, so even a 1 s window sees
//! some 40 of them. Nothing here waits for a ring-full exit: ring size and reaper cadence do
//! not enter.

use super::{Decision, Usage, MAX_RECHECK};

/// The quota refill a sleep restores, in seconds of the limit.
const REFILL: f64 = 0.025;
/// The most quota a vCPU can hold, in seconds of the limit: room for a sleep that ends late
/// (the vCPU thread must be scheduled again), not for saving up a burst.
const CAP: f64 = 0.1;
/// How fast the run-rate estimate follows a new sample: full weight after this much running.
const RUN_RATE_HORIZON: f64 = 0.05;
/// Until the vCPU has run, look again this soon.
const FIRST_RECHECK: f64 = 0.002;
/// The shortest sleep a kick imposes.
const MIN_SLEEP: f64 = 0.001;

/// One vCPU's quota.
#[derive(Debug, Clone)]
pub struct Quota {
    /// The limit, pages per second.
    limit: f64,
    /// Pages the vCPU may still dirty; negative is debt.
    tokens: f64,
    /// Dirty rate while running, pages per second; `None` until the vCPU has run.
    run_rate: Option<f64>,
}

impl Quota {
    /// A quota for `limit` pages per second, starting full.
    pub fn new(limit: f64) -> Quota {
        Quota {
            limit,
            tokens: limit * REFILL,
            run_rate: None,
        }
    }

    /// Changes the limit, keeping the vCPU's debt or credit.
    pub fn set_limit(&mut self, limit: f64) {
        self.limit = limit;
        self.tokens = self.tokens.min(self.cap());
    }

    fn cap(&self) -> f64 {
        self.limit * CAP
    }

    fn refill(&self) -> f64 {
        self.limit * REFILL
    }

    /// Folds in usage since the last step and decides; `asleep_for` is what remains of a
    /// penalty the vCPU is serving, `latency` the expected kick-to-exit delay (seconds).
    pub fn step(&mut self, usage: Usage, asleep_for: f64, latency: f64) -> Decision {
        self.tokens = (self.tokens + self.limit * usage.elapsed - usage.dirtied).min(self.cap());
        if usage.ran > 0.0 {
            let sample = usage.dirtied / usage.ran;
            // The first sample is all there is to go on, however short.
            let weight = (usage.ran / RUN_RATE_HORIZON).min(1.0);
            let rate = self.run_rate.map_or(sample, |r| r + weight * (sample - r));
            self.run_rate = Some(rate);
        }
        if asleep_for > 0.0 {
            // The sleep ends when the quota, counted from the pages actually dirtied, is back
            // to R; pages dirtied before the vCPU stopped may still be arriving.
            let left = ((self.refill() - self.tokens) / self.limit).max(0.0);
            return Decision::Resleep {
                left,
                recheck_in: left.min(MAX_RECHECK),
            };
        }
        let Some(run_rate) = self.run_rate else {
            return Decision::Run {
                recheck_in: FIRST_RECHECK,
            };
        };
        let net = run_rate - self.limit;
        let projected = self.tokens - net.max(0.0) * latency;
        if projected <= 0.0 {
            // Provisional: the next step re-times it from the pages actually dirtied.
            let sleep = (self.refill() - projected) / self.limit;
            return Decision::Sleep(sleep.max(MIN_SLEEP));
        }
        let recheck_in = if net > 0.0 {
            (projected / net).min(MAX_RECHECK)
        } else {
            MAX_RECHECK
        };
        Decision::Run { recheck_in }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 256.0; // pages

    /// Simulates the controller and a vCPU dirtying `rate` pages/s while running, which
    /// stops `latency` s after each kick, for `seconds`; returns the pages dirtied.
    fn simulate(limit: f64, rate: f64, latency: f64, seconds: f64) -> f64 {
        simulate_with_latency_estimate(limit, rate, latency, latency, 0.0..seconds)
    }

    /// [`simulate`] with the controller believing the latency is `estimate`; counts the
    /// pages dirtied in `counted` only.
    fn simulate_with_latency_estimate(
        limit: f64,
        rate: f64,
        latency: f64,
        estimate: f64,
        counted: std::ops::Range<f64>,
    ) -> f64 {
        let mut quota = Quota::new(limit);
        let dt = 1e-5;
        let (mut t, mut total, mut next_step) = (0.0, 0.0, 0.0);
        // The vCPU is asleep in [stop_at, wake_at).
        let (mut stop_at, mut wake_at) = (f64::INFINITY, 0.0);
        let mut usage = Usage::default();
        while t < counted.end {
            if !(stop_at..wake_at).contains(&t) {
                usage.dirtied += rate * dt;
                usage.ran += dt;
                if counted.contains(&t) {
                    total += rate * dt;
                }
            }
            usage.elapsed += dt;
            t += dt;
            if t >= next_step {
                match quota.step(usage, (wake_at - t).max(0.0), estimate) {
                    Decision::Sleep(s) => {
                        (stop_at, wake_at) = (t + latency, t + s);
                        next_step = t + s.min(MAX_RECHECK);
                    }
                    Decision::Resleep { left, recheck_in } => {
                        wake_at = t + left;
                        next_step = t + recheck_in;
                    }
                    Decision::Run { recheck_in } => next_step = t + recheck_in,
                }
                usage = Usage::default();
            }
        }
        total
    }

    #[test]
    fn long_run_rate_is_the_limit() {
        for (limit_mib, rate_mib, latency) in [
            (16.0, 2048.0, 1e-4),
            (64.0, 700.0, 5e-4),
            (256.0, 2048.0, 2e-3),
            (16.0, 500.0, 0.0),
        ] {
            let dirtied = simulate(limit_mib * MIB, rate_mib * MIB, latency, 5.0);
            let achieved = dirtied / MIB / 5.0;
            assert!(
                (achieved - limit_mib).abs() / limit_mib < 0.03,
                "limit {limit_mib} MiB/s at {rate_mib} MiB/s: got {achieved:.2}"
            );
        }
    }

    #[test]
    fn a_vcpu_under_its_limit_is_never_stopped() {
        let mut quota = Quota::new(64.0 * MIB);
        for _ in 0..1000 {
            let usage = Usage {
                elapsed: 0.01,
                ran: 0.01,
                dirtied: 0.01 * 32.0 * MIB,
            };
            assert!(matches!(quota.step(usage, 0.0, 1e-4), Decision::Run { .. }));
        }
        // A reader dirties nothing at all.
        let mut reader = Quota::new(MIB);
        let idle = Usage {
            elapsed: 0.02,
            ran: 0.02,
            dirtied: 0.0,
        };
        assert!(matches!(reader.step(idle, 0.0, 1e-3), Decision::Run { .. }));
    }

    #[test]
    fn a_misjudged_latency_never_lengthens_a_sleep() {
        // 1 MiB/s, a writer at 150 000 pages/s, and a latency estimate gone wrong (50 ms,
        // as a kick that found the vCPU already asleep once measured it): the projection
        // says 7500 pages of overshoot, but the sleep is only what the pages actually
        // dirtied call for.
        let mut quota = Quota::new(MIB);
        let burst = Usage {
            elapsed: 0.0001,
            ran: 0.0001,
            dirtied: 15.0,
        };
        assert!(matches!(quota.step(burst, 0.0, 0.05), Decision::Sleep(_)));
        // The vCPU stopped 0.1 ms after the kick, having dirtied 15 more pages: the sleep
        // is re-timed to what 30 pages call for at 1 MiB/s, about 0.1 s.
        let stopped = Usage {
            elapsed: 0.0002,
            ran: 0.0001,
            dirtied: 15.0,
        };
        match quota.step(stopped, 29.0, 0.05) {
            Decision::Resleep { left, recheck_in } => {
                assert!(left < 0.15, "slept {left} s more for 30 pages at 1 MiB/s");
                assert!(recheck_in <= left);
            }
            other => panic!("{other:?}"),
        }
        // Whatever the estimates say, sleeps that follow the pages stay bounded: the long-run
        // rate is the limit, not zero.
        // (The first seconds pay for the burst before the run rate is known.)
        let dirtied = simulate_with_latency_estimate(MIB, 150_000.0, 1e-4, 0.05, 3.0..13.0);
        let achieved = dirtied / MIB / 10.0;
        assert!(
            (achieved - 1.0).abs() < 0.1,
            "1 MiB/s limit with a 50 ms latency estimate: got {achieved:.3} MiB/s"
        );
    }

    #[test]
    fn debt_is_paid_with_a_sleep_to_a_full_refill() {
        let mut quota = Quota::new(1000.0);
        // 25 pages of quota, 125 dirtied: 100 pages of debt; sleep until 25 again: 0.125 s.
        let usage = Usage {
            elapsed: 0.0,
            ran: 0.01,
            dirtied: 125.0,
        };
        match quota.step(usage, 0.0, 0.0) {
            Decision::Sleep(s) => assert!((s - 0.125).abs() < 1e-9, "{s}"),
            other => panic!("{other:?}"),
        }
    }
}

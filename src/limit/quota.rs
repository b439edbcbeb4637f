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
//! 3. Projected quota exhausted: sleep until it is refilled to `R = limit × 25 ms`, i.e. for
//!    `(R − projected) / limit`. Otherwise: look again when it will be, at most 20 ms on.
//!
//! The accounting is exact whatever the projections: overshoot (a late kick, a misjudged
//! rate) is debt that lengthens the next sleep, so the long-run rate is the limit, and the
//! bursts stay about `R` long, so even a 1 s window sees some 40 of them. Nothing here waits
//! for a ring-full exit: ring size and reaper cadence do not enter.

use super::{Decision, Usage, MAX_RECHECK};

/// The quota refill a sleep restores, in seconds of the limit.
const REFILL: f64 = 0.025;
/// The most quota a vCPU can hold, in seconds of the limit: room for a sleep that ends late
/// (the vCPU thread must be scheduled again), not for saving up a burst.
const CAP: f64 = 0.1;
/// How fast the run-rate estimate follows a new sample: full weight after this much running.
const RUN_RATE_HORIZON: f64 = 0.05;
/// While the run rate is unknown, look again this soon.
const FIRST_RECHECK: f64 = 0.002;

/// One vCPU's quota.
#[derive(Debug, Clone)]
pub struct Quota {
    /// The limit, pages per second.
    limit: f64,
    /// Pages the vCPU may still dirty; negative is debt.
    tokens: f64,
    /// Dirty rate while running, pages per second (0 until measured).
    run_rate: f64,
}

impl Quota {
    /// A quota for `limit` pages per second, starting full.
    pub fn new(limit: f64) -> Quota {
        Quota {
            limit,
            tokens: limit * REFILL,
            run_rate: 0.0,
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
            let weight = (usage.ran / RUN_RATE_HORIZON).min(1.0);
            self.run_rate += weight * (usage.dirtied / usage.ran - self.run_rate);
        }
        if asleep_for > 0.0 {
            return Decision::Run {
                recheck_in: asleep_for,
            };
        }
        let net = self.run_rate - self.limit;
        let projected = self.tokens - net.max(0.0) * latency;
        if projected <= 0.0 {
            return Decision::Sleep((self.refill() - projected) / self.limit);
        }
        let recheck_in = if self.run_rate == 0.0 {
            FIRST_RECHECK
        } else if net > 0.0 {
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
        let mut quota = Quota::new(limit);
        let dt = 1e-5;
        let (mut t, mut total, mut next_step) = (0.0, 0.0, 0.0);
        // The vCPU is asleep in [stop_at, wake_at).
        let (mut stop_at, mut wake_at) = (f64::INFINITY, 0.0);
        let mut usage = Usage::default();
        while t < seconds {
            if !(stop_at..wake_at).contains(&t) {
                usage.dirtied += rate * dt;
                usage.ran += dt;
                total += rate * dt;
            }
            usage.elapsed += dt;
            t += dt;
            if t >= next_step {
                match quota.step(usage, (wake_at - t).max(0.0), latency) {
                    Decision::Sleep(s) => {
                        (stop_at, wake_at) = (t + latency, t + s);
                        next_step = wake_at;
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

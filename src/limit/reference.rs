//! The reference dirty-limit algorithm (QEMU `system/dirtylimit.c`), computed exactly:
//! integer MB/s rates, the 25 MB/s tolerance band, the ring-full time from the full ring size
//! and a process-wide monotonic maximum rate, linear adjustment beyond 50 %, fixed steps of a
//! tenth of the ring-full time otherwise, and the 99 × T cap (docs/reference.md#the-per-vcpu-dirty-limit-qemu-dirtylimit).
//!
//! QEMU applies `throttle_us_per_full` as a sleep after each ring-full exit. Ring-full exits
//! are not a dependable delivery on every host (docs/host.md), so dirtyvm delivers the same
//! penalty through its own kicks: after every `T` µs the vCPU has run, it sleeps
//! `throttle_us_per_full` µs. That is the reference's own model, `q = c × T / (T + throttle)`,
//! so the comparison is between the algorithms, not between delivery mechanisms.
//!
//! Two departures keep a vCPU from being held asleep on a throttle it no longer has, which
//! QEMU 8.2's code does with large rings (`dirtylimit_adjust_throttle`):
//!
//! - QEMU checks the tolerance band (`dirtylimit_done`) before the rule "a vCPU that dirtied
//!   nothing gets throttle 0" (`dirtylimit_set_throttle`), so under a quota of 25 MB/s or less
//!   a vCPU that slept a whole period is "within tolerance" and keeps a throttle of up to
//!   `99 × T`: 42 s of sleep per fill with 65536-entry rings, again and again. Here a period
//!   with nothing dirtied resets the throttle whatever the quota, as the design describes the
//!   algorithm (docs/reference-controller.md).
//! - QEMU's sleep is uninterruptible, so a reset throttle takes effect only after the sleep in
//!   progress. dirtyvm's sleeps are interruptible, and the throttle is re-evaluated every
//!   period whether the vCPU runs or sleeps: a sleep in progress ends at most the new
//!   throttle after the re-evaluation.
//!
//! The algorithm then oscillates, as its model says it should, instead of freezing.

use super::{Decision, DutyCycle, Usage};

/// Measurement period of the reference controller, seconds (`DIRTYLIMIT_CALC_TIME_MS`);
/// during a dirty-limit migration, `x-vcpu-dirty-limit-period` instead.
pub const PERIOD: f64 = 1.0;
/// `DIRTYLIMIT_TOLERANCE_RANGE`, MB/s.
const TOLERANCE: u64 = 25;
/// `DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT`.
const LINEAR_ADJUSTMENT_PCT: u64 = 50;
/// `DIRTYLIMIT_THROTTLE_PCT_MAX`.
const THROTTLE_PCT_MAX: i64 = 99;

/// State shared by every vCPU's reference controller, as QEMU keeps it process-wide.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shared {
    /// `max_dirtyrate`: the highest rate ever measured, MB/s; never reset.
    pub max_rate: u64,
    /// Ring size in MiB (`entries × 4096 >> 20`, integer).
    pub ring_mib: u64,
}

impl Shared {
    /// State for rings of `entries` entries.
    pub fn new(entries: u32) -> Shared {
        Shared {
            max_rate: 0,
            ring_mib: (u64::from(entries) * 4096) >> 20,
        }
    }

    /// `dirtylimit_dirty_ring_full_time`: µs to fill the ring at the highest rate seen,
    /// updating that maximum.
    pub fn ring_full_time_us(&mut self, rate: u64) -> u64 {
        self.max_rate = self.max_rate.max(rate);
        // QEMU divides by max_dirtyrate unguarded; callers pass rate > 0.
        self.ring_mib * 1_000_000 / self.max_rate.max(1)
    }
}

/// `dirtylimit_set_throttle` after `dirtylimit_done`: the new sleep per ring-full, µs. A vCPU
/// that dirtied nothing gets 0 before the tolerance band is looked at (see the module docs).
pub fn adjust_throttle(shared: &mut Shared, throttle_us: i64, quota: u64, current: u64) -> i64 {
    if current == 0 {
        return 0;
    }
    if quota.abs_diff(current) <= TOLERANCE {
        return throttle_us;
    }
    let t = shared.ring_full_time_us(current) as i64;
    let (min, max) = (quota.min(current), quota.max(current));
    let mut throttle = throttle_us;
    if (max - min) * 100 / max > LINEAR_ADJUSTMENT_PCT {
        if quota < current {
            let pct = (current - quota) * 100 / current;
            throttle += (t as f64 * pct as f64 / (100 - pct) as f64) as i64;
        } else {
            let pct = (quota - current) * 100 / quota;
            throttle -= (t as f64 * pct as f64 / (100 - pct) as f64) as i64;
        }
    } else if quota < current {
        throttle += t / 10;
    } else {
        throttle -= t / 10;
    }
    throttle.min(t * THROTTLE_PCT_MAX).max(0)
}

/// One vCPU under the reference controller.
#[derive(Debug, Clone)]
pub struct Reference {
    quota: u64,
    /// The measurement period, seconds.
    period: f64,
    throttle_us: i64,
    ring_full_time_us: u64,
    period_dirtied: f64,
    period_elapsed: f64,
    duty: DutyCycle,
}

impl Reference {
    /// A controller for a limit of `quota` MB/s measuring every `period` seconds, with no
    /// throttle yet.
    pub fn new(quota: u64, period: f64) -> Reference {
        Reference {
            quota,
            period,
            throttle_us: 0,
            ring_full_time_us: 0,
            period_dirtied: 0.0,
            period_elapsed: 0.0,
            duty: DutyCycle::default(),
        }
    }

    /// The current sleep per ring-full, µs.
    pub fn throttle_us(&self) -> i64 {
        self.throttle_us
    }

    /// Measures every `period` seconds from now on.
    pub fn set_period(&mut self, period: f64) {
        self.period = period;
    }

    /// Folds in usage since the last step and decides. Every period, asleep or not, it
    /// measures the rate as QEMU does (`((pages × 1000 × 4096) >> 20) / elapsed_ms`) and
    /// adjusts the throttle; a sleep in progress then ends at most the new throttle later.
    pub fn step(&mut self, shared: &mut Shared, usage: Usage, asleep_for: f64) -> Decision {
        self.period_dirtied += usage.dirtied;
        self.period_elapsed += usage.elapsed;
        let adjusted = self.period_elapsed >= self.period;
        if adjusted {
            let elapsed_ms = (self.period_elapsed * 1000.0) as u64;
            let current = ((self.period_dirtied as u64 * 1000 * 4096) >> 20) / elapsed_ms.max(1);
            self.throttle_us = adjust_throttle(shared, self.throttle_us, self.quota, current);
            self.ring_full_time_us = shared.ring_mib * 1_000_000 / shared.max_rate.max(1);
            self.period_dirtied = 0.0;
            self.period_elapsed = 0.0;
        }
        let throttle = self.throttle_us as f64 / 1e6;
        let period_left = self.period - self.period_elapsed;
        if asleep_for > 0.0 {
            // Still asleep: the duty cycle waits for it, but the period does not.
            self.duty.step(0.0, 0.0, usage, asleep_for);
            let left = if adjusted {
                asleep_for.min(throttle)
            } else {
                asleep_for
            };
            return Decision::Resleep {
                left,
                recheck_in: left.min(period_left),
            };
        }
        let t = self.ring_full_time_us as f64 / 1e6;
        match self.duty.step(t, throttle, usage, 0.0) {
            Decision::Run { recheck_in } => Decision::Run {
                recheck_in: recheck_in.min(period_left),
            },
            decision => decision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_from_the_reference() {
        // 4096 entries (16 MiB), max rate 1000 MB/s: T = 16 000 µs; q = 100, c = 1000:
        // pct 90, +144 000 µs.
        let mut shared = Shared::new(4096);
        assert_eq!(shared.ring_mib, 16);
        assert_eq!(adjust_throttle(&mut shared, 0, 100, 1000), 144_000);
        assert_eq!(shared.max_rate, 1000);
    }

    #[test]
    fn tolerance_band_fixed_steps_and_cap() {
        let mut shared = Shared::new(4096);
        shared.max_rate = 1000;
        // Within 25 MB/s: unchanged, even a quota of 1 at 26.
        assert_eq!(adjust_throttle(&mut shared, 5000, 100, 125), 5000);
        assert_eq!(adjust_throttle(&mut shared, 5000, 1, 26), 5000);
        // 100 vs 140: (40 × 100 / 140) = 28 ≤ 50, so a fixed step of T/10 = 1600 µs.
        assert_eq!(adjust_throttle(&mut shared, 5000, 100, 140), 6600);
        assert_eq!(adjust_throttle(&mut shared, 5000, 140, 100), 3400);
        // Linear below: c < q/2 (q 400, c 100): pct 75, -16000 × 75 / 25 = -48000; floor 0.
        assert_eq!(adjust_throttle(&mut shared, 10_000, 400, 100), 0);
        // Cap: 99 × T.
        assert_eq!(
            adjust_throttle(&mut shared, 99 * 16_000, 10, 1000),
            99 * 16_000
        );
        // A vCPU that measured 0 loses its throttle.
        assert_eq!(adjust_throttle(&mut shared, 7000, 100, 0), 0);
    }

    #[test]
    fn small_rings_have_no_ring_full_time() {
        // Fewer than 256 entries is under 1 MiB: integer MiB 0, T = 0.
        let mut shared = Shared::new(128);
        assert_eq!(shared.ring_full_time_us(500), 0);
    }

    #[test]
    fn a_sleeping_vcpu_is_re_evaluated_every_period() {
        // A throttle of 99 × T (here 1.58 s) put the vCPU to sleep; a period later it has
        // dirtied nothing, so its throttle is 0, and the sleep ends at once instead of
        // running to its end (QEMU's uninterruptible sleep would).
        let mut shared = Shared::new(4096);
        let mut vcpu = Reference::new(10, PERIOD);
        let burst = Usage {
            elapsed: 1.0,
            ran: 1.0,
            dirtied: 256_000.0,
        };
        let Decision::Sleep(sleep) = vcpu.step(&mut shared, burst, 0.0) else {
            panic!("a vCPU 100 times over its limit is not put to sleep");
        };
        assert!(sleep > 1.0, "{sleep}");
        // Asleep: looked at again when the period ends, not when the sleep does.
        let half = Usage {
            elapsed: 0.5,
            ran: 0.0,
            dirtied: 0.0,
        };
        assert_eq!(
            vcpu.step(&mut shared, half, sleep - 0.5),
            Decision::Resleep {
                left: sleep - 0.5,
                recheck_in: 0.5
            }
        );
        assert_eq!(
            vcpu.step(&mut shared, half, sleep - 1.0),
            Decision::Resleep {
                left: 0.0,
                recheck_in: 0.0
            }
        );
        assert_eq!(vcpu.throttle_us(), 0);
    }

    #[test]
    fn delivery_sleeps_throttle_after_every_t_of_running() {
        let mut shared = Shared::new(4096);
        let mut vcpu = Reference::new(100, PERIOD);
        // One second at 1000 MB/s = 256 000 pages.
        let usage = Usage {
            elapsed: 1.0,
            ran: 1.0,
            dirtied: 256_000.0,
        };
        assert_eq!(vcpu.step(&mut shared, usage, 0.0), Decision::Sleep(0.144));
        assert_eq!(vcpu.throttle_us(), 144_000);
        let small = Usage {
            elapsed: 0.01,
            ran: 0.01,
            dirtied: 0.0,
        };
        match vcpu.step(&mut shared, small, 0.0) {
            Decision::Run { recheck_in } => assert!((recheck_in - 0.006).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
    }
}

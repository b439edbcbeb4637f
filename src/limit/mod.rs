//! The per-vCPU dirty-limit controller, and the auto-converge throttle beside it.
//!
//! One real-time (`SCHED_FIFO`) thread runs while any limit or the throttle is in force. Each
//! time it wakes it
//!
//! 1. **prepares**: reaps the dirty rings, so every vCPU's harvested count is exact up to
//!    now, and reads how long each vCPU has slept;
//! 2. **calculates**, per limited vCPU, with its strategy: dirtyvm's [`quota`] (the default)
//!    or the [`reference`](mod@reference) algorithm (QEMU's, computed exactly); or, for every vCPU alike,
//!    the [`throttle`];
//! 3. **sets the penalty**: publishes "sleep until T" in the vCPU's [`PenaltySlot`](crate::vm::handoff::PenaltySlot) and kicks
//!    the vCPU out of `KVM_RUN`;
//!
//! and sleeps until the earliest moment a strategy asked to look again (at most 20 ms).
//! The vCPU thread **accepts** the penalty by sleeping outside `KVM_RUN`, interruptibly:
//! a cancel or a stop wakes it at once.
//!
//! Unlike the reference design, no penalty waits for a ring-full exit: the controller kicks
//! the vCPU when its quota runs out, so control works the same with any ring size and any
//! reaper cadence, and never drives a ring into the overflow this host suffers from. A vCPU
//! that only reads dirties nothing, is charged nothing, and is never stopped. The controller
//! runs at real-time priority because its kicks are its precision: a late wake is a burst.

#[cfg(not(loom))]
mod controller;
pub mod quota;
pub mod reference;
pub mod throttle;

#[cfg(not(loom))]
pub use controller::{
    DirtyLimiter, LimitError, LimitInfo, LimitReport, PenaltyInfo, SeriesPoint, ThrottleInfo,
};

use std::fmt;

use serde::Serialize;

/// The lowest dirty limit, MiB/s: QEMU's lowest `vcpu-dirty-limit`.
pub const MIN_LIMIT_MIBPS: f64 = 1.0;
/// The highest dirty limit, MiB/s (1 TiB/s: far above what any vCPU dirties).
pub const MAX_LIMIT_MIBPS: f64 = 1_048_576.0;

/// The longest a strategy waits before looking at a running vCPU again, seconds.
pub const MAX_RECHECK: f64 = 0.020;

/// What a vCPU did since the controller last looked, in seconds and pages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Wall time.
    pub elapsed: f64,
    /// Time it was not serving a penalty.
    pub ran: f64,
    /// Pages harvested from its ring.
    pub dirtied: f64,
}

/// What a strategy wants for a vCPU now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Stop it and let it sleep this long, seconds.
    Sleep(f64),
    /// Let the sleep it is serving end `left` seconds from now (0: at once), sooner or later
    /// than planned; look again in `recheck_in` seconds.
    Resleep { left: f64, recheck_in: f64 },
    /// Let it run; look again in this many seconds.
    Run { recheck_in: f64 },
}

/// Run for a while, then sleep for a while: how the reference algorithm and the throttle
/// deliver their penalties.
#[derive(Debug, Clone, Copy, Default)]
pub struct DutyCycle {
    ran_since_sleep: f64,
}

impl DutyCycle {
    /// After every `run` seconds of running, sleep `sleep` seconds (no sleep when either is 0).
    pub fn step(&mut self, run: f64, sleep: f64, usage: Usage, asleep_for: f64) -> Decision {
        self.ran_since_sleep += usage.ran;
        if asleep_for > 0.0 {
            return Decision::Run {
                recheck_in: asleep_for,
            };
        }
        if run <= 0.0 || sleep <= 0.0 {
            return Decision::Run {
                recheck_in: MAX_RECHECK,
            };
        }
        if self.ran_since_sleep >= run {
            self.ran_since_sleep = 0.0;
            return Decision::Sleep(sleep);
        }
        Decision::Run {
            recheck_in: (run - self.ran_since_sleep).min(MAX_RECHECK),
        }
    }
}

/// Which algorithm limits a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LimitAlgo {
    /// dirtyvm's quota with predictive kicks ([`quota`]).
    Quota,
    /// QEMU's algorithm ([`reference`](mod@reference)).
    Reference,
}

impl fmt::Display for LimitAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitAlgo::Quota => "quota",
            LimitAlgo::Reference => "reference",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duty_cycle_runs_then_sleeps() {
        let mut duty = DutyCycle::default();
        let ran = |s| Usage {
            elapsed: s,
            ran: s,
            dirtied: 0.0,
        };
        assert_eq!(
            duty.step(0.010, 0.0025, ran(0.004), 0.0),
            Decision::Run { recheck_in: 0.006 }
        );
        assert_eq!(
            duty.step(0.010, 0.0025, ran(0.006), 0.0),
            Decision::Sleep(0.0025)
        );
        // While asleep: look again when it wakes.
        assert_eq!(
            duty.step(0.010, 0.0025, ran(0.0), 0.002),
            Decision::Run { recheck_in: 0.002 }
        );
        // Off.
        assert_eq!(
            duty.step(0.010, 0.0, ran(1.0), 0.0),
            Decision::Run {
                recheck_in: MAX_RECHECK
            }
        );
    }

    #[test]
    fn algorithms_have_their_cli_names() {
        use clap::ValueEnum;
        assert_eq!(LimitAlgo::from_str("quota", false), Ok(LimitAlgo::Quota));
        assert_eq!(
            LimitAlgo::from_str("reference", false),
            Ok(LimitAlgo::Reference)
        );
        assert!(LimitAlgo::from_str("qemu", false).is_err());
    }
}

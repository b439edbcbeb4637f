//! The classic auto-converge throttle (QEMU `migration/cpu-throttle.c`): every vCPU alike runs
//! 10 ms, then sleeps `10 ms × P / (100 − P)`; while the VM's dirty rate is above the target,
//! P starts at 20 % and rises by 10 points per period, up to 99 % (docs/reference.md#auto-converge). It slows
//! readers exactly as much as writers: the baseline the per-vCPU dirty limit must beat.

/// `CPU_THROTTLE_TIMESLICE_NS`, seconds.
pub const TIMESLICE: f64 = 0.010;
/// `cpu-throttle-initial` default.
pub const INITIAL_PCT: u8 = 20;
/// `cpu-throttle-increment` default.
pub const INCREMENT_PCT: u8 = 10;
/// `max-cpu-throttle` default.
pub const MAX_PCT: u8 = 99;
/// How often the VM's rate is compared with the target (QEMU's trigger period, 1 s).
pub const PERIOD: f64 = 1.0;

/// The throttle's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoConverge {
    /// Current percentage, 0 = off.
    pub percent: u8,
    /// The VM dirty rate to get under, MiB/s, when raising step by step; `None` for a
    /// fixed percentage set by hand.
    pub target_mibps: Option<f64>,
}

impl AutoConverge {
    /// Raises the percentage one step: to the initial value, then by the increment.
    pub fn raise(&mut self) {
        self.percent = match self.percent {
            0 => INITIAL_PCT,
            p => p.saturating_add(INCREMENT_PCT).min(MAX_PCT),
        };
    }

    /// Called once per period with the VM's measured rate: raises while over the target.
    pub fn evaluate(&mut self, vm_mibps: f64) {
        if self.target_mibps.is_some_and(|target| vm_mibps > target) {
            self.raise();
        }
    }

    /// Sleep after each timeslice of running, seconds.
    pub fn sleep_per_slice(&self) -> f64 {
        let p = f64::from(self.percent.min(MAX_PCT));
        TIMESLICE * p / (100.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_reference_percentages() {
        let mut t = AutoConverge {
            percent: 0,
            target_mibps: Some(100.0),
        };
        t.evaluate(50.0);
        assert_eq!(t.percent, 0);
        let mut seen = Vec::new();
        for _ in 0..12 {
            t.evaluate(500.0);
            seen.push(t.percent);
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99, 99]);
    }

    #[test]
    fn sleep_per_timeslice() {
        let at = |percent| {
            AutoConverge {
                percent,
                target_mibps: None,
            }
            .sleep_per_slice()
        };
        assert!((at(20) - 0.0025).abs() < 1e-12);
        assert!((at(50) - 0.010).abs() < 1e-12);
        assert!((at(99) - 0.990).abs() < 1e-9);
        assert_eq!(at(0), 0.0);
    }
}

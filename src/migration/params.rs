//! Migration parameters and capabilities with QEMU 8.2's names, defaults, ranges and error
//! texts (`migration/options.c`; docs/qmp.md#migration-commands).

use std::fmt;

/// `MAX_THROTTLE`: the default `max-bandwidth`, bytes/s (128 MiB/s).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// `DEFAULT_MIGRATE_SET_DOWNTIME`, ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// `MAX_MIGRATE_DOWNTIME`, ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2000 * 1000;

/// The migration parameters (`migrate-set-parameters`, `query-migrate-parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parameters {
    /// `max-bandwidth`: the stream's rate limit, bytes/s.
    pub max_bandwidth: u64,
    /// `avail-switchover-bandwidth`: when not 0, the bandwidth the switchover is planned with
    /// (bytes/s) instead of the one measured.
    pub avail_switchover_bandwidth: u64,
    /// `downtime-limit`: the longest pause the switchover may take, ms.
    pub downtime_limit_ms: u64,
    /// `throttle-trigger-threshold`: % of the bytes sent in a period that, dirtied, count as
    /// a period that dirties too fast.
    pub throttle_trigger_threshold: u8,
    /// `cpu-throttle-initial`: auto-converge's first percentage.
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: auto-converge's step.
    pub cpu_throttle_increment: u8,
    /// `cpu-throttle-tailslow`: smaller steps near the needed throttle.
    pub cpu_throttle_tailslow: bool,
    /// `max-cpu-throttle`: auto-converge's ceiling.
    pub max_cpu_throttle: u8,
    /// `x-vcpu-dirty-limit-period`: the dirty limiter's measurement period during a
    /// dirty-limit migration, ms.
    pub vcpu_dirty_limit_period_ms: u64,
    /// `vcpu-dirty-limit`: the per-vCPU limit a dirty-limit migration sets, MB/s.
    pub vcpu_dirty_limit: u64,
    /// `x-vcpu-dirty-limit-auto` (dirtyvm's): a dirty-limit migration chooses and adjusts
    /// each vCPU's limit itself instead of applying `vcpu-dirty-limit` (see `converge`).
    pub vcpu_dirty_limit_auto: bool,
}

impl Default for Parameters {
    fn default() -> Parameters {
        Parameters {
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            avail_switchover_bandwidth: 0,
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
            vcpu_dirty_limit_period_ms: 1000,
            vcpu_dirty_limit: 1,
            vcpu_dirty_limit_auto: false,
        }
    }
}

/// A parameter out of its range: QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterError(pub String);

impl fmt::Display for ParameterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParameterError {}

impl Parameters {
    /// `migrate_params_check()`: the checks, in QEMU's order, of the parameters as they would
    /// be after a change; the first that fails is the error, and nothing is applied.
    pub fn check(&self) -> Result<(), ParameterError> {
        let range = |name: &str, what: &str| {
            Err(ParameterError(format!(
                "Parameter '{name}' expects an integer in the range of {what}"
            )))
        };
        if !(1..=100).contains(&self.throttle_trigger_threshold) {
            return range("throttle_trigger_threshold", "1 to 100");
        }
        if !(1..=99).contains(&self.cpu_throttle_initial) {
            return range("cpu_throttle_initial", "1 to 99");
        }
        if !(1..=99).contains(&self.cpu_throttle_increment) {
            return range("cpu_throttle_increment", "1 to 99");
        }
        if self.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            return range("downtime_limit", "0 to (2000 * 1000) ms");
        }
        if self.max_cpu_throttle < self.cpu_throttle_initial || self.max_cpu_throttle > 99 {
            return range("max_cpu_throttle", "cpu_throttle_initial to 99");
        }
        if !(1..=1000).contains(&self.vcpu_dirty_limit_period_ms) {
            return Err(ParameterError(
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000".into(),
            ));
        }
        if self.vcpu_dirty_limit < 1 {
            return Err(ParameterError(
                "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `MigrationCapability`, QEMU 8.2's enum, in its order: what `query-migrate-capabilities`
/// lists.
pub const CAPABILITIES: [&str; 23] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
];

/// The capabilities dirtyvm implements; the others are always off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `events`: `MIGRATION` and `MIGRATION_PASS` events are sent.
    pub events: bool,
    /// `auto-converge`: throttle every vCPU when the guest dirties faster than the stream.
    pub auto_converge: bool,
    /// `dirty-limit`: limit every vCPU's dirty rate instead.
    pub dirty_limit: bool,
}

impl Capabilities {
    /// The state of capability `name` (one of [`CAPABILITIES`]).
    pub fn get(&self, name: &str) -> bool {
        match name {
            "events" => self.events,
            "auto-converge" => self.auto_converge,
            "dirty-limit" => self.dirty_limit,
            _ => false,
        }
    }

    /// Sets capability `name` (one of [`CAPABILITIES`]); the capabilities dirtyvm does not
    /// implement can only be off.
    pub fn set(&mut self, name: &str, state: bool) -> Result<(), ParameterError> {
        match name {
            "events" => self.events = state,
            "auto-converge" => self.auto_converge = state,
            "dirty-limit" => self.dirty_limit = state,
            _ if !state => {}
            _ => {
                return Err(ParameterError(format!(
                    "Capability '{name}' is not supported by dirtyvm"
                )))
            }
        }
        Ok(())
    }

    /// `migrate_caps_check()` for what dirtyvm implements: `dirty_ring` says whether the VM
    /// tracks with per-vCPU rings.
    pub fn check(&self, dirty_ring: bool) -> Result<(), ParameterError> {
        if self.dirty_limit && self.auto_converge {
            return Err(ParameterError(
                "dirty-limit conflicts with auto-converge either of then available currently"
                    .into(),
            ));
        }
        if self.dirty_limit && !dirty_ring {
            return Err(ParameterError(
                "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus() {
        let p = Parameters::default();
        assert_eq!(p.max_bandwidth, 134_217_728);
        assert_eq!(p.downtime_limit_ms, 300);
        assert_eq!(
            (
                p.throttle_trigger_threshold,
                p.cpu_throttle_initial,
                p.cpu_throttle_increment,
                p.max_cpu_throttle
            ),
            (50, 20, 10, 99)
        );
        assert_eq!(
            (p.vcpu_dirty_limit_period_ms, p.vcpu_dirty_limit),
            (1000, 1)
        );
        assert_eq!(p.check(), Ok(()));
    }

    #[test]
    fn checks_follow_qemus_order_and_texts() {
        let bad = |change: fn(&mut Parameters)| {
            let mut p = Parameters::default();
            change(&mut p);
            p.check().unwrap_err().0
        };
        assert_eq!(
            bad(|p| p.throttle_trigger_threshold = 0),
            "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"
        );
        assert_eq!(
            bad(|p| p.cpu_throttle_initial = 100),
            "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"
        );
        assert_eq!(
            bad(|p| p.downtime_limit_ms = 2_000_001),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        );
        // Raising the initial throttle above the ceiling fails on the ceiling.
        assert_eq!(
            bad(|p| {
                p.cpu_throttle_initial = 60;
                p.max_cpu_throttle = 50;
            }),
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"
        );
        assert_eq!(
            bad(|p| p.vcpu_dirty_limit_period_ms = 1001),
            "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"
        );
        assert_eq!(
            bad(|p| p.vcpu_dirty_limit = 0),
            "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"
        );
        // The first failing check is the one reported.
        assert!(bad(|p| {
            p.cpu_throttle_increment = 0;
            p.vcpu_dirty_limit = 0;
        })
        .contains("cpu_throttle_increment"));
    }

    #[test]
    fn capabilities_conflict_as_in_qemu() {
        let mut c = Capabilities::default();
        c.set("dirty-limit", true).unwrap();
        assert_eq!(c.check(true), Ok(()));
        assert_eq!(
            c.check(false).unwrap_err().0,
            "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
        );
        c.set("auto-converge", true).unwrap();
        assert_eq!(
            c.check(true).unwrap_err().0,
            "dirty-limit conflicts with auto-converge either of then available currently"
        );
        assert!(c.set("xbzrle", false).is_ok());
        assert!(c.set("xbzrle", true).is_err());
        assert_eq!(CAPABILITIES.len(), 23);
        assert!(CAPABILITIES.iter().filter(|n| c.get(n)).count() == 2);
    }
}

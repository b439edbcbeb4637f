//! The [`Backend`] over a [`Machine`] and the process's [`Migration`]: QMP commands mapped
//! onto the VMM. A destination serves QMP before its guest exists: until it arrives, the
//! commands that need one answer as for a VM without vCPUs, or with [`NO_GUEST_YET`].

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use super::{
    Backend, CalcDirtyRate, CpuInfo, DirtyLimitInfo, DirtyRateInfo, DirtyRateMode, DirtyRateStatus,
    QmpError, RunState,
};
use crate::limit::LimitError;
use crate::migration::{Migration, MigrationStatus, Role};
use crate::rate::RateRequest;
use crate::tracking::DirtyLog;
use crate::vm::vcpu::{StopReason, StopRequest};
use crate::vmm::Machine;

/// What the commands that need a guest answer on a destination it has not reached yet.
pub const NO_GUEST_YET: &str =
    "the guest has not arrived yet: this dirtyvm waits for an incoming migration";

/// QMP's view of a machine and its migrations.
#[derive(Debug)]
pub struct MachineBackend {
    /// Set at boot, or when an incoming guest arrives.
    machine: OnceLock<Arc<Machine>>,
    migration: Arc<Migration>,
    stop: Arc<StopRequest>,
    dirty_log: DirtyLog,
}

impl MachineBackend {
    /// The backend of a process with `migration`, answering to `stop`, whose machine tracks
    /// with `dirty_log`: without a machine until [`MachineBackend::attach`] (a destination
    /// waiting for its guest is `inmigrate`).
    pub fn new(
        migration: Arc<Migration>,
        stop: Arc<StopRequest>,
        dirty_log: DirtyLog,
    ) -> MachineBackend {
        MachineBackend {
            machine: OnceLock::new(),
            migration,
            stop,
            dirty_log,
        }
    }

    /// The machine booted, or the guest arrived: commands go to `machine` from now on.
    pub fn attach(&self, machine: Arc<Machine>) {
        // Once: a process has one machine.
        let _ = self.machine.set(machine);
    }

    fn machine(&self) -> Result<&Arc<Machine>, QmpError> {
        self.machine
            .get()
            .ok_or_else(|| QmpError::generic(NO_GUEST_YET))
    }
}

impl Backend for MachineBackend {
    fn run_state(&self) -> RunState {
        let Some(machine) = self.machine.get() else {
            return RunState::InMigrate;
        };
        let phase = self.migration.phase();
        if phase.finishing {
            RunState::FinishMigrate
        } else if machine.running() {
            RunState::Running
        } else if phase.role == Some(Role::Source) && phase.status == MigrationStatus::Completed {
            RunState::PostMigrate
        } else {
            RunState::Paused
        }
    }

    fn pause(&self) {
        match self.machine.get() {
            Some(machine) => {
                machine.pause();
            }
            None => self.migration.set_autostart(false),
        }
    }

    fn resume(&self) -> Result<(), QmpError> {
        match self.machine.get() {
            _ if self.migration.phase().finishing => {
                Err(QmpError::generic("Migration is not finalized yet"))
            }
            Some(machine) => {
                machine.resume();
                Ok(())
            }
            None => {
                self.migration.set_autostart(true);
                Ok(())
            }
        }
    }

    fn quit(&self) {
        self.stop.request(StopReason::Quit);
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        let Some(machine) = self.machine.get() else {
            return Vec::new();
        };
        machine
            .vcpus()
            .iter()
            .map(|v| CpuInfo {
                cpu_index: v.id(),
                thread_id: v.tid(),
            })
            .collect()
    }

    fn max_cpus(&self) -> u32 {
        self.machine.get().map_or(0, |m| m.vcpus().len() as u32)
    }

    fn calc_dirty_rate(&self, request: CalcDirtyRate) -> Result<(), QmpError> {
        self.machine()?
            .rate_meter()
            .start(RateRequest {
                mode: request.mode,
                calc_time_ms: request.calc_time_ms,
                sample_pages: request.sample_pages,
            })
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn query_dirty_rate(&self) -> DirtyRateInfo {
        let Some(machine) = self.machine.get() else {
            return DirtyRateInfo::unstarted();
        };
        let state = machine.rate_meter().state();
        let request = state.request;
        let measured = state
            .last
            .as_ref()
            .filter(|_| state.status == DirtyRateStatus::Measured);
        DirtyRateInfo {
            status: state.status,
            dirty_rate: measured.map(|m| m.rate_mibps.round() as i64),
            start_time: state.start_time,
            calc_time_ms: measured.map_or(request.map_or(0, |r| r.calc_time_ms), |m| {
                m.calc_time_ms as u64
            }),
            sample_pages: match (measured, request) {
                (Some(m), _) => m.sample_pages,
                (None, Some(r)) => r.sample_pages,
                (None, None) => 0,
            },
            mode: request.map_or(DirtyRateMode::PageSampling, |r| r.mode),
            vcpu_dirty_rate: measured.and_then(|m| {
                m.vcpu_rates_mibps.as_ref().map(|rates| {
                    rates
                        .iter()
                        .enumerate()
                        .map(|(id, r)| (id as u32, r.round() as i64))
                        .collect()
                })
            }),
        }
    }

    fn set_vcpu_dirty_limit(
        &self,
        cpu_index: Option<u32>,
        dirty_rate: u64,
    ) -> Result<(), QmpError> {
        // As QEMU: the ring check comes first, even for a rate of 0 (a cancel).
        if self.dirty_log != DirtyLog::Ring {
            return Err(QmpError::generic(LimitError::NeedsRing.to_string()));
        }
        let limiter = self.machine()?.limiter();
        // QEMU's `dirtylimit_is_allowed()`: not while a dirty-limit migration has limits in
        // force.
        if self.migration.holds_dirty_limits() && !limiter.limits().is_empty() {
            return Err(QmpError::generic(
                "can't set dirty page rate limit while migration is running",
            ));
        }
        let result = if dirty_rate == 0 {
            limiter.cancel(cpu_index)
        } else {
            limiter.set_limit(cpu_index, dirty_rate as f64, None)
        };
        result.map_err(|e| QmpError::generic(e.to_string()))
    }

    fn cancel_vcpu_dirty_limit(&self, cpu_index: Option<u32>) -> Result<(), QmpError> {
        // As QEMU: without a dirty ring there is nothing to cancel, and that is a success.
        if self.dirty_log != DirtyLog::Ring {
            return Ok(());
        }
        let limiter = self.machine()?.limiter();
        if self.migration.holds_dirty_limits() && !limiter.limits().is_empty() {
            return Err(QmpError::generic(
                "can't cancel dirty page rate limit while migration is running",
            ));
        }
        limiter
            .cancel(cpu_index)
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn query_vcpu_dirty_limit(&self) -> Vec<DirtyLimitInfo> {
        let Some(machine) = self.machine.get() else {
            return Vec::new();
        };
        machine
            .limiter()
            .limits()
            .into_iter()
            .map(|l| DirtyLimitInfo {
                cpu_index: l.vcpu,
                limit_rate: l.limit_mibps.round() as u64,
                current_rate: l.current_mibps.round() as u64,
            })
            .collect()
    }

    fn x_counters(&self) -> Value {
        let Some(machine) = self.machine.get() else {
            return Value::Array(Vec::new());
        };
        let stats = machine.guest_stats();
        let tracker = machine.tracker();
        let estimates = tracker.rate_estimates();
        let vcpus: Vec<Value> = machine
            .vcpus()
            .iter()
            .zip(&stats)
            .zip(machine.layout().vcpus())
            .map(|((control, s), plan)| {
                let id = control.id();
                let dirty = tracker.vcpu(id).snapshot();
                let penalty = machine.limiter().penalty(id);
                json!({
                    "cpu-index": id,
                    "workload": plan.workload.to_string(),
                    "pages-written": s.pages_written,
                    "pages-read": s.pages_read,
                    "passes": s.passes,
                    "dirty-pages-harvested": dirty.harvested,
                    "dirty-rate-mibps": estimates.get(id as usize).map_or(0.0, |e| e.smoothed_mibps),
                    "ring-full-exits": dirty.ring_full_exits,
                    "ring-overflows": dirty.overflows,
                    "penalty-ms-total": penalty.ms_total,
                    "penalty-ms-per-s": penalty.ms_per_s,
                })
            })
            .collect();
        Value::Array(vcpus)
    }

    fn x_reaper(&self) -> Value {
        match self.machine.get().and_then(|m| m.reaper()) {
            Some(reaper) => {
                let r = reaper.stats();
                json!({
                    "mode": r.mode,
                    "reaps": r.reaps,
                    "flushes": r.flushes,
                    "interval-ms": r.interval_ms,
                    "policy": r.policy,
                })
            }
            None => json!({"mode": "none"}),
        }
    }

    fn x_set_throttle(&self, percent: Option<u8>) -> Result<(), QmpError> {
        self.machine()?
            .limiter()
            .set_throttle_percent(percent.unwrap_or(0))
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn x_query_throttle(&self) -> Value {
        let throttle = self.machine.get().and_then(|m| m.limiter().throttle());
        json!({
            "percent": throttle.map_or(0, |t| t.percent),
            "target-mibps": throttle.and_then(|t| t.target_mibps),
            "current-mibps": throttle.map_or(0.0, |t| t.current_mibps),
        })
    }

    fn migration(&self) -> &Migration {
        &self.migration
    }

    fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        let machine = self
            .machine()
            .map_err(|_| QmpError::generic(crate::migration::WAITING_FOR_INCOMING))?;
        self.migration
            .migrate(machine.clone(), uri)
            .map_err(|e| QmpError::generic(e.0))
    }

    fn dirty_ring(&self) -> bool {
        self.dirty_log == DirtyLog::Ring
    }
}

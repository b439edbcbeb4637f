//! The [`Backend`] over a running [`Machine`]: QMP commands mapped onto the VMM.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    Backend, CalcDirtyRate, CpuInfo, DirtyLimitInfo, DirtyRateInfo, DirtyRateMode, DirtyRateStatus,
    QmpError,
};
use crate::limit::LimitError;
use crate::rate::RateRequest;
use crate::tracking::DirtyLog;
use crate::vm::vcpu::StopReason;
use crate::vmm::Machine;

/// QMP's view of a machine.
#[derive(Debug)]
pub struct MachineBackend {
    machine: Arc<Machine>,
}

impl MachineBackend {
    /// The backend of `machine`.
    pub fn new(machine: Arc<Machine>) -> MachineBackend {
        MachineBackend { machine }
    }
}

impl Backend for MachineBackend {
    fn running(&self) -> bool {
        self.machine.running()
    }

    fn pause(&self) {
        self.machine.pause();
    }

    fn resume(&self) {
        self.machine.resume();
    }

    fn quit(&self) {
        self.machine.stop_request().request(StopReason::Quit);
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.machine
            .vcpus()
            .iter()
            .map(|v| CpuInfo {
                cpu_index: v.id(),
                thread_id: v.tid(),
            })
            .collect()
    }

    fn max_cpus(&self) -> u32 {
        self.machine.vcpus().len() as u32
    }

    fn calc_dirty_rate(&self, request: CalcDirtyRate) -> Result<(), QmpError> {
        self.machine
            .rate_meter()
            .start(RateRequest {
                mode: request.mode,
                calc_time_ms: request.calc_time_ms,
                sample_pages: request.sample_pages,
            })
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn query_dirty_rate(&self) -> DirtyRateInfo {
        let state = self.machine.rate_meter().state();
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
        if self.machine.tracker().log() != DirtyLog::Ring {
            return Err(QmpError::generic(LimitError::NeedsRing.to_string()));
        }
        let limiter = self.machine.limiter();
        let result = if dirty_rate == 0 {
            limiter.cancel(cpu_index)
        } else {
            limiter.set_limit(cpu_index, dirty_rate as f64, None)
        };
        result.map_err(|e| QmpError::generic(e.to_string()))
    }

    fn cancel_vcpu_dirty_limit(&self, cpu_index: Option<u32>) -> Result<(), QmpError> {
        // As QEMU: without a dirty ring there is nothing to cancel, and that is a success.
        if self.machine.tracker().log() != DirtyLog::Ring {
            return Ok(());
        }
        self.machine
            .limiter()
            .cancel(cpu_index)
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn query_vcpu_dirty_limit(&self) -> Vec<DirtyLimitInfo> {
        self.machine
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
        let stats = self.machine.guest_stats();
        let tracker = self.machine.tracker();
        let estimates = tracker.rate_estimates();
        let vcpus: Vec<Value> = self
            .machine
            .vcpus()
            .iter()
            .zip(&stats)
            .zip(self.machine.layout().vcpus())
            .map(|((control, s), plan)| {
                let id = control.id();
                let dirty = tracker.vcpu(id).snapshot();
                let penalty = self.machine.limiter().penalty(id);
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
        match self.machine.reaper() {
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
        self.machine
            .limiter()
            .set_throttle_percent(percent.unwrap_or(0))
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    fn x_query_throttle(&self) -> Value {
        let throttle = self.machine.limiter().throttle();
        json!({
            "percent": throttle.map_or(0, |t| t.percent),
            "target-mibps": throttle.and_then(|t| t.target_mibps),
            "current-mibps": throttle.map_or(0.0, |t| t.current_mibps),
        })
    }
}

//! The JSON report written at exit (`--report PATH`).

use serde::Serialize;

use crate::limit::LimitReport;
use crate::rate::Measurement;
use crate::tracking::DirtyLog;
use crate::tracking::ReaperStats;
use crate::units::pages_to_mibps;
use crate::vm::vcpu::StopReason;
use crate::vmm::Machine;

/// The run's report. Sections of features not in use are absent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// dirtyvm version that wrote it.
    pub version: &'static str,
    /// Wall-clock seconds the vCPUs ran.
    pub duration_s: f64,
    /// Why the run ended.
    pub stop_reason: String,
    /// Dirty tracking mechanism: `ring`, `bitmap` or `none`.
    pub dirty_log: &'static str,
    /// Entries per vCPU ring, with ring tracking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_entries: Option<u32>,
    /// Bitmap mode: whether pages were re-armed with `KVM_CLEAR_DIRTY_LOG`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_manual_protect: Option<bool>,
    /// Dirty pages harvested in all (ring entries of every vCPU, or bitmap pages).
    pub dirty_pages_harvested: u64,
    /// Ring overflows detected (each would have wedged the ring without recovery); after
    /// one, the dirty-page set's next take reported every page.
    pub ring_overflows: u64,
    /// Rings that overflowed and could not be recovered (their vCPU stopped the run).
    pub wedged_rings: u64,
    /// `KVM_RESET_DIRTY_RINGS` calls whose count differed from what had been harvested.
    pub reset_mismatches: u64,
    /// The reaper, with tracking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reaper: Option<ReaperStats>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Guest TSC frequency used for pacing.
    pub tsc_khz: u32,
    /// One entry per vCPU, by id.
    pub vcpus: Vec<VcpuReport>,
    /// Dirty-rate measurements, in order, each with the ground truth of its window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dirty_rate: Vec<Measurement>,
    /// The dirty limiter's series, when a limit or the throttle was in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit: Option<LimitReport>,
}

/// One vCPU's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct VcpuReport {
    /// vCPU id.
    pub id: u32,
    /// Workload spec, e.g. `write:64M@100`.
    pub workload: String,
    /// Ground truth: pages the guest wrote.
    pub pages_written: u64,
    /// Ground truth: pages the guest read.
    pub pages_read: u64,
    /// Ground truth: passes over the working set.
    pub passes: u64,
    /// Mean write rate over the run (ground truth), MiB/s.
    pub written_mibps: f64,
    /// Mean read rate over the run (ground truth), MiB/s.
    pub read_mibps: f64,
    /// Dirty pages harvested from this vCPU's ring.
    pub dirty_pages_harvested: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits.
    pub ring_full_exits: u64,
    /// Ring entries dropped because they named no tracked page.
    pub bad_entries: u64,
    /// Ring entries found lost after an overflow.
    pub lost_entries: u64,
    /// Time spent asleep under a dirty-limit or throttle penalty, ms.
    pub penalty_ms_total: f64,
    /// `hlt` exits.
    pub hlt_exits: u64,
    /// Times the vCPU was kicked out of `KVM_RUN`.
    pub kicks: u64,
}

impl Report {
    /// The report of `machine`, which stopped for `reason`, with the measurements taken.
    /// Read it after [`Machine::shutdown`]: the vCPUs have stopped and the rings were
    /// flushed, so each vCPU's ground truth and harvested count describe the same moment.
    pub fn new(machine: &Machine, reason: &StopReason, dirty_rate: Vec<Measurement>) -> Report {
        let tracker = machine.tracker();
        let elapsed = machine.ran_for().as_secs_f64();
        let vcpus = machine
            .layout()
            .vcpus()
            .iter()
            .zip(machine.guest_stats())
            .zip(machine.vcpus())
            .map(|((plan, s), control)| {
                let dirty = tracker.vcpu(plan.id).snapshot();
                let exits = control.exits.snapshot();
                VcpuReport {
                    id: plan.id,
                    workload: plan.workload.to_string(),
                    pages_written: s.pages_written,
                    pages_read: s.pages_read,
                    passes: s.passes,
                    written_mibps: pages_to_mibps(s.pages_written, elapsed),
                    read_mibps: pages_to_mibps(s.pages_read, elapsed),
                    dirty_pages_harvested: dirty.harvested,
                    ring_full_exits: dirty.ring_full_exits,
                    bad_entries: dirty.bad_entries,
                    lost_entries: dirty.lost_entries,
                    penalty_ms_total: machine.limiter().penalty(plan.id).ms_total,
                    hlt_exits: exits.hlt,
                    kicks: exits.interrupted,
                }
            })
            .collect();
        Report {
            version: env!("CARGO_PKG_VERSION"),
            duration_s: elapsed,
            stop_reason: reason.to_string(),
            dirty_log: tracker.log().name(),
            ring_entries: tracker.ring_entries(),
            bitmap_manual_protect: (tracker.log() == DirtyLog::Bitmap)
                .then(|| tracker.manual_protect()),
            dirty_pages_harvested: tracker.harvested(),
            ring_overflows: tracker.ring_overflows(),
            wedged_rings: tracker.wedged_rings(),
            reset_mismatches: tracker.reset_mismatches(),
            reaper: machine.reaper().map(|r| r.stats()),
            memory_bytes: machine.layout().memory(),
            tsc_khz: machine.tsc_khz(),
            vcpus,
            dirty_rate,
            dirty_limit: Some(machine.limiter().report()).filter(|r| !r.series.is_empty()),
        }
    }

    /// The report as pretty JSON, one buffer, ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("plain data serializes");
        json.push(b'\n');
        json
    }
}

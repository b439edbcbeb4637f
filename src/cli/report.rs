//! The JSON report written at exit (`--report PATH`).

use serde::Serialize;

use crate::limit::LimitReport;
use crate::migration::{Iteration, MigrationInfo, Role};
use crate::rate::Measurement;
use crate::tracking::DirtyLog;
use crate::tracking::ReaperStats;
use crate::units::pages_to_mibps;
use crate::vmm::Machine;

/// The run's report. Sections of features not in use are absent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// dirtyvm version that wrote it.
    pub version: &'static str,
    /// Why the run ended.
    pub stop_reason: String,
    /// The guest; absent on a destination it never reached.
    #[serde(flatten)]
    pub guest: Option<GuestReport>,
    /// The last migration, sent or received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationReport>,
}

/// What the guest did in this process.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    /// Wall-clock seconds the vCPUs ran.
    pub duration_s: f64,
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
    /// Ground truth: pages the guest wrote (on a destination, counting from the source's
    /// start: the counters migrate with the guest).
    pub pages_written: u64,
    /// Ground truth: pages the guest read.
    pub pages_read: u64,
    /// Ground truth: passes over the working set.
    pub passes: u64,
    /// Mean write rate over this process's run (ground truth), MiB/s.
    pub written_mibps: f64,
    /// Mean read rate over this process's run (ground truth), MiB/s.
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

/// A migration in the report.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// `source` or `destination`.
    pub role: Role,
    /// QEMU's status at the end: `completed`, `failed`, `cancelled`, or `active` for one
    /// the run's end interrupted.
    pub status: &'static str,
    /// The peer's address.
    pub uri: Option<String>,
    /// From `migrate` (or listening) to the end, ms.
    pub total_time_ms: u64,
    /// Connecting and the header, ms.
    pub setup_time_ms: u64,
    /// Source pause to the destination's word that the guest runs there, ms (the source's
    /// clock; a completed migration only).
    pub downtime_ms: Option<u64>,
    /// Bytes of the stream.
    pub bytes_transferred: u64,
    /// Pages sent whole.
    pub normal_pages: u64,
    /// Pages sent as a zero flag, without their 4 KiB.
    pub zero_pages: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// The passes, the first over all of RAM.
    pub iterations: Vec<Iteration>,
    /// The digest of guest RAM at the switchover, hex (the same on both sides of a
    /// migration that succeeded).
    pub memory_digest: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

impl MigrationReport {
    /// The report of a process's last migration; `None` if it had none.
    pub fn new(info: &MigrationInfo) -> Option<MigrationReport> {
        Some(MigrationReport {
            role: info.role?,
            status: info.status.name(),
            uri: info.uri.clone(),
            total_time_ms: info.total_time_ms,
            setup_time_ms: info.setup_time_ms,
            downtime_ms: info.downtime_ms,
            bytes_transferred: info.ram.transferred,
            normal_pages: info.ram.normal,
            zero_pages: info.ram.duplicate,
            downtime_bytes: info.ram.downtime_bytes,
            iterations: info.iterations.clone(),
            memory_digest: info.memory_digest.map(|d| format!("{d:016x}")),
            error: info.error.clone(),
        })
    }
}

impl Report {
    /// The report of a run that stopped for `reason`: of `machine` if it had one, with the
    /// measurements taken, and of its last migration. Read it after [`Machine::shutdown`]:
    /// the vCPUs have stopped and the rings were flushed, so each vCPU's ground truth and
    /// harvested count describe the same moment.
    pub fn new(
        machine: Option<&Machine>,
        reason: &str,
        dirty_rate: Vec<Measurement>,
        migration: &MigrationInfo,
    ) -> Report {
        Report {
            version: env!("CARGO_PKG_VERSION"),
            stop_reason: reason.to_string(),
            guest: machine.map(|m| GuestReport::new(m, dirty_rate)),
            migration: MigrationReport::new(migration),
        }
    }

    /// The report as pretty JSON, one buffer, ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("plain data serializes");
        json.push(b'\n');
        json
    }
}

impl GuestReport {
    fn new(machine: &Machine, dirty_rate: Vec<Measurement>) -> GuestReport {
        let tracker = machine.tracker();
        let elapsed = machine.ran_for().as_secs_f64();
        let vcpus = machine
            .layout()
            .vcpus()
            .iter()
            .zip(machine.guest_stats())
            .zip(machine.initial_stats())
            .zip(machine.vcpus())
            .map(|(((plan, s), initial), control)| {
                let dirty = tracker.vcpu(plan.id).snapshot();
                let exits = control.exits.snapshot();
                VcpuReport {
                    id: plan.id,
                    workload: plan.workload.to_string(),
                    pages_written: s.pages_written,
                    pages_read: s.pages_read,
                    passes: s.passes,
                    written_mibps: pages_to_mibps(s.pages_written - initial.pages_written, elapsed),
                    read_mibps: pages_to_mibps(s.pages_read - initial.pages_read, elapsed),
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
        GuestReport {
            duration_s: elapsed,
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
}

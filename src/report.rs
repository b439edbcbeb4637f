//! The JSON report written at exit (`--report PATH`), and the page/MiB arithmetic shared by
//! everything that prints rates.

use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::limit::LimitReport;
use crate::rate::Measurement;
use crate::reaper::ReaperStats;

/// Pages of 4 KiB per MiB.
const PAGES_PER_MIB: f64 = 256.0;

/// A page count over `seconds`, in MiB/s.
pub fn pages_to_mibps(pages: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        pages as f64 / PAGES_PER_MIB / seconds
    } else {
        0.0
    }
}

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
    /// Writes the report as pretty JSON, atomically: a reader never sees half a report.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = Path::new(&tmp);
        let mut file = std::fs::File::create(tmp)?;
        serde_json::to_writer_pretty(&mut file, self)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

//! Dirty tracking: the kernel's per-vCPU dirty rings (through [`crate::ring`], the harvest
//! protocol, model-checked) or its dirty bitmap, harvested by the [`Tracker`] into per-vCPU
//! counters, per-vCPU rate estimates and the guest RAM's [`DirtyPageSet`]; and the
//! [`Reaper`] thread that harvests on a cadence and flushes on demand.
//!
//! Data flows one way: ring or bitmap -> harvest -> counters, estimates and the dirty-page
//! set -> their consumers (measurements, the limiter, migration).

mod dirty_set;
mod estimate;
mod reaper;
mod tracker;

pub use dirty_set::{DirtyPageSet, DirtyPages};
pub use estimate::{RateEstimate, RateEstimator};
pub use reaper::{Cadence, Reaper, ReaperStats};
pub use tracker::{
    DirtyLog, RingFullError, Tracker, VcpuDirtyCounts, VcpuDirtyStats, WedgedRing, MIN_RING_ENTRIES,
};

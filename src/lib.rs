//! dirtyvm: a minimal KVM virtual machine monitor built to track, measure and limit how fast
//! vCPUs dirty guest memory.
//!
//! Data flows one way: the kernel's dirty ring or bitmap -> harvest -> per-vCPU counters and
//! the dirty-page set -> rate estimates -> controller -> per-vCPU penalty -> vCPU thread.
//!
//! Unsafe code is denied at the crate root and allowed only in the modules that talk to the
//! kernel ([`kvm`]); each opens with a `# Safety` paragraph stating its contract.

pub use dirtyvm_sys as sys;

// First: its macros (`say!`, `warn!`) are in scope in every module declared after it.
#[cfg(not(loom))]
#[macro_use]
pub mod console;

// Under `--cfg loom` only the modules with loom models build: the ring protocol and the
// penalty handoff; everything that needs KVM is left out.
#[cfg(not(loom))]
pub mod bitmap;
#[cfg(not(loom))]
pub mod cli;
#[cfg(not(loom))]
pub mod demo;
#[cfg(not(loom))]
pub mod guest;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod kvm;
pub mod limit;
#[cfg(not(loom))]
pub mod output;
#[cfg(not(loom))]
pub mod plot;
#[cfg(not(loom))]
pub mod qmp;
#[cfg(not(loom))]
pub mod rate;
#[cfg(not(loom))]
pub mod reaper;
#[cfg(not(loom))]
pub mod report;
pub mod ring;
#[cfg(not(loom))]
pub mod scenario;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod sched;
mod sync;
#[cfg(not(loom))]
pub mod tracking;
pub mod units;
#[cfg(not(loom))]
pub mod vcpu;
#[cfg(not(loom))]
pub mod vmm;

//! dirtyvm: a minimal KVM virtual machine monitor built to track, measure and limit how fast
//! vCPUs dirty guest memory.
//!
//! Data flows one way: the kernel's dirty ring or bitmap -> harvest -> per-vCPU counters and
//! the dirty-page set -> rate estimates -> controller -> per-vCPU penalty -> vCPU thread.
//!
//! Unsafe code is denied at the crate root and allowed only in the modules that talk to the
//! kernel ([`kvm`]); each opens with a `# Safety` paragraph stating its contract.

pub use dirtyvm_sys as sys;

pub mod bitmap;
pub mod guest;
#[allow(unsafe_code)]
pub mod kvm;
pub mod rate;
pub mod reaper;
pub mod report;
pub mod ring;
#[allow(unsafe_code)]
pub mod sched;
mod sync;
pub mod tracking;
pub mod vcpu;
pub mod vmm;

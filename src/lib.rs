//! dirtyvm: a minimal KVM virtual machine monitor built to track, measure and limit how fast
//! vCPUs dirty guest memory.
//!
//! The layout follows the data, which flows one way: the [`vm`] (KVM, the built-in guest, the
//! vCPU threads) dirties memory; [`tracking`] harvests the kernel's dirty rings (with the
//! [`ring`] protocol, which the kernel's mapping in `vm::kvm` also implements) or bitmap into
//! per-vCPU counters, rate estimates and the dirty-page set; [`rate`] measures dirty rates
//! from them; [`limit`] controls each vCPU's rate with penalties the vCPU threads serve;
//! [`vmm`] puts one VM together from these parts. The interfaces drive a VM: [`qmp`] (QEMU's
//! protocol) and [`cli`] (the launcher's commands, its report and output files). Leaves that
//! everything may use: [`units`] (pages, MiB/s, the clock), [`sync`]'s worker threads,
//! [`sched`] (real-time priority) and [`console`] (output that never stops a run). No module
//! imports one that imports it back.
//!
//! Unsafe code is denied at the crate root and allowed only in the modules that talk to the
//! kernel ([`vm::kvm`], [`sched`]); each opens with a `# Safety` paragraph stating its
//! contract. The facts they rely on are in `docs/kernel.md` and `docs/host.md`.

pub use dirtyvm_sys as sys;

// First: its macros (`say!`, `warn!`) are in scope in every module declared after it.
#[cfg(not(loom))]
#[macro_use]
pub mod console;

// Under `--cfg loom` only what has loom models builds: the ring protocol and the penalty and
// kick handoff (in `vm`); everything that needs KVM is left out.
#[cfg(not(loom))]
pub mod cli;
#[cfg(not(loom))]
pub mod digest;
pub mod limit;
#[cfg(not(loom))]
pub mod migration;
#[cfg(not(loom))]
pub mod qmp;
#[cfg(not(loom))]
pub mod rate;
pub mod ring;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod sched;
#[cfg(not(loom))]
#[doc(hidden)]
pub mod showcase;
#[cfg(not(loom))]
pub mod socket_file;
pub mod sync;
#[cfg(not(loom))]
pub mod tracking;
pub mod units;
pub mod vm;
#[cfg(not(loom))]
pub mod vmm;

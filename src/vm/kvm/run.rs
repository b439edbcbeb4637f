//! The `kvm_run` area: decoding exits, and the immediate-exit flag used to kick a vCPU.

use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use dirtyvm_sys as sys;
use memmap2::MmapRaw;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::vm::handoff;

/// Why `KVM_RUN` returned. Unknown reasons are values, never panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest executed `hlt` (no in-kernel LAPIC).
    Hlt,
    /// Port I/O. `out` is a guest write; data for an `in` would have to be filled before the
    /// next `KVM_RUN`.
    Io {
        port: u16,
        out: bool,
        size: u8,
        count: u32,
    },
    /// An access to guest-physical memory no slot backs.
    Mmio { addr: u64, len: u32, is_write: bool },
    /// A signal or `immediate_exit` made `KVM_RUN` return (`EINTR`, or `KVM_EXIT_INTR`).
    Interrupted,
    /// This vCPU's dirty ring is (soft-)full: harvest and reset before re-entering.
    DirtyRingFull,
    /// Triple fault.
    Shutdown,
    /// The hardware refused to enter the guest.
    FailEntry { reason: u64, cpu: u32 },
    /// KVM could not handle an exit (for example an instruction it cannot emulate).
    InternalError { suberror: u32 },
    /// A system event such as reset or shutdown requested by the guest.
    SystemEvent { kind: u32 },
    /// An exit reason this VMM does not know.
    Unknown(u32),
}

/// Reads the exit the kernel left in `kvm_run` after `KVM_RUN` returned 0.
pub(super) fn decode_exit(run: &MmapRaw) -> VcpuExit {
    let run = run.as_ptr().cast::<sys::kvm_run>();
    // SAFETY: the mapping is at least size_of::<kvm_run>() bytes (checked at creation) and
    // page-aligned. The kernel writes it only inside KVM_RUN on this thread, which has
    // returned; other threads only touch `immediate_exit`, a different byte, atomically.
    let (reason, exit) = unsafe { ((*run).exit_reason, (*run).exit) };
    match reason {
        sys::KVM_EXIT_HLT => VcpuExit::Hlt,
        sys::KVM_EXIT_IO => {
            // SAFETY: the kernel filled the `io` member for this exit reason; every bit
            // pattern is a valid value of its integer fields.
            let io = unsafe { exit.io };
            VcpuExit::Io {
                port: io.port,
                out: io.direction == sys::KVM_EXIT_IO_OUT,
                size: io.size,
                count: io.count,
            }
        }
        sys::KVM_EXIT_MMIO => {
            // SAFETY: the kernel filled the `mmio` member for this exit reason.
            let mmio = unsafe { exit.mmio };
            VcpuExit::Mmio {
                addr: mmio.phys_addr,
                len: mmio.len,
                is_write: mmio.is_write != 0,
            }
        }
        sys::KVM_EXIT_INTR => VcpuExit::Interrupted,
        sys::KVM_EXIT_DIRTY_RING_FULL => VcpuExit::DirtyRingFull,
        sys::KVM_EXIT_SHUTDOWN => VcpuExit::Shutdown,
        sys::KVM_EXIT_FAIL_ENTRY => {
            // SAFETY: the kernel filled the `fail_entry` member for this exit reason.
            let fail = unsafe { exit.fail_entry };
            VcpuExit::FailEntry {
                reason: fail.hardware_entry_failure_reason,
                cpu: fail.cpu,
            }
        }
        sys::KVM_EXIT_INTERNAL_ERROR => VcpuExit::InternalError {
            // SAFETY: the kernel filled the `internal` member for this exit reason.
            suberror: unsafe { exit.internal.suberror },
        },
        sys::KVM_EXIT_SYSTEM_EVENT => VcpuExit::SystemEvent {
            // SAFETY: the kernel filled the `system_event` member for this exit reason.
            kind: unsafe { exit.system_event.type_ },
        },
        other => VcpuExit::Unknown(other),
    }
}

/// The `immediate_exit` byte of one vCPU's `kvm_run`: while set, `KVM_RUN` returns `EINTR`
/// without entering the guest. Shared with the threads that kick the vCPU.
#[derive(Debug, Clone)]
pub struct ImmediateExit {
    run: Arc<MmapRaw>,
}

impl ImmediateExit {
    pub(super) fn new(run: Arc<MmapRaw>) -> ImmediateExit {
        ImmediateExit { run }
    }

    fn flag(&self) -> &AtomicU8 {
        let offset = std::mem::offset_of!(sys::kvm_run, immediate_exit);
        // SAFETY: the mapping outlives `self` (Arc) and is larger than kvm_run; AtomicU8 has
        // the layout of u8 and every userspace access to this byte is atomic. The kernel
        // only reads it, once, at KVM_RUN entry.
        unsafe { &*self.run.as_ptr().add(offset).cast::<AtomicU8>() }
    }

    /// Makes the next `KVM_RUN` return at once; what the kicker published before is
    /// visible to the vCPU once it takes the request ([`handoff::request_exit`]).
    pub fn set(&self) {
        handoff::request_exit(self.flag());
    }

    /// Takes the request and lets `KVM_RUN` enter the guest again; called by the vCPU
    /// thread after an exit ([`handoff::take_exit_request`]). True if there was a request.
    pub fn take(&self) -> bool {
        handoff::take_exit_request(self.flag())
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub const KICK_SIGNAL: Signal = Signal::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the (empty) kick handler, without `SA_RESTART`, so that a kicked `KVM_RUN`
/// returns `EINTR`. Idempotent.
pub fn install_kick_handler() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_kick),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is async-signal-safe (it does nothing) and replacing the
    // disposition of KICK_SIGNAL affects only this process, which reserves it for kicks.
    unsafe { signal::sigaction(KICK_SIGNAL, &action) }?;
    Ok(())
}

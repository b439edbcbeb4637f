//! Plain constants: API version, capability numbers, exit reasons and flag
//! bits, with the kernel's spellings and values.

#[cfg(doc)]
use crate::*;

// ---------------------------------------------------------------------------
// API version
// ---------------------------------------------------------------------------

/// The only KVM API version this crate describes; [`KVM_GET_API_VERSION`] must
/// return exactly this value.
pub const KVM_API_VERSION: i32 = 12;

// ---------------------------------------------------------------------------
// Capabilities (`KVM_CAP_*`), queried with `KVM_CHECK_EXTENSION`
// ---------------------------------------------------------------------------

/// [`KVM_SET_USER_MEMORY_REGION`] is available.
pub const KVM_CAP_USER_MEMORY: u32 = 3;
/// [`KVM_SET_TSS_ADDR`] is available.
pub const KVM_CAP_SET_TSS_ADDR: u32 = 4;
/// [`KVM_GET_SUPPORTED_CPUID`] and [`KVM_SET_CPUID2`] are available.
pub const KVM_CAP_EXT_CPUID: u32 = 7;
/// Returns the recommended maximum number of vCPUs per VM.
pub const KVM_CAP_NR_VCPUS: u32 = 9;
/// Returns the maximum number of memslots per address space.
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;
/// [`KVM_SET_IDENTITY_MAP_ADDR`] is available.
pub const KVM_CAP_SET_IDENTITY_MAP_ADDR: u32 = 37;
/// [`KVM_ENABLE_CAP`] is available on the vCPU fd.
pub const KVM_CAP_ENABLE_CAP: u32 = 54;
/// [`KVM_SET_TSC_KHZ`] is available (the guest TSC frequency can be set).
pub const KVM_CAP_TSC_CONTROL: u32 = 60;
/// [`KVM_GET_TSC_KHZ`] is available.
pub const KVM_CAP_GET_TSC_KHZ: u32 = 61;
/// Returns the maximum number of vCPUs per VM (vCPU ids stay below it).
pub const KVM_CAP_MAX_VCPUS: u32 = 66;
/// [`KVM_ENABLE_CAP`] is available on the VM fd.
pub const KVM_CAP_ENABLE_CAP_VM: u32 = 98;
/// [`KVM_CHECK_EXTENSION`] works on the VM fd (and then reports what this VM
/// supports, which is the answer to trust).
pub const KVM_CAP_CHECK_EXTENSION_VM: u32 = 105;
/// Returns the number of address spaces (x86: 2, `as_id` 1 being SMM).
pub const KVM_CAP_MULTI_ADDRESS_SPACE: u32 = 118;
/// `kvm_run.immediate_exit` is honoured.
pub const KVM_CAP_IMMEDIATE_EXIT: u32 = 136;
/// Manual dirty-log protection ([`KVM_CLEAR_DIRTY_LOG`]); returns the supported
/// `KVM_DIRTY_LOG_*` flag mask, enabled with those flags in `args[0]`.
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// Per-vCPU dirty ring; returns the maximum ring size in bytes (0 if absent),
/// enabled with the ring size in bytes in `args[0]`.
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_GET_STATS_FD` is available.
pub const KVM_CAP_BINARY_STATS_FD: u32 = 203;
/// Dirty ring with acquire/release semantics on `kvm_dirty_gfn.flags`;
/// returns and is enabled like [`KVM_CAP_DIRTY_LOG_RING`].
pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// Dirty ring plus a per-slot backup bitmap for writes made outside vCPU
/// context; enabled after the ring, before any memslot exists.
pub const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: u32 = 225;

// ---------------------------------------------------------------------------
// Exit reasons (`kvm_run.exit_reason`)
// ---------------------------------------------------------------------------

/// Unknown exit; the header's `hw` payload (not modelled here) holds the
/// hardware exit reason.
pub const KVM_EXIT_UNKNOWN: u32 = 0;
/// Guest exception exit.
pub const KVM_EXIT_EXCEPTION: u32 = 1;
/// Port I/O; described by [`kvm_run_exit::io`].
pub const KVM_EXIT_IO: u32 = 2;
/// Hypercall forwarded to userspace.
pub const KVM_EXIT_HYPERCALL: u32 = 3;
/// Debug exit (single step or breakpoint).
pub const KVM_EXIT_DEBUG: u32 = 4;
/// The guest executed `HLT` (only without an in-kernel local APIC).
pub const KVM_EXIT_HLT: u32 = 5;
/// MMIO access outside any memslot; described by [`kvm_run_exit::mmio`].
pub const KVM_EXIT_MMIO: u32 = 6;
/// The guest can accept an interrupt (requested via
/// `kvm_run.request_interrupt_window`).
pub const KVM_EXIT_IRQ_WINDOW_OPEN: u32 = 7;
/// The guest shut down (on x86, a triple fault).
pub const KVM_EXIT_SHUTDOWN: u32 = 8;
/// VM entry failed; described by [`kvm_run_exit::fail_entry`].
pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
/// [`KVM_RUN`] was interrupted by a signal.
pub const KVM_EXIT_INTR: u32 = 10;
/// KVM internal error; described by [`kvm_run_exit::internal`].
pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
/// System event (shutdown, reset, crash, ...); described by
/// [`kvm_run_exit::system_event`].
pub const KVM_EXIT_SYSTEM_EVENT: u32 = 24;
/// This vCPU's dirty ring reached its soft limit; no payload. Harvest and
/// [`KVM_RESET_DIRTY_RINGS`] before re-entering.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
/// Memory fault userspace must resolve; the only exit delivered with
/// [`KVM_RUN`] returning -1 (`EFAULT` or `EHWPOISON`).
pub const KVM_EXIT_MEMORY_FAULT: u32 = 39;

// ---------------------------------------------------------------------------
// `kvm_run` payload values and flags
// ---------------------------------------------------------------------------

/// [`kvm_run_exit_io::direction`]: the guest reads from the port.
pub const KVM_EXIT_IO_IN: u8 = 0;
/// [`kvm_run_exit_io::direction`]: the guest writes to the port.
pub const KVM_EXIT_IO_OUT: u8 = 1;

/// [`kvm_run::flags`]: the vCPU is in System Management Mode.
pub const KVM_RUN_X86_SMM: u16 = 1 << 0;
/// [`kvm_run::flags`]: a bus lock was detected.
pub const KVM_RUN_X86_BUS_LOCK: u16 = 1 << 1;
/// [`kvm_run::flags`]: the vCPU exited from a nested (L2) guest.
pub const KVM_RUN_X86_GUEST_MODE: u16 = 1 << 2;

/// Number of interrupt vectors on x86; sizes [`kvm_sregs::interrupt_bitmap`].
pub const KVM_NR_INTERRUPTS: usize = 256;

/// Size in bytes of the `s` union at the end of [`kvm_run`] (it holds
/// `struct kvm_sync_regs`).
pub const SYNC_REGS_SIZE_BYTES: usize = 2048;

// ---------------------------------------------------------------------------
// Memslots (`kvm_userspace_memory_region.flags`)
// ---------------------------------------------------------------------------

/// Track writes to the slot (dirty bitmap or dirty ring).
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// The guest cannot write the slot; writes exit as MMIO.
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// The slot is backed by a `guest_memfd` (only with
/// `KVM_SET_USER_MEMORY_REGION2`).
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

// ---------------------------------------------------------------------------
// Dirty ring (`kvm_dirty_gfn.flags`)
// ---------------------------------------------------------------------------

/// Entry published by the kernel, not yet harvested. The header builds it
/// with `_BITUL` (unsigned long); the field it lives in is a `__u32`.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Entry harvested by userspace, to be re-protected by
/// [`KVM_RESET_DIRTY_RINGS`]. Built with `_BITUL` in the header.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// All flag bits defined for a dirty-ring entry.
pub const KVM_DIRTY_GFN_F_MASK: u32 = 0x3;

/// Page index of the dirty ring in the vCPU fd: map it at
/// `KVM_DIRTY_LOG_PAGE_OFFSET * host_page_size`.
pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;

/// Ring entries the kernel reserves beyond the soft limit (kernel-internal,
/// from `include/linux/kvm_dirty_ring.h`; not uapi). Only for sizing: the
/// usable entries per exit are `entries - KVM_DIRTY_RING_RSVD_ENTRIES`, minus
/// 512 more on Intel hosts with PML.
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;

/// Page index of the coalesced-MMIO ring in the vCPU mapping (page 1 is the
/// PIO data page, page 0 is [`kvm_run`]).
pub const KVM_COALESCED_MMIO_PAGE_OFFSET: u64 = 2;

// ---------------------------------------------------------------------------
// Manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` args[0])
// ---------------------------------------------------------------------------

/// [`KVM_GET_DIRTY_LOG`] only copies the bitmap; userspace re-protects pages
/// with [`KVM_CLEAR_DIRTY_LOG`].
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// Enabling dirty logging sets every bit and write-protects nothing;
/// protection happens gradually in [`KVM_CLEAR_DIRTY_LOG`].
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;

/// `MSR_IA32_TSC` (arch/x86/include/asm/msr-index.h): the time-stamp counter, the
/// clock the built-in guest paces itself against; migrated with the vCPU.
pub const MSR_IA32_TSC: u32 = 0x10;

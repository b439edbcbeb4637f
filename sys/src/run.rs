//! `struct kvm_run`, the per-vCPU block shared with the kernel, and the exit
//! payloads dirtyvm reads from its union.
//!
//! Only the union members dirtyvm decodes are modelled; the `padding` member
//! fixes the union's size at 256 bytes exactly as in the header. Each type is
//! followed by a layout block asserting its size, alignment and field offsets.

#![allow(non_camel_case_types)]

#[cfg(doc)]
use crate::*;

use core::mem::offset_of;

use static_assertions::const_assert_eq;

use crate::consts::SYNC_REGS_SIZE_BYTES;

/// Payload of [`KVM_EXIT_IO`] (`io` in the header's exit union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_run_exit_io {
    /// [`KVM_EXIT_IO_IN`] or [`KVM_EXIT_IO_OUT`].
    pub direction: u8,
    /// Access width in bytes (1, 2 or 4).
    pub size: u8,
    /// I/O port.
    pub port: u16,
    /// Number of accesses (above 1 for string instructions).
    pub count: u32,
    /// Offset of the data from the start of [`kvm_run`] (x86: 4096, the PIO
    /// page); `size * count` bytes, packed.
    pub data_offset: u64,
}

const_assert_eq!(size_of::<kvm_run_exit_io>(), 16);
const_assert_eq!(align_of::<kvm_run_exit_io>(), 8);
const_assert_eq!(offset_of!(kvm_run_exit_io, direction), 0);
const_assert_eq!(offset_of!(kvm_run_exit_io, size), 1);
const_assert_eq!(offset_of!(kvm_run_exit_io, port), 2);
const_assert_eq!(offset_of!(kvm_run_exit_io, count), 4);
const_assert_eq!(offset_of!(kvm_run_exit_io, data_offset), 8);

/// Payload of [`KVM_EXIT_MMIO`] (`mmio` in the header's exit union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_run_exit_mmio {
    /// Guest physical address accessed.
    pub phys_addr: u64,
    /// Data written by the guest, or to fill in for a read; `len` bytes used.
    pub data: [u8; 8],
    /// Access width in bytes.
    pub len: u32,
    /// Nonzero for a write.
    pub is_write: u8,
    /// Tail padding, implicit in the header; spelled out so that every byte
    /// is initialised.
    pub padding: [u8; 3],
}

const_assert_eq!(size_of::<kvm_run_exit_mmio>(), 24);
const_assert_eq!(align_of::<kvm_run_exit_mmio>(), 8);
const_assert_eq!(offset_of!(kvm_run_exit_mmio, phys_addr), 0);
const_assert_eq!(offset_of!(kvm_run_exit_mmio, data), 8);
const_assert_eq!(offset_of!(kvm_run_exit_mmio, len), 16);
const_assert_eq!(offset_of!(kvm_run_exit_mmio, is_write), 20);
const_assert_eq!(offset_of!(kvm_run_exit_mmio, padding), 21);

/// Payload of [`KVM_EXIT_FAIL_ENTRY`] (`fail_entry` in the header's exit
/// union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_run_exit_fail_entry {
    /// Hardware-specific reason (on Intel, the VM-exit reason of the failed
    /// VM entry).
    pub hardware_entry_failure_reason: u64,
    /// Host CPU the entry failed on.
    pub cpu: u32,
    /// Tail padding, implicit in the header; spelled out so that every byte
    /// is initialised.
    pub padding: u32,
}

const_assert_eq!(size_of::<kvm_run_exit_fail_entry>(), 16);
const_assert_eq!(align_of::<kvm_run_exit_fail_entry>(), 8);
const_assert_eq!(
    offset_of!(kvm_run_exit_fail_entry, hardware_entry_failure_reason),
    0
);
const_assert_eq!(offset_of!(kvm_run_exit_fail_entry, cpu), 8);
const_assert_eq!(offset_of!(kvm_run_exit_fail_entry, padding), 12);

/// Payload of [`KVM_EXIT_INTERNAL_ERROR`] (`internal` in the header's exit
/// union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_run_exit_internal {
    /// `KVM_INTERNAL_ERROR_*` sub-reason.
    pub suberror: u32,
    /// Number of valid words in `data`.
    pub ndata: u32,
    /// Sub-reason-specific data.
    pub data: [u64; 16],
}

const_assert_eq!(size_of::<kvm_run_exit_internal>(), 136);
const_assert_eq!(align_of::<kvm_run_exit_internal>(), 8);
const_assert_eq!(offset_of!(kvm_run_exit_internal, suberror), 0);
const_assert_eq!(offset_of!(kvm_run_exit_internal, ndata), 4);
const_assert_eq!(offset_of!(kvm_run_exit_internal, data), 8);

/// Payload of [`KVM_EXIT_SYSTEM_EVENT`] (`system_event` in the header's exit
/// union).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_run_exit_system_event {
    /// `KVM_SYSTEM_EVENT_*` kind (`type` in the header).
    pub type_: u32,
    /// Number of valid words in `data`.
    pub ndata: u32,
    /// Event-specific data. In the header this is a union with
    /// `__u64 flags`, which aliases `data[0]`.
    pub data: [u64; 16],
}

const_assert_eq!(size_of::<kvm_run_exit_system_event>(), 136);
const_assert_eq!(align_of::<kvm_run_exit_system_event>(), 8);
const_assert_eq!(offset_of!(kvm_run_exit_system_event, type_), 0);
const_assert_eq!(offset_of!(kvm_run_exit_system_event, ndata), 4);
const_assert_eq!(offset_of!(kvm_run_exit_system_event, data), 8);

/// The exit-payload union of [`kvm_run`] (anonymous in the header), selected
/// by [`kvm_run::exit_reason`].
///
/// Reading a member is `unsafe` and belongs to the caller's crate; every
/// member is plain integers, so any bit pattern is valid for each of them.
#[repr(C)]
#[derive(Clone, Copy)]
pub union kvm_run_exit {
    /// [`KVM_EXIT_IO`].
    pub io: kvm_run_exit_io,
    /// [`KVM_EXIT_MMIO`].
    pub mmio: kvm_run_exit_mmio,
    /// [`KVM_EXIT_FAIL_ENTRY`].
    pub fail_entry: kvm_run_exit_fail_entry,
    /// [`KVM_EXIT_INTERNAL_ERROR`].
    pub internal: kvm_run_exit_internal,
    /// [`KVM_EXIT_SYSTEM_EVENT`].
    pub system_event: kvm_run_exit_system_event,
    /// Fixes the size of the union; the raw bytes of any payload.
    pub padding: [u8; 256],
}

impl Default for kvm_run_exit {
    /// All 256 bytes zero.
    fn default() -> Self {
        Self { padding: [0; 256] }
    }
}

const_assert_eq!(size_of::<kvm_run_exit>(), 256);
const_assert_eq!(align_of::<kvm_run_exit>(), 8);
const_assert_eq!(offset_of!(kvm_run_exit, io), 0);
const_assert_eq!(offset_of!(kvm_run_exit, mmio), 0);
const_assert_eq!(offset_of!(kvm_run_exit, fail_entry), 0);
const_assert_eq!(offset_of!(kvm_run_exit, internal), 0);
const_assert_eq!(offset_of!(kvm_run_exit, system_event), 0);
const_assert_eq!(offset_of!(kvm_run_exit, padding), 0);

/// The per-vCPU communication block, mapped from the vCPU fd at offset 0
/// (length [`KVM_GET_VCPU_MMAP_SIZE`]). The kernel writes it during
/// [`KVM_RUN`].
///
/// Only ever accessed through the mapping, never constructed or copied, so it
/// derives nothing.
#[repr(C)]
pub struct kvm_run {
    /// In: ask for [`KVM_EXIT_IRQ_WINDOW_OPEN`] once the guest can take an
    /// interrupt.
    pub request_interrupt_window: u8,
    /// In: if nonzero when [`KVM_RUN`] starts, it returns at once with `EINTR`
    /// (needs [`KVM_CAP_IMMEDIATE_EXIT`]). Read once per [`KVM_RUN`] call.
    pub immediate_exit: u8,
    /// Unused.
    pub padding1: [u8; 6],
    /// Out: `KVM_EXIT_*`; selects the member of `exit`.
    pub exit_reason: u32,
    /// Out: the guest can take an interrupt now.
    pub ready_for_interrupt_injection: u8,
    /// Out: the guest's `RFLAGS.IF`.
    pub if_flag: u8,
    /// Out: `KVM_RUN_X86_*` bits.
    pub flags: u16,
    /// In and out: `CR8` (task priority).
    pub cr8: u64,
    /// In and out: `IA32_APIC_BASE`.
    pub apic_base: u64,
    /// Out: the exit payload (anonymous union in the header).
    pub exit: kvm_run_exit,
    /// Out: which register sets in `s` the kernel filled (`KVM_SYNC_X86_*`).
    pub kvm_valid_regs: u64,
    /// In: which register sets in `s` userspace modified (`KVM_SYNC_X86_*`).
    pub kvm_dirty_regs: u64,
    /// Shared register sets: `union { struct kvm_sync_regs regs; char
    /// padding[SYNC_REGS_SIZE_BYTES]; }` in the header.
    pub s: [u8; SYNC_REGS_SIZE_BYTES],
}

const_assert_eq!(size_of::<kvm_run>(), 2352);
const_assert_eq!(align_of::<kvm_run>(), 8);
const_assert_eq!(offset_of!(kvm_run, request_interrupt_window), 0);
const_assert_eq!(offset_of!(kvm_run, immediate_exit), 1);
const_assert_eq!(offset_of!(kvm_run, padding1), 2);
const_assert_eq!(offset_of!(kvm_run, exit_reason), 8);
const_assert_eq!(offset_of!(kvm_run, ready_for_interrupt_injection), 12);
const_assert_eq!(offset_of!(kvm_run, if_flag), 13);
const_assert_eq!(offset_of!(kvm_run, flags), 14);
const_assert_eq!(offset_of!(kvm_run, cr8), 16);
const_assert_eq!(offset_of!(kvm_run, apic_base), 24);
const_assert_eq!(offset_of!(kvm_run, exit), 32);
const_assert_eq!(offset_of!(kvm_run, kvm_valid_regs), 288);
const_assert_eq!(offset_of!(kvm_run, kvm_dirty_regs), 296);
const_assert_eq!(offset_of!(kvm_run, s), 304);

//! ioctl argument structures and the dirty-ring entry, `#[repr(C)]` with the
//! kernel's spellings and field order.
//!
//! Every structure is followed by a layout block asserting, at compile time,
//! its size, its alignment and the offset of every field, with the numbers of
//! the x86-64 uapi headers. Pointers the kernel reads are `u64` fields, as the
//! headers' `union { void *p; __u64 padding; }` makes them.

#![allow(non_camel_case_types)]

#[cfg(doc)]
use crate::*;

use core::mem::offset_of;

use static_assertions::const_assert_eq;

use crate::consts::KVM_NR_INTERRUPTS;

// ---------------------------------------------------------------------------
// Memslots
// ---------------------------------------------------------------------------

/// Argument of [`KVM_SET_USER_MEMORY_REGION`]: one guest-physical memory slot
/// backed by host virtual memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_userspace_memory_region {
    /// `(as_id << 16) | slot_id`.
    pub slot: u32,
    /// `KVM_MEM_*` bits (see [`MemoryRegionFlags`]).
    pub flags: u32,
    /// Guest physical address of the slot's first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the backing memory.
    pub userspace_addr: u64,
}

const_assert_eq!(size_of::<kvm_userspace_memory_region>(), 32);
const_assert_eq!(align_of::<kvm_userspace_memory_region>(), 8);
const_assert_eq!(offset_of!(kvm_userspace_memory_region, slot), 0);
const_assert_eq!(offset_of!(kvm_userspace_memory_region, flags), 4);
const_assert_eq!(offset_of!(kvm_userspace_memory_region, guest_phys_addr), 8);
const_assert_eq!(offset_of!(kvm_userspace_memory_region, memory_size), 16);
const_assert_eq!(offset_of!(kvm_userspace_memory_region, userspace_addr), 24);

// ---------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------

/// Argument of [`KVM_ENABLE_CAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_enable_cap {
    /// The `KVM_CAP_*` number to enable.
    pub cap: u32,
    /// Capability-specific flags; 0 for every capability dirtyvm enables.
    pub flags: u32,
    /// Capability-specific arguments (ring size in bytes, protect mask, ...).
    pub args: [u64; 4],
    /// Reserved; must be zero.
    pub pad: [u8; 64],
}

impl Default for kvm_enable_cap {
    /// All zero.
    fn default() -> Self {
        Self {
            cap: 0,
            flags: 0,
            args: [0; 4],
            pad: [0; 64],
        }
    }
}

const_assert_eq!(size_of::<kvm_enable_cap>(), 104);
const_assert_eq!(align_of::<kvm_enable_cap>(), 8);
const_assert_eq!(offset_of!(kvm_enable_cap, cap), 0);
const_assert_eq!(offset_of!(kvm_enable_cap, flags), 4);
const_assert_eq!(offset_of!(kvm_enable_cap, args), 8);
const_assert_eq!(offset_of!(kvm_enable_cap, pad), 40);

// ---------------------------------------------------------------------------
// Dirty tracking
// ---------------------------------------------------------------------------

/// One dirty-ring entry, shared with the kernel in the vCPU fd mapping at
/// page [`KVM_DIRTY_LOG_PAGE_OFFSET`].
///
/// This is the layout only: the kernel writes the ring concurrently, so read
/// and write mapped entries through an atomic overlay of the same layout,
/// never through references to this type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_dirty_gfn {
    /// `KVM_DIRTY_GFN_F_*` state bits (see [`DirtyGfnFlags`]).
    pub flags: u32,
    /// `(as_id << 16) | slot_id` of the dirtied page's memslot.
    pub slot: u32,
    /// Page index inside the memslot (`gfn - base_gfn`), not an address.
    pub offset: u64,
}

const_assert_eq!(size_of::<kvm_dirty_gfn>(), 16);
const_assert_eq!(align_of::<kvm_dirty_gfn>(), 8);
const_assert_eq!(offset_of!(kvm_dirty_gfn, flags), 0);
const_assert_eq!(offset_of!(kvm_dirty_gfn, slot), 4);
const_assert_eq!(offset_of!(kvm_dirty_gfn, offset), 8);

/// Argument of [`KVM_GET_DIRTY_LOG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_dirty_log {
    /// `(as_id << 16) | slot_id`.
    pub slot: u32,
    /// Unused; zero.
    pub padding1: u32,
    /// User pointer to the bitmap the kernel fills, one bit per page in whole
    /// `u64` words. In the header this is `union { void *dirty_bitmap; __u64
    /// padding2; }`.
    pub dirty_bitmap: u64,
}

const_assert_eq!(size_of::<kvm_dirty_log>(), 16);
const_assert_eq!(align_of::<kvm_dirty_log>(), 8);
const_assert_eq!(offset_of!(kvm_dirty_log, slot), 0);
const_assert_eq!(offset_of!(kvm_dirty_log, padding1), 4);
const_assert_eq!(offset_of!(kvm_dirty_log, dirty_bitmap), 8);

/// Argument of [`KVM_CLEAR_DIRTY_LOG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_clear_dirty_log {
    /// `(as_id << 16) | slot_id`.
    pub slot: u32,
    /// Number of pages covered; a multiple of 64 unless the range reaches the
    /// end of the slot.
    pub num_pages: u32,
    /// First page covered (slot-relative); a multiple of 64.
    pub first_page: u64,
    /// User pointer to the bitmap of pages to re-protect, bit 0 being
    /// `first_page`. In the header this is `union { void *dirty_bitmap; __u64
    /// padding2; }`.
    pub dirty_bitmap: u64,
}

const_assert_eq!(size_of::<kvm_clear_dirty_log>(), 24);
const_assert_eq!(align_of::<kvm_clear_dirty_log>(), 8);
const_assert_eq!(offset_of!(kvm_clear_dirty_log, slot), 0);
const_assert_eq!(offset_of!(kvm_clear_dirty_log, num_pages), 4);
const_assert_eq!(offset_of!(kvm_clear_dirty_log, first_page), 8);
const_assert_eq!(offset_of!(kvm_clear_dirty_log, dirty_bitmap), 16);

// ---------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------

/// Argument of [`KVM_GET_REGS`] / [`KVM_SET_REGS`]: general-purpose registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // Field names are the x86-64 register names.
pub struct kvm_regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

const_assert_eq!(size_of::<kvm_regs>(), 144);
const_assert_eq!(align_of::<kvm_regs>(), 8);
const_assert_eq!(offset_of!(kvm_regs, rax), 0);
const_assert_eq!(offset_of!(kvm_regs, rbx), 8);
const_assert_eq!(offset_of!(kvm_regs, rcx), 16);
const_assert_eq!(offset_of!(kvm_regs, rdx), 24);
const_assert_eq!(offset_of!(kvm_regs, rsi), 32);
const_assert_eq!(offset_of!(kvm_regs, rdi), 40);
const_assert_eq!(offset_of!(kvm_regs, rsp), 48);
const_assert_eq!(offset_of!(kvm_regs, rbp), 56);
const_assert_eq!(offset_of!(kvm_regs, r8), 64);
const_assert_eq!(offset_of!(kvm_regs, r9), 72);
const_assert_eq!(offset_of!(kvm_regs, r10), 80);
const_assert_eq!(offset_of!(kvm_regs, r11), 88);
const_assert_eq!(offset_of!(kvm_regs, r12), 96);
const_assert_eq!(offset_of!(kvm_regs, r13), 104);
const_assert_eq!(offset_of!(kvm_regs, r14), 112);
const_assert_eq!(offset_of!(kvm_regs, r15), 120);
const_assert_eq!(offset_of!(kvm_regs, rip), 128);
const_assert_eq!(offset_of!(kvm_regs, rflags), 136);

/// A segment register with its hidden descriptor-cache part (in
/// [`kvm_sregs`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_segment {
    /// Segment base address.
    pub base: u64,
    /// Segment limit, in bytes (already scaled by granularity).
    pub limit: u32,
    /// Visible selector.
    pub selector: u16,
    /// Descriptor type (4 bits). `type` in the header.
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (0 = 16-bit, 1 = 32-bit).
    pub db: u8,
    /// Descriptor type bit (0 = system, 1 = code or data).
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity (limit in 4 KiB units).
    pub g: u8,
    /// Available for system software.
    pub avl: u8,
    /// The segment is unusable (VMX "unusable" access-rights bit).
    pub unusable: u8,
    /// Unused; zero.
    pub padding: u8,
}

const_assert_eq!(size_of::<kvm_segment>(), 24);
const_assert_eq!(align_of::<kvm_segment>(), 8);
const_assert_eq!(offset_of!(kvm_segment, base), 0);
const_assert_eq!(offset_of!(kvm_segment, limit), 8);
const_assert_eq!(offset_of!(kvm_segment, selector), 12);
const_assert_eq!(offset_of!(kvm_segment, type_), 14);
const_assert_eq!(offset_of!(kvm_segment, present), 15);
const_assert_eq!(offset_of!(kvm_segment, dpl), 16);
const_assert_eq!(offset_of!(kvm_segment, db), 17);
const_assert_eq!(offset_of!(kvm_segment, s), 18);
const_assert_eq!(offset_of!(kvm_segment, l), 19);
const_assert_eq!(offset_of!(kvm_segment, g), 20);
const_assert_eq!(offset_of!(kvm_segment, avl), 21);
const_assert_eq!(offset_of!(kvm_segment, unusable), 22);
const_assert_eq!(offset_of!(kvm_segment, padding), 23);

/// A descriptor-table register, GDTR or IDTR (in [`kvm_sregs`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_dtable {
    /// Table base address.
    pub base: u64,
    /// Table limit (size in bytes minus one).
    pub limit: u16,
    /// Unused; zero.
    pub padding: [u16; 3],
}

const_assert_eq!(size_of::<kvm_dtable>(), 16);
const_assert_eq!(align_of::<kvm_dtable>(), 8);
const_assert_eq!(offset_of!(kvm_dtable, base), 0);
const_assert_eq!(offset_of!(kvm_dtable, limit), 8);
const_assert_eq!(offset_of!(kvm_dtable, padding), 10);

/// Argument of [`KVM_GET_SREGS`] / [`KVM_SET_SREGS`]: segment, descriptor-table
/// and control registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_sregs {
    /// Code segment.
    pub cs: kvm_segment,
    /// Data segment.
    pub ds: kvm_segment,
    /// Extra segment.
    pub es: kvm_segment,
    /// FS segment.
    pub fs: kvm_segment,
    /// GS segment.
    pub gs: kvm_segment,
    /// Stack segment.
    pub ss: kvm_segment,
    /// Task register.
    pub tr: kvm_segment,
    /// Local descriptor table register.
    pub ldt: kvm_segment,
    /// Global descriptor table register.
    pub gdt: kvm_dtable,
    /// Interrupt descriptor table register.
    pub idt: kvm_dtable,
    /// Control register 0.
    pub cr0: u64,
    /// Control register 2 (page-fault linear address).
    pub cr2: u64,
    /// Control register 3 (page-table base).
    pub cr3: u64,
    /// Control register 4.
    pub cr4: u64,
    /// Control register 8 (task priority).
    pub cr8: u64,
    /// Extended feature enable register (MSR `IA32_EFER`).
    pub efer: u64,
    /// Local APIC base (MSR `IA32_APIC_BASE`).
    pub apic_base: u64,
    /// Pending external interrupt, one bit per vector (at most one bit set).
    pub interrupt_bitmap: [u64; KVM_NR_INTERRUPTS.div_ceil(64)],
}

const_assert_eq!(size_of::<kvm_sregs>(), 312);
const_assert_eq!(align_of::<kvm_sregs>(), 8);
const_assert_eq!(offset_of!(kvm_sregs, cs), 0);
const_assert_eq!(offset_of!(kvm_sregs, ds), 24);
const_assert_eq!(offset_of!(kvm_sregs, es), 48);
const_assert_eq!(offset_of!(kvm_sregs, fs), 72);
const_assert_eq!(offset_of!(kvm_sregs, gs), 96);
const_assert_eq!(offset_of!(kvm_sregs, ss), 120);
const_assert_eq!(offset_of!(kvm_sregs, tr), 144);
const_assert_eq!(offset_of!(kvm_sregs, ldt), 168);
const_assert_eq!(offset_of!(kvm_sregs, gdt), 192);
const_assert_eq!(offset_of!(kvm_sregs, idt), 208);
const_assert_eq!(offset_of!(kvm_sregs, cr0), 224);
const_assert_eq!(offset_of!(kvm_sregs, cr2), 232);
const_assert_eq!(offset_of!(kvm_sregs, cr3), 240);
const_assert_eq!(offset_of!(kvm_sregs, cr4), 248);
const_assert_eq!(offset_of!(kvm_sregs, cr8), 256);
const_assert_eq!(offset_of!(kvm_sregs, efer), 264);
const_assert_eq!(offset_of!(kvm_sregs, apic_base), 272);
const_assert_eq!(offset_of!(kvm_sregs, interrupt_bitmap), 280);

// ---------------------------------------------------------------------------
// CPUID
// ---------------------------------------------------------------------------

/// One CPUID leaf (or sub-leaf) as reported by [`KVM_GET_SUPPORTED_CPUID`] and
/// set with [`KVM_SET_CPUID2`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_cpuid_entry2 {
    /// Leaf (`EAX` input).
    pub function: u32,
    /// Sub-leaf (`ECX` input), when `flags` marks the leaf as indexed.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*` bits.
    pub flags: u32,
    /// `EAX` output.
    pub eax: u32,
    /// `EBX` output.
    pub ebx: u32,
    /// `ECX` output.
    pub ecx: u32,
    /// `EDX` output.
    pub edx: u32,
    /// Unused; zero.
    pub padding: [u32; 3],
}

const_assert_eq!(size_of::<kvm_cpuid_entry2>(), 40);
const_assert_eq!(align_of::<kvm_cpuid_entry2>(), 4);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, function), 0);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, index), 4);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, flags), 8);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, eax), 12);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, ebx), 16);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, ecx), 20);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, edx), 24);
const_assert_eq!(offset_of!(kvm_cpuid_entry2, padding), 28);

/// Header of the argument of [`KVM_GET_SUPPORTED_CPUID`] / [`KVM_SET_CPUID2`].
///
/// In the header it ends with the flexible array member
/// `struct kvm_cpuid_entry2 entries[]`: `nent` entries follow it directly in
/// memory. This type is the fixed 8-byte part only (its size is the one
/// encoded in the ioctl numbers); use [`CpuidBuf`] for header plus entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_cpuid2 {
    /// Number of entries following the header. For [`KVM_GET_SUPPORTED_CPUID`]
    /// it is the capacity on input and the count filled on output.
    pub nent: u32,
    /// Unused; zero.
    pub padding: u32,
}

const_assert_eq!(size_of::<kvm_cpuid2>(), 8);
const_assert_eq!(align_of::<kvm_cpuid2>(), 4);
const_assert_eq!(offset_of!(kvm_cpuid2, nent), 0);
const_assert_eq!(offset_of!(kvm_cpuid2, padding), 4);

/// A [`kvm_cpuid2`] header followed by room for `N` entries, laid out as the
/// kernel expects, so a caller can pass a fixed-size buffer.
///
/// Pass a pointer to the whole [`CpuidBuf`] (not to `header`): the kernel reads
/// and writes `header.nent` entries past the header. Not a kernel type.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuidBuf<const N: usize> {
    /// The fixed part; `nent` counts the valid entries.
    pub header: kvm_cpuid2,
    /// The entries, of which the first `header.nent` are meaningful.
    pub entries: [kvm_cpuid_entry2; N],
}

impl<const N: usize> CpuidBuf<N> {
    /// Capacity in entries, as the `u32` that `nent` holds.
    const NENT: u32 = {
        assert!(N <= u32::MAX as usize, "CpuidBuf capacity exceeds u32");
        N as u32
    };

    /// A zeroed buffer with `header.nent = N`, ready for
    /// [`KVM_GET_SUPPORTED_CPUID`] (which takes `nent` as the capacity).
    pub fn new() -> Self {
        Self {
            header: kvm_cpuid2 {
                nent: Self::NENT,
                padding: 0,
            },
            entries: [kvm_cpuid_entry2::default(); N],
        }
    }

    /// The first `header.nent` entries (all `N` if `nent` is larger).
    pub fn valid_entries(&self) -> &[kvm_cpuid_entry2] {
        let n = usize::try_from(self.header.nent).map_or(N, |n| n.min(N));
        &self.entries[..n]
    }
}

impl<const N: usize> Default for CpuidBuf<N> {
    /// Same as [`CpuidBuf::new`]: zeroed, `header.nent = N`.
    fn default() -> Self {
        Self::new()
    }
}

const_assert_eq!(size_of::<CpuidBuf<256>>(), 8 + 256 * 40);
const_assert_eq!(align_of::<CpuidBuf<256>>(), 4);
const_assert_eq!(offset_of!(CpuidBuf<256>, header), 0);
const_assert_eq!(offset_of!(CpuidBuf<256>, entries), 8);

/// `struct kvm_msr_entry`: one model-specific register for [`KVM_GET_MSRS`] and
/// [`KVM_SET_MSRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_msr_entry {
    /// The MSR's index, e.g. [`MSR_IA32_TSC`].
    pub index: u32,
    /// Unused; zero.
    pub reserved: u32,
    /// The value.
    pub data: u64,
}

const_assert_eq!(size_of::<kvm_msr_entry>(), 16);
const_assert_eq!(align_of::<kvm_msr_entry>(), 8);
const_assert_eq!(offset_of!(kvm_msr_entry, index), 0);
const_assert_eq!(offset_of!(kvm_msr_entry, reserved), 4);
const_assert_eq!(offset_of!(kvm_msr_entry, data), 8);

/// `struct kvm_msrs`: the fixed header of [`KVM_GET_MSRS`] / [`KVM_SET_MSRS`]'s
/// argument, followed in memory by `nmsrs` [`kvm_msr_entry`]s; use [`MsrBuf`]
/// for header plus entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_msrs {
    /// Number of entries following the header.
    pub nmsrs: u32,
    /// Unused; zero.
    pub pad: u32,
}

const_assert_eq!(size_of::<kvm_msrs>(), 8);
const_assert_eq!(align_of::<kvm_msrs>(), 4);
const_assert_eq!(offset_of!(kvm_msrs, nmsrs), 0);
const_assert_eq!(offset_of!(kvm_msrs, pad), 4);

/// A [`kvm_msrs`] header followed by `N` entries, laid out as the kernel
/// expects. Not a kernel type. Pass a pointer to the whole buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MsrBuf<const N: usize> {
    /// The fixed part; `nmsrs` counts the entries.
    pub header: kvm_msrs,
    /// The entries.
    pub entries: [kvm_msr_entry; N],
}

impl<const N: usize> MsrBuf<N> {
    /// A buffer of the MSRs `indices`, values zero, `header.nmsrs = N`.
    pub fn new(indices: [u32; N]) -> Self {
        Self {
            header: kvm_msrs {
                nmsrs: {
                    assert!(N <= u32::MAX as usize, "MsrBuf capacity exceeds u32");
                    N as u32
                },
                pad: 0,
            },
            entries: indices.map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            }),
        }
    }
}

const_assert_eq!(size_of::<MsrBuf<1>>(), 8 + 16);
const_assert_eq!(align_of::<MsrBuf<1>>(), 8);
const_assert_eq!(offset_of!(MsrBuf<1>, header), 0);
const_assert_eq!(offset_of!(MsrBuf<1>, entries), 8);

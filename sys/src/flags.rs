//! Typed flag sets built from the raw `KVM_*` flag constants.

#[cfg(doc)]
use crate::*;

use bitflags::bitflags;
use static_assertions::const_assert_eq;

use crate::consts::{
    KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_MASK, KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};

bitflags! {
    /// `kvm_userspace_memory_region.flags` (`KVM_MEM_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MemoryRegionFlags: u32 {
        /// [`KVM_MEM_LOG_DIRTY_PAGES`]: track writes to the slot.
        const LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
        /// [`KVM_MEM_READONLY`]: guest writes exit as MMIO.
        const READONLY = KVM_MEM_READONLY;
        /// [`KVM_MEM_GUEST_MEMFD`]: the slot is backed by a `guest_memfd`.
        const GUEST_MEMFD = KVM_MEM_GUEST_MEMFD;
    }
}

bitflags! {
    /// `kvm_dirty_gfn.flags` (`KVM_DIRTY_GFN_F_*`).
    ///
    /// An entry is ready to harvest only when its flags are exactly
    /// [`DirtyGfnFlags::DIRTY`]; compare, do not test the bit.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DirtyGfnFlags: u32 {
        /// [`KVM_DIRTY_GFN_F_DIRTY`]: published by the kernel, not harvested.
        const DIRTY = KVM_DIRTY_GFN_F_DIRTY;
        /// [`KVM_DIRTY_GFN_F_RESET`]: harvested, awaiting
        /// [`KVM_RESET_DIRTY_RINGS`].
        const RESET = KVM_DIRTY_GFN_F_RESET;
    }
}

impl DirtyGfnFlags {
    /// [`KVM_DIRTY_GFN_F_MASK`]: every defined bit (equal to [`Self::all`]).
    pub const MASK: Self = Self::from_bits_retain(KVM_DIRTY_GFN_F_MASK);
}

const_assert_eq!(DirtyGfnFlags::MASK.bits(), DirtyGfnFlags::all().bits());

bitflags! {
    /// `args[0]` of `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`, and
    /// the mask [`KVM_CHECK_EXTENSION`] returns for it (`KVM_DIRTY_LOG_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct ManualDirtyLogProtect: u64 {
        /// [`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`]: re-protect via
        /// [`KVM_CLEAR_DIRTY_LOG`] instead of inside [`KVM_GET_DIRTY_LOG`].
        const MANUAL_PROTECT_ENABLE = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        /// [`KVM_DIRTY_LOG_INITIALLY_SET`]: logging starts all-dirty and
        /// unprotected.
        const INITIALLY_SET = KVM_DIRTY_LOG_INITIALLY_SET;
    }
}

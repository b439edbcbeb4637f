//! ioctl request numbers, as literal values.
//!
//! Each number is `_IOC(dir, KVMIO, nr, size) = dir << 30 | size << 16 |
//! KVMIO << 8 | nr`, with `size = sizeof(argument struct)`; the tests below
//! re-derive every one of them from the structure sizes in this crate. "Basic"
//! means the ioctl belongs to the base API and needs no capability.

#[cfg(doc)]
use crate::*;

use core::ffi::c_ulong;

/// The ioctl type byte of every KVM request (`KVMIO`).
pub const KVMIO: u32 = 0xAE;

// ---------------------------------------------------------------------------
// System ioctls (/dev/kvm fd)
// ---------------------------------------------------------------------------

/// `_IO(KVMIO, 0x00)`. `/dev/kvm` fd; basic. Returns the API version, which
/// must equal [`KVM_API_VERSION`] (12).
pub const KVM_GET_API_VERSION: c_ulong = 0xAE00;

/// `_IO(KVMIO, 0x01)`. `/dev/kvm` fd; basic. Argument: the machine type by
/// value (0 on x86). Returns a new VM fd.
pub const KVM_CREATE_VM: c_ulong = 0xAE01;

/// `_IO(KVMIO, 0x03)`. `/dev/kvm` fd (basic), or VM fd (needs
/// [`KVM_CAP_CHECK_EXTENSION_VM`]). Argument: a `KVM_CAP_*` number by value.
/// Returns 0 if unsupported, otherwise 1 or a capability-specific value.
pub const KVM_CHECK_EXTENSION: c_ulong = 0xAE03;

/// `_IO(KVMIO, 0x04)`. `/dev/kvm` fd; basic. Returns the length of the vCPU
/// fd mapping at offset 0 ([`kvm_run`], PIO page, coalesced-MMIO page: 3 pages
/// on x86). It does not cover the dirty ring.
pub const KVM_GET_VCPU_MMAP_SIZE: c_ulong = 0xAE04;

/// `_IOWR(KVMIO, 0x05, struct kvm_cpuid2)`. `/dev/kvm` fd; needs
/// [`KVM_CAP_EXT_CPUID`]. Argument: [`kvm_cpuid2`] followed by `nent`
/// entries (see [`CpuidBuf`]); `nent` is the capacity in and the count filled
/// out (`E2BIG` if too small).
pub const KVM_GET_SUPPORTED_CPUID: c_ulong = 0xC008_AE05;

// ---------------------------------------------------------------------------
// VM ioctls (VM fd)
// ---------------------------------------------------------------------------

/// `_IO(KVMIO, 0x41)`. VM fd; basic. Argument: the vCPU id by value (on x86
/// the APIC id), below [`KVM_CAP_MAX_VCPUS`]. Returns a new vCPU fd.
pub const KVM_CREATE_VCPU: c_ulong = 0xAE41;

/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`. VM fd; basic. Argument:
/// [`kvm_dirty_log`]. Copies the slot's dirty bitmap (and, without manual
/// protection, clears it and re-protects the pages). `ENXIO` while the dirty
/// ring is enabled without [`KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`].
pub const KVM_GET_DIRTY_LOG: c_ulong = 0x4010_AE42;

/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`. VM fd; needs
/// [`KVM_CAP_USER_MEMORY`]. Argument: [`kvm_userspace_memory_region`].
/// Creates a memslot, changes its flags, or deletes it (`memory_size` 0).
pub const KVM_SET_USER_MEMORY_REGION: c_ulong = 0x4020_AE46;

/// `_IO(KVMIO, 0x47)`. VM fd; needs [`KVM_CAP_SET_TSS_ADDR`]. Argument: by
/// value, the guest physical address of a 3-page region below 4 GiB that the
/// guest does not use (needed on Intel).
pub const KVM_SET_TSS_ADDR: c_ulong = 0xAE47;

/// `_IOW(KVMIO, 0x48, __u64)`. VM fd; needs [`KVM_CAP_SET_IDENTITY_MAP_ADDR`].
/// Argument: a pointer to a `u64` holding the guest physical address of a
/// 1-page region (Intel's real-mode identity map). Only before the first
/// [`KVM_CREATE_VCPU`].
pub const KVM_SET_IDENTITY_MAP_ADDR: c_ulong = 0x4008_AE48;

/// `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`. VM fd (needs
/// [`KVM_CAP_ENABLE_CAP_VM`]) or vCPU fd (needs [`KVM_CAP_ENABLE_CAP`]).
/// Argument: [`kvm_enable_cap`]. The dirty-ring and dirty-log capabilities are
/// VM-wide and enabled on the VM fd.
pub const KVM_ENABLE_CAP: c_ulong = 0x4068_AEA3;

/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`. VM fd; needs
/// [`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`], enabled. Argument:
/// [`kvm_clear_dirty_log`]. Re-protects the pages whose bits are set.
pub const KVM_CLEAR_DIRTY_LOG: c_ulong = 0xC018_AEC0;

/// `_IO(KVMIO, 0xc7)`. VM fd; needs [`KVM_CAP_DIRTY_LOG_RING`] or
/// [`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`], enabled (`EINVAL` otherwise).
/// Re-protects the harvested (`RESET`) entries of every vCPU's ring and
/// returns how many it reset.
pub const KVM_RESET_DIRTY_RINGS: c_ulong = 0xAEC7;

// ---------------------------------------------------------------------------
// vCPU ioctls (vCPU fd)
// ---------------------------------------------------------------------------

/// `_IO(KVMIO, 0x80)`. vCPU fd; basic. Runs the vCPU until an exit, which is
/// described in [`kvm_run`]; returns 0 ([`KVM_EXIT_MEMORY_FAULT`] alone comes
/// with -1).
pub const KVM_RUN: c_ulong = 0xAE80;

/// `_IOR(KVMIO, 0x81, struct kvm_regs)`. vCPU fd; basic. Argument:
/// [`kvm_regs`], filled by the kernel.
pub const KVM_GET_REGS: c_ulong = 0x8090_AE81;

/// `_IOW(KVMIO, 0x82, struct kvm_regs)`. vCPU fd; basic. Argument:
/// [`kvm_regs`].
pub const KVM_SET_REGS: c_ulong = 0x4090_AE82;

/// `_IOR(KVMIO, 0x83, struct kvm_sregs)`. vCPU fd; basic. Argument:
/// [`kvm_sregs`], filled by the kernel.
pub const KVM_GET_SREGS: c_ulong = 0x8138_AE83;

/// `_IOW(KVMIO, 0x84, struct kvm_sregs)`. vCPU fd; basic. Argument:
/// [`kvm_sregs`].
pub const KVM_SET_SREGS: c_ulong = 0x4138_AE84;

/// `_IOW(KVMIO, 0x90, struct kvm_cpuid2)`. vCPU fd; needs
/// [`KVM_CAP_EXT_CPUID`]. Argument: [`kvm_cpuid2`] followed by `nent`
/// entries (see [`CpuidBuf`]). Call before the first [`KVM_RUN`].
pub const KVM_SET_CPUID2: c_ulong = 0x4008_AE90;

/// `_IO(KVMIO, 0xa3)`. vCPU fd; needs [`KVM_CAP_GET_TSC_KHZ`]. Returns the
/// guest TSC frequency in kHz. Shares `nr` 0xa3 with [`KVM_ENABLE_CAP`]; the
/// direction and size tell them apart.
pub const KVM_GET_TSC_KHZ: c_ulong = 0xAEA3;

/// `_IOWR(KVMIO, 0x88, struct kvm_msrs)`. vCPU fd; basic (x86). Argument:
/// [`kvm_msrs`] followed by `nmsrs` entries (see [`MsrBuf`]) whose `index` the
/// caller sets and whose `data` the kernel fills; returns how many it read.
pub const KVM_GET_MSRS: c_ulong = 0xC008_AE88;

/// `_IOW(KVMIO, 0x89, struct kvm_msrs)`. vCPU fd; basic (x86). Argument:
/// [`kvm_msrs`] followed by `nmsrs` entries; returns how many it set.
pub const KVM_SET_MSRS: c_ulong = 0x4008_AE89;

/// `_IO(KVMIO, 0xa2)`. vCPU fd; needs [`KVM_CAP_TSC_CONTROL`]. Sets the guest
/// TSC frequency in kHz (the argument, by value).
pub const KVM_SET_TSC_KHZ: c_ulong = 0xAEA2;

#[cfg(test)]
mod tests {
    //! Re-derives every literal request number from `_IOC` and the sizes of
    //! this crate's structures.

    use core::ffi::c_ulong;

    use super::*;
    use crate::structs::{
        kvm_clear_dirty_log, kvm_cpuid2, kvm_dirty_log, kvm_enable_cap, kvm_msrs, kvm_regs,
        kvm_sregs, kvm_userspace_memory_region,
    };

    /// `_IOC_NONE`: no argument, or an integer argument passed by value.
    const NONE: u32 = 0;
    /// `_IOC_WRITE`: userspace to kernel.
    const WRITE: u32 = 1;
    /// `_IOC_READ`: kernel to userspace.
    const READ: u32 = 2;

    /// `_IOC(dir, type, nr, size)`.
    const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> c_ulong {
        assert!(dir <= 3 && ty <= 0xff && nr <= 0xff && size < 1 << 14);
        (dir as c_ulong) << 30 | (size as c_ulong) << 16 | (ty as c_ulong) << 8 | nr as c_ulong
    }

    #[test]
    fn kvm_get_api_version() {
        assert_eq!(KVM_GET_API_VERSION, ioc(NONE, KVMIO, 0x00, 0));
    }

    #[test]
    fn kvm_create_vm() {
        assert_eq!(KVM_CREATE_VM, ioc(NONE, KVMIO, 0x01, 0));
    }

    #[test]
    fn kvm_check_extension() {
        assert_eq!(KVM_CHECK_EXTENSION, ioc(NONE, KVMIO, 0x03, 0));
    }

    #[test]
    fn kvm_get_vcpu_mmap_size() {
        assert_eq!(KVM_GET_VCPU_MMAP_SIZE, ioc(NONE, KVMIO, 0x04, 0));
    }

    #[test]
    fn kvm_get_supported_cpuid() {
        let size = size_of::<kvm_cpuid2>();
        assert_eq!(
            KVM_GET_SUPPORTED_CPUID,
            ioc(READ | WRITE, KVMIO, 0x05, size)
        );
    }

    #[test]
    fn kvm_create_vcpu() {
        assert_eq!(KVM_CREATE_VCPU, ioc(NONE, KVMIO, 0x41, 0));
    }

    #[test]
    fn kvm_get_dirty_log() {
        let size = size_of::<kvm_dirty_log>();
        assert_eq!(KVM_GET_DIRTY_LOG, ioc(WRITE, KVMIO, 0x42, size));
    }

    #[test]
    fn kvm_set_user_memory_region() {
        let size = size_of::<kvm_userspace_memory_region>();
        assert_eq!(KVM_SET_USER_MEMORY_REGION, ioc(WRITE, KVMIO, 0x46, size));
    }

    #[test]
    fn kvm_set_tss_addr() {
        assert_eq!(KVM_SET_TSS_ADDR, ioc(NONE, KVMIO, 0x47, 0));
    }

    #[test]
    fn kvm_set_identity_map_addr() {
        let size = size_of::<u64>();
        assert_eq!(KVM_SET_IDENTITY_MAP_ADDR, ioc(WRITE, KVMIO, 0x48, size));
    }

    #[test]
    fn kvm_enable_cap() {
        let size = size_of::<kvm_enable_cap>();
        assert_eq!(KVM_ENABLE_CAP, ioc(WRITE, KVMIO, 0xa3, size));
    }

    #[test]
    fn kvm_clear_dirty_log() {
        let size = size_of::<kvm_clear_dirty_log>();
        assert_eq!(KVM_CLEAR_DIRTY_LOG, ioc(READ | WRITE, KVMIO, 0xc0, size));
    }

    #[test]
    fn kvm_reset_dirty_rings() {
        assert_eq!(KVM_RESET_DIRTY_RINGS, ioc(NONE, KVMIO, 0xc7, 0));
    }

    #[test]
    fn kvm_run() {
        assert_eq!(KVM_RUN, ioc(NONE, KVMIO, 0x80, 0));
    }

    #[test]
    fn kvm_get_regs() {
        let size = size_of::<kvm_regs>();
        assert_eq!(KVM_GET_REGS, ioc(READ, KVMIO, 0x81, size));
    }

    #[test]
    fn kvm_set_regs() {
        let size = size_of::<kvm_regs>();
        assert_eq!(KVM_SET_REGS, ioc(WRITE, KVMIO, 0x82, size));
    }

    #[test]
    fn kvm_get_sregs() {
        let size = size_of::<kvm_sregs>();
        assert_eq!(KVM_GET_SREGS, ioc(READ, KVMIO, 0x83, size));
    }

    #[test]
    fn kvm_set_sregs() {
        let size = size_of::<kvm_sregs>();
        assert_eq!(KVM_SET_SREGS, ioc(WRITE, KVMIO, 0x84, size));
    }

    #[test]
    fn kvm_set_cpuid2() {
        let size = size_of::<kvm_cpuid2>();
        assert_eq!(KVM_SET_CPUID2, ioc(WRITE, KVMIO, 0x90, size));
    }

    #[test]
    fn kvm_get_tsc_khz() {
        assert_eq!(KVM_GET_TSC_KHZ, ioc(NONE, KVMIO, 0xa3, 0));
    }

    #[test]
    fn kvm_get_msrs() {
        let size = size_of::<kvm_msrs>();
        assert_eq!(KVM_GET_MSRS, ioc(READ | WRITE, KVMIO, 0x88, size));
    }

    #[test]
    fn kvm_set_msrs() {
        let size = size_of::<kvm_msrs>();
        assert_eq!(KVM_SET_MSRS, ioc(WRITE, KVMIO, 0x89, size));
    }

    #[test]
    fn kvm_set_tsc_khz() {
        assert_eq!(KVM_SET_TSC_KHZ, ioc(NONE, KVMIO, 0xa2, 0));
    }
}

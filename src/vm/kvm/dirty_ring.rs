//! The kernel's per-vCPU dirty ring, mapped from the vCPU fd.

use std::io;
use std::os::fd::AsRawFd;

use dirtyvm_sys as sys;
use memmap2::{MmapOptions, MmapRaw};

use crate::ring::{DirtyGfn, SlotStore};

/// One vCPU's dirty ring: `entries` × `kvm_dirty_gfn`, shared read-write with the kernel.
#[derive(Debug)]
pub struct DirtyRingMap {
    map: MmapRaw,
    entries: u32,
}

impl DirtyRingMap {
    /// Maps the ring of the vCPU behind `fd`: its own `MAP_SHARED`, read-write, non-executable
    /// mapping at page [`sys::KVM_DIRTY_LOG_PAGE_OFFSET`] of the fd, in host pages.
    pub(super) fn map(fd: &impl AsRawFd, entries: u32) -> io::Result<DirtyRingMap> {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as u64);
        let len = entries as usize * std::mem::size_of::<sys::kvm_dirty_gfn>();
        // memmap2's raw maps are MAP_SHARED, PROT_READ | PROT_WRITE: exactly what the kernel
        // requires (a read-only map faults at the first RESET store).
        let map = MmapOptions::new()
            .offset(sys::KVM_DIRTY_LOG_PAGE_OFFSET * page_size)
            .len(len)
            .map_raw(fd.as_raw_fd())?;
        Ok(DirtyRingMap { map, entries })
    }
}

impl SlotStore for DirtyRingMap {
    fn gfns(&self) -> &[DirtyGfn] {
        let first = self.map.as_ptr().cast::<DirtyGfn>();
        // SAFETY: the mapping holds `entries` page-aligned kvm_dirty_gfn while `self` lives;
        // DirtyGfn has that layout (asserted in crate::ring) and only atomic fields, the
        // only way the kernel's concurrent writes are ever observed; no `&mut` is made.
        unsafe { std::slice::from_raw_parts(first, self.entries as usize) }
    }
}

//! The dirty-gfn ring: harvest protocol, entry checks and a model of the kernel.
//!
//! # Protocol
//!
//! KVM gives every vCPU its own ring of [`DirtyGfn`] entries (`struct
//! kvm_dirty_gfn`), shared with userspace through an mmap of the vCPU fd.
//! There is no shared head or tail: the kernel privately keeps a *dirty index*
//! (next push) and a *reset index* (next entry to re-protect), and userspace
//! keeps its own free-running `u32` fetch index, the [`Harvester`]'s cursor,
//! for the whole life of the VM. Entry `cursor & (entries - 1)` is the next one
//! to look at; this is wrap-safe because `entries` is a power of two and so
//! divides 2^32.
//!
//! Every entry goes through four states, driven by its `flags`:
//!
//! ```text
//!   00 empty --kernel push--> 01 dirtied --harvest--> 1X harvested --KVM_RESET_DIRTY_RINGS--> 00
//! ```
//!
//! - The kernel pushes: it writes `slot` and `offset`, then publishes `flags =
//!   DIRTY` with a store-release (`smp_wmb` + store in `kvm_dirty_ring_push`).
//! - The harvester, starting at its cursor, load-acquires `flags`, stops at the
//!   first entry whose flags (within `KVM_DIRTY_GFN_F_MASK`) are not exactly
//!   `DIRTY`, reads `slot`/`offset`, checks them against the VM's memory slots
//!   ([`SlotBounds`]: the kernel's ring is untrusted input), records the page,
//!   store-releases `flags = RESET` and advances the cursor. It never skips an
//!   entry and never writes back flags it did not harvest.
//! - `KVM_RESET_DIRTY_RINGS` walks every ring from its reset index: for each
//!   entry whose flags load-acquire with the `RESET` bit set it reads
//!   `slot`/`offset`, re-protects that page, store-releases `flags = 0` and
//!   counts it; it returns the count, which equals what was harvested since
//!   the previous reset unless another thread reset concurrently.
//!
//! The harvester's RESET store must be a release: the kernel's reset walk may
//! run on a third CPU while the entry's producer ran on a second, and only the
//! chain producer --release/acquire--> harvester --release/acquire--> reset walk
//! guarantees that the reset walk reads the payload the producer wrote rather
//! than the one of the entry's previous use (QEMU's 2022 fix "kvm: dirty ring:
//! add missing memory barrier"). x86's TSO hides this; loom does not, and the
//! `loom_tests` module shows the race.
//!
//! Harvesting frees nothing: only the reset moves the kernel's reset index, so a
//! ring that is harvested but never reset still fills up.
//!
//! # The loom seam
//!
//! loom atomics keep their history next to the value and have a different
//! layout from a `u32`, so they cannot be overlaid on the kernel's mmap'd ring.
//! The seam is therefore the slot store, not the atomic type: the harvest logic
//! is generic over [`SlotStore`], implemented by the mmap-backed ring in
//! `crate::vm::kvm` and by the heap-backed `HeapRing` (a test double, built for tests and
//! with the `testing` feature), each handing out its entries
//! as one slice ([`SlotStore::gfns`]) that the harvester walks without a
//! per-entry index check. [`DirtyGfn`] is built from
//! `crate::sync` atomics, which are loom's under `cfg(loom)`; loom then drives a
//! `HeapRing` shared between the [`Harvester`] and a `MockKernel`, a model of
//! the kernel's producer and reset walk. Tests, benches and the fuzz target use
//! the same pair without loom.
//!
//! # Wedged rings
//!
//! On hosts whose soft-full exit comes late the kernel can push past a full ring
//! (it only warns). The entry at the harvest index then stays empty, the reset
//! returns 0 and the vCPU exits with ring-full forever. `MockKernel` can
//! reproduce this (`MockKernel::push_overflowing`), and [`peek`] lets recovery
//! code inspect entries past the cursor without harvesting them.

use dirtyvm_sys::{
    KVM_DIRTY_GFN_F_DIRTY as DIRTY, KVM_DIRTY_GFN_F_MASK as FLAG_MASK,
    KVM_DIRTY_GFN_F_RESET as RESET,
};

use crate::sync::{AtomicU32, AtomicU64, Ordering};

mod entry;
mod harvest;
#[cfg(any(test, feature = "testing"))]
mod heap;
#[cfg(any(test, feature = "testing"))]
mod mock;
mod recover;

pub use entry::{BadEntry, DirtyEntry, SlotBounds};
pub use harvest::{Harvest, Harvester};
#[cfg(any(test, feature = "testing"))]
pub use heap::HeapRing;
#[cfg(any(test, feature = "testing"))]
pub use mock::{MockKernel, RingFull};
pub use recover::first_dirty_after;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;

/// One ring entry, laid out like the kernel's `struct kvm_dirty_gfn`.
///
/// Every field is atomic because the kernel writes them while userspace reads
/// them: a plain reference to memory the kernel mutates would be a data race.
/// Never create a `&mut` into a kernel-mapped ring.
#[repr(C)]
#[derive(Debug)]
pub struct DirtyGfn {
    /// `KVM_DIRTY_GFN_F_*`: 0 empty, `DIRTY` published, `RESET` harvested.
    pub flags: AtomicU32,
    /// `(as_id << 16) | slot_id` of the memory slot the page belongs to.
    pub slot: AtomicU32,
    /// Page index inside the memory slot (`gfn - base_gfn`), not an address.
    pub offset: AtomicU64,
}

// Same size, alignment and field offsets as `struct kvm_dirty_gfn` (x86-64
// uapi): the mmap-backed store reinterprets the kernel's ring as `[DirtyGfn]`.
// Under loom the atomics carry model state and the layout is meaningless.
#[cfg(not(loom))]
const _: () = {
    assert!(core::mem::size_of::<DirtyGfn>() == 16);
    assert!(core::mem::align_of::<DirtyGfn>() == 8);
    assert!(core::mem::offset_of!(DirtyGfn, flags) == 0);
    assert!(core::mem::offset_of!(DirtyGfn, slot) == 4);
    assert!(core::mem::offset_of!(DirtyGfn, offset) == 8);
};

impl DirtyGfn {
    /// An entry holding the given raw values.
    pub fn new(flags: u32, slot: u32, offset: u64) -> Self {
        Self {
            flags: AtomicU32::new(flags),
            slot: AtomicU32::new(slot),
            offset: AtomicU64::new(offset),
        }
    }
}

impl Default for DirtyGfn {
    /// An empty entry (`flags == 0`), as the kernel allocates them.
    fn default() -> Self {
        Self::new(0, 0, 0)
    }
}

/// Storage for one vCPU's ring: the seam between the harvest protocol and the
/// memory it runs on (the kernel's mmap, or `HeapRing` for tests and loom).
pub trait SlotStore {
    /// The ring's entries, contiguous: their number is a power of two, constant
    /// for the ring's life.
    fn gfns(&self) -> &[DirtyGfn];

    /// Number of entries in the ring.
    #[inline]
    fn entries(&self) -> u32 {
        // Cannot truncate: KVM rings hold at most 65536 entries.
        self.gfns().len() as u32
    }

    /// The entry at free-running index `index`, masked to the ring.
    #[inline]
    fn gfn(&self, index: u32) -> &DirtyGfn {
        let gfns = self.gfns();
        &gfns[index as usize & (gfns.len() - 1)]
    }
}

impl<T: SlotStore + ?Sized> SlotStore for &T {
    fn gfns(&self) -> &[DirtyGfn] {
        (**self).gfns()
    }
}

impl<T: SlotStore + ?Sized> SlotStore for Box<T> {
    fn gfns(&self) -> &[DirtyGfn] {
        (**self).gfns()
    }
}

impl<T: SlotStore + ?Sized> SlotStore for std::sync::Arc<T> {
    fn gfns(&self) -> &[DirtyGfn] {
        (**self).gfns()
    }
}

#[cfg(loom)]
impl<T: SlotStore> SlotStore for loom::sync::Arc<T> {
    fn gfns(&self) -> &[DirtyGfn] {
        (**self).gfns()
    }
}

/// Reads the entry at free-running index `index` (masked to the ring) without
/// harvesting it: its raw flags, foreign bits included, and its payload.
///
/// For diagnosing a wedged ring, e.g. looking past an empty entry at the
/// harvester's cursor for entries the kernel published after an overflow. The
/// payload is meaningful only if the flags say `DIRTY` or `RESET`.
pub fn peek<S: SlotStore + ?Sized>(store: &S, index: u32) -> (u32, DirtyEntry) {
    let gfn = store.gfn(index & (store.entries() - 1));
    // Acquire: pairs with the kernel's smp_wmb + store of DIRTY in
    // kvm_dirty_ring_push (and with the harvester's store-release of RESET), so
    // the payload read below is at least as new as the flags.
    let flags = gfn.flags.load(Ordering::Acquire);
    let entry = DirtyEntry {
        // Relaxed: ordered after the Acquire load of flags above.
        slot: gfn.slot.load(Ordering::Relaxed),
        // Relaxed: ordered after the Acquire load of flags above.
        offset: gfn.offset.load(Ordering::Relaxed),
    };
    (flags, entry)
}

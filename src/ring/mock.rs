//! A model of the kernel's side of one vCPU ring (virt/kvm/dirty_ring.c).

use std::fmt;

use dirtyvm_sys::KVM_DIRTY_RING_RSVD_ENTRIES;

use super::{DirtyEntry, SlotStore, DIRTY, RESET};
use crate::sync::Ordering;

/// A push was refused: every entry is dirtied or harvested and awaiting reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFull {
    /// The ring's size in entries.
    pub entries: u32,
}

impl fmt::Display for RingFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dirty ring full: all {} entries await harvest or reset; harvest and reset the ring",
            self.entries
        )
    }
}

impl std::error::Error for RingFull {}

/// The kernel's producer and reset walk for one vCPU ring, over any
/// [`SlotStore`] (typically `&HeapRing` or `Arc<HeapRing>`).
///
/// It keeps the kernel's private indices, `dirty_index` (next push) and
/// `reset_index` (next entry to re-protect), both free-running `u32`s, and
/// performs exactly the kernel's atomic accesses on the shared entries, so a
/// [`Harvester`](super::Harvester) cannot tell it from KVM.
///
/// The store is the only state shared with the harvester. In the kernel the
/// push (vCPU thread) and the reset walk (`KVM_RESET_DIRTY_RINGS`, any thread)
/// also run on different CPUs; a loom model that needs both concurrently clones
/// the kernel to give each CPU its own view of the indices, which is faithful as
/// long as the producer stays clear of the full check (the only place the push
/// reads `reset_index`).
#[derive(Debug, Clone)]
pub struct MockKernel<S> {
    store: S,
    dirty_index: u32,
    reset_index: u32,
    soft_limit: u32,
    overflowed: bool,
}

impl<S: SlotStore> MockKernel<S> {
    /// A kernel ring over `store` as `KVM_CREATE_VCPU` leaves it: indices 0,
    /// soft limit `entries - KVM_DIRTY_RING_RSVD_ENTRIES` (0 for rings too small
    /// to have a reserve, which are then always soft-full).
    ///
    /// The store's entries should all be empty (a fresh [`HeapRing`](super::HeapRing)).
    pub fn new(store: S) -> Self {
        Self::with_index(store, 0)
    }

    /// Like [`Self::new`] but with both indices starting at `index`, to test the
    /// wrap-around of the free-running indices; pair it with
    /// [`Harvester::with_cursor`](super::Harvester::with_cursor)`(index)`.
    pub fn with_index(store: S, index: u32) -> Self {
        assert!(
            store.entries().is_power_of_two(),
            "slot store reports {} entries, not a power of two",
            store.entries()
        );
        let soft_limit = store.entries().saturating_sub(KVM_DIRTY_RING_RSVD_ENTRIES);
        Self {
            store,
            dirty_index: index,
            reset_index: index,
            soft_limit,
            overflowed: false,
        }
    }

    /// Replaces the soft limit (the `used` count at which the kernel requests a
    /// ring-full exit); on Intel with PML the kernel also reserves the PML size.
    pub fn with_soft_limit(mut self, soft_limit: u32) -> Self {
        self.soft_limit = soft_limit;
        self
    }

    /// The shared entries.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Number of entries in the ring.
    pub fn entries(&self) -> u32 {
        self.store.entries()
    }

    /// Free-running index of the next push.
    pub fn dirty_index(&self) -> u32 {
        self.dirty_index
    }

    /// Free-running index of the next entry the reset walk looks at.
    pub fn reset_index(&self) -> u32 {
        self.reset_index
    }

    /// Entries pushed and not yet reset (`dirty_index - reset_index`); larger
    /// than [`Self::entries`] after an overflow.
    pub fn used(&self) -> u32 {
        self.dirty_index.wrapping_sub(self.reset_index)
    }

    /// Whether the kernel would raise `KVM_REQ_DIRTY_RING_SOFT_FULL` and exit
    /// with `KVM_EXIT_DIRTY_RING_FULL` before the next guest entry.
    pub fn is_soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// Whether every entry awaits harvest or reset (`kvm_dirty_ring_full`).
    pub fn is_full(&self) -> bool {
        self.used() >= self.entries()
    }

    /// Whether a push ever overflowed the ring (the kernel's `WARN_ON_ONCE` in
    /// `kvm_dirty_ring_push`).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Publishes a dirtied page as `kvm_dirty_ring_push` does, refusing when the
    /// ring is full (the kernel never refuses; it relies on soft-full exits).
    pub fn push(&mut self, slot: u32, offset: u64) -> Result<(), RingFull> {
        if self.is_full() {
            return Err(RingFull {
                entries: self.entries(),
            });
        }
        self.publish(slot, offset);
        Ok(())
    }

    /// Publishes a dirtied page even if the ring is full, as the kernel does
    /// when its soft-full exit came too late (docs/host.md#late-ring-full-exits-overflows-and-wedged-rings): it warns once and
    /// overwrites the entry at its dirty index, the oldest one not yet reset.
    /// The lost payload is gone and `dirty_index` runs ahead of everything the
    /// harvester and the reset walk can reach, which wedges the ring once it has
    /// been harvested and reset: the entry at the harvest index stays empty and
    /// every later reset returns 0. Returns whether this push overflowed.
    pub fn push_overflowing(&mut self, slot: u32, offset: u64) -> bool {
        let overflow = self.is_full();
        self.overflowed |= overflow;
        self.publish(slot, offset);
        overflow
    }

    fn publish(&mut self, slot: u32, offset: u64) {
        let gfn = self.store.gfn(self.dirty_index & (self.entries() - 1));
        // Relaxed: ordered before the Release store of DIRTY below.
        gfn.slot.store(slot, Ordering::Relaxed);
        // Relaxed: ordered before the Release store of DIRTY below.
        gfn.offset.store(offset, Ordering::Relaxed);
        // Release: the kernel's smp_wmb + store of DIRTY
        // (kvm_dirty_gfn_set_dirtied); pairs with the harvester's Acquire load
        // of flags, which then sees the payload stored above.
        gfn.flags.store(DIRTY, Ordering::Release);
        self.dirty_index = self.dirty_index.wrapping_add(1);
    }

    /// `KVM_RESET_DIRTY_RINGS` for this ring: re-protects every harvested entry
    /// from the reset index on and returns how many it reset.
    pub fn reset(&mut self) -> u32 {
        self.reset_with(|_| {})
    }

    /// [`Self::reset`], calling `reprotect` with the payload of each entry it
    /// re-protects, in ring order: what the kernel would write-protect again.
    ///
    /// Like `kvm_dirty_ring_reset` it stops at the first entry without the
    /// RESET bit (a bit test, unlike the harvester's exact compare), and does
    /// not look at `dirty_index`. It also stops after one lap, which a
    /// single-threaded walk never reaches (each entry it passes becomes empty);
    /// the kernel bounds the walk at `INT_MAX` instead.
    pub fn reset_with(&mut self, mut reprotect: impl FnMut(DirtyEntry)) -> u32 {
        let mask = self.entries() - 1;
        let mut reset = 0;
        while reset < self.entries() {
            let gfn = self.store.gfn(self.reset_index & mask);
            // Acquire: the kernel's smp_load_acquire in kvm_dirty_gfn_harvested;
            // pairs with the harvester's Release store of RESET, so the payload
            // read below is the one the harvester saw, not a stale one.
            if gfn.flags.load(Ordering::Acquire) & RESET == 0 {
                break;
            }
            let entry = DirtyEntry {
                // Relaxed: ordered after the Acquire load of flags above.
                slot: gfn.slot.load(Ordering::Relaxed),
                // Relaxed: ordered after the Acquire load of flags above.
                offset: gfn.offset.load(Ordering::Relaxed),
            };
            // Release: the kernel's smp_store_release in
            // kvm_dirty_gfn_set_invalid; keeps the payload reads above before
            // the entry is free for the next push's payload stores (which
            // follow this walk through the kernel's locks and reset_index).
            gfn.flags.store(0, Ordering::Release);
            self.reset_index = self.reset_index.wrapping_add(1);
            reset += 1;
            reprotect(entry);
        }
        reset
    }
}

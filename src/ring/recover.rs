//! Recovering a ring the kernel overflowed (see `crate::tracking`): finding the gap of lost
//! entries at the cursor, and marking lost entries harvested so the reset walk passes them.

use super::{Harvester, SlotStore, DIRTY, FLAG_MASK, RESET};
use crate::sync::Ordering;

/// Distance from `cursor` to the first dirty entry after a run of *empty* entries (flags 0
/// within the mask) starting at the cursor: `Some(0)` when the cursor entry itself is dirty,
/// `None` when the run of empty entries ends at a harvested entry or spans the ring (the
/// normal state: nothing dirty past the cursor).
///
/// The kernel publishes entries in ring order, so a dirty entry past empty ones means the
/// empty ones were pushed and then lost: a gap. Safe to call while the vCPU runs: a dirty
/// entry seen past the cursor is re-checked against the cursor entry, which the kernel
/// published first.
pub fn first_dirty_after<S: SlotStore + ?Sized>(store: &S, cursor: u32) -> Option<u32> {
    let entries = store.entries();
    let mask = entries - 1;
    for distance in 0..entries {
        // Acquire: pairs with the kernel's store-release of DIRTY (kvm_dirty_ring_push),
        // so if this entry is dirty, every entry the kernel pushed before it is visible
        // as pushed to the re-check below.
        let flags = store
            .gfn(cursor.wrapping_add(distance) & mask)
            .flags
            .load(Ordering::Acquire)
            & FLAG_MASK;
        match flags {
            0 => continue,
            DIRTY if distance == 0 => return Some(0),
            DIRTY => {
                // Acquire: as above; ordered after the load that saw the later entry dirty.
                let at_cursor = store.gfn(cursor & mask).flags.load(Ordering::Acquire);
                return Some(if at_cursor & FLAG_MASK == DIRTY {
                    0
                } else {
                    distance
                });
            }
            _ => return None,
        }
    }
    None
}

impl Harvester {
    /// Marks up to `max` empty entries from the cursor on as harvested (RESET), stopping at
    /// the first entry that is not empty; returns how many it marked. Only for entries the
    /// kernel is known to have pushed and lost (a gap, or a ring-full exit with nothing to
    /// harvest): the reset walk can then pass them, and the ring runs again.
    pub fn skip_lost<S: SlotStore + ?Sized>(&mut self, store: &S, max: u32) -> u32 {
        let mask = store.entries() - 1;
        let mut cursor = self.cursor();
        let mut skipped = 0;
        while skipped < max.min(store.entries()) {
            let gfn = store.gfn(cursor & mask);
            // Acquire: pairs with the kernel's store-release of flags (push or reset).
            if gfn.flags.load(Ordering::Acquire) & FLAG_MASK != 0 {
                break;
            }
            // Release: pairs with the reset walk's load-acquire of flags, like a harvest.
            gfn.flags.store(RESET, Ordering::Release);
            cursor = cursor.wrapping_add(1);
            skipped += 1;
        }
        *self = Harvester::with_cursor(cursor);
        skipped
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ring::{HeapRing, MockKernel, SlotBounds};

    #[test]
    fn no_gap_in_a_healthy_ring() {
        let mut kernel = MockKernel::new(HeapRing::new(8));
        let mut harvester = Harvester::new();
        assert_eq!(first_dirty_after(kernel.store(), harvester.cursor()), None);
        kernel.push(1, 3).unwrap();
        assert_eq!(
            first_dirty_after(kernel.store(), harvester.cursor()),
            Some(0)
        );
        let bounds = SlotBounds::new([(1, 16)]);
        harvester.harvest(kernel.store(), &bounds, |_, _| {});
        // The harvested entry awaits its reset: the scan stops there.
        assert_eq!(first_dirty_after(kernel.store(), harvester.cursor()), None);
        assert_eq!(kernel.reset(), 1);
        assert_eq!(first_dirty_after(kernel.store(), harvester.cursor()), None);
    }

    #[test]
    fn lost_entries_are_skipped_and_the_ring_recovers() {
        let mut kernel = MockKernel::new(HeapRing::new(8));
        let bounds = SlotBounds::new([(1, 64)]);
        let mut harvester = Harvester::new();
        for page in 0..8 {
            kernel.push(1, page).unwrap();
        }
        // Entries 0..3 lose their flags, as after an overflow on the host.
        for i in 0..3 {
            kernel.store().gfn(i).flags.store(0, Ordering::Release);
        }
        assert_eq!(
            harvester
                .harvest(kernel.store(), &bounds, |_, _| {})
                .collected,
            0
        );
        assert_eq!(kernel.reset(), 0, "wedged: nothing to reset");
        assert_eq!(
            first_dirty_after(kernel.store(), harvester.cursor()),
            Some(3)
        );
        assert_eq!(harvester.skip_lost(kernel.store(), 3), 3);
        let mut pages = Vec::new();
        let h = harvester.harvest(kernel.store(), &bounds, |_, p| pages.push(p));
        assert_eq!((h.collected, pages), (5, vec![3, 4, 5, 6, 7]));
        assert_eq!(
            kernel.reset(),
            8,
            "the reset walk passes the skipped entries"
        );
        kernel.push(1, 9).unwrap();
        assert_eq!(
            harvester
                .harvest(kernel.store(), &bounds, |_, _| {})
                .collected,
            1
        );
    }

    #[test]
    fn skip_stops_at_a_published_entry() {
        let mut kernel = MockKernel::new(HeapRing::new(8));
        kernel.push(1, 0).unwrap();
        let mut harvester = Harvester::new();
        assert_eq!(harvester.skip_lost(kernel.store(), 8), 0);
        assert_eq!(harvester.cursor(), 0);
    }
}

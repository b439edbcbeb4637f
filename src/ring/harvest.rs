//! The consumer side of the ring: harvesting dirtied entries in order.

use std::hint;

use super::{DirtyEntry, DirtyGfn, SlotBounds, SlotStore, DIRTY, FLAG_MASK, RESET};
use crate::sync::Ordering;

/// What one [`Harvester::harvest`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Harvest {
    /// Entries collected (marked RESET), bad ones included: what the next
    /// `KVM_RESET_DIRTY_RINGS` should report for this ring, unless another
    /// thread resets concurrently. The pages harvested are these minus
    /// [`Harvest::bad_entries`].
    pub collected: u32,
    /// Entries that failed the [`SlotBounds`] check: marked RESET but not
    /// passed to the `dirtied` callback.
    pub bad_entries: u32,
    /// Harvested entries whose flags had bits set outside
    /// `KVM_DIRTY_GFN_F_MASK` (ignored, but worth reporting).
    pub foreign_flag_bits: u32,
}

/// The harvest state of one vCPU ring: its free-running fetch index.
///
/// Keep one per vCPU ring for the VM's whole life (the kernel keeps its own
/// indices across munmap and re-mmap), and never run two harvests of one ring
/// at once: `&mut self` enforces that.
#[derive(Debug, Default)]
pub struct Harvester {
    /// Next entry to look at, free-running: the entry is `cursor & (entries - 1)`.
    cursor: u32,
}

impl Harvester {
    /// A harvester for a freshly created ring, starting at index 0.
    pub const fn new() -> Self {
        Self::with_cursor(0)
    }

    /// A harvester resuming at fetch index `cursor` (tests of the `u32`
    /// wrap-around, or recovery code that knows where the kernel stands).
    pub const fn with_cursor(cursor: u32) -> Self {
        Self { cursor }
    }

    /// The free-running fetch index of the next entry to harvest.
    pub const fn cursor(&self) -> u32 {
        self.cursor
    }

    /// Harvests every dirtied entry from the cursor on, in ring order, calling
    /// `dirtied(slot_id, page)` for each valid one.
    ///
    /// Stops at the first entry whose flags are not exactly DIRTY (within
    /// `KVM_DIRTY_GFN_F_MASK`), or after one full lap of the ring: a well-behaved
    /// kernel cannot publish more than `entries` entries between two resets, so
    /// a second lap in one call would mean something else is resetting
    /// concurrently; calling again picks up where this call stopped.
    ///
    /// Entries that fail `bounds` are counted in [`Harvest::bad_entries`] and
    /// not passed to `dirtied`, but are still marked RESET so that the counts
    /// agree with what `KVM_RESET_DIRTY_RINGS` returns.
    ///
    /// After harvesting every ring, call `KVM_RESET_DIRTY_RINGS` before reading
    /// the dirtied pages' contents or publishing them to consumers.
    ///
    /// # Panics
    ///
    /// If `store` is broken (not a power-of-two number of entries), or if
    /// `dirtied` panics; in that case the entry
    /// being recorded stays DIRTY and the cursor still points at it.
    #[inline]
    pub fn harvest<S: SlotStore + ?Sized>(
        &mut self,
        store: &S,
        bounds: &SlotBounds,
        dirtied: impl FnMut(u16, u64),
    ) -> Harvest {
        self.harvest_with(store, bounds, dirtied, Ordering::Release)
    }

    /// [`Self::harvest`] with the ordering of the RESET store as a parameter,
    /// only so that the loom model can demonstrate why it must be Release.
    #[inline]
    pub(super) fn harvest_with<S: SlotStore + ?Sized>(
        &mut self,
        store: &S,
        bounds: &SlotBounds,
        dirtied: impl FnMut(u16, u64),
        reset_order: Ordering,
    ) -> Harvest {
        let entries = store.entries();
        assert!(
            entries.is_power_of_two(),
            "slot store reports {entries} entries, not a power of two"
        );
        let gfns = store.gfns();
        let start = self.cursor;
        let first = start & (entries - 1);
        let mut pass = Pass {
            cursor: CursorGuard {
                next: start,
                cursor: &mut self.cursor,
            },
            bounds,
            dirtied,
            reset_order,
            bad_entries: 0,
            foreign_flag_bits: 0,
            run_slot: u32::MAX,
            run_pages: 0,
        };
        // One lap at most, as two contiguous segments: from the cursor's entry
        // to the end of the ring, then from its start up to the cursor's entry.
        'lap: for (lo, hi) in [(first, entries), (0, first)] {
            for gfn in &gfns[lo as usize..hi as usize] {
                if !pass.step(gfn) {
                    break 'lap;
                }
            }
        }
        Harvest {
            collected: pass.cursor.next.wrapping_sub(start),
            bad_entries: pass.bad_entries,
            foreign_flag_bits: pass.foreign_flag_bits,
        }
    }
}

/// The state of one harvest call, kept in registers by the compiler.
struct Pass<'a, F> {
    cursor: CursorGuard<'a>,
    bounds: &'a SlotBounds,
    dirtied: F,
    reset_order: Ordering,
    bad_entries: u32,
    foreign_flag_bits: u32,
    /// Entries come in runs of one slot: the raw slot of the current run,
    /// already checked (u32::MAX names address space 0xffff, never valid).
    run_slot: u32,
    /// The current run's slot size in pages.
    run_pages: u64,
}

impl<F: FnMut(u16, u64)> Pass<'_, F> {
    /// Harvests `gfn`, the entry at fetch index `self.cursor.next`, if it is
    /// dirtied; returns whether it was.
    #[inline(always)]
    fn step(&mut self, gfn: &DirtyGfn) -> bool {
        // Acquire: pairs with the kernel's smp_wmb + store of DIRTY in
        // kvm_dirty_ring_push (store-release in MockKernel::push), so the
        // slot/offset read below are the ones published with DIRTY.
        let flags = gfn.flags.load(Ordering::Acquire);
        // The hot path is straight-line: exactly DIRTY, the current slot run,
        // a page inside it. Every other case is marked cold.
        if flags != DIRTY {
            hint::cold_path();
            if flags & FLAG_MASK != DIRTY {
                return false;
            }
            self.foreign_flag_bits += 1;
        }
        // Relaxed: ordered after the Acquire load of flags above.
        let slot = gfn.slot.load(Ordering::Relaxed);
        // Relaxed: ordered after the Acquire load of flags above.
        let offset = gfn.offset.load(Ordering::Relaxed);
        // `&`, not `&&`: one branch on the hot path.
        if (slot == self.run_slot) & (offset < self.run_pages) {
            // Cannot truncate: a valid slot names address space 0.
            (self.dirtied)(slot as u16, offset);
        } else {
            hint::cold_path();
            self.check_outside_run(slot, offset);
        }
        // Release (as passed by `harvest`): pairs with the load-acquire of
        // flags in the kernel's reset walk (kvm_dirty_gfn_harvested in
        // kvm_dirty_ring_reset; MockKernel::reset_with), which may run on
        // another CPU: it must see the payload the producer published, which
        // this thread acquired above, not a stale one.
        gfn.flags.store(RESET, self.reset_order);
        self.cursor.next = self.cursor.next.wrapping_add(1);
        true
    }

    /// Records an entry outside the current run of one slot: the start of a
    /// new run, or a bad entry.
    #[inline(always)]
    fn check_outside_run(&mut self, slot: u32, offset: u64) {
        if slot != self.run_slot {
            if let Some(pages) = slot_pages(self.bounds, slot) {
                (self.run_slot, self.run_pages) = (slot, pages);
            }
        }
        if slot == self.run_slot && offset < self.run_pages {
            // Cannot truncate: a valid slot names address space 0.
            (self.dirtied)(slot as u16, offset);
        } else {
            self.bad_entries += 1;
        }
    }
}

/// The fetch index of the next entry during a harvest, kept in a register and
/// written back to the [`Harvester`] when the harvest ends, also if `dirtied`
/// panics, so that the cursor always points at the first entry this harvester
/// has not marked RESET. (A guard of its own, so that only it escapes into the
/// drop glue, not the whole pass with the caller's closure.)
struct CursorGuard<'a> {
    next: u32,
    cursor: &'a mut u32,
}

impl Drop for CursorGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        *self.cursor = self.next;
    }
}

/// The size of the slot a raw `slot` field names, if it is a tracked slot of
/// address space 0.
#[inline]
fn slot_pages(bounds: &SlotBounds, slot: u32) -> Option<u64> {
    bounds.pages_of(DirtyEntry { slot, offset: 0 }).ok()
}

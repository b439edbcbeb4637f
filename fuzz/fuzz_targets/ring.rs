//! Drives the harvester against the mock kernel with arbitrary operations,
//! including a hostile kernel that corrupts entries and a late soft-full exit
//! that overflows the ring, and checks the harvest protocol's invariants
//! against a model of what was pushed.
//!
//! Always: no panic; `dirtied` only ever gets a page inside a tracked slot of
//! address space 0; the counts of a harvest add up and stay within one lap;
//! the cursor advances by exactly what was harvested.
//!
//! While no corruption or overflow was injected: every pushed entry is
//! harvested exactly once, in push order, valid ones reported to `dirtied`
//! and bad ones only counted; a push is refused exactly when the ring is full;
//! each reset returns what was harvested since the previous one and
//! re-protects exactly those payloads, in order.

#![no_main]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use dirtyvm::ring::{DirtyEntry, Harvester, HeapRing, MockKernel, SlotBounds, SlotStore};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Ring size: `1 << (log2_entries % 7)`, 1 to 64 entries.
    log2_entries: u8,
    /// Where the kernel's indices and the harvester's cursor start, to cross
    /// the u32 wrap-around.
    start: u32,
    /// Tracked memory slots of address space 0: `(slot_id, pages)`.
    slots: Vec<(u16, u16)>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The kernel pushes an arbitrary payload (mostly bad entries).
    Push {
        slot: u32,
        offset: u64,
    },
    /// The kernel pushes a page of one of the tracked slots (`page` may still
    /// be past its end).
    PushTracked {
        which: u8,
        page: u16,
    },
    Harvest,
    Reset,
    /// A hostile kernel rewrites an entry's flags and/or payload.
    Corrupt {
        index: u8,
        flags: Option<u32>,
        slot: Option<u32>,
        offset: Option<u64>,
    },
    /// The kernel pushes even if the ring is full (late soft-full exit).
    PushOverflowing {
        slot: u32,
        offset: u64,
    },
}

fuzz_target!(|input: Input| {
    let entries = 1u32 << (input.log2_entries % 7);
    let ring = HeapRing::new(entries);
    let mut kernel = MockKernel::with_index(&ring, input.start);
    let mut harvester = Harvester::with_cursor(input.start);

    let slots = &input.slots[..input.slots.len().min(8)];
    let bounds = SlotBounds::new(slots.iter().map(|&(id, pages)| (id, u64::from(pages))));
    // The reference the checks use, built independently of SlotBounds: the
    // last size given for a slot id counts, and a 0-page slot is absent.
    let mut tracked: HashMap<u16, u64> = HashMap::new();
    for &(id, pages) in slots {
        tracked.insert(id, u64::from(pages));
    }
    tracked.retain(|_, pages| *pages > 0);
    let valid = |e: DirtyEntry| {
        e.slot >> 16 == 0 && tracked.get(&(e.slot as u16)).is_some_and(|&p| e.offset < p)
    };

    // The model: pushed and not yet harvested, harvested and not yet reset.
    let mut pending: VecDeque<DirtyEntry> = VecDeque::new();
    let mut harvested: Vec<DirtyEntry> = Vec::new();
    // Set once a corruption or an overflow makes the ring diverge from the
    // model; only the unconditional invariants hold after that.
    let mut tainted = false;

    for op in input.ops.iter().take(512) {
        match *op {
            Op::Push { slot, offset } => push(
                &mut kernel,
                &mut pending,
                &harvested,
                entries,
                tainted,
                slot,
                offset,
            ),
            Op::PushTracked { which, page } => {
                if !slots.is_empty() {
                    let slot = u32::from(slots[usize::from(which) % slots.len()].0);
                    push(
                        &mut kernel,
                        &mut pending,
                        &harvested,
                        entries,
                        tainted,
                        slot,
                        u64::from(page),
                    );
                }
            }
            Op::PushOverflowing { slot, offset } => {
                if kernel.push_overflowing(slot, offset) {
                    tainted = true;
                } else {
                    pending.push_back(DirtyEntry { slot, offset });
                }
            }
            Op::Corrupt {
                index,
                flags,
                slot,
                offset,
            } => {
                let gfn = ring.gfn(u32::from(index) & (entries - 1));
                // The fuzz target is single-threaded: these stores pair with
                // nothing; Release on flags only mimics a kernel publishing.
                if let Some(flags) = flags {
                    gfn.flags.store(flags, Ordering::Release);
                }
                if let Some(slot) = slot {
                    gfn.slot.store(slot, Ordering::Relaxed);
                }
                if let Some(offset) = offset {
                    gfn.offset.store(offset, Ordering::Relaxed);
                }
                tainted = true;
            }
            Op::Harvest => {
                let before = harvester.cursor();
                let mut reported = Vec::new();
                let mut record = |slot_id: u16, page: u64| {
                    // Bad entries never reach the callback, whatever the kernel did.
                    assert!(
                        tracked.get(&slot_id).is_some_and(|&p| page < p),
                        "dirtied({slot_id}, {page}) is outside the tracked slots"
                    );
                    reported.push((slot_id, page));
                };
                let tally = harvester.harvest(&ring, &bounds, &mut record);
                assert!(tally.collected <= entries, "more than one lap: {tally:?}");
                assert_eq!(tally.collected, reported.len() as u32 + tally.bad_entries);
                assert!(tally.foreign_flag_bits <= tally.collected);
                assert_eq!(harvester.cursor(), before.wrapping_add(tally.collected));
                if !tainted {
                    // Single-threaded, so everything pushed is harvested now.
                    assert_eq!(tally.collected as usize, pending.len());
                    let expected: Vec<(u16, u64)> = pending
                        .iter()
                        .filter(|&&e| valid(e))
                        .map(|e| (e.slot as u16, e.offset))
                        .collect();
                    assert_eq!(reported, expected, "not every valid entry once, in order");
                    assert_eq!(tally.bad_entries as usize, pending.len() - expected.len());
                    assert_eq!(tally.foreign_flag_bits, 0);
                    assert_eq!(harvester.cursor(), kernel.dirty_index());
                }
                harvested.extend(pending.drain(..));
            }
            Op::Reset => {
                let mut reprotected = Vec::new();
                let reset = kernel.reset_with(|e| reprotected.push(e));
                assert!(reset <= entries);
                if !tainted {
                    assert_eq!(
                        reprotected, harvested,
                        "the reset must re-protect what was harvested"
                    );
                    assert_eq!(kernel.used() as usize, pending.len());
                }
                harvested.clear();
            }
        }
    }
});

/// A push through the refusing path: refused exactly when the model says the
/// ring is full.
fn push(
    kernel: &mut MockKernel<&HeapRing>,
    pending: &mut VecDeque<DirtyEntry>,
    harvested: &[DirtyEntry],
    entries: u32,
    tainted: bool,
    slot: u32,
    offset: u64,
) {
    let pushed = kernel.push(slot, offset).is_ok();
    if !tainted {
        let full = pending.len() + harvested.len() == entries as usize;
        assert_eq!(pushed, !full, "push refused or accepted against the model");
    }
    if pushed {
        pending.push_back(DirtyEntry { slot, offset });
    }
}

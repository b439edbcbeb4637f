//! Single-threaded round trips through the harvester and the mock kernel.
//!
//! The tests' own atomic accesses (corrupting or inspecting entries) run on
//! the one test thread and pair with nothing: Relaxed throughout.

use super::*;
use crate::sync::Ordering;

/// Slot 1 of 1024 pages and slot 3 of 16 pages, both in address space 0.
fn bounds() -> SlotBounds {
    SlotBounds::new([(1, 1024), (3, 16)])
}

/// Harvests into a vector of `(slot_id, page)`.
fn harvest_all<S: SlotStore>(
    h: &mut Harvester,
    store: &S,
    bounds: &SlotBounds,
) -> (Harvest, Vec<(u16, u64)>) {
    let mut seen = Vec::new();
    let tally = h.harvest(store, bounds, |slot, page| seen.push((slot, page)));
    (tally, seen)
}

fn reset_all<S: SlotStore>(kernel: &mut MockKernel<S>) -> (u32, Vec<DirtyEntry>) {
    let mut reprotected = Vec::new();
    let n = kernel.reset_with(|e| reprotected.push(e));
    (n, reprotected)
}

#[test]
fn layout_matches_kvm_dirty_gfn() {
    assert_eq!(std::mem::size_of::<DirtyGfn>(), 16);
    assert_eq!(std::mem::align_of::<DirtyGfn>(), 8);
}

#[test]
fn entry_decodes_address_space_and_slot() {
    let e = DirtyEntry {
        slot: 0x0001_0007,
        offset: 9,
    };
    assert_eq!((e.as_id(), e.slot_id()), (1, 7));
}

#[test]
fn slot_bounds_check() {
    let b = bounds();
    let e = |slot, offset| DirtyEntry { slot, offset };
    assert_eq!(b.check(e(1, 0)), Ok((1, 0)));
    assert_eq!(b.check(e(1, 1023)), Ok((1, 1023)));
    assert_eq!(
        b.check(e(1, 1024)),
        Err(BadEntry::OffsetOutOfRange {
            slot_id: 1,
            offset: 1024,
            pages: 1024
        })
    );
    assert_eq!(b.check(e(2, 0)), Err(BadEntry::UnknownSlot { slot_id: 2 }));
    assert_eq!(
        b.check(e(70, 0)),
        Err(BadEntry::UnknownSlot { slot_id: 70 })
    );
    assert_eq!(
        b.check(e(1 << 16 | 1, 0)),
        Err(BadEntry::WrongAddressSpace { as_id: 1 })
    );
    assert_eq!(b.pages(3), Some(16));
    assert_eq!(b.pages(0), None);
    // Re-setting a slot takes the new size; a 0-page slot is absent.
    let b = SlotBounds::new([(1, 8), (1, 4), (2, 0)]);
    assert_eq!(b.pages(1), Some(4));
    assert_eq!(b.check(e(2, 0)), Err(BadEntry::UnknownSlot { slot_id: 2 }));
}

#[test]
fn bad_entry_messages_name_the_problem() {
    assert_eq!(
        BadEntry::OffsetOutOfRange {
            slot_id: 1,
            offset: 5,
            pages: 4
        }
        .to_string(),
        "dirty ring entry names page 5 of memory slot 1, which has only 4 pages"
    );
    assert!(BadEntry::UnknownSlot { slot_id: 9 }
        .to_string()
        .contains("memory slot 9"));
    assert!(BadEntry::WrongAddressSpace { as_id: 1 }
        .to_string()
        .contains("address space 1"));
}

#[test]
fn ring_round_trip_in_order() {
    let ring = HeapRing::new(16);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for page in 0..10 {
        kernel.push(1, page).unwrap();
    }
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!(
        tally,
        Harvest {
            collected: 10,
            bad_entries: 0,
            foreign_flag_bits: 0
        }
    );
    assert_eq!(seen, (0..10).map(|p| (1, p)).collect::<Vec<_>>());
    assert_eq!(h.cursor(), 10);
    // Harvesting frees nothing.
    assert_eq!(kernel.used(), 10);
    let (reset, reprotected) = reset_all(&mut kernel);
    assert_eq!(reset, tally.collected);
    assert_eq!(
        reprotected,
        (0..10)
            .map(|offset| DirtyEntry { slot: 1, offset })
            .collect::<Vec<_>>()
    );
    assert_eq!(kernel.used(), 0);
    // Nothing left: a second harvest and reset find nothing.
    assert_eq!(harvest_all(&mut h, &ring, &bounds()).0.collected, 0);
    assert_eq!(kernel.reset(), 0);
}

#[test]
fn ring_harvest_of_empty_ring_is_a_no_op() {
    let ring = HeapRing::new(4);
    let mut h = Harvester::new();
    assert_eq!(
        harvest_all(&mut h, &ring, &bounds()),
        (Harvest::default(), vec![])
    );
    assert_eq!(h.cursor(), 0);
}

#[test]
fn ring_exactly_full_harvests_every_entry_once() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for round in 0..5u64 {
        for i in 0..8 {
            kernel.push(1, round * 8 + i).unwrap();
        }
        assert!(kernel.is_full());
        assert_eq!(kernel.push(1, 0), Err(RingFull { entries: 8 }));
        let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
        assert_eq!(tally.collected, 8);
        assert_eq!(seen, (0..8).map(|i| (1, round * 8 + i)).collect::<Vec<_>>());
        // Still full until the reset.
        assert!(kernel.is_full());
        assert_eq!(kernel.reset(), 8);
        assert_eq!(h.cursor(), kernel.reset_index());
    }
}

#[test]
fn ring_cursor_wraps_around_u32() {
    let start = u32::MAX - 5;
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::with_index(&ring, start);
    let mut h = Harvester::with_cursor(start);
    let mut expected = Vec::new();
    let mut next = 0;
    // 4 rounds of 5 cross the 2^32 boundary of every index mid-round.
    for _ in 0..4 {
        for _ in 0..5 {
            kernel.push(3, next % 16).unwrap();
            expected.push((3, next % 16));
            next += 1;
        }
        let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
        assert_eq!(tally.collected, 5);
        assert_eq!(seen, expected);
        expected.clear();
        let (reset, reprotected) = reset_all(&mut kernel);
        assert_eq!(reset, 5);
        assert_eq!(reprotected.len(), 5);
        assert_eq!(h.cursor(), kernel.dirty_index());
    }
    assert_eq!(h.cursor(), start.wrapping_add(20));
    assert!(h.cursor() < start);
}

#[test]
fn ring_bad_entries_are_counted_and_still_reset() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    kernel.push(1, 7).unwrap();
    kernel.push(1 << 16 | 1, 7).unwrap(); // address space 1
    kernel.push(2, 0).unwrap(); // no such slot
    kernel.push(3, 16).unwrap(); // past the end of slot 3
    kernel.push(3, 15).unwrap();
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!(
        tally,
        Harvest {
            collected: 5,
            bad_entries: 3,
            foreign_flag_bits: 0
        }
    );
    assert_eq!(seen, vec![(1, 7), (3, 15)]);
    // KVM reset them too (it silently ignores what it cannot re-protect).
    assert_eq!(kernel.reset(), 5);
}

#[test]
fn ring_harvest_stops_at_first_entry_not_exactly_dirty() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for page in 0..4 {
        kernel.push(1, page).unwrap();
    }
    // Entry 2 looks harvested-and-dirty (11): KVM ignores bit 0 once bit 1 is
    // set, so it is not DIRTY and the harvest must stop there, not skip it.
    ring.gfn(2).flags.store(3, Ordering::Relaxed);
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!(tally.collected, 2);
    assert_eq!(seen, vec![(1, 0), (1, 1)]);
    assert_eq!(h.cursor(), 2);
    // Entry 3 is untouched: still DIRTY, never written back.
    assert_eq!(ring.gfn(3).flags.load(Ordering::Relaxed), 1);
    // The stop is sticky: a second call does not skip entry 2 either.
    assert_eq!(harvest_all(&mut h, &ring, &bounds()).0.collected, 0);
    // Entry 2 is RESET from the reset walk's point of view (bit test).
    assert_eq!(kernel.reset(), 3);
}

#[test]
fn ring_foreign_flag_bits_are_ignored_but_counted() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for page in 0..3 {
        kernel.push(1, page).unwrap();
    }
    ring.gfn(1).flags.store(0x8000_0001, Ordering::Relaxed);
    ring.gfn(2).flags.store(0x4, Ordering::Relaxed); // foreign bit, not DIRTY
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!(
        tally,
        Harvest {
            collected: 2,
            bad_entries: 0,
            foreign_flag_bits: 1
        }
    );
    assert_eq!(seen, vec![(1, 0), (1, 1)]);
    // The harvester writes exactly RESET, dropping the foreign bits.
    assert_eq!(ring.gfn(1).flags.load(Ordering::Relaxed), 2);
    assert_eq!(kernel.reset(), 2);
}

#[test]
fn ring_harvest_and_reset_interleave_with_pushes() {
    let ring = HeapRing::new(4);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    let mut pushed = Vec::new();
    let mut harvested = Vec::new();
    let mut page = 0;
    for step in 0..50u32 {
        for _ in 0..step % 3 + 1 {
            if kernel.push(1, page).is_ok() {
                pushed.push((1, page));
                page += 1;
            }
        }
        if step % 2 == 0 {
            let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
            assert_eq!(tally.collected as usize, seen.len());
            harvested.extend(seen);
        }
        if step % 4 == 3 {
            kernel.reset();
        }
    }
    harvested.extend(harvest_all(&mut h, &ring, &bounds()).1);
    assert_eq!(harvested, pushed);
}

/// Thousands of entries through a small ring, many laps, bursts of pushes against harvests
/// and resets at varying points: every entry comes out exactly once, in order, and the resets
/// re-protect exactly what was harvested. (A harvester that lost one entry in a thousand
/// would pass a test that pushes fewer.)
#[test]
fn every_entry_comes_out_once_over_hundreds_of_laps() {
    const PAGES: u64 = 20_000;
    let ring = HeapRing::new(64);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    let (mut harvested, mut reprotected) = (Vec::new(), Vec::new());
    let (mut page, mut step) = (0u64, 0u64);
    while page < PAGES {
        step += 1;
        // Bursts of 1 to 97 pushes, until the ring is full.
        for _ in 0..step * 31 % 97 + 1 {
            if page == PAGES || kernel.push(1, page % 1024).is_err() {
                break;
            }
            page += 1;
        }
        if step % 3 != 0 {
            harvested.extend(harvest_all(&mut h, &ring, &bounds()).1);
        }
        if step % 5 != 0 {
            reprotected.extend(reset_all(&mut kernel).1);
        }
    }
    harvested.extend(harvest_all(&mut h, &ring, &bounds()).1);
    reprotected.extend(reset_all(&mut kernel).1);
    assert_eq!(harvested.len() as u64, PAGES, "entries lost or duplicated");
    assert!(harvested
        .iter()
        .enumerate()
        .all(|(i, &(slot, p))| slot == 1 && p == i as u64 % 1024));
    let pages: Vec<(u16, u64)> = reprotected
        .iter()
        .map(|e| (e.slot as u16, e.offset))
        .collect();
    assert_eq!(pages, harvested, "the resets re-protected something else");
    assert!(h.cursor() as u64 == PAGES && kernel.used() == 0);
}

#[test]
fn ring_harvest_stops_after_one_lap() {
    // A hostile or confused kernel that marks every entry DIRTY behind the
    // harvester's back cannot keep one harvest call spinning.
    let ring = HeapRing::new(4);
    let mut h = Harvester::new();
    for i in 0..4 {
        ring.gfn(i).flags.store(1, Ordering::Relaxed);
        ring.gfn(i).slot.store(1, Ordering::Relaxed);
    }
    let tally = h.harvest(&ring, &bounds(), |_, _| {
        ring.gfn(0).flags.store(1, Ordering::Relaxed);
    });
    assert_eq!(tally.collected, 4);
    assert_eq!(h.cursor(), 4);
}

#[test]
fn ring_cursor_stays_consistent_when_the_callback_panics() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for page in 0..3 {
        kernel.push(1, page).unwrap();
    }
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.harvest(&ring, &bounds(), |_, page| {
            assert_ne!(page, 1, "consumer bug")
        });
    }));
    assert!(panicked.is_err());
    // Entry 0 was harvested, entry 1 was being recorded: still DIRTY, and the
    // cursor points at it.
    assert_eq!(h.cursor(), 1);
    assert_eq!(ring.gfn(0).flags.load(Ordering::Relaxed), 2);
    assert_eq!(ring.gfn(1).flags.load(Ordering::Relaxed), 1);
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!((tally.collected, seen), (2, vec![(1, 1), (1, 2)]));
    assert_eq!(kernel.reset(), 3);
}

#[test]
fn soft_full_uses_the_reserved_entries() {
    let ring = HeapRing::new(256);
    let mut kernel = MockKernel::new(&ring);
    for page in 0..191 {
        kernel.push(1, page).unwrap();
    }
    assert!(!kernel.is_soft_full());
    kernel.push(1, 191).unwrap();
    assert!(kernel.is_soft_full());
    let kernel = MockKernel::new(&ring).with_soft_limit(10);
    assert!(!kernel.is_soft_full());
}

#[test]
fn ring_overflow_wedges_the_ring_like_this_host() {
    let ring = HeapRing::new(8);
    let mut kernel = MockKernel::new(&ring);
    let mut h = Harvester::new();
    for page in 0..8 {
        assert!(!kernel.push_overflowing(1, page));
    }
    // The late soft-full exit: two more pushes overwrite the oldest entries.
    assert!(kernel.push_overflowing(1, 100));
    assert!(kernel.push_overflowing(1, 101));
    assert!(kernel.overflowed());
    let (tally, seen) = harvest_all(&mut h, &ring, &bounds());
    assert_eq!(tally.collected, 8);
    // Pages 0 and 1 are lost.
    assert_eq!(seen[..3], [(1, 100), (1, 101), (1, 2)]);
    assert_eq!(kernel.reset(), 8);
    // The kernel's dirty index is two ahead of everything else now.
    for page in 200..204 {
        kernel.push(1, page).unwrap();
    }
    let (flags, _) = peek(&ring, h.cursor());
    assert_eq!(flags, 0, "the entry at the harvest index is not DIRTY");
    assert_eq!(harvest_all(&mut h, &ring, &bounds()).0.collected, 0);
    assert_eq!(kernel.reset(), 0);
    // The pushed entries sit past the cursor, where recovery can find them.
    let (flags, entry) = peek(&ring, h.cursor().wrapping_add(2));
    assert_eq!(
        (flags, entry),
        (
            1,
            DirtyEntry {
                slot: 1,
                offset: 200
            }
        )
    );
}

#[test]
fn ring_full_message_says_what_to_do() {
    assert_eq!(
        RingFull { entries: 4 }.to_string(),
        "dirty ring full: all 4 entries await harvest or reset; harvest and reset the ring"
    );
}

#[test]
#[should_panic(expected = "power-of-two")]
fn heap_ring_rejects_non_power_of_two() {
    let _ = HeapRing::new(12);
}

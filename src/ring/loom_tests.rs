//! loom models of the harvest protocol against the mock kernel.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.

use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::sync::Ordering;

/// Explores every interleaving of `f`, and every value each atomic load may
/// return, exhaustively: the models are small enough (a fraction of a second in
/// all) that no preemption bound is needed. Returns the number of executions.
fn model(f: impl Fn() + Sync + Send + 'static) -> usize {
    // std atomics: the counter is outside the model, loom must not see it.
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    // Builder::new() takes LOOM_MAX_PREEMPTIONS etc. from the environment;
    // unset, the search is exhaustive.
    loom::model::Builder::new().check(move || {
        // Relaxed: a tally, read below once check() has returned on this thread.
        counter.fetch_add(1, Relaxed);
        f();
    });
    // Relaxed: every increment happened on this thread (loom runs executions
    // on its own coroutines, joined before check() returns).
    let explored = executions.load(Relaxed);
    eprintln!("loom explored {explored} executions");
    explored
}

fn bounds() -> SlotBounds {
    SlotBounds::new([(1, 64), (2, 64), (3, 64)])
}

/// A vCPU pushes three entries into a two-entry ring while the reaper harvests
/// concurrently: the third push finds the ring full until the kernel's reset
/// (run here on the vCPU's side, as KVM_RESET_DIRTY_RINGS may run on any CPU)
/// frees an entry, so the ring wraps and an entry is reused. Each entry is seen
/// exactly once, in order, with the payload it was published with, and the
/// resets re-protect exactly those entries.
#[test]
fn loom_harvest_concurrent_with_push() {
    let explored = model(|| {
        let ring = Arc::new(HeapRing::new(2));
        let mut kernel = MockKernel::new(ring.clone());
        let vcpu = thread::spawn(move || {
            let mut reprotected = Vec::new();
            for (slot, offset) in [(1, 10), (2, 20), (3, 30)] {
                while kernel.push(slot, offset).is_err() {
                    kernel.reset_with(|e| reprotected.push(e));
                    thread::yield_now();
                }
            }
            (kernel, reprotected)
        });

        let bounds = bounds();
        let mut harvester = Harvester::new();
        let mut seen = Vec::new();
        let mut harvested = 0;
        while seen.len() < 3 {
            let tally = harvester.harvest(&*ring, &bounds, |slot, page| seen.push((slot, page)));
            assert_eq!(tally.bad_entries, 0, "torn or stale payload: {seen:?}");
            harvested += tally.collected;
            thread::yield_now();
        }
        assert_eq!(seen, [(1, 10), (2, 20), (3, 30)]);
        assert_eq!(harvested, 3);

        let (mut kernel, mut reprotected) = vcpu.join().unwrap();
        kernel.reset_with(|e| reprotected.push(e));
        assert_eq!(
            reprotected,
            [
                DirtyEntry {
                    slot: 1,
                    offset: 10
                },
                DirtyEntry {
                    slot: 2,
                    offset: 20
                },
                DirtyEntry {
                    slot: 3,
                    offset: 30
                },
            ]
        );
        assert_eq!(kernel.used(), 0);
    });
    assert!(explored > 100, "only {explored} executions explored");
}

/// The payload of the entry's previous use, already harvested and reset.
const OLD: DirtyEntry = DirtyEntry { slot: 1, offset: 5 };
/// The payload the vCPU publishes in the race.
const NEW: DirtyEntry = DirtyEntry { slot: 2, offset: 7 };

/// The three CPUs of docs/kernel.md#dirty-ring-memory-ordering on a one-entry
/// ring whose only entry last held `OLD`: CPU2 (vCPU) publishes `NEW`, CPU0
/// (reaper) harvests it with [`Harvester::harvest`], the function the tracker
/// calls (or, to show the model catches the bug, with a RESET store of
/// `weakened` ordering), CPU1 runs `KVM_RESET_DIRTY_RINGS` concurrently.
/// Whenever the reset walk sees RESET it must re-protect `NEW`: re-protecting
/// `OLD` and clearing the flags loses `NEW`'s page for good.
fn three_cpu_race(weakened: Option<Ordering>) -> usize {
    model(move || {
        let ring = Arc::new(HeapRing::new(1));
        let mut kernel = MockKernel::new(ring.clone());
        let bounds = bounds();
        // The entry's previous life, so that a stale read is observable.
        kernel.push(OLD.slot, OLD.offset).unwrap();
        Harvester::new().harvest(&*ring, &bounds, |_, _| {});
        assert_eq!(kernel.reset(), 1);
        // Two views of the kernel's indices: the vCPU's push and the reset
        // walk run on different CPUs.
        let mut reset_walk = kernel.clone();

        let vcpu = thread::spawn(move || kernel.push(NEW.slot, NEW.offset).unwrap());
        let reaper = {
            let ring = ring.clone();
            thread::spawn(move || {
                let mut seen = Vec::new();
                let mut harvester = Harvester::with_cursor(1);
                let dirtied = |slot, page| seen.push((slot, page));
                let tally = match weakened {
                    None => harvester.harvest(&*ring, &bounds, dirtied),
                    Some(order) => harvester.harvest_with(&*ring, &bounds, dirtied, order),
                };
                // Acquire on DIRTY always gives the reaper the fresh payload.
                assert!(seen.iter().all(|&s| s == (2, 7)), "reaper saw {seen:?}");
                tally.collected
            })
        };

        let mut reprotected = Vec::new();
        let reset = reset_walk.reset_with(|e| reprotected.push(e));
        for e in &reprotected {
            assert_eq!(*e, NEW, "stale payload re-protected by the reset walk");
        }

        vcpu.join().unwrap();
        let harvested = reaper.join().unwrap();
        assert!(reset <= harvested);
    })
}

#[test]
fn loom_three_cpu_reset_race_as_the_tracker_harvests() {
    let explored = three_cpu_race(None);
    assert!(explored > 100, "only {explored} executions explored");
}

/// The bug QEMU fixed in 2022: a plain (relaxed) RESET store lets the reset
/// walk see RESET with the previous use's payload.
#[test]
#[should_panic(expected = "stale payload re-protected by the reset walk")]
fn loom_three_cpu_reset_race_with_relaxed_reset_is_caught() {
    three_cpu_race(Some(Ordering::Relaxed));
}

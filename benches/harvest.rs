//! Ring harvest throughput, against a plain sequential scan of the same entries.
//!
//! Measures `Harvester::harvest` over a `HeapRing` of 4096 and 65536 entries
//! (the smallest size api.rst recommends, and the largest KVM allows: 256 MiB
//! of dirtied memory) that a `MockKernel` has filled with dirtied entries of
//! one memory slot, the callback summing the pages. The reference is the
//! cheapest loop that reads the same entries the same way: an acquire load of
//! each entry's flags and relaxed loads of its payload, summing the offsets,
//! over the ring's slice, with no checks and no stores.
//!
//! Why: the reaper harvests every vCPU ring on a 2-core host where it competes
//! with vCPU threads for CPU time, so the protocol's own cost (the exact flag
//! compare, the slot-bounds check, the store-release of RESET, the cursor)
//! must stay close to the cost of merely reading the ring. Design targets:
//! harvest at least 80% of the scan's throughput and at least 100 M entries/s.
//!
//! The ring is reset and refilled between iterations, untimed, so that both
//! benches start from the same all-DIRTY, cache-warm ring.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirtyvm::ring::{Harvest, Harvester, HeapRing, MockKernel, SlotBounds, SlotStore};

/// Ring sizes: the size api.rst recommends at least, and KVM's maximum.
const ENTRIES: [u32; 2] = [4096, 65536];
/// The slot entries name: 1 GiB of 4 KiB pages.
const SLOT: u16 = 1;
const SLOT_PAGES: u64 = 1 << 18;

/// Resets whatever was harvested and refills the ring with the next run of
/// pages of a sequential writer.
fn refill(kernel: &mut MockKernel<&HeapRing>, next_page: &mut u64) {
    kernel.reset();
    for _ in 0..kernel.entries() {
        kernel
            .push(u32::from(SLOT), *next_page)
            .expect("the ring was reset");
        *next_page = (*next_page + 1) % SLOT_PAGES;
    }
}

/// The harvest under test, the callback summing the dirtied pages. Out of line,
/// like the reference, as the reaper would call it.
#[inline(never)]
fn harvest_sum<S: SlotStore>(
    harvester: &mut Harvester,
    store: &S,
    bounds: &SlotBounds,
) -> (Harvest, u64) {
    let mut sum = 0u64;
    let tally = harvester.harvest(store, bounds, |_, page| sum = sum.wrapping_add(page));
    (tally, sum)
}

/// The reference: read every entry the way the harvester must, nothing more.
#[inline(never)]
fn sequential_scan(ring: &HeapRing) -> u64 {
    let mut sum = 0u64;
    for gfn in ring.gfns() {
        // Acquire: pairs with MockKernel::push's store-release of DIRTY.
        let flags = gfn.flags.load(Ordering::Acquire);
        // Relaxed: ordered after the Acquire load of flags above.
        let slot = gfn.slot.load(Ordering::Relaxed);
        // Relaxed: ordered after the Acquire load of flags above.
        let offset = gfn.offset.load(Ordering::Relaxed);
        sum = sum.wrapping_add(offset ^ u64::from(slot) ^ u64::from(flags));
    }
    sum
}

fn harvest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    for entries in ENTRIES {
        let ring = HeapRing::new(entries);
        let bounds = SlotBounds::new([(SLOT, SLOT_PAGES)]);
        let mut kernel = MockKernel::new(&ring);
        let mut harvester = Harvester::new();
        let mut next_page = 0;
        group.throughput(Throughput::Elements(u64::from(entries)));

        group.bench_function(BenchmarkId::new("harvest", entries), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    refill(&mut kernel, &mut next_page);
                    let start = Instant::now();
                    let (tally, sum) = harvest_sum(&mut harvester, &ring, &bounds);
                    timed += start.elapsed();
                    assert_eq!(tally.collected, entries);
                    black_box(sum);
                }
                timed
            })
        });

        group.bench_function(BenchmarkId::new("sequential_scan", entries), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Harvest (untimed) so that the refill's reset has work to
                    // do and the ring is in the same state as for the harvest.
                    harvester.harvest(&ring, &bounds, |_, _| {});
                    refill(&mut kernel, &mut next_page);
                    let start = Instant::now();
                    let sum = sequential_scan(&ring);
                    timed += start.elapsed();
                    black_box(sum);
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, harvest);
criterion_main!(benches);

//! The merged dirty-page set ([`DirtyPageSet`]) of a 1 GiB slot (262144 pages).
//!
//! Measures, per page of the slot (`Throughput::Elements` in pages):
//!
//! - `mark_bitmap/all_dirty` and `mark_bitmap/none_dirty`: merging a slot-wide bitmap as
//!   `KVM_GET_DIRTY_LOG` returns it, every bit set or none. This is what every bitmap sync
//!   does after the ioctls (`Tracker::sync_bitmap`); a word with no bits costs a load and a
//!   branch, a word with bits an atomic `fetch_or`.
//! - `mark/sequential` and `mark/random`: marking pages one at a time, as a ring harvest
//!   publishes them after `KVM_RESET_DIRTY_RINGS` (one atomic `fetch_or` per page), in the
//!   order a sequential writer dirties them and in a pseudo-random order. The set of a
//!   1 GiB slot is 32 KiB, so it stays in cache either way: the order shows whether
//!   anything but the locked read-modify-write itself costs.
//! - `take/all_dirty`: taking a full set (swap every word to zero into a fresh bitmap), what a
//!   consumer such as a migration pass does once per round.
//!
//! Why: the set is written by the reaper on every reap and by bitmap syncs, on a 2-core host
//! where the reaper competes with vCPU threads; its cost per page must stay far below the
//! per-page cost of the kernel's own work (see `kvm_ioctls`) and of the harvest itself
//! (`harvest`), so that merging never becomes what limits how often the reaper can run.
//! No KVM needed.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirtyvm::tracking::DirtyPageSet;

/// A 1 GiB slot of 4 KiB pages.
const PAGES: u64 = 1 << 18;
const WORDS: usize = (PAGES / 64) as usize;

fn dirty_set(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirty_set");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(PAGES));

    let set = DirtyPageSet::new(PAGES);
    for (name, word) in [("all_dirty", u64::MAX), ("none_dirty", 0)] {
        let bitmap = vec![word; WORDS];
        group.bench_function(BenchmarkId::new("mark_bitmap", name), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Start from an empty set each time, as after a consumer's take.
                    black_box(set.take());
                    let start = Instant::now();
                    set.mark_bitmap(black_box(&bitmap));
                    timed += start.elapsed();
                }
                timed
            })
        });
    }

    let sequential: Vec<u64> = (0..PAGES).collect();
    for (name, order) in [
        ("sequential", sequential),
        ("random", common::random_order(PAGES, 12345)),
    ] {
        group.bench_function(BenchmarkId::new("mark", name), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    black_box(set.take());
                    let start = Instant::now();
                    for &page in &order {
                        set.mark(black_box(page));
                    }
                    timed += start.elapsed();
                }
                timed
            })
        });
    }

    let full = vec![u64::MAX; WORDS];
    group.bench_function(BenchmarkId::new("take", "all_dirty"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                set.mark_bitmap(&full);
                let start = Instant::now();
                let taken = set.take();
                timed += start.elapsed();
                assert_eq!(taken.bitmap.len(), WORDS);
                black_box(taken);
            }
            timed
        })
    });
    group.finish();
}

criterion_group!(benches, dirty_set);
criterion_main!(benches);

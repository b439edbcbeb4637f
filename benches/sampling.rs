//! The cost of hashing one 4 KiB guest page, the unit of work of page-sampling mode.
//!
//! Measures `dirtyvm::rate::hash_page` (XXH64, seed 1, over the page's 512 words read as
//! relaxed `AtomicU64` loads, exactly as page-sampling reads guest memory the guest may be
//! writing), per page (`Throughput::Bytes(4096)`):
//!
//! - `hash_page/hot`: the same page again and again, in L1: the hash's arithmetic alone;
//! - `hash_page/cold`: every page of a 256 MiB region (larger than any cache) in a
//!   pseudo-random order, each page touched beforehand so it has its own physical frame:
//!   what sampling pays, since its pages are spread over all of guest memory and were last
//!   read a whole measurement period ago;
//! - `read_page/cold`: the reference for the cold case, the same loads summed without
//!   hashing: how much of the cold cost is memory rather than the hash.
//!
//! Why: page-sampling hashes 512 pages per GiB of guest memory (QEMU's default) at the
//! start and again at the end of every measurement, on the caller's thread; its cost per
//! page decides how cheap a measurement of a large guest is, and whether a faster hash
//! would matter (it would not if the cold case is dominated by the loads). No KVM needed.

mod common;

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirtyvm::rate::hash_page;
use dirtyvm::units::PAGE_SIZE;
use dirtyvm::vm::kvm::GuestMemory;

/// The cold region: 64Ki pages.
const COLD_BYTES: usize = 256 << 20;

/// Something done to one page of guest memory.
type PageRoutine = fn(&GuestMemory, u64) -> u64;

/// The reference: the page's words loaded the way `hash_page` loads them, summed.
#[inline(never)]
fn read_page(ram: &GuestMemory, page: u64) -> u64 {
    let words = PAGE_SIZE as usize / 8;
    ram.words()[page as usize * words..][..words]
        .iter()
        // Relaxed, like hash_page: nothing is published through guest memory.
        .fold(0u64, |sum, w| sum.wrapping_add(w.load(Ordering::Relaxed)))
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("page_sampling");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(PAGE_SIZE));

    let hot = GuestMemory::new(PAGE_SIZE as usize).expect("one page of anonymous memory");
    for (i, word) in hot.words().iter().enumerate() {
        word.store(i as u64 * 0x9e37_79b9, Ordering::Relaxed);
    }
    group.bench_function(BenchmarkId::new("hash_page", "hot"), |b| {
        b.iter(|| hash_page(black_box(&hot), black_box(0)))
    });

    let cold = GuestMemory::new(COLD_BYTES).expect("256 MiB of anonymous memory");
    let pages = COLD_BYTES as u64 / PAGE_SIZE;
    // One distinct word per page, so every page is backed by its own frame rather than by
    // the shared zero page.
    for page in 0..pages {
        cold.write_u64((page * PAGE_SIZE) as usize, page | 1);
    }
    let order = common::random_order(pages, 7);
    let routines: [(&str, PageRoutine); 2] = [("hash_page", hash_page), ("read_page", read_page)];
    for (name, routine) in routines {
        let mut next = order.iter().copied().cycle();
        group.bench_function(BenchmarkId::new(name, "cold"), |b| {
            b.iter(|| routine(&cold, next.next().expect("a cycle never ends")))
        });
    }
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);

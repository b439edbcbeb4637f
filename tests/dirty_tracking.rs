//! Dirty tracking on real KVM: rings and bitmap report exactly the pages the guest wrote,
//! and an overflowed ring is detected, reported and recovered, never a hang.

mod common;

use std::collections::BTreeSet;
use std::thread::sleep;
use std::time::{Duration, Instant};

use dirtyvm::tracking::Cadence;
use dirtyvm::tracking::DirtyLog;
use dirtyvm::vm::guest::Workload;
use dirtyvm::vmm::{Machine, VmConfig};

fn config(log: DirtyLog, workloads: &[&str]) -> VmConfig {
    let workloads: Vec<Workload> = workloads.iter().map(|w| w.parse().unwrap()).collect();
    VmConfig::new(2, 64 << 20, workloads).with_dirty_log(log)
}

/// Pages (RAM-slot page numbers) of vCPU `id`'s working set.
fn region(machine: &Machine, id: usize) -> std::ops::Range<u64> {
    let plan = machine.layout().vcpus()[id];
    let first = plan.ram_offset / 4096;
    first..first + plan.workload.pages()
}

/// Boots, lets a slow sequential writer run for a while, stops, and checks the dirty set is
/// exactly the pages written (plus at most the one whose counter was not yet bumped).
fn sequential_writer_is_tracked_exactly(log: DirtyLog) {
    let _vm = common::one_vm_at_a_time();
    // 4096 pages at 4 MiB/s = 1024 pages/s: no page is written twice in the test.
    let machine = Machine::boot(&config(log, &["write:16M@4", "read:4M"])).unwrap();
    // Start the window mid-run: flush (every write counted so far is then in the tracker)
    // and take what was dirtied until now. Pages written while that happens may land in
    // either set.
    let window_start = machine.guest_stats()[0].pages_written;
    if let Some(reaper) = machine.reaper() {
        assert!(reaper.flush());
    }
    let before = machine.tracker().take_dirty().unwrap();
    assert!(before.complete);
    let taken_at = machine.guest_stats()[0].pages_written;
    sleep(Duration::from_millis(700));
    machine.shutdown().unwrap();
    let written = machine.guest_stats()[0].pages_written;
    assert!(written > taken_at + 100, "writer too slow: {written}");
    assert!(written < 4096, "writer wrapped around its working set");

    let dirty = machine.tracker().take_dirty().unwrap();
    assert!(dirty.complete);
    let got: BTreeSet<u64> = dirty.pages().collect();
    let writer = region(&machine, 0);
    // Surely in this window: everything counted after the take, up to the last write.
    let expected: BTreeSet<u64> = (writer.start + taken_at + 1..writer.start + written).collect();
    assert!(
        got.is_superset(&expected),
        "{log:?}: missing pages {:?}",
        expected.difference(&got).take(10).collect::<Vec<_>>()
    );
    // At most: from the flush on, plus the one write whose counter had not been bumped.
    let possible = writer.start + window_start..=writer.start + written;
    let extra: Vec<_> = got.iter().filter(|p| !possible.contains(p)).collect();
    assert!(
        extra.is_empty(),
        "{log:?}: pages reported but not written in the window: {extra:?}"
    );
    assert!(
        got.iter().all(|p| writer.contains(p)),
        "reader or idle pages reported"
    );
    if log == DirtyLog::Ring {
        let harvested = machine.tracker().vcpu(0).snapshot().harvested;
        // Every page is written once, so every write is a first write: one entry each.
        assert!(
            (written..=written + 1).contains(&harvested),
            "harvested {harvested} entries for {written} pages written"
        );
        let reader = machine.tracker().vcpu(1).snapshot().harvested;
        assert_eq!(reader, 0, "the reader's ring had entries");
    }
    assert_eq!(machine.tracker().ring_overflows(), 0);
    assert_eq!(machine.tracker().reset_mismatches(), 0);
}

#[test]
fn ring_reports_exactly_the_pages_written() {
    if common::kvm_available("ring_reports_exactly_the_pages_written") {
        sequential_writer_is_tracked_exactly(DirtyLog::Ring);
    }
}

#[test]
fn bitmap_reports_exactly_the_pages_written() {
    if common::kvm_available("bitmap_reports_exactly_the_pages_written") {
        sequential_writer_is_tracked_exactly(DirtyLog::Bitmap);
    }
}

#[test]
fn random_writer_pages_match_the_replayed_order() {
    if !common::kvm_available("random_writer_pages_match_the_replayed_order") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let machine = Machine::boot(&config(DirtyLog::Ring, &["random-write:16M@4"])).unwrap();
    sleep(Duration::from_millis(500));
    machine.shutdown().unwrap();
    let written = machine.guest_stats()[0].pages_written;
    let plan = machine.layout().vcpus()[0];
    let (mask, pages) = (plan.lcg_mask(), plan.workload.pages());
    let mut x = plan.lcg_seed();
    let mut order = Vec::new();
    while order.len() as u64 <= written {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345) & mask;
        if x < pages {
            order.push(x + plan.ram_offset / 4096);
        }
    }
    let got: BTreeSet<u64> = machine.tracker().take_dirty().unwrap().pages().collect();
    let expected: BTreeSet<u64> = order[..written as usize].iter().copied().collect();
    let with_in_flight: BTreeSet<u64> = order.iter().copied().collect();
    assert!(
        got == expected || got == with_in_flight,
        "random writer's pages differ"
    );
}

#[test]
fn flush_makes_every_write_visible() {
    if !common::kvm_available("flush_makes_every_write_visible") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let machine = Machine::boot(&config(DirtyLog::Ring, &["write:16M@8"])).unwrap();
    let reaper = machine.reaper().expect("ring mode has a reaper");
    sleep(Duration::from_millis(200));
    // 2048 pages/s over 4096 pages: no page is written twice during the test, so every
    // write is a first write and gets its own ring entry.
    let written = machine.guest_stats()[0].pages_written;
    assert!(reaper.flush());
    let harvested = machine.tracker().vcpu(0).snapshot().harvested;
    // Every write counted before the flush began is harvested when it returns.
    assert!(
        harvested >= written,
        "{harvested} harvested < {written} written"
    );
    assert!(reaper.stats().flushes >= 1);
}

/// A small ring, a slow fixed reaper and an unpaced writer over more pages than the ring
/// holds: on this host the ring overflows. Whatever the host does, the run must end on
/// time with either no overflow, or overflows that were detected, reported and recovered
/// (the dirty set then says it is incomplete), or a clean wedge error: never a hang.
#[test]
fn overflowing_ring_is_detected_and_recovered() {
    if !common::kvm_available("overflowing_ring_is_detected_and_recovered") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let mut config = config(DirtyLog::Ring, &["write:32M"]);
    config.ring_entries = Some(1024);
    config.reaper = Cadence::Fixed(Duration::from_millis(1000));
    let machine = Machine::boot(&config).unwrap();
    let start = Instant::now();
    let mut progress = Vec::new();
    for _ in 0..10 {
        sleep(Duration::from_millis(100));
        if machine.stop_request().reason().is_some() {
            break;
        }
        progress.push(machine.guest_stats()[0].pages_written);
    }
    let stop_reason = machine.stop_request().reason();
    machine.shutdown().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the run did not end on time"
    );
    let tracker = machine.tracker();
    let ring_full: u64 = tracker.vcpu(0).snapshot().ring_full_exits;
    assert!(ring_full > 0, "the writer never filled its ring");
    match stop_reason {
        None => {
            // Recovered: the writer kept going through its ring-full exits.
            assert!(
                progress.windows(2).last().is_some_and(|w| w[1] > w[0]),
                "writer stalled: {progress:?}"
            );
            if tracker.ring_overflows() > 0 {
                let lost = tracker.vcpu(0).snapshot().lost_entries;
                eprintln!(
                    "{} overflows, {lost} entries lost, all recovered",
                    tracker.ring_overflows()
                );
            }
        }
        Some(reason) => {
            let text = reason.to_string();
            assert!(text.contains("wedged"), "unexpected stop: {text}");
        }
    }
    let dirty = tracker.take_dirty().unwrap();
    if tracker.ring_overflows() > 0 {
        // The first take after a loss reports every page of guest RAM, and says so.
        assert!(!dirty.complete);
        assert_eq!(dirty.count(), machine.ram().len() as u64 / 4096);
    }
}

/// A writer that laps a 1024-entry ring about five times (at least four, on a loaded host) in
/// the window, writing every page once: every write is harvested exactly once (a harvester
/// that lost one entry in a thousand would fall four or five short), and the dirty set is
/// exactly the pages written.
#[test]
fn ring_is_exact_over_several_laps_of_a_small_ring() {
    if !common::kvm_available("ring_is_exact_over_several_laps_of_a_small_ring") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // 8 MiB/s = 2048 pages/s over 16384 pages: 2.5 s is 5120 pages, no page twice.
    let mut config = config(DirtyLog::Ring, &["write:64M@8"]);
    config.ring_entries = Some(1024);
    let machine = Machine::boot(&config).unwrap();
    sleep(Duration::from_millis(2500));
    machine.shutdown().unwrap();
    let written = machine.guest_stats()[0].pages_written;
    assert!(
        (4 * 1024..16384).contains(&written),
        "{written} pages: not four laps of the ring, or more than one pass"
    );
    let vcpu = machine.tracker().vcpu(0).snapshot();
    assert!(
        (written..=written + 1).contains(&vcpu.harvested),
        "{} entries harvested for {written} pages written",
        vcpu.harvested
    );
    assert_eq!((vcpu.bad_entries, vcpu.lost_entries), (0, 0));
    let got: BTreeSet<u64> = machine.tracker().take_dirty().unwrap().pages().collect();
    let expected: BTreeSet<u64> = (0..written).collect();
    let in_flight: BTreeSet<u64> = (0..=written).collect();
    assert!(
        got == expected || got == in_flight,
        "dirty set of {} pages for {written} written",
        got.len()
    );
    assert_eq!(machine.tracker().ring_overflows(), 0);
    assert_eq!(machine.tracker().reset_mismatches(), 0);
}

/// A writer over the last pages of a guest RAM that is not a whole number of 64-page bitmap
/// words: the end of RAM is tracked like the rest, by rings and by the bitmap.
fn the_end_of_ram_is_tracked(log: DirtyLog) {
    let _vm = common::one_vm_at_a_time();
    // 4101 pages: the last bitmap word holds 5 of them, all the writer's.
    let workloads = ["read:16M".parse().unwrap(), "write:20K".parse().unwrap()];
    let machine = Machine::boot(
        &VmConfig::new(2, (16 << 20) + (20 << 10), workloads.to_vec()).with_dirty_log(log),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while machine.guest_stats()[1].passes < 2 && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
    machine.shutdown().unwrap();
    assert!(
        machine.guest_stats()[1].passes >= 2,
        "the writer never finished a pass"
    );
    let dirty = machine.tracker().take_dirty().unwrap();
    assert!(dirty.complete);
    assert_eq!(
        dirty.pages().collect::<Vec<_>>(),
        [4096, 4097, 4098, 4099, 4100],
        "{log:?}"
    );
}

#[test]
fn ring_tracks_the_end_of_ram() {
    if common::kvm_available("ring_tracks_the_end_of_ram") {
        the_end_of_ram_is_tracked(DirtyLog::Ring);
    }
}

#[test]
fn bitmap_tracks_the_end_of_ram() {
    if common::kvm_available("bitmap_tracks_the_end_of_ram") {
        the_end_of_ram_is_tracked(DirtyLog::Bitmap);
    }
}

//! End-to-end dirty-tracking overhead on KVM: how fast a guest writer dirties pages with
//! each tracking mechanism, against the same writer untracked.
//!
//! Measures the ground-truth page rate (the guest's own `pages_written` counter) of one vCPU
//! running an unpaced `write:256M` (one byte per 4 KiB page, sequentially, over 256 MiB) in
//! a 1-vCPU, 256 MiB VM booted with `Machine::boot`, in four configurations:
//!
//! - `none`: no dirty logging, no reaper: the baseline;
//! - `ring/65536`: per-vCPU dirty rings of 65536 entries (this host's largest) harvested by
//!   the adaptive reaper, the project's default;
//! - `ring/4096`: 4096-entry rings, adaptive reaper: the small ring the reaper must harvest
//!   16 times as often;
//! - `bitmap`: `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect), synced by the
//!   same reaper thread (its adaptive cadence settles at 1 s with no ring to watch).
//!
//! One criterion iteration is one page written by the guest, so criterion's time is the time
//! per page and its throughput is pages/s. One VM runs per configuration for the whole
//! configuration (booted before and shut down after it, its first two passes over the
//! working set run before timing so host memory is faulted in); each sample opens a window,
//! sleeps until the guest has written at least the requested pages, and scales the window's
//! time to exactly that many pages. The bench thread sleeps while it waits, so it leaves
//! both cores to the vCPU and the reaper.
//!
//! Then, because configurations measured one after the other see different background
//! load on a shared 2-core host (run-to-run swings of ±15 % were seen), it runs 4
//! interleaved rounds: each round boots every configuration in turn (rotating which goes
//! first) on a fresh VM, warms it the same way and measures 1 s. At the end it prints each
//! configuration's rate over criterion's samples and over the rounds (with the rounds'
//! spread), the ratio to `none` from the rounds, and what the tracking did (ring-full
//! exits, overflowed rings, reaps). The interleaved ratio is the number to quote.
//!
//! Why: dirty tracking must not slow the guest it tracks. Design target: a writer's page
//! rate with ring tracking at least 95% of its rate without tracking, and zero ring-full
//! exits for a full-speed writer with 65536-entry rings under the adaptive reaper. On this
//! host the guest is emulated (docs/host.md#guest-code-is-emulated), so the write-protection fault each first write
//! to a page takes costs little next to the emulation; on a host with hardware
//! virtualization the same bench shows the fault's full cost. Needs `/dev/kvm`: skipped with
//! a message without it.

use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirtyvm::tracking::Cadence;
use dirtyvm::tracking::DirtyLog;
use dirtyvm::vm::kvm::Kvm;
use dirtyvm::vmm::{Machine, VmConfig};

const MEMORY: u64 = 256 << 20;
const WORKLOAD: &str = "write:256M";
const WORKING_SET_PAGES: u64 = MEMORY / 4096;
/// Shortest window a sample measures, however few pages criterion asks for.
const MIN_WINDOW: Duration = Duration::from_millis(20);
/// A writer that makes no progress for this long has stopped: fail rather than hang.
const STALL: Duration = Duration::from_secs(5);

struct Setup {
    name: &'static str,
    log: DirtyLog,
    ring_entries: Option<u32>,
}

const SETUPS: [Setup; 4] = [
    Setup {
        name: "none",
        log: DirtyLog::None,
        ring_entries: None,
    },
    Setup {
        name: "ring/65536",
        log: DirtyLog::Ring,
        ring_entries: Some(65536),
    },
    Setup {
        name: "ring/4096",
        log: DirtyLog::Ring,
        ring_entries: Some(4096),
    },
    Setup {
        name: "bitmap",
        log: DirtyLog::Bitmap,
        ring_entries: None,
    },
];

/// Rounds of the interleaved phase, and each configuration's window in a round.
const ROUNDS: usize = 4;
const ROUND_WINDOW: Duration = Duration::from_secs(1);

/// One configuration's results.
#[derive(Default)]
struct Outcome {
    /// Pages and time over criterion's samples.
    sampled: (u64, Duration),
    /// Pages and time over the interleaved rounds.
    interleaved: (u64, Duration),
    /// Each interleaved round's rate, pages/s.
    round_rates: Vec<f64>,
    ring_full_exits: u64,
    ring_overflows: u64,
    reaps: u64,
}

fn pages_per_s((pages, time): (u64, Duration)) -> f64 {
    pages as f64 / time.as_secs_f64()
}

fn pages_written(machine: &Machine) -> u64 {
    machine.guest_stats()[0].pages_written
}

/// Sleeps until the writer has written at least `want` more pages and at least `min`
/// has passed; returns the pages written and the window's length.
fn window(machine: &Machine, want: u64, min: Duration) -> (u64, Duration) {
    let start = Instant::now();
    let first = pages_written(machine);
    let (mut last, mut progress) = (first, start);
    loop {
        thread::sleep(Duration::from_millis(2));
        let now = pages_written(machine);
        let elapsed = start.elapsed();
        if now - first >= want && elapsed >= min {
            return (now - first, elapsed);
        }
        if now != last {
            (last, progress) = (now, Instant::now());
        } else if progress.elapsed() > STALL {
            panic!(
                "the writer made no progress for {STALL:?} (VM stop reason: {:?})",
                machine.stop_request().reason()
            );
        }
    }
}

/// Boots `setup`'s VM and lets the writer make two passes untimed (the first faults in
/// host memory).
fn boot(setup: &Setup) -> Result<Machine, String> {
    let config = VmConfig {
        ring_entries: setup.ring_entries,
        reaper: Cadence::Adaptive,
        ..VmConfig::new(1, MEMORY, vec![WORKLOAD.parse().expect("workload spec")])
            .with_dirty_log(setup.log)
    };
    let machine = Machine::boot(&config).map_err(|e| e.to_string())?;
    window(&machine, 2 * WORKING_SET_PAGES, Duration::ZERO);
    Ok(machine)
}

/// Adds what `machine`'s tracking did to `outcome`, and shuts it down.
fn finish(machine: Machine, setup: &Setup, outcome: &mut Outcome) {
    let tracker = machine.tracker();
    outcome.ring_full_exits += tracker.vcpu(0).snapshot().ring_full_exits;
    outcome.ring_overflows += tracker.ring_overflows();
    outcome.reaps += machine.reaper().map_or(0, |r| r.stats().reaps);
    if let Err(e) = machine.shutdown() {
        println!("tracking_overhead/{}: shutdown failed: {e}", setup.name);
    }
}

fn tracking(c: &mut Criterion) {
    if let Err(e) = Kvm::open() {
        println!("tracking_overhead: skipped: /dev/kvm cannot be opened ({e})");
        return;
    }
    let mut group = c.benchmark_group("tracking_overhead");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));

    let mut outcomes: Vec<Option<Outcome>> = SETUPS.iter().map(|_| None).collect();
    for (setup, slot) in SETUPS.iter().zip(&mut outcomes) {
        let machine = match boot(setup) {
            Ok(machine) => machine,
            Err(e) => {
                println!("tracking_overhead/{}: skipped: {e}", setup.name);
                continue;
            }
        };
        let outcome = slot.insert(Outcome::default());
        group.bench_function(BenchmarkId::new("write_256M", setup.name), |b| {
            b.iter_custom(|iters| {
                let (pages, elapsed) = window(&machine, iters, MIN_WINDOW);
                outcome.sampled.0 += pages;
                outcome.sampled.1 += elapsed;
                elapsed.mul_f64(iters as f64 / pages as f64)
            })
        });
        finish(machine, setup, outcome);
    }
    group.finish();

    // The ratio between configurations measured one after the other drifts with whatever
    // else the host runs; rounds that visit every configuration in turn (rotating which
    // goes first), each on a fresh VM, cancel that drift.
    println!(
        "tracking_overhead: interleaving {ROUNDS} rounds of {ROUND_WINDOW:?} per configuration"
    );
    for round in 0..ROUNDS {
        for i in (0..SETUPS.len()).map(|i| (i + round) % SETUPS.len()) {
            let (setup, Some(outcome)) = (&SETUPS[i], outcomes[i].as_mut()) else {
                continue;
            };
            let machine = boot(setup).unwrap_or_else(|e| panic!("{}: {e}", setup.name));
            let (pages, time) = window(&machine, 0, ROUND_WINDOW);
            outcome.interleaved.0 += pages;
            outcome.interleaved.1 += time;
            outcome.round_rates.push(pages_per_s((pages, time)));
            finish(machine, setup, outcome);
        }
    }

    let baseline = outcomes[0].as_ref().map(|o| pages_per_s(o.interleaved));
    println!("\ntracking overhead: unpaced {WORKLOAD} writer, ground-truth page rate (Mpages/s)");
    println!(
        "{:<11} {:>9} {:>12} {:>14} {:>8} {:>10} {:>9} {:>7}",
        "tracking",
        "sampled",
        "interleaved",
        "rounds min-max",
        "vs none",
        "ring-full",
        "overflows",
        "reaps"
    );
    for (setup, outcome) in SETUPS.iter().zip(&outcomes) {
        let Some(o) = outcome else {
            continue;
        };
        let rate = pages_per_s(o.interleaved);
        let (min, max) = o
            .round_rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        println!(
            "{:<11} {:>9.3} {:>12.3} {:>14} {:>8} {:>10} {:>9} {:>7}",
            setup.name,
            pages_per_s(o.sampled) / 1e6,
            rate / 1e6,
            format!("{:.3}-{:.3}", min / 1e6, max / 1e6),
            baseline.map_or("-".into(), |b| format!("{:.1}%", 100.0 * rate / b)),
            o.ring_full_exits,
            o.ring_overflows,
            o.reaps,
        );
    }
    println!(
        "(sampled: over criterion's samples, one VM per configuration, run one after the \
         other; interleaved: over the rounds, the basis of 'vs none'; ring-full, overflows and \
         reaps: totals over every VM of the configuration. Design target: ring >= 95% of \
         none; zero ring-full exits with 65536-entry rings)\n"
    );
}

criterion_group!(benches, tracking);
criterion_main!(benches);

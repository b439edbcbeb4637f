//! The built-in guest workloads on real KVM, judged by their ground-truth counters and by the
//! bytes they leave in guest memory: paced writers hold their rate, writers touch exactly the
//! pages (and the number of times) their program says, idle vCPUs halt, and shutdown joins
//! every vCPU thread.

mod common;

use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::{Duration, Instant};

use dirtyvm::vm::guest::{GuestStats, VcpuPlan, Workload};
use dirtyvm::vmm::{Machine, VmConfig};

const PAGE: u64 = 4096;

// VMs take turns (`common::one_vm_at_a_time`): the host has two cores, and the thread
// checks below look at every `vcpu*` thread of this process.

fn boot(vcpus: u32, memory: u64, workloads: &[&str]) -> Machine {
    let workloads = workloads
        .iter()
        .map(|w| w.parse::<Workload>().expect("workload spec"))
        .collect();
    Machine::boot(&VmConfig::new(vcpus, memory, workloads)).expect("boot")
}

/// Polls the guest counters until `done` holds; fails after `timeout`.
fn wait_for(
    machine: &Machine,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[GuestStats]) -> bool,
) -> Vec<GuestStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = machine.guest_stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}; counters {stats:?}"
        );
        sleep(Duration::from_millis(5));
    }
}

/// Threads of this process named `vcpu*` that have not exited (zombie and dead tasks are
/// past their exit), as `(tid, name)`.
fn live_vcpu_threads() -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let name = name.trim_end().to_string();
            if !name.starts_with("vcpu") {
                return None;
            }
            // The state is the first field after the parenthesized name.
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            (!matches!(state, 'Z' | 'X' | 'x'))
                .then(|| (task.file_name().to_string_lossy().into(), name))
        })
        .collect()
}

/// Waits until no `vcpu*` thread of this process is alive; fails after `timeout`.
fn wait_for_no_vcpu_threads(timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let live = live_vcpu_threads();
        if live.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: vCPU threads still alive after {timeout:?}: {live:?}"
        );
        sleep(Duration::from_millis(1));
    }
}

/// Checks guest RAM byte by byte: the first byte of page `p` of vCPU `i`'s working set must
/// equal `expected[i][p]` (or one more at the single page `in_flight[i]`: a write whose
/// counter increment had not happened yet when the vCPU stopped); every other byte must be
/// zero.
fn check_ram(machine: &Machine, expected: &[Vec<u8>], in_flight: &[Option<u64>]) {
    let plans: &[VcpuPlan] = machine.layout().vcpus();
    let mut bad = Vec::new();
    for (offset, cell) in machine.ram().bytes().iter().enumerate() {
        let offset = offset as u64;
        let got = cell.load(Ordering::Relaxed);
        let page_of = |plan: &VcpuPlan| {
            let inside =
                offset >= plan.ram_offset && offset < plan.ram_offset + plan.workload.working_set();
            (inside && offset.is_multiple_of(PAGE)).then(|| (offset - plan.ram_offset) / PAGE)
        };
        let want =
            plans
                .iter()
                .zip(expected.iter().zip(in_flight))
                .find_map(|(plan, (want, flight))| {
                    let page = page_of(plan)?;
                    Some((plan.id, page, want[page as usize], *flight == Some(page)))
                });
        match want {
            None if got != 0 => bad.push(format!(
                "byte {offset:#x} (not a page's first byte) is {got}"
            )),
            None => {}
            Some((_, _, b, _)) if got == b => {}
            Some((_, _, b, true)) if got == b.wrapping_add(1) => {}
            Some((id, page, b, _)) => bad.push(format!(
                "vCPU {id} page {page}: first byte {got}, expected {b}"
            )),
        }
        if bad.len() >= 10 {
            break;
        }
    }
    assert!(bad.is_empty(), "guest memory differs:\n{}", bad.join("\n"));
}

/// Measures a one-vCPU VM running `spec` over ~3 s (after it is running) and checks the
/// ground-truth write rate is within 2% of `mibps` (the pacing is exact; 2 % is the noise
/// measured beside a spinning core).
fn paced_writer_holds(spec: &str, mibps: f64) {
    let _vm = common::one_vm_at_a_time();
    let machine = boot(1, 16 << 20, &[spec]);
    wait_for(
        &machine,
        Duration::from_secs(10),
        "first page written",
        |s| s[0].pages_written > 0,
    );
    sleep(Duration::from_millis(200));
    let (before, from) = (machine.guest_stats()[0], Instant::now());
    sleep(Duration::from_secs(3));
    let (after, to) = (machine.guest_stats()[0], Instant::now());
    machine.shutdown().expect("shutdown");

    let seconds = (to - from).as_secs_f64();
    let rate = (after.pages_written - before.pages_written) as f64 / 256.0 / seconds;
    eprintln!("{spec}: {rate:.2} MiB/s over {seconds:.2} s");
    assert!(
        (rate - mibps).abs() <= 0.02 * mibps,
        "{spec} wrote {rate:.2} MiB/s over {seconds:.2} s, not within 2% of {mibps} MiB/s"
    );
    assert_eq!(after.pages_read, 0);
}

#[test]
fn paced_writer_holds_its_rate() {
    if !common::kvm_available("paced_writer_holds_its_rate") {
        return;
    }
    paced_writer_holds("write:8M@64", 64.0);
}

#[test]
fn paced_random_writer_holds_its_rate() {
    if !common::kvm_available("paced_random_writer_holds_its_rate") {
        return;
    }
    paced_writer_holds("random-write:8M@32", 32.0);
}

/// The random writers' order, replayed on the host.
struct Replay {
    /// Visits per page after the first `n` accepted draws.
    counts: Vec<u64>,
    /// The page the `n+1`-th accepted draw writes (possibly in flight when stopped).
    next_page: u64,
    /// Completed periods counted by the guest up to the `n`-th accepted draw, and up to the
    /// `n+1`-th (the guest may be stopped anywhere in between).
    passes: (u64, u64),
}

fn lcg_next(x: u64, mask: u64) -> u64 {
    1_103_515_245u64.wrapping_mul(x).wrapping_add(12_345) & mask
}

/// Replays `n` accepted draws of the program: draw `x`, count a pass when `x` is back at the
/// seed, draw again while `x >= pages`, else write page `x`.
fn replay(seed: u64, mask: u64, pages: u64, n: u64) -> Replay {
    let mut x = seed;
    let mut passes = 0;
    let mut draw = || loop {
        x = lcg_next(x, mask);
        if x == seed {
            passes += 1;
        }
        if x < pages {
            return (x, passes);
        }
    };
    let mut counts = vec![0u64; pages as usize];
    let mut done = 0;
    for _ in 0..n {
        let (page, p) = draw();
        counts[page as usize] += 1;
        done = p;
    }
    let (next_page, next_passes) = draw();
    Replay {
        counts,
        next_page,
        passes: (done, next_passes),
    }
}

#[test]
fn lcg_replay_visits_every_page_once_per_period() {
    // The host side of the check below, on its own: a full period of the LCG visits every
    // page once, also when the page count is not a power of two.
    for (pages, mask) in [(1024u64, 1023u64), (768, 1023), (1, 0), (5, 7)] {
        let r = replay(3 & mask, mask, pages, pages);
        assert!(
            r.counts.iter().all(|&c| c == 1),
            "{pages} pages: {:?}",
            r.counts
        );
        assert_eq!(r.passes.0, 1, "{pages} pages: one period, one pass");
        let r = replay(3 & mask, mask, pages, 3 * pages);
        assert!(r.counts.iter().all(|&c| c == 3), "{pages} pages");
    }
}

#[test]
fn random_writer_writes_exactly_its_replayed_order() {
    if !common::kvm_available("random_writer_writes_exactly_its_replayed_order") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // 4M is 1024 pages (the LCG's period exactly); 3M is 768 pages, so the writer must skip
    // draws at or above the page count.
    let machine = boot(2, 8 << 20, &["random-write:4M", "random-write:3M"]);
    let plans = machine.layout().vcpus().to_vec();
    assert_eq!(plans[0].lcg_mask(), 1023);
    assert_eq!(plans[1].lcg_mask(), 1023);
    for plan in &plans {
        assert!(plan.lcg_seed() <= plan.lcg_mask(), "{plan:?}");
    }
    wait_for(&machine, Duration::from_secs(20), "one pass each", |s| {
        s.iter().all(|s| s.passes >= 1)
    });
    // After shutdown no guest code runs, and counters and memory stay readable: from here
    // on they are final and can be compared exactly.
    machine.shutdown().expect("shutdown");
    let stats = machine.guest_stats();
    eprintln!("random writers stopped at {stats:?}");

    let mut expected = Vec::new();
    let mut in_flight = Vec::new();
    for (plan, s) in plans.iter().zip(&stats) {
        let pages = plan.workload.pages();
        let r = replay(plan.lcg_seed(), plan.lcg_mask(), pages, s.pages_written);
        assert!(
            (r.passes.0..=r.passes.1).contains(&s.passes),
            "vCPU {}: {} passes after {} pages, replay says {:?}",
            plan.id,
            s.passes,
            s.pages_written,
            r.passes
        );
        assert!(
            s.pages_written >= pages,
            "vCPU {}: a pass but only {} of {pages} pages written",
            plan.id,
            s.pages_written
        );
        assert_eq!(s.pages_read, 0);
        // After at least one full period every page was visited at least once.
        assert!(r.counts.iter().all(|&c| c >= 1), "vCPU {}", plan.id);
        expected.push(r.counts.iter().map(|&c| c as u8).collect());
        in_flight.push(Some(r.next_page));
    }
    // Every page holds its visit count mod 256 (so, below 256 passes, none is zero), and
    // nothing outside the pages' first bytes was touched.
    check_ram(&machine, &expected, &in_flight);
}

#[test]
fn sequential_writer_writes_each_page_once_per_pass() {
    if !common::kvm_available("sequential_writer_writes_each_page_once_per_pass") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // The 257-page writer laps often enough that its bytes wrap past 255.
    let machine = boot(2, 8 << 20, &["write:4M", "write:1028K"]);
    wait_for(&machine, Duration::from_secs(30), "passes", |s| {
        s[0].passes >= 2 && s[1].passes >= 300
    });
    // After shutdown no guest code runs, and counters and memory stay readable: from here
    // on they are final and can be compared exactly.
    machine.shutdown().expect("shutdown");
    let stats = machine.guest_stats();
    eprintln!("sequential writers stopped at {stats:?}");

    let plans = machine.layout().vcpus().to_vec();
    let mut expected = Vec::new();
    let mut in_flight = Vec::new();
    for (plan, s) in plans.iter().zip(&stats) {
        let pages = plan.workload.pages();
        let n = s.pages_written;
        // The pass counter is bumped just after the last page's counter.
        let passes_ok = s.passes == n / pages || (n % pages == 0 && s.passes + 1 == n / pages);
        assert!(
            passes_ok,
            "vCPU {}: {} passes after {n} pages of {pages}",
            plan.id, s.passes
        );
        assert_eq!(s.pages_read, 0);
        expected.push(
            (0..pages)
                .map(|p| (n / pages + u64::from(p < n % pages)) as u8)
                .collect(),
        );
        in_flight.push(Some(n % pages));
    }
    check_ram(&machine, &expected, &in_flight);
}

#[test]
fn shutdown_joins_every_vcpu_thread() {
    if !common::kvm_available("shutdown_joins_every_vcpu_thread") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // A busy vCPU and a halted (parked) one: both must be woken and joined.
    let machine = boot(2, 8 << 20, &["write:4M"]);
    wait_for(&machine, Duration::from_secs(10), "writer running", |s| {
        s[0].pages_written > 0
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while machine.vcpus()[1].exits.hlt.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "idle vCPU never halted");
        sleep(Duration::from_millis(5));
    }
    let mut names: Vec<String> = live_vcpu_threads().into_iter().map(|(_, n)| n).collect();
    names.sort();
    assert_eq!(names, ["vcpu0", "vcpu1"], "one named thread per vCPU");

    machine.shutdown().expect("shutdown");
    // shutdown has joined the threads; the kernel may still be finishing their exit (between
    // the join's wake-up and the task's release), so give it a moment, no more.
    wait_for_no_vcpu_threads(Duration::from_secs(1), "after shutdown");
}

#[test]
fn idle_vcpus_halt_and_do_nothing() {
    if !common::kvm_available("idle_vcpus_halt_and_do_nothing") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let machine = boot(2, 4 << 20, &[]);
    let hlt = |i: usize| machine.vcpus()[i].exits.hlt.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hlt(0) == 0 || hlt(1) == 0 {
        assert!(
            Instant::now() < deadline,
            "idle vCPUs did not halt: hlt exits {} and {}",
            hlt(0),
            hlt(1)
        );
        sleep(Duration::from_millis(5));
    }
    sleep(Duration::from_millis(300));
    let stats = machine.guest_stats();
    let exits = (hlt(0), hlt(1));
    let untouched = machine
        .ram()
        .bytes()
        .iter()
        .all(|b| b.load(Ordering::Relaxed) == 0);
    machine.shutdown().expect("shutdown");

    assert_eq!(stats, vec![GuestStats::default(); 2], "idle vCPUs did work");
    assert!(untouched, "idle vCPUs wrote guest RAM");
    // A halted vCPU sleeps until kicked; it must not spin on hlt exits.
    assert!(
        exits.0 < 100 && exits.1 < 100,
        "idle vCPUs keep exiting: {exits:?} hlt exits in 300 ms"
    );
}

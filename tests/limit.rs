//! The dirty limit and the auto-converge throttle on real KVM, judged by the guests' own
//! counters within bounds set from the noise measured (each test says how); the finer
//! numbers are the benchmarks'.

mod common;

use std::sync::MutexGuard;
use std::thread::sleep;
use std::time::{Duration, Instant};

use dirtyvm::limit::{LimitAlgo, LimitError};
use dirtyvm::tracking::DirtyLog;
use dirtyvm::vm::guest::Workload;
use dirtyvm::vmm::{Machine, VmConfig};

/// Boots two vCPUs and waits until every writer has touched its whole working set once
/// (the first pass pays for the host's page faults and is much slower).
fn boot(log: DirtyLog, workloads: &[&str]) -> (Machine, MutexGuard<'static, ()>) {
    let turn = common::one_vm_at_a_time();
    let workloads: Vec<Workload> = workloads.iter().map(|w| w.parse().unwrap()).collect();
    let machine =
        Machine::boot(&VmConfig::new(2, 128 << 20, workloads).with_dirty_log(log)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while machine
        .guest_stats()
        .iter()
        .zip(machine.layout().vcpus())
        .any(|(s, plan)| plan.workload.writes() && s.passes == 0)
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(20));
    }
    (machine, turn)
}

/// Ground-truth MiB/s written and read by each vCPU over `window`.
fn rates(machine: &Machine, window: Duration) -> Vec<(f64, f64)> {
    let before = machine.guest_stats();
    let start = Instant::now();
    sleep(window);
    let after = machine.guest_stats();
    let secs = start.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            (
                (a.pages_written - b.pages_written) as f64 / 256.0 / secs,
                (a.pages_read - b.pages_read) as f64 / 256.0 / secs,
            )
        })
        .collect()
}

fn limit_holds_the_writer_and_spares_the_reader(algo: LimitAlgo) {
    let (machine, _turn) = boot(DirtyLog::Ring, &["write:64M", "read:64M"]);
    let free = rates(&machine, Duration::from_millis(700))[0].0;
    assert!(
        free > 100.0,
        "the unlimited writer is too slow to test a limit: {free:.1} MiB/s"
    );
    let limit = (free / 8.0).max(16.0);
    machine
        .limiter()
        .set_limit(None, limit, Some(algo))
        .unwrap();
    let infos = machine.limiter().limits();
    assert_eq!(infos.len(), 2, "both vCPUs are limited");
    assert!(infos
        .iter()
        .all(|i| i.limit_mibps == limit && i.algo == algo));
    sleep(Duration::from_secs(if algo == LimitAlgo::Quota {
        1
    } else {
        4
    }));
    let limited = rates(&machine, Duration::from_secs(2))[0].0;
    let reader_penalty = machine.limiter().penalty(1).ms_total;
    let writer_penalty = machine.limiter().penalty(0).ms_total;
    machine.limiter().cancel(None).unwrap();
    assert!(machine.limiter().limits().is_empty());
    sleep(Duration::from_millis(300));
    let restored = rates(&machine, Duration::from_millis(700))[0].0;
    machine.shutdown().unwrap();

    assert!(
        writer_penalty > 0.0,
        "{algo}: the writer was never put to sleep"
    );
    assert_eq!(reader_penalty, 0.0, "{algo}: the reader was penalized");
    assert!(
        restored > free / 2.0,
        "{algo}: cancel did not restore the writer: {restored:.1} vs free {free:.1}"
    );
    // The reference algorithm oscillates (that is the benchmark's finding), so only the
    // quota controller is held to a rate in a 2 s window: within 10 % of the limit (measured
    // here: within 3 %, also beside a process spinning on the other core), and so neither
    // frozen nor let through at twice the limit.
    if algo == LimitAlgo::Quota {
        assert!(
            (limited - limit).abs() <= 0.10 * limit,
            "{algo}: the writer ran at {limited:.1} MiB/s under a limit of {limit:.1} \
             (free {free:.1} MiB/s)"
        );
    }
    assert!(machine
        .limiter()
        .report()
        .series
        .iter()
        .any(|p| p.vcpu == 0));
}

#[test]
fn quota_limit_holds_the_writer_and_spares_the_reader() {
    if common::kvm_available("quota_limit_holds_the_writer_and_spares_the_reader") {
        limit_holds_the_writer_and_spares_the_reader(LimitAlgo::Quota);
    }
}

#[test]
fn reference_limit_holds_the_writer_and_spares_the_reader() {
    if common::kvm_available("reference_limit_holds_the_writer_and_spares_the_reader") {
        limit_holds_the_writer_and_spares_the_reader(LimitAlgo::Reference);
    }
}

#[test]
fn auto_converge_slows_every_vcpu_alike() {
    if !common::kvm_available("auto_converge_slows_every_vcpu_alike") {
        return;
    }
    let (machine, _turn) = boot(DirtyLog::Ring, &["write:64M", "read:64M"]);
    machine.limiter().set_auto_converge(1.0).unwrap();
    // Conflicts both ways.
    assert_eq!(
        machine.limiter().set_limit(None, 10.0, None),
        Err(LimitError::Conflict)
    );
    sleep(Duration::from_millis(3500));
    let throttle = machine.limiter().throttle().expect("throttle on");
    let (writer, reader) = (machine.limiter().penalty(0), machine.limiter().penalty(1));
    machine.limiter().set_throttle_percent(0).unwrap();
    assert!(machine.limiter().throttle().is_none());
    machine.shutdown().unwrap();
    assert!(
        throttle.percent >= 30,
        "percentage never rose: {}",
        throttle.percent
    );
    // The reader sleeps as much as the writer: that is what the dirty limit avoids.
    assert!(
        reader.ms_total > 0.0,
        "auto-converge did not slow the reader"
    );
    assert!(
        reader.ms_total > writer.ms_total / 3.0,
        "reader slept {:.0} ms, writer {:.0} ms",
        reader.ms_total,
        writer.ms_total
    );
}

/// A fixed throttle of P % puts every vCPU to sleep P % of the time (10 ms running, then
/// `10 × P / (100 − P)` ms asleep), and a writer then dirties at about (1 − P) of its free rate.
/// Measured here at 50 %: slept 49.4-50.1 % (47.0-48.3 % beside a process spinning on the
/// other core, which takes CPU time the vCPU threads would sleep in); the writer at 34-54 % of
/// its free rate (57-76 % beside the spinner: a vCPU that sleeps half the time competes less
/// for the cores, so it runs faster while it runs), the free rate itself moving 470-620 MiB/s
/// from run to run on this shared host. A throttle at half strength sleeps 33 %; one whose
/// sleeps are counted but not served leaves the writer at its free rate.
#[test]
fn a_fixed_throttle_takes_its_share_of_every_vcpu() {
    if !common::kvm_available("a_fixed_throttle_takes_its_share_of_every_vcpu") {
        return;
    }
    let (machine, _turn) = boot(DirtyLog::Ring, &["write:64M", "read:64M"]);
    let free = rates(&machine, Duration::from_secs(2));
    machine.limiter().set_throttle_percent(50).unwrap();
    sleep(Duration::from_millis(300));
    let slept_before: Vec<f64> = (0..2)
        .map(|id| machine.limiter().penalty(id).ms_total)
        .collect();
    let start = Instant::now();
    let throttled = rates(&machine, Duration::from_secs(2));
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let slept: Vec<f64> = (0..2)
        .map(|id| machine.limiter().penalty(id).ms_total - slept_before[id as usize])
        .collect();
    machine.shutdown().unwrap();
    for (id, ms) in slept.iter().enumerate() {
        let share = ms / elapsed_ms;
        assert!(
            (0.44..=0.56).contains(&share),
            "vCPU {id} slept {:.1} % of the time under a 50 % throttle",
            share * 100.0
        );
    }
    let writer = throttled[0].0 / free[0].0;
    assert!(
        (0.30..=0.80).contains(&writer),
        "the writer ran at {:.1} % of its free rate under a 50 % throttle",
        writer * 100.0
    );
}

#[test]
fn limits_are_refused_with_reasons() {
    if !common::kvm_available("limits_are_refused_with_reasons") {
        return;
    }
    let (bitmap, turn) = boot(DirtyLog::Bitmap, &["idle"]);
    let e = bitmap.limiter().set_limit(Some(0), 10.0, None).unwrap_err();
    assert_eq!(e, LimitError::NeedsRing);
    assert!(e.to_string().contains("dirty-ring-size"));
    bitmap.shutdown().unwrap();
    drop(turn);

    let (ring, _turn) = boot(DirtyLog::Ring, &["idle"]);
    let limiter = ring.limiter();
    assert_eq!(
        limiter.set_limit(Some(2), 10.0, None),
        Err(LimitError::BadVcpu(2))
    );
    assert_eq!(limiter.cancel(Some(7)), Err(LimitError::BadVcpu(7)));
    assert!(matches!(
        limiter.set_limit(None, 0.0, None),
        Err(LimitError::BadRate(_))
    ));
    assert!(matches!(
        limiter.set_limit(None, f64::NAN, None),
        Err(LimitError::BadRate(_))
    ));
    assert_eq!(
        limiter.set_throttle_percent(100),
        Err(LimitError::BadPercent(100))
    );
    limiter.set_limit(Some(1), 10.0, None).unwrap();
    assert_eq!(limiter.set_auto_converge(5.0), Err(LimitError::Conflict));
    ring.shutdown().unwrap();
}

/// The lowest limits hold a full-speed writer without ever freezing it: the quota
/// controller keeps it at 1 MiB/s in every second, and the reference algorithm, which
/// oscillates at such a limit, never keeps it asleep for a whole second twice in a row (a
/// throttle of 99 × T, 42 s with these rings, once did, on a throttle it no longer had).
#[test]
fn the_lowest_limits_never_freeze_the_writer() {
    if !common::kvm_available("the_lowest_limits_never_freeze_the_writer") {
        return;
    }
    let (machine, _turn) = boot(DirtyLog::Ring, &["write:64M", "read:64M"]);
    let seconds = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| rates(&machine, Duration::from_secs(1))[0].0)
            .collect()
    };

    machine
        .limiter()
        .set_limit(None, 1.0, Some(LimitAlgo::Quota))
        .unwrap();
    let quota = seconds(8);
    machine.limiter().cancel(None).unwrap();

    machine
        .limiter()
        .set_limit(None, 2.0, Some(LimitAlgo::Reference))
        .unwrap();
    let reference = seconds(6);
    machine.shutdown().unwrap();

    // The first second pays for the burst before the controller knew the writer's rate.
    // After it, a second can be off by a burst (what the writer dirties in a kick's latency,
    // paid back with a longer sleep: 0.3 MiB idle here, 0.7 MiB while the other core
    // compiles, so a second reads 0.3 to 1.7): over six seconds the writer is at its limit,
    // and it never stands still for two.
    let held: f64 = quota[2..].iter().sum::<f64>() / 6.0;
    assert!(
        (0.8..=1.2).contains(&held),
        "quota, 1 MiB/s: {held:.2} MiB/s over seconds 2-7 ({quota:.2?})"
    );
    assert!(
        quota[1..].windows(2).all(|w| w[0] + w[1] > 0.0),
        "quota, 1 MiB/s: the writer stood still for two seconds in a row ({quota:.2?})"
    );
    assert!(
        reference.windows(2).all(|w| w[0] + w[1] > 0.0),
        "reference, 2 MiB/s: the writer stood still for two seconds in a row ({reference:.1?})"
    );
}

/// A paused vCPU serving a penalty when the machine shuts down: the stop's wakeup can be
/// taken by the penalty's sleep, and the paused vCPU must still see the stop (it once parked
/// forever). Several rounds, each with a watchdog: the shutdown must end.
#[test]
fn a_paused_vcpu_serving_a_penalty_still_stops() {
    if !common::kvm_available("a_paused_vcpu_serving_a_penalty_still_stops") {
        return;
    }
    let _turn = common::one_vm_at_a_time();
    for round in 0..10 {
        let workloads = vec!["write:8M".parse().unwrap(), "write:8M".parse().unwrap()];
        let machine = std::sync::Arc::new(
            Machine::boot(&VmConfig::new(2, 32 << 20, workloads).with_dirty_log(DirtyLog::Ring))
                .unwrap(),
        );
        // At 1 MiB/s the writers spend nearly all their time asleep under a penalty.
        machine.limiter().set_limit(None, 1.0, None).unwrap();
        sleep(Duration::from_millis(100));
        assert!(machine.pause());
        let stopping = machine.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(stopping.shutdown().is_ok());
        });
        let ended = finished.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            ended,
            Ok(true),
            "round {round}: the shutdown hung or failed"
        );
    }
}

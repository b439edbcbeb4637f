//! Live migration on real KVM.
//!
//! In one process, a source machine and a destination built from what it received, so the
//! test can read both guests' memory:
//!
//! - a VM with a sequential writer, a random writer, a reader and an idle vCPU, tracked with
//!   rings and sent over `unix:`, and tracked with the bitmap and sent over `tcp:`: the RAM
//!   digest the destination computes before it runs a single instruction equals the source's
//!   at pause (and the source's own guest memory, hashed again); the destination's counters
//!   start from the source's at pause; after the destination has run on and stopped, the
//!   first byte of every page of guest RAM is what the replayed writer order says (how many
//!   times each writer incremented it), and every other byte is zero;
//! - zero pages cost no 4 KiB payload: the stream's bytes are counted.
//!
//! Between two `dirtyvm run` processes, driven with QMP as a QEMU user would, and the
//! faults that must leave both sides sane: see the tests below `two processes`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use dirtyvm::digest;
use dirtyvm::limit::LimitAlgo;
use dirtyvm::migration::{self, Expect, Migration, MigrationInfo, MigrationStatus, Received};
use dirtyvm::rate::{RateMode, RateRequest, RateStatus};
use dirtyvm::tracking::DirtyLog;
use dirtyvm::vm::guest::{GuestStats, VcpuPlan, Workload};
use dirtyvm::vmm::{Boot, Machine, VmConfig};

/// How long a migration in these tests may take before the test fails.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn workloads(specs: &[&str]) -> Vec<Workload> {
    specs.iter().map(|s| s.parse().unwrap()).collect()
}

/// The four kinds of vCPU, each over 8 MiB of a 64 MiB guest.
fn four_kinds(dirty_log: DirtyLog) -> VmConfig {
    VmConfig::new(
        4,
        64 << 20,
        workloads(&["write:8M", "random-write:8M", "read:8M", "idle"]),
    )
    .with_dirty_log(dirty_log)
}

/// The pages a writer visits in one pass, in order, as RAM page numbers.
fn pass_order(plan: &VcpuPlan) -> Vec<u64> {
    let pages = plan.workload.pages();
    let base = plan.ram_offset / 4096;
    match plan.workload {
        Workload::Write { .. } => (0..pages).map(|p| base + p).collect(),
        Workload::RandomWrite { .. } => {
            // The guest's full-period LCG from the seed, skipping values beyond the set.
            let (mask, mut x) = (plan.lcg_mask(), plan.lcg_seed());
            let mut order = Vec::with_capacity(pages as usize);
            while order.len() < pages as usize {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345) & mask;
                if x < pages {
                    order.push(base + x);
                }
            }
            order
        }
        Workload::Read { .. } | Workload::Idle => Vec::new(),
    }
}

/// What the first byte of each written page must be after the guests' counted writes
/// (`inc byte` once per visit, so the count mod 256), and for each writer the one page whose
/// write may be done but not yet counted when the vCPU stopped.
fn expected_bytes(layout: &[VcpuPlan], stats: &[GuestStats]) -> (HashMap<u64, u8>, Vec<u64>) {
    let mut bytes = HashMap::new();
    let mut in_flight = Vec::new();
    for (plan, stats) in layout.iter().zip(stats) {
        let order = pass_order(plan);
        if order.is_empty() {
            continue;
        }
        let (passes, partial) = (
            stats.pages_written / order.len() as u64,
            (stats.pages_written % order.len() as u64) as usize,
        );
        for (i, &page) in order.iter().enumerate() {
            let visits = passes + u64::from(i < partial);
            bytes.insert(page, visits as u8);
        }
        in_flight.push(order[partial]);
    }
    (bytes, in_flight)
}

/// Checks every byte of `machine`'s guest RAM against the replayed writers.
fn assert_ram_matches_the_writers(machine: &Machine) {
    let stats = machine.guest_stats();
    let (expected, in_flight) = expected_bytes(machine.layout().vcpus(), &stats);
    let words = machine.ram().words();
    let mut wrong = Vec::new();
    for (page, chunk) in words.chunks(512).enumerate() {
        let page = page as u64;
        let first = chunk[0].load(std::sync::atomic::Ordering::Relaxed);
        let want = u64::from(*expected.get(&page).unwrap_or(&0));
        let ok_first = first == want
            || (in_flight.contains(&page) && first == u64::from((want as u8).wrapping_add(1)));
        let rest_zero = chunk[1..]
            .iter()
            .all(|w| w.load(std::sync::atomic::Ordering::Relaxed) == 0);
        if !ok_first || !rest_zero {
            wrong.push((page, first, want));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} pages differ from the replayed writers (page, found, expected), first: {:?}; \
         counters {stats:?}",
        wrong.len(),
        &wrong[..wrong.len().min(8)]
    );
}

/// Waits until `migration` has left the running states; fails after the timeout.
fn wait_done(migration: &Migration) -> MigrationInfo {
    let info = migration.wait(MIGRATION_TIMEOUT);
    assert!(
        !info.status.running(),
        "the migration did not end within {MIGRATION_TIMEOUT:?}: {info:?}"
    );
    info
}

/// A migration done in this process, and what the test saw on the way.
struct Moved {
    /// The source's view when it ended.
    info: MigrationInfo,
    /// The destination's view.
    incoming: MigrationInfo,
    /// The destination machine, running.
    dest: Machine,
    /// The source's counters at pause.
    at_pause: Vec<GuestStats>,
    /// The destination's RAM digest before it ran.
    arrived: u64,
}

/// Migrates `source` to a destination in this process listening on `uri` (for `tcp:` the
/// port is the one the destination got); checks on the way that the destination's counters
/// and RAM are the source's at pause before it runs.
fn migrate_in_process(source: &Arc<Machine>, uri: &str) -> Moved {
    let outgoing = Migration::new();
    let incoming = Migration::new();
    incoming.listen(uri.parse().unwrap()).unwrap();
    // The address the destination really listens on (its port, for tcp:...:0).
    let address = incoming.info().listening.expect("listening");
    let (dest, at_pause, arrived) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| migration::receive(&incoming, &Expect::default(), || false));
        outgoing
            .migrate(source.clone(), &address.to_string())
            .unwrap();
        let Received {
            config,
            restore,
            answer,
        } = receiver
            .join()
            .unwrap()
            .expect("the destination received the stream")
            .expect("it was not told to give up");
        // The source is paused now (it waits for the answer): its counters are the ones at
        // pause, and the destination's start from them.
        let at_pause = source.guest_stats();
        assert_eq!(restore.stats, at_pause);
        let vm = VmConfig {
            vcpus: config.vcpus(),
            memory: config.memory,
            workloads: config.workloads.clone(),
            ..VmConfig::new(0, 0, Vec::new()).with_dirty_log(DirtyLog::Ring)
        };
        let boot = Boot {
            restore: Some(restore),
            paused: true,
            ..Boot::default()
        };
        let dest = Machine::boot_with(&vm, boot).unwrap();
        assert_eq!(dest.guest_stats(), at_pause);
        let arrived = digest::ram_digest(dest.ram().words(), 2);
        assert_eq!(incoming.info().memory_digest, Some(arrived));
        dest.resume();
        answer.accept().unwrap();
        incoming.incoming_completed(true);
        (dest, at_pause, arrived)
    });
    let info = wait_done(&outgoing);
    assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
    Moved {
        info,
        incoming: incoming.info(),
        dest,
        at_pause,
        arrived,
    }
}

/// Boots `source`, lets it run, migrates it over `uri`, and checks everything the module
/// docs promise.
fn migrate_and_check(source: VmConfig, uri: &str) {
    let _vm = common::one_vm_at_a_time();
    let source_machine = Arc::new(Machine::boot(&source).unwrap());
    sleep(Duration::from_millis(300));
    // Migration, a dirty-rate measurement and the limiter share the tracker: all at once.
    let mode = match source.dirty_log {
        DirtyLog::Ring => {
            source_machine
                .limiter()
                .set_limit(Some(1), 64.0, None)
                .unwrap();
            RateMode::DirtyRing
        }
        _ => RateMode::DirtyBitmap,
    };
    source_machine
        .rate_meter()
        .start(RateRequest {
            mode,
            calc_time_ms: 200,
            sample_pages: 512,
        })
        .unwrap();
    let Moved {
        info,
        dest,
        at_pause,
        arrived,
        ..
    } = migrate_in_process(&source_machine, uri);
    assert_eq!(info.memory_digest, Some(arrived), "digests differ");
    // The source stays paused with the memory it hashed.
    assert!(!source_machine.running());
    assert_eq!(
        digest::ram_digest(source_machine.ram().words(), 2),
        arrived,
        "the source's RAM at pause is not what arrived"
    );
    assert!(info.downtime_ms.is_some());
    let measured = source_machine.rate_meter().wait(Duration::from_secs(10));
    assert_eq!(measured.status, RateStatus::Measured, "{measured:?}");
    assert!(measured.last.unwrap().rate_mibps > 0.0);
    // The first pass takes all of RAM (QEMU's may end before it sent it all, when what is
    // left fits the threshold; the rest goes with the next pass): every page went once.
    let pages = source.memory / 4096;
    assert_eq!(info.iterations[0].dirty_pages_found, pages);
    let sent: u64 = info.iterations.iter().map(|i| i.pages_sent).sum();
    assert!(sent >= pages, "{sent} pages sent of {pages}");
    assert_eq!(info.ram.normal + info.ram.duplicate, sent);
    // The destination carries on from where the source stopped, and every page it holds
    // after running on is what its writers' counts say.
    sleep(Duration::from_millis(300));
    dest.shutdown().unwrap();
    let after = dest.guest_stats();
    for (id, (now, then)) in after.iter().zip(&at_pause).enumerate() {
        if source.workloads[id] != Workload::Idle {
            assert!(
                now.pages_written + now.pages_read > then.pages_written + then.pages_read,
                "vCPU {id} did not carry on: {then:?} then, {now:?} now"
            );
        }
    }
    assert_ram_matches_the_writers(&dest);
    source_machine.shutdown().unwrap();
    assert_ram_matches_the_writers(&source_machine);
}

#[test]
fn ring_tracked_vm_moves_over_unix_byte_for_byte() {
    if !common::kvm_available("ring_tracked_vm_moves_over_unix_byte_for_byte") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dirtyvm-mig-ring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uri = format!("unix:{}", dir.join("m.sock").display());
    migrate_and_check(four_kinds(DirtyLog::Ring), &uri);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bitmap_tracked_vm_moves_over_tcp_byte_for_byte() {
    if common::kvm_available("bitmap_tracked_vm_moves_over_tcp_byte_for_byte") {
        migrate_and_check(four_kinds(DirtyLog::Bitmap), "tcp:127.0.0.1:0");
    }
}

#[test]
fn ring_tracked_vm_moves_over_tcp_byte_for_byte() {
    if common::kvm_available("ring_tracked_vm_moves_over_tcp_byte_for_byte") {
        migrate_and_check(four_kinds(DirtyLog::Ring), "tcp:127.0.0.1:0");
    }
}

/// A guest of 32 MiB of which a slow writer has touched a few pages: the zero pages go as a
/// 9-byte record each (tag and page number), never with their 4 KiB; the stream is the pages
/// with data, 9 bytes per zero page, and a small rest (header, pass markers, device state,
/// digest), counted on both sides.
#[test]
fn zero_pages_cost_no_payload() {
    if !common::kvm_available("zero_pages_cost_no_payload") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let config =
        VmConfig::new(1, 32 << 20, workloads(&["write:4M@1"])).with_dirty_log(DirtyLog::Ring);
    let source = Arc::new(Machine::boot(&config).unwrap());
    sleep(Duration::from_millis(200));
    let moved = migrate_in_process(&source, "tcp:127.0.0.1:0");
    let ram = &moved.info.ram;
    let pages = config.memory / 4096;
    let written = moved.at_pause[0].pages_written;
    assert!(written > 0 && written < 1024, "{written} pages written");
    assert!(
        ram.normal >= written && ram.normal <= written + 2 * moved.info.iterations.len() as u64,
        "{} pages sent whole for {written} written",
        ram.normal
    );
    assert!(ram.duplicate >= pages - ram.normal, "{ram:?}");
    let rest = ram.transferred - ram.normal * (4096 + 9) - ram.duplicate * 9;
    assert!(
        rest < 2048,
        "{rest} bytes beyond the pages' records: zero pages cost more than their 9 bytes ({ram:?})"
    );
    assert_eq!(moved.incoming.ram.transferred, ram.transferred);
    assert_eq!(moved.incoming.ram.duplicate, ram.duplicate);
    moved.dest.shutdown().unwrap();
    source.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------
// Two processes, driven with QMP.

use common::qmp::{Exited, Qmp, TempDir, Vm};
use serde_json::{json, Value};

/// The source's VM: a writer and a reader over 16 MiB each in 64 MiB.
const SOURCE: [&str; 9] = [
    "run",
    "--vcpus",
    "2",
    "--memory",
    "64M",
    "--workload",
    "write:16M",
    "--workload",
    "read:16M",
];

/// How long a process may take to exit once it should.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// A `dirtyvm run` with QMP and a report in its own directory.
fn start(test: &str, args: &[&str]) -> Vm {
    let dir = TempDir::new(test);
    let report = dir.0.join("report.json");
    let args = [args, &["--report", report.to_str().unwrap()]].concat();
    Vm::start_in(dir, &args)
}

/// A destination listening on a Unix socket in its directory, with `extra` options; and the
/// URI to migrate to.
fn destination(test: &str, extra: &[&str]) -> (Vm, String) {
    let dir = TempDir::new(test);
    let socket = dir.0.join("migration.sock");
    let uri = format!("unix:{}", socket.display());
    let report = dir.0.join("report.json");
    let args = [
        &[
            "run",
            "--incoming",
            &uri,
            "--report",
            report.to_str().unwrap(),
        ][..],
        extra,
    ]
    .concat();
    let vm = Vm::start_in(dir, &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::qmp::is_socket(&socket) {
        assert!(Instant::now() < deadline, "the destination never listened");
        sleep(Duration::from_millis(10));
    }
    (vm, uri)
}

fn report(vm: &Vm) -> Value {
    let text = std::fs::read_to_string(vm.dir.0.join("report.json")).expect("the report");
    serde_json::from_str(&text).expect("the report is JSON")
}

/// Polls `query-migrate` until its status is one of `statuses`; fails after `timeout`.
#[track_caller]
fn wait_status(qmp: &mut Qmp, statuses: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.ok("query-migrate", Value::Null);
        if statuses.iter().any(|s| info["status"] == *s) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "query-migrate did not reach {statuses:?} within {timeout:?}: {info}"
        );
        sleep(Duration::from_millis(20));
    }
}

/// Each vCPU's pages written and read, from the guests' own counters.
fn counters(qmp: &mut Qmp) -> Vec<(u64, u64)> {
    qmp.ok("x-query-vcpu-counters", Value::Null)
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            (
                v["pages-written"].as_u64().unwrap(),
                v["pages-read"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The guest runs: its counters advance.
#[track_caller]
fn assert_guest_runs(qmp: &mut Qmp) {
    assert_eq!(
        qmp.ok("query-status", Value::Null)["status"],
        "running",
        "the guest is not running"
    );
    let before = counters(qmp);
    sleep(Duration::from_millis(200));
    let after = counters(qmp);
    assert!(
        after[0].0 > before[0].0 && after[1].1 > before[1].1,
        "the guest's counters stand still: {before:?} then {after:?}"
    );
}

fn set_bandwidth(qmp: &mut Qmp, bytes_per_second: u64) {
    qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bytes_per_second }),
    );
}

/// A bandwidth that keeps a migration of [`SOURCE`] in precopy for seconds: 4 MiB/s, below
/// the writer's rate, so it never converges.
const SLOW: u64 = 4 << 20;
/// A bandwidth no loopback reaches.
const UNLIMITED: u64 = 1 << 40;

/// A source and a destination, and a migration between them held in precopy by [`SLOW`]:
/// active for a while already.
fn slow_migration(test: &str) -> (Vm, Qmp, Vm) {
    let source = start(&format!("{test}-source"), &SOURCE);
    let mut sq = source.client();
    let (dest, uri) = destination(&format!("{test}-dest"), &[]);
    sq.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    set_bandwidth(&mut sq, SLOW);
    sq.ok("migrate", json!({ "uri": uri }));
    wait_status(&mut sq, &["active"], Duration::from_secs(10));
    sleep(Duration::from_millis(300));
    (source, sq, dest)
}

#[track_caller]
fn assert_quits(vm: &mut Vm, qmp: &mut Qmp) -> Exited {
    qmp.ok("quit", Value::Null);
    let exited = vm.exit(EXIT_TIMEOUT);
    assert!(exited.status.success(), "{}", exited.describe());
    assert_no_panic(&exited);
    exited
}

#[track_caller]
fn assert_no_panic(exited: &Exited) {
    assert!(
        !exited.stderr.contains("panicked"),
        "a thread panicked:\n{}",
        exited.describe()
    );
}

/// Asserts `events` holds these events, in this order (others may come between).
#[track_caller]
fn assert_events_in_order(events: &[Value], expected: &[Value]) {
    let mut rest = events.iter();
    for want in expected {
        assert!(
            rest.any(|e| e["event"] == want["event"]
                && want.get("data").is_none_or(|d| e.get("data") == Some(d))),
            "event {want} missing or out of order in {events:?}"
        );
    }
}

#[test]
fn two_processes_migrate_with_qmp_as_qemu_users_do() {
    if !common::kvm_available("two_processes_migrate_with_qmp_as_qemu_users_do") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut dest, uri) = destination("qmp-dest", &[]);
    let mut dq = dest.client();
    // The destination before its guest.
    assert_eq!(
        dq.ok("query-status", Value::Null),
        json!({"status": "inmigrate", "singlestep": false, "running": false})
    );
    let path = uri.strip_prefix("unix:").unwrap();
    assert_eq!(
        dq.ok("query-migrate", Value::Null),
        json!({"status": "setup", "socket-address": [{"type": "unix", "path": path}]})
    );
    dq.generic(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:1"}),
        "The incoming migration has already been started",
    );
    dq.generic(
        "migrate",
        json!({"uri": "tcp:127.0.0.1:1"}),
        "Guest is waiting for an incoming migration",
    );
    assert_eq!(dq.ok("query-cpus-fast", Value::Null), json!([]));

    let mut source = start("qmp-source", &SOURCE);
    let mut sq = source.client();
    assert_eq!(sq.ok("query-migrate", Value::Null), json!({}));
    assert_eq!(sq.ok("migrate_cancel", Value::Null), json!({}));
    let params = sq.ok("query-migrate-parameters", Value::Null);
    assert_eq!(params["max-bandwidth"], 134_217_728);
    assert_eq!(params["downtime-limit"], 300);
    let caps = sq.ok("query-migrate-capabilities", Value::Null);
    assert_eq!(caps.as_array().unwrap().len(), 23);
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "events", "state": false})));
    sq.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    sq.generic(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:1"}),
        "'-incoming' was not specified on the command line",
    );
    set_bandwidth(&mut sq, SLOW);
    sq.ok("migrate", json!({ "uri": uri }));
    let active = wait_status(&mut sq, &["active"], Duration::from_secs(10));
    let members: Vec<&str> = active
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        members,
        [
            "expected-downtime",
            "ram",
            "setup-time",
            "status",
            "total-time"
        ],
        "{active}"
    );
    assert_eq!(active["ram"].as_object().unwrap().len(), 18, "{active}");
    assert_eq!(active["ram"]["total"], 64 << 20);
    assert_eq!(active["ram"]["page-size"], 4096);
    sq.generic(
        "migrate",
        json!({ "uri": uri }),
        "There's a migration process in progress",
    );
    sq.generic(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": false}]}),
        "There's a migration process in progress",
    );
    assert_eq!(
        dq.ok("query-migrate", Value::Null)["status"],
        "active",
        "the destination receives"
    );
    // Parameters change during a migration, and take effect.
    set_bandwidth(&mut sq, UNLIMITED);
    let done = wait_status(&mut sq, &["completed", "failed"], Duration::from_secs(30));
    assert_eq!(done["status"], "completed", "{done}");
    let members: Vec<&str> = done
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        members,
        ["downtime", "ram", "setup-time", "status", "total-time"],
        "{done}"
    );
    assert_eq!(done["ram"]["remaining"], 0);
    assert_eq!(
        sq.ok("query-status", Value::Null),
        json!({"status": "postmigrate", "singlestep": false, "running": false})
    );
    sq.generic(
        "migrate",
        json!({ "uri": uri }),
        "Can't migrate the vm that was paused due to previous migration",
    );
    // Events arrive by themselves: read what came with the last replies and a little more.
    sq.ok("query-status", Value::Null);
    assert_events_in_order(
        &sq.events,
        &[
            json!({"event": "MIGRATION", "data": {"status": "setup"}}),
            json!({"event": "MIGRATION_PASS", "data": {"pass": 1}}),
            json!({"event": "MIGRATION", "data": {"status": "active"}}),
            json!({"event": "STOP"}),
            json!({"event": "MIGRATION", "data": {"status": "completed"}}),
        ],
    );
    let frozen = counters(&mut sq);
    sleep(Duration::from_millis(100));
    assert_eq!(counters(&mut sq), frozen, "the source's guest still runs");

    // The guest runs on at the destination, from where it was.
    assert_eq!(
        dq.ok("query-migrate", Value::Null),
        json!({"status": "completed"})
    );
    assert_guest_runs(&mut dq);
    let moved_on = counters(&mut dq);
    assert!(moved_on[0].0 > frozen[0].0 && moved_on[1].1 > frozen[1].1);

    assert_quits(&mut source, &mut sq);
    assert_quits(&mut dest, &mut dq);
    let (from, to) = (report(&source), report(&dest));
    assert_eq!(from["migration"]["role"], "source");
    assert_eq!(to["migration"]["role"], "destination");
    for side in [&from, &to] {
        assert_eq!(side["migration"]["status"], "completed", "{side}");
        assert!(side["migration"]["memory_digest"].is_string());
    }
    assert_eq!(
        from["migration"]["memory_digest"],
        to["migration"]["memory_digest"]
    );
    assert_eq!(
        from["migration"]["bytes_transferred"],
        to["migration"]["bytes_transferred"]
    );
    assert!(from["migration"]["downtime_ms"].as_u64().unwrap() < 1000);
    assert_eq!(
        from["vcpus"][0]["pages_written"].as_u64().unwrap(),
        frozen[0].0
    );
    assert!(to["vcpus"][0]["pages_written"].as_u64().unwrap() > frozen[0].0);
}

#[test]
fn a_deferred_destination_waits_for_migrate_incoming() {
    if !common::kvm_available("a_deferred_destination_waits_for_migrate_incoming") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let mut dest = start("defer-dest", &["run", "--incoming", "defer"]);
    let mut dq = dest.client();
    assert_eq!(dq.ok("query-migrate", Value::Null), json!({}));
    assert_eq!(dq.ok("query-status", Value::Null)["status"], "inmigrate");
    // `stop` while waiting: the guest will arrive paused (QEMU's autostart).
    dq.ok("stop", Value::Null);
    assert_eq!(dq.ok("query-status", Value::Null)["status"], "inmigrate");
    dq.generic(
        "migrate-incoming",
        json!({"uri": "foo:bar"}),
        "unknown migration protocol: foo:bar",
    );
    dq.generic(
        "migrate-incoming",
        Value::Null,
        "neither 'uri' or 'channels' argument are specified in 'migrate-incoming' qmp command ",
    );
    dq.generic(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:0", "channels": []}),
        "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should \
         be present in 'migrate-incoming' qmp command ",
    );
    dq.generic(
        "migrate-incoming",
        json!({"uri": 5}),
        "Invalid parameter type for 'uri', expected: string",
    );
    // A failed attempt can be retried; the port the system chose is in query-migrate.
    dq.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let listening = dq.ok("query-migrate", Value::Null);
    assert_eq!(listening["status"], "setup", "{listening}");
    let address = &listening["socket-address"][0];
    assert_eq!(address["type"], "inet");
    assert_eq!(address["host"], "127.0.0.1");
    let port = address["port"].as_str().unwrap();
    assert_ne!(port, "0");
    dq.generic(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:0"}),
        "The incoming migration has already been started",
    );

    let mut source = start("defer-source", &SOURCE);
    let mut sq = source.client();
    sq.ok("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
    let done = wait_status(&mut sq, &["completed", "failed"], Duration::from_secs(30));
    assert_eq!(done["status"], "completed", "{done}");
    wait_status(&mut dq, &["completed"], Duration::from_secs(10));
    assert_eq!(
        dq.ok("query-status", Value::Null),
        json!({"status": "paused", "singlestep": false, "running": false})
    );
    let paused = counters(&mut dq);
    sleep(Duration::from_millis(100));
    assert_eq!(
        counters(&mut dq),
        paused,
        "the guest runs though told to stop"
    );
    dq.events.clear();
    dq.ok("cont", Value::Null);
    assert!(
        dq.events.iter().any(|e| e["event"] == "RESUME"),
        "{:?}",
        dq.events
    );
    assert_guest_runs(&mut dq);
    assert_quits(&mut source, &mut sq);
    assert_quits(&mut dest, &mut dq);
}

/// A destination killed with SIGKILL in the middle of precopy: the source fails with the
/// socket's error, its guest runs on and loses nothing, and a second migration to a fresh
/// destination completes.
#[test]
fn a_killed_destination_fails_the_migration_and_the_guest_runs_on() {
    if !common::kvm_available("a_killed_destination_fails_the_migration_and_the_guest_runs_on") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut source, mut sq, mut dest) = slow_migration("killed-dest");
    dest.child.0.kill().unwrap();
    let exited = dest.exit(EXIT_TIMEOUT);
    assert!(!exited.status.success());
    let failed = wait_status(&mut sq, &["failed"], Duration::from_secs(10));
    let why = failed["error-desc"].as_str().expect("error-desc");
    assert!(
        why.starts_with("Unable to write to socket: ")
            || why.contains("closed the connection")
            || why.contains("Connection reset"),
        "{failed}"
    );
    assert_eq!(failed.as_object().unwrap().len(), 2, "{failed}");
    assert_guest_runs(&mut sq);

    let (mut dest, uri) = destination("killed-dest-again", &[]);
    set_bandwidth(&mut sq, UNLIMITED);
    sq.ok("migrate", json!({ "uri": uri }));
    let done = wait_status(&mut sq, &["completed", "failed"], Duration::from_secs(30));
    assert_eq!(done["status"], "completed", "{done}");
    let mut dq = dest.client();
    assert_guest_runs(&mut dq);
    assert_quits(&mut source, &mut sq);
    assert_quits(&mut dest, &mut dq);
}

/// A source killed in the middle of the stream: the destination exits non-zero, says why,
/// and never ran the partial guest.
#[test]
fn a_killed_source_fails_the_destination_which_never_runs_the_guest() {
    if !common::kvm_available("a_killed_source_fails_the_destination_which_never_runs_the_guest") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut source, _, mut dest) = slow_migration("killed-source");
    source.child.0.kill().unwrap();
    let exited = dest.exit(EXIT_TIMEOUT);
    assert_eq!(exited.status.code(), Some(1), "{}", exited.describe());
    assert!(
        exited
            .stderr
            .contains("load of migration failed: the stream ends in the middle of"),
        "{}",
        exited.describe()
    );
    assert!(
        !exited.stdout.contains("the guest arrived"),
        "{}",
        exited.describe()
    );
    assert_no_panic(&exited);
    let written = report(&dest);
    assert_eq!(written["migration"]["status"], "failed");
    assert!(written.get("vcpus").is_none(), "a guest ran: {written}");
}

/// Bytes that are not a dirtyvm stream of this version, sent to `--incoming`: refused with
/// what was wrong, exit code 1, no panic.
#[test]
fn garbage_truncated_and_foreign_version_streams_are_refused() {
    if !common::kvm_available("garbage_truncated_and_foreign_version_streams_are_refused") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let mut header = b"DIRTYVM\0".to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    let mut config = header.clone();
    config.extend_from_slice(&(64u64 << 20).to_le_bytes()); // memory
    config.extend_from_slice(&2_000_000u32.to_le_bytes()); // TSC kHz
    config.extend_from_slice(&1u32.to_le_bytes()); // vCPUs
    config.extend_from_slice(&[0; 17]); // idle
    let mut version_2 = b"DIRTYVM\0".to_vec();
    version_2.extend_from_slice(&2u32.to_le_bytes());
    version_2.extend_from_slice(&[0; 16]);
    let mut beyond = config.clone();
    beyond.push(2); // a zero page...
    beyond.extend_from_slice(&(1u64 << 40).to_le_bytes()); // ...far beyond RAM
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and more bytes".to_vec(),
            "not a dirtyvm migration stream: it starts with",
        ),
        (
            "version",
            version_2,
            "the stream is version 2; this dirtyvm reads version 1",
        ),
        (
            "truncated-header",
            header,
            "the stream ends in the middle of the header",
        ),
        (
            "truncated-records",
            config,
            "the stream ends in the middle of a record's tag",
        ),
        (
            "beyond",
            beyond,
            "names page 1099511627776, beyond the guest's 16384 pages",
        ),
    ];
    for (name, bytes, expected) in cases {
        let (mut dest, uri) = destination(&format!("bad-{name}"), &[]);
        let path = uri.strip_prefix("unix:").unwrap();
        let mut peer = std::os::unix::net::UnixStream::connect(path).unwrap();
        let mut hello = [0u8; 12];
        std::io::Read::read_exact(&mut peer, &mut hello).unwrap();
        assert_eq!(&hello[..8], b"DIRTYVMd");
        std::io::Write::write_all(&mut peer, &bytes).unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let exited = dest.exit(EXIT_TIMEOUT);
        assert_eq!(
            exited.status.code(),
            Some(1),
            "{name}: {}",
            exited.describe()
        );
        assert!(
            exited.stderr.contains("load of migration failed: ")
                && exited.stderr.contains(expected),
            "{name}: {}",
            exited.describe()
        );
        assert_no_panic(&exited);
        // The peer was told too.
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut peer, &mut answer);
        assert_eq!(answer.first(), Some(&b'E'), "{name}: {answer:?}");
    }
}

/// `migrate_cancel` during precopy: `cancelled`, and the guest runs on.
#[test]
fn a_cancelled_migration_leaves_the_guest_running() {
    if !common::kvm_available("a_cancelled_migration_leaves_the_guest_running") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut source, mut sq, mut dest) = slow_migration("cancel");
    sq.ok("migrate_cancel", Value::Null);
    let cancelled = wait_status(&mut sq, &["cancelled"], Duration::from_secs(10));
    assert_eq!(cancelled, json!({"status": "cancelled"}));
    assert_events_in_order(
        &sq.events,
        &[
            json!({"event": "MIGRATION", "data": {"status": "active"}}),
            json!({"event": "MIGRATION", "data": {"status": "cancelling"}}),
            json!({"event": "MIGRATION", "data": {"status": "cancelled"}}),
        ],
    );
    assert_guest_runs(&mut sq);
    // The destination lost its source: it fails, as QEMU's does.
    let exited = dest.exit(EXIT_TIMEOUT);
    assert_eq!(exited.status.code(), Some(1), "{}", exited.describe());
    assert_quits(&mut source, &mut sq);
    assert_eq!(report(&source)["migration"]["status"], "cancelled");
}

/// Peers that are not there, refuse, or are not dirtyvm: `failed` with the reason, and
/// nothing else changes.
#[test]
fn unreachable_refusing_and_foreign_peers_fail_the_migration() {
    if !common::kvm_available("unreachable_refusing_and_foreign_peers_fail_the_migration") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let mut source = start("peers-source", &SOURCE);
    let mut sq = source.client();
    sq.generic(
        "migrate",
        json!({"uri": "foo:bar"}),
        "unknown migration protocol: foo:bar",
    );
    assert_eq!(sq.ok("query-migrate", Value::Null), json!({}));
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let foreign_port = foreign.local_addr().unwrap().port();
    let speaker = std::thread::spawn(move || {
        let (mut peer, _) = foreign.accept().unwrap();
        std::io::Write::write_all(&mut peer, b"SSH-2.0-OpenSSH_9.2p1\r\n").unwrap();
        sleep(Duration::from_millis(500));
    });
    let missing = source.dir.0.join("no-such-dir").join("m.sock");
    let cases = [
        (
            format!("tcp:127.0.0.1:{closed}"),
            format!("Failed to connect to '127.0.0.1:{closed}': Connection refused"),
        ),
        (
            format!("unix:{}", missing.display()),
            format!(
                "Failed to connect to '{}': No such file or directory",
                missing.display()
            ),
        ),
        (
            format!("tcp:127.0.0.1:{foreign_port}"),
            "the destination is not a dirtyvm migration destination: it sent \"SSH-2.0-\""
                .to_string(),
        ),
    ];
    for (uri, why) in cases {
        sq.ok("migrate", json!({ "uri": uri }));
        let failed = wait_status(&mut sq, &["failed", "completed"], Duration::from_secs(15));
        assert_eq!(
            failed,
            json!({"status": "failed", "error-desc": why}),
            "migrating to {uri}"
        );
        assert_guest_runs(&mut sq);
    }
    speaker.join().unwrap();
    assert_quits(&mut source, &mut sq);
}

/// A destination told a different shape refuses the stream, naming both values; the source
/// fails with that reason and runs on.
#[test]
fn a_destination_of_another_shape_is_refused_with_both_values() {
    if !common::kvm_available("a_destination_of_another_shape_is_refused_with_both_values") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut dest, uri) = destination("shape-dest", &["--vcpus", "3", "--memory", "32M"]);
    let mut source = start("shape-source", &SOURCE);
    let mut sq = source.client();
    sq.ok("migrate", json!({ "uri": uri }));
    let failed = wait_status(&mut sq, &["failed", "completed"], Duration::from_secs(15));
    let why = "--vcpus 3, but the source's VM has 2 vCPUs; --memory 32M, but the source's VM \
               has 64M";
    assert_eq!(
        failed,
        json!({"status": "failed", "error-desc": format!("the destination refused: {why}")})
    );
    let exited = dest.exit(EXIT_TIMEOUT);
    assert_eq!(exited.status.code(), Some(1), "{}", exited.describe());
    assert!(exited.stderr.contains(why), "{}", exited.describe());
    assert_guest_runs(&mut sq);
    assert_quits(&mut source, &mut sq);
}

/// `examples/migrate.py`, a QMP client written the way one drives QEMU's migration, moves the
/// guest between two dirtyvm processes unchanged (skipped without `python3`).
#[test]
fn the_qemu_style_migration_script_runs_unchanged() {
    if !common::kvm_available("the_qemu_style_migration_script_runs_unchanged") {
        return;
    }
    let python = std::process::Command::new("python3")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !python.is_ok_and(|s| s.success()) {
        eprintln!("skipping the_qemu_style_migration_script_runs_unchanged: no python3");
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let (mut dest, uri) = destination("script-dest", &[]);
    let mut source = start("script-source", &SOURCE);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/migrate.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .arg(&source.socket)
        .arg(&uri)
        .arg("--dest-qmp")
        .arg(&dest.socket)
        .args(["--max-bandwidth", "67108864", "--quit"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning python3");
    let out = common::drain(child.stdout.take().unwrap());
    let err = common::drain(child.stderr.take().unwrap());
    let mut child = common::KillOnDrop(child);
    let session = common::qmp::finish(&mut child, out, err, Duration::from_secs(60), "migrate.py");
    assert_eq!(session.status.code(), Some(0), "{}", session.describe());
    for expected in [
        "\"status\": \"completed\"",
        "MIGRATION events: setup active completed",
        "destination: running",
    ] {
        assert!(
            session.stdout.contains(expected),
            "{expected:?} missing:\n{}",
            session.describe()
        );
    }
    for vm in [&mut source, &mut dest] {
        let exited = vm.exit(EXIT_TIMEOUT);
        assert!(exited.status.success(), "{}", exited.describe());
    }
}

// ---------------------------------------------------------------------------------------
// Convergence aids (in this process: source, and a destination that boots the guest).

use dirtyvm::migration::Parameters;
use dirtyvm::showcase::migration::{converge, Aid, ConvergenceCase, ConvergenceRow};

/// A writer over 32 MiB, unpaced (some 600 MiB/s here), and a reader, in 128 MiB, over a
/// 64 MiB/s link: the writer re-dirties its working set faster than a pass sends it.
fn capped_link(aid: Aid, bound: Duration) -> ConvergenceRow {
    let mut case = ConvergenceCase::qemu_shape(aid, "write:32M");
    case.reader = "read:32M".into();
    case.memory = 128 << 20;
    case.bound = bound;
    // Auto-converge's first step alone is enough (a test cannot wait for 20, 30, ... 99 %).
    case.params = Parameters {
        cpu_throttle_initial: 95,
        ..case.params
    };
    let (row, _) = converge(&case).unwrap();
    eprintln!(
        "{}: converged {} in {:.1} s, writer {:.0} %, reader {:.0} %, penalties {:?} ms",
        row.aid,
        row.converged,
        row.total_s,
        row.writer_share * 100.0,
        row.reader_share * 100.0,
        row.penalty_ms
    );
    row
}

#[test]
fn a_writer_outrunning_the_link_converges_only_with_an_aid() {
    if !common::kvm_available("a_writer_outrunning_the_link_converges_only_with_an_aid") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let none = capped_link(Aid::None, Duration::from_secs(6));
    assert!(!none.converged, "converged without an aid: {none:?}");
    assert_eq!(none.penalty_ms, (0.0, 0.0));
    for aid in [
        Aid::AutoConverge,
        Aid::DirtyLimit(1, LimitAlgo::Quota),
        Aid::AutoLimit,
    ] {
        let row = capped_link(aid, Duration::from_secs(30));
        assert!(row.converged, "{aid} did not converge: {row:?}");
        match aid {
            Aid::AutoConverge => {
                assert_eq!(row.max_throttle, 95, "{row:?}");
                // The throttle slows every vCPU alike: the reader served penalties too.
                assert!(row.penalty_ms.1 > 0.0, "{row:?}");
            }
            _ => {
                // The dirty limit holds the writer only: the reader, limited too by the
                // capability (every vCPU), dirtied nothing and never slept.
                assert!(row.penalty_ms.0 > 0.0, "{row:?}");
                assert_eq!(row.penalty_ms.1, 0.0, "the reader was penalized: {row:?}");
                assert!(row.min_limit_mibps.is_some());
            }
        }
    }
}

/// Polls until `check` accepts `query-migrate`'s reply; fails after `timeout`.
#[track_caller]
fn wait_migrate(qmp: &mut Qmp, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.ok("query-migrate", Value::Null);
        if check(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "query-migrate never got there: {info}"
        );
        sleep(Duration::from_millis(20));
    }
}

/// The capabilities over QMP on a real VM: their conflicts, a dirty-limit migration that
/// holds the limits (a user's set and cancel refused with QEMU's texts, the two `dirty-limit-`
/// members in `query-migrate`), `migrate_cancel` lifting them; auto-converge's percentage in
/// `query-migrate` and the throttle off after the cancel.
#[test]
fn the_capabilities_act_and_answer_as_qemu_8_2() {
    if !common::kvm_available("the_capabilities_act_and_answer_as_qemu_8_2") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let mut source = start("caps-source", &SOURCE);
    let mut sq = source.client();
    let caps = |on: &[(&str, bool)]| json!({"capabilities": on.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect::<Vec<_>>()});
    sq.generic(
        "migrate-set-capabilities",
        caps(&[("auto-converge", true), ("dirty-limit", true)]),
        "dirty-limit conflicts with auto-converge either of then available currently",
    );
    sq.ok("migrate-set-capabilities", caps(&[("dirty-limit", true)]));
    sq.generic(
        "migrate-set-capabilities",
        caps(&[("auto-converge", true)]),
        "dirty-limit conflicts with auto-converge either of then available currently",
    );
    sq.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 16 << 20, "vcpu-dirty-limit": 1}),
    );
    let (mut dest, uri) = destination("caps-dest", &[]);
    sq.ok("migrate", json!({ "uri": uri }));
    // The trigger: every second period (≥ 1 s) whose dirtying outruns half the bytes sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sq.ok("query-vcpu-dirty-limit", Value::Null) == json!([]) {
        assert!(
            Instant::now() < deadline,
            "the migration never limited the vCPUs"
        );
        sleep(Duration::from_millis(20));
    }
    // Hold the migration in precopy while the limits are looked at.
    set_bandwidth(&mut sq, 1 << 20);
    let limits = sq.ok("query-vcpu-dirty-limit", Value::Null);
    assert_eq!(limits.as_array().unwrap().len(), 2, "{limits}");
    assert_eq!(limits[0]["limit-rate"], 1);
    sq.generic(
        "set-vcpu-dirty-limit",
        json!({"dirty-rate": 100}),
        "can't set dirty page rate limit while migration is running",
    );
    sq.generic(
        "cancel-vcpu-dirty-limit",
        Value::Null,
        "can't cancel dirty page rate limit while migration is running",
    );
    let info = wait_migrate(&mut sq, Duration::from_secs(5), |i| {
        i.get("dirty-limit-ring-full-time").is_some()
    });
    assert_eq!(info["status"], "active", "{info}");
    assert!(
        info["dirty-limit-throttle-time-per-round"].is_u64(),
        "{info}"
    );
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    sq.ok("migrate_cancel", Value::Null);
    wait_status(&mut sq, &["cancelled"], Duration::from_secs(10));
    assert_eq!(sq.ok("query-vcpu-dirty-limit", Value::Null), json!([]));
    sq.ok(
        "set-vcpu-dirty-limit",
        json!({"cpu-index": 0, "dirty-rate": 100}),
    );
    sq.ok("cancel-vcpu-dirty-limit", Value::Null);
    assert!(!dest.exit(EXIT_TIMEOUT).status.success());

    // Auto-converge: its percentage in query-migrate, the throttle off after the cancel.
    sq.ok(
        "migrate-set-capabilities",
        caps(&[("dirty-limit", false), ("auto-converge", true)]),
    );
    set_bandwidth(&mut sq, 16 << 20);
    let (mut dest, uri) = destination("caps-dest-again", &[]);
    sq.ok("migrate", json!({ "uri": uri }));
    let info = wait_migrate(&mut sq, Duration::from_secs(20), |i| {
        i.get("cpu-throttle-percentage").is_some()
    });
    assert_eq!(info["cpu-throttle-percentage"], 20, "{info}");
    assert_eq!(sq.ok("x-query-auto-converge", Value::Null)["percent"], 20);
    sq.ok("migrate_cancel", Value::Null);
    wait_status(&mut sq, &["cancelled"], Duration::from_secs(10));
    assert_eq!(sq.ok("x-query-auto-converge", Value::Null)["percent"], 0);
    assert_guest_runs(&mut sq);
    assert!(!dest.exit(EXIT_TIMEOUT).status.success());
    assert_quits(&mut source, &mut sq);
}

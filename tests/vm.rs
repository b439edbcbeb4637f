//! The VMM core on real KVM: guest workloads run, counters advance, memory changes as the
//! workloads say, and shutdown joins every vCPU thread.

mod common;

use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::{Duration, Instant};

use dirtyvm::vm::guest::{GuestStats, Workload};
use dirtyvm::vmm::{Machine, VmConfig};

fn boot(vcpus: u32, memory: u64, workloads: &[&str]) -> Machine {
    let workloads = workloads
        .iter()
        .map(|w| w.parse::<Workload>().unwrap())
        .collect();
    Machine::boot(&VmConfig::new(vcpus, memory, workloads)).expect("boot")
}

/// First byte of every page of a vCPU's working set.
fn first_bytes(machine: &Machine, vcpu: usize) -> Vec<u8> {
    let plan = machine.layout().vcpus()[vcpu];
    let bytes = machine.ram().bytes();
    (0..plan.workload.pages())
        .map(|p| bytes[(plan.ram_offset + p * 4096) as usize].load(Ordering::Relaxed))
        .collect()
}

#[test]
fn writer_dirties_its_region_reader_and_idle_do_not() {
    if !common::kvm_available("writer_dirties_its_region_reader_and_idle_do_not") {
        return;
    }
    let machine = boot(3, 16 << 20, &["write:4M", "read:4M"]);
    // The reader's region holds a pattern it must leave untouched.
    let plan = machine.layout().vcpus()[1];
    for p in 0..plan.workload.pages() {
        machine.ram().bytes()[(plan.ram_offset + p * 4096) as usize].store(0xa5, Ordering::Relaxed);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stats;
    loop {
        stats = machine.guest_stats();
        if stats[0].passes >= 2 && stats[1].passes >= 2 || Instant::now() > deadline {
            break;
        }
        sleep(Duration::from_millis(20));
    }
    let written = first_bytes(&machine, 0);
    let read = first_bytes(&machine, 1);
    let hlt_exits = machine.vcpus()[2].exits.snapshot().hlt;
    machine.shutdown().unwrap();

    assert!(
        stats[0].passes >= 2,
        "writer made too little progress: {:?}",
        stats[0]
    );
    assert!(stats[0].pages_written >= 2 * 1024);
    assert_eq!(stats[0].pages_read, 0);
    // Every page was incremented once per completed pass (and maybe once more).
    for (page, &b) in written.iter().enumerate() {
        assert!(b != 0, "writer never wrote page {page}");
    }
    assert!(
        stats[1].passes >= 2,
        "reader made too little progress: {:?}",
        stats[1]
    );
    assert!(stats[1].pages_read >= 2 * 1024);
    assert_eq!(stats[1].pages_written, 0);
    assert!(read.iter().all(|&b| b == 0xa5), "reader changed its region");
    assert_eq!(stats[2], GuestStats::default(), "idle vCPU did work");
    assert!(hlt_exits >= 1, "idle vCPU never halted");
}

//! `dirtyvm probe`: this host's KVM facts and capabilities.

use serde::Serialize;

use super::Failure;
use crate::{sched, sys, vmm};

/// Host KVM facts, as `probe` prints them.
#[derive(Debug, Serialize)]
struct Probe {
    api_version: i32,
    nr_vcpus: i32,
    max_vcpus: u32,
    nr_memslots: i32,
    immediate_exit: bool,
    dirty_log_ring_max_bytes: i32,
    dirty_log_ring_acq_rel_max_bytes: i32,
    dirty_log_ring_max_entries: i32,
    dirty_log_ring_with_bitmap: bool,
    manual_dirty_log_protect2_flags: i32,
    sched_fifo: String,
    guest_instructions_per_second: f64,
}

pub(super) fn probe(json: bool) -> Result<(), Failure> {
    let kvm = vmm::open_kvm()?;
    let ring = kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING);
    let ring_acq_rel = kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    let fifo = std::thread::spawn(|| match sched::set_current_thread_fifo(1) {
        Ok(_) => "permitted".to_string(),
        Err(e) => format!("refused ({e})"),
    })
    .join()
    .unwrap_or_else(|_| "unknown".into());
    let facts = Probe {
        api_version: sys::KVM_API_VERSION,
        nr_vcpus: kvm.check_extension(sys::KVM_CAP_NR_VCPUS),
        max_vcpus: vmm::max_vcpus(&kvm),
        nr_memslots: kvm.check_extension(sys::KVM_CAP_NR_MEMSLOTS),
        immediate_exit: kvm.check_extension(sys::KVM_CAP_IMMEDIATE_EXIT) > 0,
        dirty_log_ring_max_bytes: ring,
        dirty_log_ring_acq_rel_max_bytes: ring_acq_rel,
        dirty_log_ring_max_entries: ring.max(ring_acq_rel) / 16,
        dirty_log_ring_with_bitmap: kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
            > 0,
        manual_dirty_log_protect2_flags: kvm
            .check_extension(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        sched_fifo: fifo,
        guest_instructions_per_second: vmm::measure_instruction_rate(&kvm, 1_000_000)?,
    };
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&facts).expect("plain data serializes")
        );
        return Ok(());
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    say!("KVM API version                  {}", facts.api_version);
    say!(
        "vCPUs per VM                     {} recommended, {} maximum",
        facts.nr_vcpus,
        facts.max_vcpus
    );
    say!("memory slots                     {}", facts.nr_memslots);
    say!(
        "immediate_exit                   {}",
        yes_no(facts.immediate_exit)
    );
    say!(
        "dirty ring (cap 192)             {}",
        ring_text(facts.dirty_log_ring_max_bytes)
    );
    say!(
        "dirty ring ACQ_REL (cap 223)     {}",
        ring_text(facts.dirty_log_ring_acq_rel_max_bytes)
    );
    say!(
        "dirty ring with bitmap (225)     {}",
        yes_no(facts.dirty_log_ring_with_bitmap)
    );
    say!(
        "manual dirty log protect2 (168)  {}",
        match facts.manual_dirty_log_protect2_flags {
            0 => "no".to_string(),
            f => format!(
                "flags {f:#x} (CLEAR_DIRTY_LOG{})",
                if f & 2 != 0 { ", INITIALLY_SET" } else { "" }
            ),
        }
    );
    say!("SCHED_FIFO                       {}", facts.sched_fifo);
    say!(
        "guest instruction rate           {:.2} M/s per vCPU",
        facts.guest_instructions_per_second / 1e6
    );
    Ok(())
}

fn ring_text(bytes: i32) -> String {
    if bytes <= 0 {
        "not supported".into()
    } else {
        format!("up to {} bytes = {} entries", bytes, bytes / 16)
    }
}

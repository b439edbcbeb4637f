//! The scenario benchmarks, judged against the guests' own counters (not criterion: each is
//! one long real-KVM run whose results are a table, not a time distribution):
//!
//! - dirty-rate accuracy in a 1 GiB guest: paced writers at 16, 64 and 256 MiB/s, an
//!   unpaced writer over all of memory and a paced random writer, each measured in dirty-ring, page-sampling and dirty-bitmap mode over 1 s
//!   windows, against the distinct pages the guest wrote in the same window (targets: ring
//!   and bitmap within 2 %, page-sampling within 10 % with the working set at least 1/8 of
//!   memory), and the writer's page rate while measured (the cost of a measurement);
//! - dirty-limit convergence: an unpaced writer beside a reader, limits of 16, 64 and
//!   256 MiB/s under dirtyvm's quota controller, the reference algorithm and auto-converge:
//!   time to within ±10 % (target 2 s), mean error after (target 5 %), the reader's
//!   throughput (target 95 % of unthrottled) and ring-full exits and wedges (target 0).
//!
//! Run: `cargo bench --bench scenarios` (about four minutes; needs /dev/kvm).

use std::time::Duration;

use dirtyvm::limit::LimitAlgo;
use dirtyvm::showcase::scenario::{self, Controller};

mod common;

fn main() {
    if !common::kvm_or_skip("scenarios") {
        return;
    }
    if common::wanted("accuracy") {
        println!("== dirty-rate accuracy (1 s windows, 3 each) ==");
        let mut rows = Vec::new();
        // Working sets of at least 1/8 of memory, and larger than a second of writing where
        // the truth should not saturate at the working set.
        for writer in [
            "write:128M@16",
            "write:256M@64",
            "write:512M@256",
            "write:1G",
            "random-write:256M@64",
        ] {
            match scenario::accuracy(writer, 1 << 30, 1000, 3) {
                Ok(r) => rows.extend(r),
                Err(e) => println!("{writer}: {e}"),
            }
        }
        scenario::print_accuracy(&rows);
    }
    if common::wanted("convergence") {
        println!(
            "\n== dirty-limit convergence (writer + reader, 1 s windows; 8 s under a limit, \
             14 s under auto-converge) =="
        );
        let mut rows = Vec::new();
        for limit in [16.0, 64.0, 256.0] {
            for controller in [
                Controller::Limit(LimitAlgo::Quota),
                Controller::Limit(LimitAlgo::Reference),
                Controller::AutoConverge,
            ] {
                // Auto-converge climbs one step a second: give it time to reach 99 %.
                let run = match controller {
                    Controller::AutoConverge => Duration::from_secs(14),
                    Controller::Limit(_) => Duration::from_secs(8),
                };
                match scenario::convergence(controller, limit, None, Duration::from_secs(2), run) {
                    Ok((row, _)) => rows.push(row),
                    Err(e) => println!("{controller} {limit}: {e}"),
                }
            }
        }
        scenario::print_convergence(&rows);
    }
}

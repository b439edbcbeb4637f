//! Migration benchmarks on real KVM (not criterion: each is one long run whose result is a
//! table), source and destination in one process over a loopback socket:
//!
//! - `throughput`: a 1 GiB guest, idle (every page zero) and fully written (a writer over all
//!   of it, paused after its first pass), migrated with `max-bandwidth` at its maximum, beside
//!   a plain copy of the same RAM over the same kind of socket into fresh memory, in the same
//!   run, the fastest of several rounds each (target: the written guest's migration at least 70 %
//!   of the copy's throughput);
//! - `downtime`: a guest whose writer runs at 64 MiB/s, migrated unthrottled with the default
//!   300 ms downtime limit to a destination that boots and resumes it: source pause to
//!   destination resume on one clock (target: under the limit).
//!
//! - `convergence`: QEMU's shape on this host: a 512 MiB guest, a writer over 128 MiB (unpaced,
//!   at 256 and at 128 MiB/s) and a reader over 128 MiB, `max-bandwidth` 64 MiB/s, downtime
//!   limit 300 ms, given up after 60 s, with each aid: none, auto-converge, dirty-limit at
//!   QEMU's default 1 MB/s by the reference algorithm and by the quota controller,
//!   dirty-limit at 50 MB/s (what QEMU's dirty-limit migration test chooses) and the
//!   self-setting limit; then a writer over 256 MiB on a 32 MiB/s link under auto-converge,
//!   dirty-limit and the self-setting limit;
//! - `tracking`: the unpaced writer under auto-converge (as the adaptive-reaper proposal
//!   measured) across tracking and reaper choices: the bitmap; rings with `fixed:1000`,
//!   `levels` and dirtyvm's adaptive reaper.
//!
//! Each convergence run writes its picture (`target/migration-bench/*.svg`): the guest's
//! speeds, the throttle or limit, what remains, the passes shaded.
//!
//! Run: `cargo bench --bench migration [throughput|downtime|convergence|tracking]` (needs
//! /dev/kvm; the convergence tables take about 25 minutes).

use std::path::Path;

use dirtyvm::limit::LimitAlgo;
use dirtyvm::showcase::migration::{self, Aid, ConvergenceCase, Transport};
use dirtyvm::tracking::{Cadence, DirtyLog};

mod common;

fn main() {
    if !common::kvm_or_skip("migration") {
        return;
    }
    if common::wanted("throughput") {
        println!("== migration throughput, 1 GiB guest, unthrottled, beside a plain copy ==");
        let mut rows = Vec::new();
        for transport in [Transport::Unix, Transport::Tcp] {
            for written in [false, true] {
                match migration::throughput(written, 1 << 30, transport) {
                    Ok(row) => rows.push(row),
                    Err(e) => println!("{transport} written={written}: {e}"),
                }
            }
        }
        migration::print_throughput(&rows);
    }
    if common::wanted("downtime") {
        println!("\n== downtime, writer at 64 MiB/s, unthrottled, limit 300 ms (5 runs) ==");
        let mut rows = Vec::new();
        for _ in 0..5 {
            match migration::downtime("write:256M@64", 512 << 20) {
                Ok(row) => rows.push(row),
                Err(e) => println!("downtime: {e}"),
            }
        }
        migration::print_downtime(&rows);
    }
    if common::wanted("convergence") {
        println!("\n== convergence, QEMU's shape: 512 MiB, writer + reader over 128 MiB each, 64 MiB/s, 300 ms, 60 s bound ==");
        let mut cases = Vec::new();
        for writer in ["write:128M", "write:128M@256", "write:128M@128"] {
            for aid in [
                Aid::None,
                Aid::AutoConverge,
                Aid::DirtyLimit(1, LimitAlgo::Reference),
                Aid::DirtyLimit(1, LimitAlgo::Quota),
                Aid::DirtyLimit(50, LimitAlgo::Quota),
                Aid::AutoLimit,
            ] {
                cases.push(ConvergenceCase::qemu_shape(aid, writer));
            }
        }
        // A writer over 256 MiB on a 32 MiB/s link: passes of 8 s, so auto-converge's steps,
        // one every second period, come too slowly for the bound.
        for aid in [
            Aid::AutoConverge,
            Aid::DirtyLimit(1, LimitAlgo::Quota),
            Aid::AutoLimit,
        ] {
            let mut case = ConvergenceCase::qemu_shape(aid, "write:256M");
            case.params.max_bandwidth = 32 << 20;
            cases.push(case);
        }
        run_cases(&cases);
    }
    if common::wanted("tracking") {
        println!("\n== convergence across tracking and reapers: unpaced writer, auto-converge ==");
        let mut cases = Vec::new();
        for (dirty_log, reaper) in [
            (DirtyLog::Bitmap, Cadence::Adaptive),
            (
                DirtyLog::Ring,
                Cadence::Fixed(std::time::Duration::from_secs(1)),
            ),
            (DirtyLog::Ring, Cadence::Levels),
            (DirtyLog::Ring, Cadence::Adaptive),
        ] {
            let mut case = ConvergenceCase::qemu_shape(Aid::AutoConverge, "write:128M");
            case.dirty_log = dirty_log;
            case.reaper = reaper;
            cases.push(case);
        }
        run_cases(&cases);
    }
}

/// Runs each case, writes its picture, prints the table.
fn run_cases(cases: &[ConvergenceCase]) {
    let dir = Path::new("target/migration-bench");
    let _ = std::fs::create_dir_all(dir);
    let mut rows = Vec::new();
    for case in cases {
        match migration::converge(case) {
            Ok((row, samples)) => {
                let name: String = format!("{}-{}-{}", row.aid, row.writer, row.tracking)
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                let svg = migration::convergence_chart(&row, &samples).to_svg();
                if let Err(e) = std::fs::write(dir.join(format!("{name}.svg")), svg) {
                    println!("picture {name}: {e}");
                }
                println!(
                    "  {} / {} / {}: {} in {:.1} s",
                    row.aid,
                    row.writer,
                    row.tracking,
                    if row.converged {
                        "completed"
                    } else {
                        "not converged"
                    },
                    row.total_s
                );
                rows.push(row);
            }
            Err(e) => println!("{} {}: {e}", case.aid, case.writer),
        }
    }
    migration::print_convergence(&rows);
}

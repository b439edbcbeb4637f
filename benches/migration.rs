//! Migration benchmarks on real KVM (not criterion: each is one long run whose result is a
//! table), source and destination in one process over a loopback socket:
//!
//! - `throughput`: a 1 GiB guest, idle (every page zero) and fully written (a writer over all
//!   of it, paused after its first pass), migrated with `max-bandwidth` at its maximum, beside
//!   a plain copy of the same RAM over the same kind of socket into fresh memory, in the same
//!   run (target: the written guest's migration at least 70 % of the copy's throughput);
//! - `downtime`: a guest whose writer runs at 64 MiB/s, migrated unthrottled with the default
//!   300 ms downtime limit to a destination that boots and resumes it: source pause to
//!   destination resume on one clock (target: under the limit).
//!
//! Run: `cargo bench --bench migration [throughput|downtime]` (needs /dev/kvm).

use dirtyvm::showcase::migration::{self, Transport};

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
}

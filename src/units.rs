//! The arithmetic everything shares: pages, MiB/s, and the clock penalties are set on. A
//! leaf of the module graph: it uses nothing else from the crate.

use std::sync::OnceLock;
use std::time::Instant;

/// Size of a guest (and host) page, bytes.
pub const PAGE_SIZE: u64 = 4096;

/// Bytes per MiB.
pub const MIB: u64 = 1 << 20;

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// 4 KiB pages per MiB.
pub const PAGES_PER_MIB: f64 = 256.0;

/// A page count over `seconds`, in MiB/s (0 over no time).
pub fn pages_to_mibps(pages: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        pages as f64 / PAGES_PER_MIB / seconds
    } else {
        0.0
    }
}

/// Nanoseconds since the first call in this process: the clock penalties are set on. Never 0,
/// so 0 can mean "no deadline".
pub fn monotonic_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

//! The atomics the ring protocol is written against.
//!
//! Under `cfg(loom)` these are loom's model-checked atomics, otherwise the
//! standard ones. Only heap-backed slot stores can be built from loom atomics:
//! loom keeps per-location history beside the value, so a loom atomic cannot be
//! overlaid on the kernel's mmap'd ring. The model-checking seam is therefore
//! the slot store (`ring::SlotStore`), not this module; see `ring`'s docs.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

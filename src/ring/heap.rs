//! A ring on the heap: the slot store of tests, benches, fuzzing and loom.

use super::{DirtyGfn, SlotStore};

/// A dirty ring allocated on the heap, standing in for the kernel's mmap'd
/// ring wherever no vCPU exists: unit tests, benches, the fuzz target and the
/// loom models (whose atomics cannot live in kernel memory).
#[derive(Debug)]
pub struct HeapRing {
    gfns: Box<[DirtyGfn]>,
}

impl HeapRing {
    /// A ring of `entries` empty entries, as the kernel allocates it.
    ///
    /// # Panics
    ///
    /// If `entries` is not a power of two (0 included).
    pub fn new(entries: u32) -> Self {
        assert!(
            entries.is_power_of_two(),
            "a dirty ring has a power-of-two number of entries, not {entries}"
        );
        Self {
            gfns: (0..entries).map(|_| DirtyGfn::default()).collect(),
        }
    }
}

impl SlotStore for HeapRing {
    #[inline]
    fn gfns(&self) -> &[DirtyGfn] {
        &self.gfns
    }
}

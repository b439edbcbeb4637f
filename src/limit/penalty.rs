//! The handoff of a penalty from the controller to a vCPU thread.
//!
//! The controller publishes "sleep until T" in the vCPU's [`PenaltySlot`], then kicks the
//! vCPU (sets `immediate_exit` with a release store, then signals the thread). The vCPU
//! thread, after every exit, clears `immediate_exit` with an acquire swap and reads the slot:
//! the release/acquire pair on the kick flag is what guarantees that a vCPU that saw the
//! kick also sees the penalty published before it. The slot's own release/acquire covers the
//! vCPU that reads it at the top of its loop without having been kicked.

use crate::sync::{AtomicU64, Ordering};

/// "Sleep until" for one vCPU, in nanoseconds on the limiter's clock; 0 = no penalty.
#[derive(Debug, Default)]
pub struct PenaltySlot {
    until_ns: AtomicU64,
}

impl PenaltySlot {
    /// Publishes a penalty: the vCPU sleeps until `until_ns` (0 cancels). The caller kicks
    /// the vCPU afterwards.
    pub fn impose(&self, until_ns: u64) {
        // Release: pairs with the Acquire load in `until`, and precedes the kick's own
        // release store of immediate_exit.
        self.until_ns.store(until_ns, Ordering::Release);
    }

    /// Clears any penalty (a cancel).
    pub fn clear(&self) {
        self.impose(0);
    }

    /// The published deadline; 0 when there is none.
    pub fn until(&self) -> u64 {
        // Acquire: pairs with the Release store in `impose`.
        self.until_ns.load(Ordering::Acquire)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicU8;
    use loom::sync::Arc;
    use loom::thread;

    /// The controller publishes a penalty and kicks; the vCPU thread, once it sees the kick,
    /// must see the penalty. `kick_store` is the ordering of the kick flag's store (the
    /// real one, `ImmediateExit::set`, is Release; the vCPU's clear is an Acquire swap).
    fn handoff(kick_store: Ordering) {
        loom::model(move || {
            let slot = Arc::new(PenaltySlot::default());
            let immediate_exit = Arc::new(AtomicU8::new(0));
            let controller = {
                let (slot, immediate_exit) = (slot.clone(), immediate_exit.clone());
                thread::spawn(move || {
                    slot.impose(42);
                    immediate_exit.store(1, kick_store);
                })
            };
            // The vCPU thread: it sees the kick when KVM_RUN returns EINTR.
            if immediate_exit.swap(0, Ordering::Acquire) == 1 {
                assert_eq!(slot.until(), 42, "kicked without a penalty");
            }
            controller.join().unwrap();
        });
    }

    #[test]
    fn loom_penalty_handoff_kicked_vcpu_sees_the_penalty() {
        handoff(Ordering::Release);
    }

    #[test]
    #[should_panic(expected = "kicked without a penalty")]
    fn loom_penalty_handoff_with_a_relaxed_kick_loses_the_penalty() {
        handoff(Ordering::Relaxed);
    }

    #[test]
    fn loom_penalty_slot_publishes_its_deadline() {
        loom::model(|| {
            let slot = Arc::new(PenaltySlot::default());
            let data = Arc::new(AtomicU64::new(0));
            let controller = {
                let (slot, data) = (slot.clone(), data.clone());
                thread::spawn(move || {
                    data.store(7, Ordering::Relaxed);
                    slot.impose(100);
                })
            };
            if slot.until() == 100 {
                assert_eq!(data.load(Ordering::Relaxed), 7);
            }
            controller.join().unwrap();
        });
    }
}

//! The handoff between a thread that controls a vCPU (the dirty-limit controller, a pause, a
//! flush) and the vCPU thread: a penalty to serve, and a request to leave `KVM_RUN`.
//!
//! The controller publishes "sleep until T" in the vCPU's [`PenaltySlot`], then kicks the
//! vCPU: [`request_exit`] sets `immediate_exit` with a release store, then the thread is
//! signalled. The vCPU thread, after every exit, takes the request with an acquire swap
//! ([`take_exit_request`]) and reads the slot: the release/acquire pair on the kick flag
//! guarantees that a vCPU that saw the kick also sees the penalty published before it. The
//! slot's own release/acquire covers the vCPU that reads it at the top of its loop without
//! having been kicked.
//!
//! Both are written against `crate::sync` atomics, so the loom models below drive these very
//! functions; `kvm::ImmediateExit` applies the kick ones to the `immediate_exit` byte of the
//! vCPU's `kvm_run` mapping.

use crate::sync::{AtomicU64, AtomicU8, Ordering};

/// "Sleep until" for one vCPU, in nanoseconds on the [`crate::units::monotonic_ns`] clock;
/// 0 = no penalty.
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

/// Asks the vCPU whose `immediate_exit` byte is `flag` to leave `KVM_RUN` (the kernel reads
/// the byte once, at entry): what the kicker published before is visible to the vCPU once
/// it takes the request.
pub fn request_exit(flag: &AtomicU8) {
    request_exit_with(flag, Ordering::Release);
}

/// [`request_exit`] with the store's ordering as a parameter, only so that the loom model
/// can show why it must be Release.
fn request_exit_with(flag: &AtomicU8, order: Ordering) {
    // Release (as `request_exit` passes): pairs with the Acquire swap in
    // `take_exit_request`.
    flag.store(1, order);
}

/// Takes a pending exit request (the vCPU thread, after `KVM_RUN` returned); true if there
/// was one. `KVM_RUN` enters the guest again afterwards.
pub fn take_exit_request(flag: &AtomicU8) -> bool {
    // Acquire: pairs with the Release store in `request_exit`.
    flag.swap(0, Ordering::Acquire) == 1
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// The controller publishes a penalty and kicks; the vCPU thread, once it takes the kick,
    /// must see the penalty. The controller kicks with [`request_exit`], as the VMM does, or
    /// (to show the model catches the bug) with a store of `weakened` ordering.
    fn handoff(weakened: Option<Ordering>) {
        loom::model(move || {
            let slot = Arc::new(PenaltySlot::default());
            let immediate_exit = Arc::new(AtomicU8::new(0));
            let controller = {
                let (slot, immediate_exit) = (slot.clone(), immediate_exit.clone());
                thread::spawn(move || {
                    slot.impose(42);
                    match weakened {
                        None => request_exit(&immediate_exit),
                        Some(order) => request_exit_with(&immediate_exit, order),
                    }
                })
            };
            // The vCPU thread: it sees the kick when KVM_RUN returns EINTR.
            if take_exit_request(&immediate_exit) {
                assert_eq!(slot.until(), 42, "kicked without a penalty");
            }
            controller.join().unwrap();
        });
    }

    #[test]
    fn loom_penalty_handoff_kicked_vcpu_sees_the_penalty() {
        handoff(None);
    }

    #[test]
    #[should_panic(expected = "kicked without a penalty")]
    fn loom_penalty_handoff_with_a_relaxed_kick_loses_the_penalty() {
        handoff(Some(Ordering::Relaxed));
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

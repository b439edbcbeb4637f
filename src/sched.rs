//! Real-time scheduling for the threads that must not be starved by vCPU threads.
//!
//! # Safety
//!
//! Talks to the kernel's scheduler through `libc` (nix has no wrapper for
//! `sched_setscheduler`): each call passes a pointer to a stack-local `sched_param` that
//! lives for the duration of the call, and affects only the calling thread (pid 0).

use std::io;

/// The scheduling policy a thread got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_FIFO` at this priority.
    Fifo(i32),
    /// The default time-sharing policy (`SCHED_OTHER`).
    Other,
}

impl Policy {
    /// The kernel's name of the policy, as reports and queries show it.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fifo(_) => "SCHED_FIFO",
            Policy::Other => "SCHED_OTHER",
        }
    }
}

/// Moves the calling thread to `SCHED_FIFO` at `priority` (1..=99).
pub fn set_current_thread_fifo(priority: i32) -> io::Result<Policy> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if ret == 0 {
        Ok(Policy::Fifo(priority))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Tries `SCHED_FIFO` at `priority` for the calling thread and falls back to the default
/// policy, returning the error the host gave when it refused.
pub fn try_fifo(priority: i32) -> (Policy, Option<io::Error>) {
    match set_current_thread_fifo(priority) {
        Ok(policy) => (policy, None),
        Err(e) => (Policy::Other, Some(e)),
    }
}

//! vCPU threads: one per vCPU, running `KVM_RUN` in a loop, and the kick that makes a vCPU
//! leave `KVM_RUN` promptly (set `immediate_exit`, then signal the thread: the flag closes
//! the race where the signal lands just before `KVM_RUN` is entered).

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};

use super::handoff::PenaltySlot;
use super::kvm::{ImmediateExit, Vcpu, VcpuExit, VcpuRegisters, KICK_SIGNAL};
use crate::sync::lock;
use crate::units::monotonic_ns;

/// Why the VM is stopping. The first reason given wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `--duration` elapsed.
    Duration,
    /// SIGINT or SIGTERM.
    Signal(&'static str),
    /// A client asked to quit.
    Quit,
    /// A vCPU hit an exit it cannot continue from.
    VcpuFailed { id: u32, error: String },
    /// A VMM thread failed.
    Failed(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Duration => f.write_str("duration elapsed"),
            StopReason::Signal(name) => write!(f, "{name} received"),
            StopReason::Quit => f.write_str("quit requested"),
            StopReason::VcpuFailed { id, error } => write!(f, "vCPU {id} failed: {error}"),
            StopReason::Failed(error) => f.write_str(error),
        }
    }
}

/// The VM-wide stop request: set once, waited on by the launcher.
#[derive(Debug, Default)]
pub struct StopRequest {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
}

impl StopRequest {
    /// Requests a stop; a later request does not replace the first reason.
    pub fn request(&self, reason: StopReason) {
        let mut current = lock(&self.reason);
        current.get_or_insert(reason);
        self.changed.notify_all();
    }

    /// The stop reason, if a stop was requested.
    pub fn reason(&self) -> Option<StopReason> {
        lock(&self.reason).clone()
    }

    /// Waits up to `timeout` for a stop request.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<StopReason> {
        let current = lock(&self.reason);
        let (current, _) = self
            .changed
            .wait_timeout_while(current, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        current.clone()
    }
}

/// Exit counters of one vCPU.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// `hlt` exits.
    pub hlt: AtomicU64,
    /// Kicks and signals (`EINTR`).
    pub interrupted: AtomicU64,
    /// Every return from `KVM_RUN`.
    pub all: AtomicU64,
}

/// A reading of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// `hlt` exits.
    pub hlt: u64,
    /// Kicks and signals (`EINTR`).
    pub interrupted: u64,
    /// Every return from `KVM_RUN`.
    pub all: u64,
}

impl ExitCounters {
    /// The counters now.
    pub fn snapshot(&self) -> ExitCounts {
        // Relaxed: counters; `VcpuControl::exits_taken` is the one read that orders.
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            hlt: load(&self.hlt),
            interrupted: load(&self.interrupted),
            all: load(&self.all),
        }
    }
}

/// The shared side of a vCPU thread: how other threads kick and stop it.
#[derive(Debug)]
pub struct VcpuControl {
    id: u32,
    /// Its registers, for saving and restoring its state while it is paused.
    pub registers: VcpuRegisters,
    stop: AtomicBool,
    immediate_exit: ImmediateExit,
    /// The running thread, registered while its run loop is live so a kick never signals a
    /// thread that has exited.
    thread: Mutex<Option<(Pthread, Thread)>>,
    /// Whether the thread is inside `KVM_RUN` (or about to enter it).
    in_guest: AtomicBool,
    /// Exit counters.
    pub exits: ExitCounters,
    /// The dirty-limit or throttle penalty to serve, published by the controller.
    pub penalty: PenaltySlot,
    /// Penalty time served.
    served: PenaltyTime,
    /// When `KVM_RUN` last returned ([`monotonic_ns`]).
    last_exit_ns: AtomicU64,
    /// Paused by the VMM (QMP `stop`): the thread waits outside `KVM_RUN`.
    paused: AtomicBool,
    /// The thread's kernel thread id, once it runs.
    tid: AtomicI64,
}

impl VcpuControl {
    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Makes the vCPU leave `KVM_RUN` (or its halt) and look at its requests.
    pub fn kick(&self) {
        self.immediate_exit.set();
        let thread = lock(&self.thread);
        if let Some((pthread, handle)) = thread.as_ref() {
            // The thread is registered, so it is alive: the signal cannot hit a reused id.
            let _ = pthread_kill(*pthread, KICK_SIGNAL);
            handle.unpark();
        }
    }

    /// Wakes the vCPU thread if it sleeps outside `KVM_RUN` (a penalty, a pause, a halt), so
    /// it looks at its requests again; a vCPU in the guest is not disturbed.
    pub fn wake(&self) {
        let thread = lock(&self.thread);
        if let Some((_, handle)) = thread.as_ref() {
            handle.unpark();
        }
    }

    /// Asks the vCPU thread to leave its run loop.
    pub fn request_stop(&self) {
        // Release: pairs with the Acquire load at the top of the run loop.
        self.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether the vCPU is inside `KVM_RUN`, or about to enter it.
    pub fn in_guest(&self) -> bool {
        // Acquire: pairs with the Release stores around KVM_RUN in the run loop.
        self.in_guest.load(Ordering::Acquire)
    }

    /// How many times `KVM_RUN` has returned: a flush waits for this to move.
    pub fn exits_taken(&self) -> u64 {
        // Acquire: pairs with the Release increment after KVM_RUN returns, so everything
        // the exit flushed (PML buffers into the dirty ring) is visible.
        self.exits.all.load(Ordering::Acquire)
    }

    /// Penalty time served up to `now_ns`, including a sleep in progress; never less than
    /// any earlier answer.
    pub fn penalty_ns(&self, now_ns: u64) -> u64 {
        self.served.up_to(now_ns)
    }

    /// When `KVM_RUN` last returned, on the [`monotonic_ns`] clock.
    pub fn last_exit_ns(&self) -> u64 {
        // Relaxed: a timestamp for the latency estimate, read after `exits_taken` moved.
        self.last_exit_ns.load(Ordering::Relaxed)
    }

    /// Pauses (`true`) or resumes the vCPU. A paused vCPU finishes its current exit and then
    /// waits outside `KVM_RUN`; [`VcpuControl::in_guest`] tells when it got there.
    pub fn set_paused(&self, paused: bool) {
        // Release: pairs with the Acquire load in the run loop.
        self.paused.store(paused, Ordering::Release);
        self.kick();
    }

    /// Whether the vCPU is paused.
    pub fn paused(&self) -> bool {
        // Acquire: pairs with the Release store in `set_paused`.
        self.paused.load(Ordering::Acquire)
    }

    /// The vCPU thread's kernel thread id (0 before it starts).
    pub fn tid(&self) -> i64 {
        // Relaxed: an id, set once before the thread enters the guest.
        self.tid.load(Ordering::Relaxed)
    }

    /// Serves the published penalty, if one is due: sleeps outside `KVM_RUN` until its
    /// deadline, waking early for a stop, a cancel or a shorter deadline.
    fn serve_penalty(&self) {
        // The common case, no penalty, costs one load and no clock read.
        let until = self.penalty.until();
        if until == 0 {
            return;
        }
        let start = monotonic_ns();
        if until <= start {
            return;
        }
        self.served.begin(start);
        loop {
            let now = monotonic_ns();
            let until = self.penalty.until();
            if until <= now || self.stop_requested() {
                break;
            }
            thread::park_timeout(Duration::from_nanos(until - now));
        }
        self.served.end(start, monotonic_ns());
    }

    fn stop_requested(&self) -> bool {
        // Acquire: pairs with the Release store in `request_stop`.
        self.stop.load(Ordering::Acquire)
    }
}

/// The time a vCPU has spent serving penalties: completed sleeps, plus the one in progress.
///
/// The vCPU thread writes it and other threads read it without a lock, with their own clock
/// readings: a reader whose clock ran ahead of the vCPU's end of sleep counts a little more
/// than the sleep will have lasted, and a computed total could then go backwards (and a
/// controller subtracting two readings would underflow). Every answer is therefore raised to
/// the highest answer given so far: the total never decreases, by construction. The store
/// order below keeps a reader from counting a finished sleep twice.
#[derive(Debug, Default)]
struct PenaltyTime {
    /// Completed sleeps, ns.
    done_ns: AtomicU64,
    /// When the sleep in progress began ([`monotonic_ns`]); 0 when awake.
    asleep_since_ns: AtomicU64,
    /// The highest total any reader was given, ns.
    reported_ns: AtomicU64,
}

impl PenaltyTime {
    /// A sleep begins at `start_ns`.
    fn begin(&self, start_ns: u64) {
        // Relaxed: a reader that sees it late counts less, which `up_to` absorbs.
        self.asleep_since_ns.store(start_ns, Ordering::Relaxed);
    }

    /// The sleep that began at `start_ns` ended at `end_ns`.
    fn end(&self, start_ns: u64, end_ns: u64) {
        // The start is cleared before the total grows: a reader that sees the new total
        // (Release here, Acquire in `up_to`) also sees the cleared start, and never adds the
        // finished sleep twice.
        self.asleep_since_ns.store(0, Ordering::Relaxed);
        self.done_ns
            .fetch_add(end_ns.saturating_sub(start_ns), Ordering::Release);
    }

    /// Total served up to `now_ns`, never less than an earlier answer.
    fn up_to(&self, now_ns: u64) -> u64 {
        // Acquire: pairs with the Release in `end`.
        let done = self.done_ns.load(Ordering::Acquire);
        // Relaxed: ordered after the Acquire load above.
        let since = self.asleep_since_ns.load(Ordering::Relaxed);
        let total = done
            + match since {
                0 => 0,
                since => now_ns.saturating_sub(since),
            };
        // Relaxed: the answers are ordered by this read-modify-write alone.
        self.reported_ns
            .fetch_max(total, Ordering::Relaxed)
            .max(total)
    }
}

/// Whoever empties a vCPU's dirty ring when the vCPU exits because it is full (the tracker):
/// the vCPU thread calls it before it re-enters the guest.
pub trait RingFullHandler: Send + Sync {
    /// Makes room in vCPU `id`'s ring; an error stops the vCPU with it.
    fn ring_full(&self, id: u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    control: Arc<VcpuControl>,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts a thread running `vcpu` (or waiting, paused, until resumed); its ring-full exits
    /// go to `ring_full`; a fatal exit requests a VM stop through `stop`.
    pub fn spawn(
        vcpu: Vcpu,
        ring_full: Arc<dyn RingFullHandler>,
        stop: Arc<StopRequest>,
        paused: bool,
    ) -> io::Result<VcpuThread> {
        let control = Arc::new(VcpuControl {
            id: vcpu.id(),
            registers: vcpu.registers().clone(),
            stop: AtomicBool::new(false),
            immediate_exit: vcpu.immediate_exit(),
            thread: Mutex::new(None),
            in_guest: AtomicBool::new(false),
            exits: ExitCounters::default(),
            penalty: PenaltySlot::default(),
            served: PenaltyTime::default(),
            last_exit_ns: AtomicU64::new(0),
            paused: AtomicBool::new(paused),
            tid: AtomicI64::new(0),
        });
        let shared = control.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || {
                let id = vcpu.id();
                if let Err(error) = run_loop(vcpu, &shared, &*ring_full) {
                    stop.request(StopReason::VcpuFailed {
                        id,
                        error: error.to_string(),
                    });
                }
            })?;
        Ok(VcpuThread { control, handle })
    }

    /// The shared control block.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// Stops the thread and waits for it.
    pub fn stop_and_join(self) {
        self.control.request_stop();
        // A panic in the run loop is a bug; surface it rather than hiding it.
        if let Err(panic) = self.handle.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Why a vCPU could not go on.
#[derive(Debug)]
pub enum VcpuError {
    /// `KVM_RUN` failed.
    Run(io::Error),
    /// The guest did something the built-in programs never do.
    UnexpectedExit(VcpuExit),
    /// A ring-full exit could not be handled.
    RingFull(Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuError::Run(e) => write!(f, "KVM_RUN failed: {e}"),
            VcpuError::UnexpectedExit(exit) => write!(f, "unexpected exit {exit:?}"),
            VcpuError::RingFull(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for VcpuError {}

fn run_loop(
    mut vcpu: Vcpu,
    control: &VcpuControl,
    ring_full: &dyn RingFullHandler,
) -> Result<(), VcpuError> {
    *lock(&control.thread) = Some((pthread_self(), thread::current()));
    control
        .tid
        .store(nix::unistd::gettid().as_raw().into(), Ordering::Relaxed);
    let result = loop {
        if control.stop_requested() {
            break Ok(());
        }
        control.serve_penalty();
        if control.paused() {
            // A kick (resume, stop) unparks; a spurious wakeup just loops. The stop is looked
            // at again first: the penalty sleep just served may have taken the unpark that
            // came with it, and this park would then wait forever.
            if !control.stop_requested() {
                thread::park();
            }
            continue;
        }
        // Release: pairs with the Acquire load in `in_guest`.
        control.in_guest.store(true, Ordering::Release);
        let exit = vcpu.run();
        control.in_guest.store(false, Ordering::Release);
        control
            .last_exit_ns
            .store(monotonic_ns(), Ordering::Relaxed);
        // Release: pairs with the Acquire load in `exits_taken`.
        control.exits.all.fetch_add(1, Ordering::Release);
        match exit {
            Ok(VcpuExit::DirtyRingFull) => {
                if let Err(e) = ring_full.ring_full(control.id) {
                    break Err(VcpuError::RingFull(e));
                }
            }
            Ok(VcpuExit::Interrupted) => {
                control.immediate_exit.take();
                control.exits.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Hlt) => {
                control.exits.hlt.fetch_add(1, Ordering::Relaxed);
                // Halted with no interrupt to wait for: sleep until kicked. A kick that came
                // before this point left an unpark token, so nothing is missed.
                if !control.stop_requested() {
                    thread::park();
                }
            }
            Ok(exit) => break Err(VcpuError::UnexpectedExit(exit)),
            Err(e) => break Err(VcpuError::Run(e)),
        }
    };
    *lock(&control.thread) = None;
    result
}

/// How long a flush waits for one vCPU to leave `KVM_RUN` before giving up on it.
const FLUSH_EXIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Kicks every vCPU inside `KVM_RUN` and waits until each has left it once.
pub fn kick_and_wait(vcpus: &[Arc<VcpuControl>]) {
    let before: Vec<_> = vcpus.iter().map(|v| v.exits_taken()).collect();
    for v in vcpus {
        if v.in_guest() {
            v.kick();
        }
    }
    for (v, before) in vcpus.iter().zip(before) {
        let deadline = Instant::now() + FLUSH_EXIT_TIMEOUT;
        while v.in_guest() && v.exits_taken() == before && Instant::now() < deadline {
            thread::sleep(Duration::from_micros(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PenaltyTime;

    #[test]
    fn penalty_time_never_goes_backwards() {
        let time = PenaltyTime::default();
        time.begin(1_000);
        // A reader whose clock runs ahead of the vCPU's: 500 ns served so far.
        assert_eq!(time.up_to(1_500), 500);
        // The vCPU ends its sleep at 1_400 by its own clock, after the read above.
        time.end(1_000, 1_400);
        assert_eq!(time.up_to(1_500), 500, "the total went backwards");
        time.begin(2_000);
        assert_eq!(time.up_to(2_200), 600);
        time.end(2_000, 2_300);
        assert_eq!(time.up_to(9_999), 700);
    }
}

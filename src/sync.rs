//! Synchronization shared by the crate: the atomics the lock-free protocols are written
//! against (loom's under `cfg(loom)`), a poison-tolerant lock, and the one pattern every
//! background thread follows (`Worker`).
//!
//! Only heap-backed slot stores can be built from loom atomics: loom keeps per-location
//! history beside the value, so a loom atomic cannot be overlaid on the kernel's mmap'd ring.
//! The model-checking seam of the ring is therefore the slot store
//! (`tracking::ring::SlotStore`), not this module.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

#[cfg(not(loom))]
pub(crate) use worker::{lock, Guard, Rounds, Shared, Worker};

#[cfg(not(loom))]
mod worker {
    use std::io;
    use std::ops::{Deref, DerefMut};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    /// Locks `mutex` whether or not a thread panicked holding it: every critical section in
    /// this crate leaves its state consistent before anything in it can panic, and a panic
    /// is reported where it happens.
    pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// State shared with a worker thread: one lock, and one condition variable signalled on
    /// every change that anyone may wait for (a wake-up, a stop, a result).
    #[derive(Debug)]
    pub(crate) struct Shared<S> {
        inner: Mutex<Inner<S>>,
        changed: Condvar,
    }

    /// The locked state: the caller's `S`, and the worker's own flags.
    #[derive(Debug)]
    pub(crate) struct Inner<S> {
        state: S,
        /// The worker is told to stop.
        quit: bool,
        /// Its thread runs.
        running: bool,
        /// Someone asked for a round before its time.
        woken: bool,
    }

    impl<S> Deref for Inner<S> {
        type Target = S;

        fn deref(&self) -> &S {
            &self.state
        }
    }

    impl<S> DerefMut for Inner<S> {
        fn deref_mut(&mut self) -> &mut S {
            &mut self.state
        }
    }

    /// The locked state, as a worker's users and its thread hold it.
    pub(crate) type Guard<'a, S> = MutexGuard<'a, Inner<S>>;

    impl<S> Shared<S> {
        /// Locks the state (see [`lock`]).
        pub(crate) fn lock(&self) -> Guard<'_, S> {
            lock(&self.inner)
        }

        /// Tells everyone waiting that the state changed.
        pub(crate) fn notify(&self) {
            self.changed.notify_all();
        }

        /// Waits, up to `timeout` if one is given, while `waiting` holds and the worker is
        /// not told to stop; returns the guard and whether it is told to stop.
        pub(crate) fn wait_while<'a>(
            &self,
            guard: Guard<'a, S>,
            timeout: Option<Duration>,
            mut waiting: impl FnMut(&S) -> bool,
        ) -> (Guard<'a, S>, bool) {
            let go_on = |inner: &mut Inner<S>| !inner.quit && waiting(&inner.state);
            let guard = match timeout {
                Some(timeout) => {
                    self.changed
                        .wait_timeout_while(guard, timeout, go_on)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self
                    .changed
                    .wait_while(guard, go_on)
                    .unwrap_or_else(|e| e.into_inner()),
            };
            let quit = guard.quit;
            (guard, quit)
        }
    }

    /// What a worker's state tells the worker loop.
    pub(crate) trait Rounds {
        /// Whether there is work: when false the thread ends, and [`Worker::start`] begins a
        /// new one when there is work again.
        fn active(&self) -> bool {
            true
        }

        /// When the next round is due if nobody wakes the worker first; `None`: only when
        /// woken.
        fn next_round(&self) -> Option<Instant>;
    }

    /// The round a worker runs: given the locked state, does its work (dropping and
    /// re-taking the lock around anything slow) and returns the guard.
    type Round<S> = dyn for<'a> Fn(&'a Shared<S>, Guard<'a, S>) -> Guard<'a, S> + Send + Sync;

    /// A background thread that runs rounds on `Shared<S>`: when [`Rounds::next_round`] is
    /// due or when woken, for as long as [`Rounds::active`] holds and nobody stops it. The
    /// reaper, the dirty-limit controller and the dirty-rate meter are workers.
    pub(crate) struct Worker<S> {
        name: &'static str,
        shared: Arc<Shared<S>>,
        round: Arc<Round<S>>,
        thread: Mutex<Option<JoinHandle<()>>>,
    }

    impl<S> std::fmt::Debug for Worker<S> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Worker")
                .field("name", &self.name)
                .finish_non_exhaustive()
        }
    }

    impl<S: Rounds + Send + 'static> Worker<S> {
        /// A worker named `name` (its thread's name) over `state`, running `round`; no thread
        /// runs until [`Worker::start`].
        pub(crate) fn new(
            name: &'static str,
            state: S,
            round: impl for<'a> Fn(&'a Shared<S>, Guard<'a, S>) -> Guard<'a, S> + Send + Sync + 'static,
        ) -> Worker<S> {
            Worker {
                name,
                shared: Arc::new(Shared {
                    inner: Mutex::new(Inner {
                        state,
                        quit: false,
                        running: false,
                        woken: false,
                    }),
                    changed: Condvar::new(),
                }),
                round: Arc::new(round),
                thread: Mutex::new(None),
            }
        }

        /// The shared state.
        pub(crate) fn shared(&self) -> &Shared<S> {
            &self.shared
        }

        /// Locks the state.
        pub(crate) fn lock(&self) -> Guard<'_, S> {
            self.shared.lock()
        }

        /// Runs a round as soon as possible, starting the thread if it is not running (and
        /// the worker is not stopped); `guard` is the caller's lock on the state, released
        /// here. Fails only if the host refuses a thread.
        pub(crate) fn wake(&self, mut guard: Guard<'_, S>) -> io::Result<()> {
            guard.woken = true;
            self.shared.notify();
            if guard.running || guard.quit {
                return Ok(());
            }
            // A thread that ended left its handle; it has returned, so this does not block.
            if let Some(ended) = lock(&self.thread).take() {
                let _ = ended.join();
            }
            guard.running = true;
            drop(guard);
            let (shared, round) = (self.shared.clone(), self.round.clone());
            let spawned = thread::Builder::new()
                .name(self.name.into())
                .spawn(move || run(&shared, &*round));
            match spawned {
                Ok(handle) => {
                    *lock(&self.thread) = Some(handle);
                    Ok(())
                }
                Err(e) => {
                    self.lock().running = false;
                    Err(e)
                }
            }
        }

        /// Starts the thread if it is not running, and runs a round as soon as possible.
        pub(crate) fn start(&self) -> io::Result<()> {
            self.wake(self.lock())
        }

        /// Tells the thread to stop after its current round and joins it. Idempotent; a
        /// stopped worker never starts again.
        pub(crate) fn stop(&self) {
            self.lock().quit = true;
            self.shared.notify();
            let handle = lock(&self.thread).take();
            if let Some(Err(panic)) = handle.map(JoinHandle::join) {
                std::panic::resume_unwind(panic);
            }
        }
    }

    impl<S> Drop for Worker<S> {
        fn drop(&mut self) {
            lock(&self.shared.inner).quit = true;
            self.shared.notify();
            if let Some(handle) = lock(&self.thread).take() {
                let _ = handle.join();
            }
        }
    }

    /// The worker thread: rounds until told to stop or out of work.
    fn run<S: Rounds>(shared: &Shared<S>, round: &Round<S>) {
        let mut guard = shared.lock();
        loop {
            if guard.quit || !guard.state.active() {
                break;
            }
            let idle = |inner: &mut Inner<S>| !inner.quit && !inner.woken;
            guard = match guard.state.next_round() {
                Some(at) => {
                    let timeout = at.saturating_duration_since(Instant::now());
                    shared
                        .changed
                        .wait_timeout_while(guard, timeout, idle)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => shared
                    .changed
                    .wait_while(guard, idle)
                    .unwrap_or_else(|e| e.into_inner()),
            };
            if guard.quit {
                break;
            }
            guard.woken = false;
            guard = round(shared, guard);
        }
        guard.running = false;
        shared.notify();
    }
}

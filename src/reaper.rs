//! The reaper thread: harvests every dirty ring (or syncs the bitmap) on a cadence, and on
//! demand with a flush for exact sync points.
//!
//! # The adaptive cadence
//!
//! The reference design reaps once a second, which a full-speed writer outruns: on this
//! host a 65536-entry ring fills in about 125 ms, and a ring that fills overflows and loses
//! pages (HOST-NOTES). The published adaptive designs step through fixed levels (Chongyun
//! Wu's six buckets) or nudge the delay (Peter Xu's `/2` above 80 % fill, `+20 ms` below
//! 20 %); both need many reaps to settle and the first lets a ring reach 50 % before its
//! fastest level.
//!
//! Ring fill between reaps is the dirty rate times the interval, so one multiplicative
//! step lands on a target: after each reap, with `fill` the fullest ring's harvested
//! entries over its size, the next interval is `interval × TARGET_FILL / fill`. Speeding up
//! takes effect at once; slowing down is capped at doubling per reap, so a writer that
//! paused for one interval does not stretch the cadence past what it needs when it
//! resumes. `TARGET_FILL` is a quarter: a vCPU can quadruple its dirty rate within one
//! interval before its ring reaches the kernel's soft limit. A ring-full exit since the
//! last reap means the cadence is already too slow: the interval drops to the minimum. The
//! interval stays within [5 ms, 1 s]: below 5 ms a reaper competing with vCPU threads for
//! two cores costs more than it saves, and 1 s is the reference's cadence.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;

use crate::sched::{self, Policy};
use crate::tracking::{Reap, Tracker};
use crate::vcpu::{kick_and_wait, Stop, StopReason, VcpuControl};

/// Shortest adaptive interval.
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Longest adaptive interval (the reference's fixed cadence).
const MAX_INTERVAL: Duration = Duration::from_secs(1);
/// The ring fill the adaptive cadence aims for.
const TARGET_FILL: f64 = 0.25;
/// `SCHED_FIFO` priority of the reaper (low: it only needs to beat `SCHED_OTHER` vCPUs).
const REAPER_PRIORITY: i32 = 10;

/// When the reaper reaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// From ring occupancy and ring-full exits (see the module docs).
    Adaptive,
    /// Every this long.
    Fixed(Duration),
}

impl FromStr for Cadence {
    type Err = String;

    fn from_str(text: &str) -> Result<Cadence, String> {
        if text == "adaptive" {
            return Ok(Cadence::Adaptive);
        }
        match text.strip_prefix("fixed:").map(str::parse::<u64>) {
            Some(Ok(ms)) if (1..=60_000).contains(&ms) => {
                Ok(Cadence::Fixed(Duration::from_millis(ms)))
            }
            _ => Err(format!(
                "reaper '{text}' is not 'adaptive' or 'fixed:MS' with MS from 1 to 60000 \
                 (fixed:1000 is the reference design)"
            )),
        }
    }
}

impl fmt::Display for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cadence::Adaptive => f.write_str("adaptive"),
            Cadence::Fixed(d) => write!(f, "fixed:{}", d.as_millis()),
        }
    }
}

/// The reaper's state, as the report and queries show it.
#[derive(Debug, Clone, Serialize)]
pub struct ReaperStats {
    /// `adaptive` or `fixed:MS`.
    pub mode: String,
    /// Reaps done.
    pub reaps: u64,
    /// Flushes (kick every vCPU, then reap) done.
    pub flushes: u64,
    /// The interval until the next reap, ms.
    pub interval_ms: f64,
    /// Scheduling policy the reaper thread got.
    pub policy: &'static str,
}

#[derive(Debug)]
struct State {
    interval: Duration,
    reaps: u64,
    flushes_requested: u64,
    flushes_done: u64,
    quit: bool,
    policy: Policy,
    ring_full_seen: u64,
}

#[derive(Debug)]
struct Shared {
    tracker: Arc<Tracker>,
    vcpus: Vec<Arc<VcpuControl>>,
    cadence: Cadence,
    state: Mutex<State>,
    /// Signalled on a flush request or quit.
    wake: Condvar,
    /// Signalled after every reap.
    reaped: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running reaper thread.
#[derive(Debug)]
pub struct Reaper {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    /// Starts the reaper for `tracker`; `vcpus` are kicked by flushes; a reap failure stops
    /// the VM through `stop`.
    pub fn spawn(
        tracker: Arc<Tracker>,
        vcpus: Vec<Arc<VcpuControl>>,
        cadence: Cadence,
        stop: Arc<Stop>,
    ) -> std::io::Result<Reaper> {
        let interval = match cadence {
            Cadence::Adaptive => MIN_INTERVAL,
            Cadence::Fixed(d) => d,
        };
        let shared = Arc::new(Shared {
            tracker,
            vcpus,
            cadence,
            state: Mutex::new(State {
                interval,
                reaps: 0,
                flushes_requested: 0,
                flushes_done: 0,
                quit: false,
                policy: Policy::Other,
                ring_full_seen: 0,
            }),
            wake: Condvar::new(),
            reaped: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper_loop(&thread_shared, &stop))?;
        Ok(Reaper {
            shared,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Kicks every vCPU out of `KVM_RUN` (flushing hardware dirty buffers into the rings),
    /// then reaps; returns once that reap is done, so every write made before the call is
    /// in the tracker's counters and dirty-page set. False if the reaper stopped first.
    pub fn flush(&self) -> bool {
        let mut state = self.shared.lock();
        state.flushes_requested += 1;
        let ticket = state.flushes_requested;
        self.shared.wake.notify_all();
        let state = self
            .shared
            .reaped
            .wait_while(state, |s| s.flushes_done < ticket && !s.quit)
            .unwrap_or_else(|e| e.into_inner());
        state.flushes_done >= ticket
    }

    /// The reaper's state.
    pub fn stats(&self) -> ReaperStats {
        let state = self.shared.lock();
        ReaperStats {
            mode: self.shared.cadence.to_string(),
            reaps: state.reaps,
            flushes: state.flushes_done,
            interval_ms: state.interval.as_secs_f64() * 1e3,
            policy: state.policy.name(),
        }
    }

    /// Stops the thread after its current reap and joins it. Idempotent.
    pub fn stop(&self) {
        self.shared.lock().quit = true;
        self.shared.wake.notify_all();
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Err(panic)) = handle.map(JoinHandle::join) {
            std::panic::resume_unwind(panic);
        }
    }
}

fn reaper_loop(shared: &Shared, stop: &Stop) {
    let (policy, refused) = sched::try_fifo(REAPER_PRIORITY);
    if let Some(e) = refused {
        eprintln!("dirtyvm: warning: the reaper runs at normal priority (SCHED_FIFO refused: {e})");
    }
    shared.lock().policy = policy;
    loop {
        let state = shared.lock();
        let interval = state.interval;
        let (state, _) = shared
            .wake
            .wait_timeout_while(state, interval, |s| {
                !s.quit && s.flushes_done == s.flushes_requested
            })
            .unwrap_or_else(|e| e.into_inner());
        if state.quit {
            break;
        }
        let flush =
            (state.flushes_done < state.flushes_requested).then_some(state.flushes_requested);
        drop(state);

        if flush.is_some() {
            kick_and_wait(&shared.vcpus);
        }
        let reap = match shared.tracker.reap() {
            Ok(reap) => reap,
            Err(e) => {
                stop.request(StopReason::Failed(format!(
                    "the reaper's harvest failed: {e}"
                )));
                break;
            }
        };
        let ring_full: u64 = (0..shared.vcpus.len() as u32)
            .map(|id| {
                shared
                    .tracker
                    .vcpu(id)
                    .ring_full_exits
                    .load(Ordering::Relaxed)
            })
            .sum();
        let mut state = shared.lock();
        state.reaps += 1;
        if let Some(ticket) = flush {
            state.flushes_done = ticket;
        }
        if shared.cadence == Cadence::Adaptive {
            state.interval = next_interval(state.interval, &reap, ring_full > state.ring_full_seen);
        }
        state.ring_full_seen = ring_full;
        shared.reaped.notify_all();
    }
    let mut state = shared.lock();
    state.quit = true;
    shared.reaped.notify_all();
}

/// The adaptive rule (module docs).
fn next_interval(interval: Duration, reap: &Reap, ring_full_exits: bool) -> Duration {
    if ring_full_exits {
        return MIN_INTERVAL;
    }
    let grown = interval * 2;
    let next = if reap.max_ring_fill > 0.0 {
        interval
            .mul_f64(TARGET_FILL / reap.max_ring_fill)
            .min(grown)
    } else {
        grown
    };
    next.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reap(fill: f64) -> Reap {
        Reap {
            harvested: 1,
            max_ring_fill: fill,
        }
    }

    #[test]
    fn cadence_parses() {
        assert_eq!("adaptive".parse(), Ok(Cadence::Adaptive));
        assert_eq!(
            "fixed:1000".parse(),
            Ok(Cadence::Fixed(Duration::from_secs(1)))
        );
        for bad in ["fixed:0", "fixed:", "fixed:x", "fast", "fixed:60001"] {
            let err = bad.parse::<Cadence>().unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn adaptive_interval_lands_on_the_target_fill_in_one_step() {
        let ms = Duration::from_millis;
        // 80 % full after 100 ms: the rate fills a quarter in 31.25 ms.
        assert_eq!(
            next_interval(ms(100), &reap(0.8), false),
            Duration::from_micros(31_250)
        );
        // Nearly empty: grow, but at most double.
        assert_eq!(next_interval(ms(100), &reap(0.01), false), ms(200));
        assert_eq!(next_interval(ms(100), &reap(0.0), false), ms(200));
        // Bounds.
        assert_eq!(next_interval(ms(800), &reap(0.0), false), MAX_INTERVAL);
        assert_eq!(next_interval(ms(6), &reap(1.0), false), MIN_INTERVAL);
        // A ring-full exit: as fast as allowed.
        assert_eq!(next_interval(ms(500), &reap(0.1), true), MIN_INTERVAL);
    }
}

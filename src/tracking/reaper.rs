//! The reaper thread: harvests every dirty ring (or syncs the bitmap) on a cadence, and on
//! demand with a flush for exact sync points.
//!
//! # The adaptive cadence
//!
//! (`--reaper levels` is the seed patch's design, [`Levels`], kept to reproduce its
//! comparison; `fixed:1000` is QEMU's.) The reference design reaps once a second, which a
//! full-speed writer outruns: on this
//! host a 65536-entry ring fills in under half a second, and a ring that fills overflows and
//! loses pages (docs/host.md#late-ring-full-exits-overflows-and-wedged-rings). The published adaptive designs step through fixed levels
//! (Chongyun Wu's six buckets) or nudge the delay (Peter Xu's `/2` above 80 % fill, `+20 ms`
//! below 20 %) from the fill each reap saw; both need many reaps to settle, and both are
//! blind to what they have not seen: a vCPU that was slow (its first pass pays for page
//! faults), paused, or held down by the dirty limiter (whose controller reaps on its own)
//! stretches the cadence, and when it speeds up its ring fills before the next reap.
//!
//! Ring fill is rate × interval, so dirtyvm sizes the interval for the fastest rate any
//! vCPU has shown: `interval = TARGET_FILL × entries / peak`, where `peak` is the highest
//! rate at which a vCPU's ring has filled (entries harvested or found lost, by whoever
//! harvested them, over the time since the previous reap), never forgotten, like the
//! reference controller's maximum rate. `TARGET_FILL` is an eighth: a vCPU can dirty eight
//! times faster than anything seen before its ring nears full. Speeding up takes effect at
//! once; slowing down at most doubles the interval per reap. A ring-full exit since the
//! last reap means the cadence was too slow: the next reap comes after the minimum. The
//! interval stays within [5 ms, 250 ms]: below 5 ms a reaper competing with vCPU threads for
//! two cores costs more than it saves, and 250 ms bounds what a writer never seen at speed
//! can put in a large ring (about 37 000 entries here). With the bitmap there is no ring to
//! fill; the interval is the maximum.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Tracker;
use crate::sched::{self, Policy};
use crate::sync::{Guard, Rounds, Shared, Worker};
use crate::vm::vcpu::{kick_and_wait, StopReason, StopRequest, VcpuControl};

/// Shortest adaptive interval.
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Longest adaptive interval.
const MAX_INTERVAL: Duration = Duration::from_millis(250);
/// The ring fill the adaptive cadence aims for at the peak rate.
const TARGET_FILL: f64 = 0.125;
/// `SCHED_FIFO` priority of the reaper (low: it only needs to beat `SCHED_OTHER` vCPUs).
const REAPER_PRIORITY: i32 = 10;

/// When the reaper reaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// From ring occupancy and ring-full exits (see the module docs).
    Adaptive,
    /// Every this long.
    Fixed(Duration),
    /// Chongyun Wu's six run levels (the module docs).
    Levels,
}

impl FromStr for Cadence {
    type Err = String;

    fn from_str(text: &str) -> Result<Cadence, String> {
        match text {
            "adaptive" => return Ok(Cadence::Adaptive),
            "levels" => return Ok(Cadence::Levels),
            _ => {}
        }
        match text.strip_prefix("fixed:").map(str::parse::<u64>) {
            Some(Ok(ms)) if (1..=60_000).contains(&ms) => {
                Ok(Cadence::Fixed(Duration::from_millis(ms)))
            }
            _ => Err(format!(
                "reaper '{text}' is not 'adaptive', 'levels' or 'fixed:MS' with MS from 1 to \
                 60000 (fixed:1000 is the reference design)"
            )),
        }
    }
}

impl fmt::Display for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cadence::Adaptive => f.write_str("adaptive"),
            Cadence::Fixed(d) => write!(f, "fixed:{}", d.as_millis()),
            Cadence::Levels => f.write_str("levels"),
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
    /// When the last reap ended.
    reaped_at: Instant,
    reaps: u64,
    flushes_requested: u64,
    flushes_done: u64,
    /// `None` until the thread has asked for `SCHED_FIFO`.
    policy: Option<Policy>,
    adaptive: Adaptive,
    levels: Levels,
    /// A reap failed: the VM is stopping and the reaper with it.
    failed: bool,
}

impl Rounds for State {
    fn active(&self) -> bool {
        !self.failed
    }

    fn next_round(&self) -> Option<Instant> {
        Some(self.reaped_at + self.interval)
    }
}

/// The reaper thread.
#[derive(Debug)]
pub struct Reaper {
    cadence: Cadence,
    worker: Worker<State>,
}

impl Reaper {
    /// Starts the reaper for `tracker`; `vcpus` are kicked by flushes; a reap failure stops
    /// the VM through `stop`.
    pub fn spawn(
        tracker: Arc<Tracker>,
        vcpus: Vec<Arc<VcpuControl>>,
        cadence: Cadence,
        stop: Arc<StopRequest>,
    ) -> std::io::Result<Reaper> {
        let interval = match cadence {
            Cadence::Adaptive => MIN_INTERVAL,
            Cadence::Fixed(d) => d,
            Cadence::Levels => LEVEL_SLEEPS[0],
        };
        let state = State {
            interval,
            reaped_at: Instant::now(),
            reaps: 0,
            flushes_requested: 0,
            flushes_done: 0,
            policy: None,
            adaptive: Adaptive::default(),
            levels: Levels::default(),
            failed: false,
        };
        let worker = Worker::new("reaper", state, move |shared, guard| {
            reap(shared, guard, &tracker, &vcpus, cadence, &stop)
        });
        worker.start()?;
        Ok(Reaper { cadence, worker })
    }

    /// Kicks every vCPU out of `KVM_RUN` (flushing hardware dirty buffers into the rings),
    /// then reaps; returns once that reap is done, so every write made before the call is
    /// in the tracker's counters and dirty-page set. False if the reaper stopped first.
    pub fn flush(&self) -> bool {
        let mut state = self.worker.lock();
        state.flushes_requested += 1;
        let ticket = state.flushes_requested;
        if self.worker.wake(state).is_err() {
            return false;
        }
        let (state, _) = self
            .worker
            .shared()
            .wait_while(self.worker.lock(), None, |s| {
                s.flushes_done < ticket && !s.failed
            });
        state.flushes_done >= ticket
    }

    /// The reaper's state.
    pub fn stats(&self) -> ReaperStats {
        let state = self.worker.lock();
        ReaperStats {
            mode: self.cadence.to_string(),
            reaps: state.reaps,
            flushes: state.flushes_done,
            interval_ms: state.interval.as_secs_f64() * 1e3,
            policy: state.policy.unwrap_or(Policy::Other).name(),
        }
    }

    /// Stops the thread after its current reap and joins it. Idempotent.
    pub fn shut_down(&self) {
        self.worker.stop();
    }
}

/// One round of the reaper thread: a flush if one was asked for, a reap, the next interval.
fn reap<'a>(
    shared: &'a Shared<State>,
    mut state: Guard<'a, State>,
    tracker: &Tracker,
    vcpus: &[Arc<VcpuControl>],
    cadence: Cadence,
    stop: &StopRequest,
) -> Guard<'a, State> {
    if state.policy.is_none() {
        let (policy, refused) = sched::try_fifo(REAPER_PRIORITY);
        if let Some(e) = refused {
            warn!("the reaper runs at normal priority (SCHED_FIFO refused: {e})");
        }
        state.policy = Some(policy);
    }
    let flush = (state.flushes_done < state.flushes_requested).then_some(state.flushes_requested);
    drop(state);

    if flush.is_some() {
        kick_and_wait(vcpus);
    }
    let reaped = tracker.reap();
    let counts: Vec<_> = (0..vcpus.len() as u32)
        .map(|id| tracker.vcpu(id).snapshot())
        .collect();
    let mut state = shared.lock();
    if let Err(e) = reaped {
        stop.request(StopReason::Failed(format!(
            "the reaper's harvest failed: {e}"
        )));
        state.failed = true;
        shared.notify();
        return state;
    }
    let ring_full: u64 = counts.iter().map(|c| c.ring_full_exits).sum();
    let produced: Vec<u64> = counts.iter().map(|c| c.entries_produced()).collect();
    let now = Instant::now();
    state.reaps += 1;
    state.reaped_at = now;
    if let Some(ticket) = flush {
        state.flushes_done = ticket;
    }
    let entries = tracker.ring_entries();
    match cadence {
        Cadence::Adaptive => {
            let interval = state.interval;
            state.interval = state
                .adaptive
                .next(interval, now, &produced, entries, ring_full);
        }
        Cadence::Levels => state.interval = state.levels.next(&produced, entries, ring_full),
        Cadence::Fixed(_) => {}
    }
    shared.notify();
    state
}

/// The adaptive cadence's memory (module docs).
#[derive(Debug, Default)]
struct Adaptive {
    /// The highest rate a ring has filled at, entries per second.
    peak: f64,
    /// When the previous reap ended, and each vCPU's entries produced then.
    last: Option<(Instant, Vec<u64>)>,
    ring_full_seen: u64,
}

impl Adaptive {
    /// The interval after a reap at `now`, given each vCPU's entries produced so far, the
    /// ring size (`None` with the bitmap) and the ring-full exits so far.
    fn next(
        &mut self,
        interval: Duration,
        now: Instant,
        produced: &[u64],
        entries: Option<u32>,
        ring_full: u64,
    ) -> Duration {
        if let Some((at, before)) = &self.last {
            let secs = now.saturating_duration_since(*at).as_secs_f64();
            // A reap right after another says little about a rate.
            if secs >= MIN_INTERVAL.as_secs_f64() / 2.0 {
                for (now_count, then) in produced.iter().zip(before) {
                    self.peak = self.peak.max(now_count.saturating_sub(*then) as f64 / secs);
                }
            }
        }
        self.last = Some((now, produced.to_vec()));
        if ring_full > self.ring_full_seen {
            self.ring_full_seen = ring_full;
            return MIN_INTERVAL;
        }
        let wanted = match entries {
            Some(entries) if self.peak > 0.0 => {
                Duration::from_secs_f64(TARGET_FILL * f64::from(entries) / self.peak)
            }
            _ => MAX_INTERVAL,
        };
        wanted.min(interval * 2).clamp(MIN_INTERVAL, MAX_INTERVAL)
    }
}

/// The seed patch's sleeps, by run level (NORMAL, FAST1 to FAST4, MAX_SPEED).
const LEVEL_SLEEPS: [Duration; 6] = [
    Duration::from_millis(1000),
    Duration::from_millis(500),
    Duration::from_millis(250),
    Duration::from_millis(125),
    Duration::from_millis(100),
    Duration::from_millis(80),
];
/// The ring fill each level above NORMAL stands for (`ratio_adjust_threshold`).
const LEVEL_STEP: f64 = 0.1;
/// Reaps wanting a lower level before the reaper slows down a level
/// (`stable_count_threshold`).
const STABLE_COUNT: u32 = 5;

/// Chongyun Wu's adaptive reaper ("kvm: Dynamically adjust the rate of dirty ring reaper
/// thread", QEMU mailing list, 2022-03; docs/reference.md#adaptive-reaper-proposals), as
/// written: six run levels, sleeping 1 s, 500, 250, 125, 100 and 80 ms. After each reap,
/// `ratio` = entries reaped (all vCPUs) / ring size; the level wanted is `ratio / 0.1`, at
/// most the last. A ring-full exit since the previous reap raises the level by one at once;
/// a level wanted higher is taken at once; one wanted lower is taken, one level down, only
/// after more than five reaps in a row wanted lower. (The posted code increments the
/// pointer to that counter instead of the counter, so it would never slow down; the counter
/// is meant, and counted here.)
#[derive(Debug, Default)]
struct Levels {
    level: usize,
    speed_down: u32,
    /// Each vCPU's entries produced at the previous reap, and the ring-full exits then.
    last: Option<(Vec<u64>, u64)>,
}

impl Levels {
    /// The sleep after a reap, given each vCPU's entries produced so far, the ring size
    /// (`None` with the bitmap: the level stays NORMAL) and the ring-full exits so far.
    fn next(&mut self, produced: &[u64], entries: Option<u32>, ring_full: u64) -> Duration {
        let (reaped, full_since) = match &self.last {
            Some((before, full_before)) => (
                produced
                    .iter()
                    .zip(before)
                    .map(|(now, then)| now.saturating_sub(*then))
                    .sum::<u64>(),
                ring_full > *full_before,
            ),
            None => (0, false),
        };
        self.last = Some((produced.to_vec(), ring_full));
        let last = LEVEL_SLEEPS.len() - 1;
        let Some(entries) = entries.filter(|&e| e > 0) else {
            return LEVEL_SLEEPS[self.level];
        };
        let ratio = reaped as f64 / f64::from(entries);
        let wanted = ((ratio / LEVEL_STEP) as usize).min(last);
        if full_since {
            self.level = (self.level + 1).min(last);
            self.speed_down = 0;
        } else if wanted > self.level {
            self.level = wanted;
            self.speed_down = 0;
        } else if wanted < self.level {
            self.speed_down += 1;
            if self.speed_down > STABLE_COUNT {
                self.level -= 1;
                self.speed_down = 0;
            }
        } else {
            self.speed_down = 0;
        }
        LEVEL_SLEEPS[self.level]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence_parses() {
        assert_eq!("adaptive".parse(), Ok(Cadence::Adaptive));
        assert_eq!("levels".parse(), Ok(Cadence::Levels));
        assert_eq!(Cadence::Levels.to_string(), "levels");
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
    fn levels_follow_the_seed_patch() {
        let ms = |d: Duration| d.as_millis();
        let mut levels = Levels::default();
        let entries = Some(1000);
        // The first reap has nothing to compare with: NORMAL.
        assert_eq!(ms(levels.next(&[0, 0], entries, 0)), 1000);
        // 350 entries reaped of a 1000-entry ring (two vCPUs together): ratio 0.35, FAST3.
        assert_eq!(ms(levels.next(&[200, 150], entries, 0)), 125);
        // A ring-full exit: one level up at once, whatever the ratio.
        assert_eq!(ms(levels.next(&[200, 150], entries, 1)), 100);
        // Above 0.5: MAX_SPEED, not beyond.
        assert_eq!(ms(levels.next(&[900, 150], entries, 1)), 80);
        assert_eq!(ms(levels.next(&[900, 150], entries, 2)), 80);
        // Idle: five reaps wanting lower change nothing; the sixth goes one level down.
        for _ in 0..5 {
            assert_eq!(ms(levels.next(&[900, 150], entries, 2)), 80);
        }
        assert_eq!(ms(levels.next(&[900, 150], entries, 2)), 100);
        // A reap at the level wanted restarts the count.
        for _ in 0..3 {
            levels.next(&[900, 150], entries, 2);
        }
        assert_eq!(ms(levels.next(&[1300, 150], entries, 2)), 100);
        for _ in 0..5 {
            assert_eq!(ms(levels.next(&[1300, 150], entries, 2)), 100);
        }
        assert_eq!(ms(levels.next(&[1300, 150], entries, 2)), 125);
        // The bitmap has no ring: the level holds.
        assert_eq!(ms(Levels::default().next(&[5000], None, 0)), 1000);
    }

    #[test]
    fn adaptive_interval_follows_the_peak_rate() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        // First reap: no rate yet; grows at most twice.
        assert_eq!(a.next(ms(5), t0, &[0, 0], Some(65536), 0), ms(10));
        // 16384 entries in 100 ms: 163 840 entries/s; an eighth of 65536 is 8192 entries,
        // 50 ms at that rate.
        assert_eq!(
            a.next(ms(100), t0 + ms(100), &[16384, 0], Some(65536), 0),
            ms(50)
        );
        // The writer is held down (or paused): the interval still stays sized for the peak.
        assert_eq!(
            a.next(ms(50), t0 + ms(200), &[16400, 0], Some(65536), 0),
            ms(50)
        );
        // A faster vCPU: faster at once.
        let i = a.next(ms(50), t0 + ms(300), &[16400, 65536], Some(65536), 0);
        assert_eq!(i, Duration::from_secs_f64(0.125 * 65536.0 / 655_360.0));
        // A ring-full exit: the minimum.
        assert_eq!(
            a.next(ms(50), t0 + ms(400), &[16400, 65536], Some(65536), 1),
            MIN_INTERVAL
        );
        // Small rings: never below the minimum.
        assert_eq!(
            a.next(ms(50), t0 + ms(500), &[16400, 65536], Some(1024), 1),
            MIN_INTERVAL
        );
    }

    #[test]
    fn without_rings_the_interval_grows_to_the_maximum() {
        let t0 = Instant::now();
        let mut a = Adaptive::default();
        let mut interval = MIN_INTERVAL;
        for i in 0..10 {
            interval = a.next(interval, t0 + Duration::from_millis(10 * i), &[], None, 0);
        }
        assert_eq!(interval, MAX_INTERVAL);
    }
}

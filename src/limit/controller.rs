//! The controller thread and the limiter's public face (see the module docs of `limit`).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::quota::Quota;
use super::reference::{self, Reference};
use super::throttle::{self, AutoConverge};
use super::{Decision, DutyCycle, LimitAlgo, Usage, MAX_LIMIT_MIBPS, MAX_RECHECK, MIN_LIMIT_MIBPS};
use crate::sched::{self, Policy};
use crate::sync::{Guard, Rounds, Shared, Worker};
use crate::tracking::{DirtyLog, Tracker};
use crate::units::{monotonic_ns, pages_to_mibps, PAGES_PER_MIB};
use crate::vm::vcpu::VcpuControl;

/// `SCHED_FIFO` priority of the controller: above the reaper (its kicks are its precision).
const CONTROLLER_PRIORITY: i32 = 20;
/// The penalty per second (`PenaltyInfo::ms_per_s`) is measured over this trailing window.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// One point of the time series per limited vCPU this often, to begin with.
const SERIES_EVERY: Duration = Duration::from_millis(250);
/// The most points the series keeps. When it is full, every other round of points is
/// dropped and the interval doubles: memory stays bounded for any run length and vCPU
/// count, and the series still spans the whole run, at a resolution that coarsens with it.
const MAX_SERIES_POINTS: usize = 1 << 16;
/// Starting guess of the kick-to-exit latency, seconds (measured here at about 0.1 ms).
const INITIAL_LATENCY: f64 = 0.0002;
/// The longest latency sample believed: 5-10 ms is what a vCPU waits for a busy core here.
const MAX_LATENCY: f64 = 0.02;
/// The longest penalty imposed at once, seconds: what any sane limit needs many times over,
/// and a bound on what an absurd one can do.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Why a limit or throttle request was refused. Texts follow QEMU where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// Per-vCPU limits need per-vCPU dirty rings.
    NeedsRing,
    /// The throttle needs some dirty tracking.
    NeedsTracking,
    /// No such vCPU.
    BadVcpu(u32),
    /// A limit outside [`MIN_LIMIT_MIBPS`, `MAX_LIMIT_MIBPS`] (use cancel to lift one).
    BadRate(String),
    /// A throttle percentage above 99.
    BadPercent(u8),
    /// The dirty limit and auto-converge exclude each other.
    Conflict,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::NeedsRing => f.write_str(
                "dirty page limit feature requires KVM with accelerator property \
                 'dirty-ring-size' set'",
            ),
            LimitError::NeedsTracking => {
                f.write_str("auto-converge needs dirty tracking (--dirty-log ring or bitmap)")
            }
            LimitError::BadVcpu(_) => f.write_str("incorrect cpu index specified"),
            LimitError::BadRate(text) => write!(
                f,
                "dirty limit {text} MiB/s is out of range [{MIN_LIMIT_MIBPS}, {MAX_LIMIT_MIBPS}]"
            ),
            LimitError::BadPercent(p) => {
                write!(f, "auto-converge percentage {p} is out of range [0, 99]")
            }
            LimitError::Conflict => f.write_str(
                "the dirty limit and auto-converge exclude each other; cancel one first",
            ),
        }
    }
}

impl std::error::Error for LimitError {}

/// A vCPU's limit, as queries show it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LimitInfo {
    /// vCPU id.
    pub vcpu: u32,
    /// The limit, MiB/s.
    pub limit_mibps: f64,
    /// Its dirty rate over the last second, MiB/s.
    pub current_mibps: f64,
    /// The algorithm.
    pub algo: LimitAlgo,
}

/// A vCPU's penalty counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PenaltyInfo {
    /// Time asleep under a penalty in the last second, ms.
    pub ms_per_s: f64,
    /// Time asleep under penalties in all, ms.
    pub ms_total: f64,
}

/// One point of the controller's time series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Seconds since the VM started.
    pub t_s: f64,
    /// vCPU id.
    pub vcpu: u32,
    /// Dirty rate over the last second, MiB/s (from harvested pages).
    pub rate_mibps: f64,
    /// The vCPU's limit, MiB/s (none under the throttle).
    pub limit_mibps: Option<f64>,
    /// Time asleep under a penalty since the previous point, ms.
    pub penalty_ms: f64,
    /// The auto-converge percentage, when the throttle is on.
    pub throttle_pct: Option<u8>,
}

/// The `dirty_limit` section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct LimitReport {
    /// Algorithm of limits set without naming one.
    pub algo: LimitAlgo,
    /// Scheduling policy the controller thread got (none if it never ran).
    pub policy: Option<&'static str>,
    /// The time series.
    pub series: Vec<SeriesPoint>,
}

/// The throttle's state, as queries show it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThrottleInfo {
    /// Current percentage, 0 = off.
    pub percent: u8,
    /// The VM rate it raises the percentage to get under, MiB/s.
    pub target_mibps: Option<f64>,
    /// The VM's dirty rate over the last second, MiB/s.
    pub current_mibps: f64,
}

enum Strategy {
    Quota(Quota),
    Reference(Reference),
}

struct Limit {
    mibps: f64,
    algo: LimitAlgo,
    strategy: Strategy,
}

/// A reading of one vCPU's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    harvested: u64,
    slept_ns: u64,
}

struct VcpuState {
    limit: Option<Limit>,
    duty: DutyCycle,
    last: Option<Sample>,
    /// Penalty time served at each round of the last second, for [`PenaltyInfo::ms_per_s`].
    slept: VecDeque<(Instant, u64)>,
    asleep_until: Option<Instant>,
    next_check: Instant,
    /// Kick-to-exit latency estimate, seconds.
    latency: f64,
    /// When the controller last kicked it while it was in the guest, and its exit count then.
    kicked: Option<(u64, u64)>,
    series_slept_ns: u64,
}

struct Throttle {
    state: AutoConverge,
    period_start: Option<Sample>,
}

struct State {
    vcpus: Vec<VcpuState>,
    throttle: Option<Throttle>,
    reference: reference::Shared,
    /// The reference algorithm's measurement period, seconds.
    reference_period: f64,
    /// `None` until the thread has asked for `SCHED_FIFO`.
    policy: Option<Policy>,
    series: Vec<SeriesPoint>,
    series_every: Duration,
    next_series: Instant,
}

impl Rounds for State {
    /// The controller runs while any limit or the throttle is in force.
    fn active(&self) -> bool {
        self.throttle.is_some() || self.vcpus.iter().any(|v| v.limit.is_some())
    }

    fn next_round(&self) -> Option<Instant> {
        let checks = self.vcpus.iter().map(|v| v.next_check);
        Some(checks.fold(self.next_series, Instant::min))
    }
}

/// What the controller works on besides its state.
struct Context {
    tracker: Arc<Tracker>,
    vcpus: Vec<Arc<VcpuControl>>,
    started: Instant,
}

/// The dirty limiter of one VM.
pub struct DirtyLimiter {
    context: Arc<Context>,
    default_algo: LimitAlgo,
    worker: Worker<State>,
}

impl fmt::Debug for DirtyLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLimiter")
            .field("default_algo", &self.default_algo)
            .finish_non_exhaustive()
    }
}

impl DirtyLimiter {
    /// A limiter over `vcpus`, fed by `tracker`; `default_algo` limits vCPUs whose limit
    /// names none; `started` is the VM's start, the origin of the series' time.
    pub fn new(
        tracker: Arc<Tracker>,
        vcpus: Vec<Arc<VcpuControl>>,
        default_algo: LimitAlgo,
        started: Instant,
    ) -> DirtyLimiter {
        let now = Instant::now();
        let ring_entries = tracker.ring_entries().unwrap_or(0);
        let states = vcpus
            .iter()
            .map(|_| VcpuState {
                limit: None,
                duty: DutyCycle::default(),
                last: None,
                slept: VecDeque::new(),
                asleep_until: None,
                next_check: now,
                latency: INITIAL_LATENCY,
                kicked: None,
                series_slept_ns: 0,
            })
            .collect();
        let context = Arc::new(Context {
            tracker,
            vcpus,
            started,
        });
        let state = State {
            vcpus: states,
            throttle: None,
            reference: reference::Shared::new(ring_entries),
            reference_period: reference::PERIOD,
            policy: None,
            series: Vec::new(),
            series_every: SERIES_EVERY,
            next_series: now,
        };
        let round_context = context.clone();
        DirtyLimiter {
            context,
            default_algo,
            worker: Worker::new("dirtylimit", state, move |shared, state| {
                round(&round_context, shared, state)
            }),
        }
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.context.vcpus.len() as u32
    }

    fn check_vcpu(&self, vcpu: Option<u32>) -> Result<Vec<usize>, LimitError> {
        match vcpu {
            Some(id) if id >= self.vcpus() => Err(LimitError::BadVcpu(id)),
            Some(id) => Ok(vec![id as usize]),
            None => Ok((0..self.context.vcpus.len()).collect()),
        }
    }

    /// Limits `vcpu` (or every vCPU) to `mibps` MiB/s with `algo` (or the default).
    pub fn set_limit(
        &self,
        vcpu: Option<u32>,
        mibps: f64,
        algo: Option<LimitAlgo>,
    ) -> Result<(), LimitError> {
        if self.context.tracker.log() != DirtyLog::Ring {
            return Err(LimitError::NeedsRing);
        }
        check_rate(mibps)?;
        let ids = self.check_vcpu(vcpu)?;
        let algo = algo.unwrap_or(self.default_algo);
        let mut state = self.worker.lock();
        if state.throttle.is_some() {
            return Err(LimitError::Conflict);
        }
        let period = state.reference_period;
        for id in ids {
            let v = &mut state.vcpus[id];
            match (&mut v.limit, algo) {
                // Changing a quota keeps its debt or credit.
                (Some(limit), LimitAlgo::Quota) if limit.algo == LimitAlgo::Quota => {
                    if let Strategy::Quota(q) = &mut limit.strategy {
                        q.set_limit(mibps * PAGES_PER_MIB);
                    }
                    limit.mibps = mibps;
                }
                _ => {
                    let strategy = match algo {
                        LimitAlgo::Quota => Strategy::Quota(Quota::new(mibps * PAGES_PER_MIB)),
                        LimitAlgo::Reference => {
                            Strategy::Reference(Reference::new(mibps as u64, period))
                        }
                    };
                    v.limit = Some(Limit {
                        mibps,
                        algo,
                        strategy,
                    });
                }
            }
        }
        self.wake(state);
        Ok(())
    }

    /// Removes the limit of `vcpu` (or every vCPU) and its penalty at once.
    pub fn cancel(&self, vcpu: Option<u32>) -> Result<(), LimitError> {
        let ids = self.check_vcpu(vcpu)?;
        let mut state = self.worker.lock();
        for id in ids {
            state.vcpus[id].limit = None;
            self.release(&mut state, id);
        }
        self.wake(state);
        Ok(())
    }

    /// Sets the auto-converge throttle: `Some(target)` raises the percentage step by step
    /// until the VM's dirty rate is under `target` MiB/s.
    pub fn set_auto_converge(&self, target_mibps: f64) -> Result<(), LimitError> {
        check_rate(target_mibps)?;
        self.set_throttle(AutoConverge {
            percent: 0,
            target_mibps: Some(target_mibps),
        })
    }

    /// Sets the throttle to a fixed percentage (0 turns it off).
    pub fn set_throttle_percent(&self, percent: u8) -> Result<(), LimitError> {
        if percent > throttle::MAX_PCT {
            return Err(LimitError::BadPercent(percent));
        }
        if percent == 0 {
            let mut state = self.worker.lock();
            state.throttle = None;
            for id in 0..state.vcpus.len() {
                self.release(&mut state, id);
            }
            self.wake(state);
            return Ok(());
        }
        self.set_throttle(AutoConverge {
            percent,
            target_mibps: None,
        })
    }

    fn set_throttle(&self, throttle: AutoConverge) -> Result<(), LimitError> {
        if self.context.tracker.log() == DirtyLog::None {
            return Err(LimitError::NeedsTracking);
        }
        let mut state = self.worker.lock();
        if state.vcpus.iter().any(|v| v.limit.is_some()) {
            return Err(LimitError::Conflict);
        }
        state.throttle = Some(Throttle {
            state: throttle,
            period_start: None,
        });
        self.wake(state);
        Ok(())
    }

    /// Lifts vCPU `id`'s penalty and wakes it.
    fn release(&self, state: &mut State, id: usize) {
        let v = &mut state.vcpus[id];
        v.asleep_until = None;
        v.duty = DutyCycle::default();
        let control = &self.context.vcpus[id];
        control.penalty.clear();
        control.kick();
    }

    /// Has the controller look again at once, starting its thread if it is not running.
    fn wake(&self, state: Guard<'_, State>) {
        if let Err(e) = self.worker.wake(state) {
            crate::console::message(
                "error",
                format_args!("cannot start the dirty-limit controller: {e}"),
            );
        }
    }

    /// Sets the reference algorithm's measurement period (QEMU's `x-vcpu-dirty-limit-period`
    /// during a dirty-limit migration, 1 s otherwise), for its limits now and later.
    pub fn set_reference_period(&self, period: Duration) {
        let mut state = self.worker.lock();
        state.reference_period = period.as_secs_f64();
        for v in &mut state.vcpus {
            if let Some(Limit {
                strategy: Strategy::Reference(r),
                ..
            }) = &mut v.limit
            {
                r.set_period(period.as_secs_f64());
            }
        }
    }

    /// What a dirty-limit migration reports of the limiter, in QEMU's terms, µs:
    /// `dirty-limit-throttle-time-per-round` and `dirty-limit-ring-full-time`. For the
    /// reference algorithm, QEMU's definitions: the largest sleep per ring-full of any vCPU,
    /// and the time the ring takes to fill at the mean dirty rate of the running vCPUs (the
    /// reference's process-wide maximum rate, updated by it, as QEMU's is). The quota
    /// controller has no sleep per ring-full: its round is a second, so the first is the
    /// most penalty time any limited vCPU served in the last second; the second is the time
    /// the ring takes to fill at the running vCPUs' mean dirty rate now. Both 0 without rings
    /// or without a dirtying vCPU.
    pub fn migration_view(&self) -> (u64, u64) {
        let estimates = self.context.tracker.rate_estimates();
        let running: Vec<f64> = self
            .context
            .vcpus
            .iter()
            .zip(&estimates)
            .filter(|(control, _)| !control.paused())
            .map(|(_, e)| e.trailing_mibps)
            .collect();
        let mean_mibps = match running.len() {
            0 => 0.0,
            n => running.iter().sum::<f64>() / n as f64,
        };
        let penalties: Vec<f64> = (0..self.vcpus())
            .map(|id| self.penalty(id).ms_per_s)
            .collect();
        let mut state = self.worker.lock();
        let reference = state.vcpus.iter().any(|v| {
            matches!(
                v.limit,
                Some(Limit {
                    strategy: Strategy::Reference(_),
                    ..
                })
            )
        });
        if reference {
            let throttle = state
                .vcpus
                .iter()
                .filter_map(|v| match &v.limit {
                    Some(Limit {
                        strategy: Strategy::Reference(r),
                        ..
                    }) => Some(r.throttle_us().max(0) as u64),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let ring_full = match mean_mibps as u64 {
                0 => 0,
                rate => state.reference.ring_full_time_us(rate),
            };
            return (throttle, ring_full);
        }
        let throttle = state
            .vcpus
            .iter()
            .zip(&penalties)
            .filter(|(v, _)| v.limit.is_some())
            .map(|(_, ms)| (ms * 1000.0) as u64)
            .max()
            .unwrap_or(0);
        let ring_bytes = f64::from(self.context.tracker.ring_entries().unwrap_or(0)) * 4096.0;
        let ring_full = if mean_mibps > 0.0 {
            (ring_bytes / (mean_mibps * (1u64 << 20) as f64) * 1e6) as u64
        } else {
            0
        };
        (throttle, ring_full)
    }

    /// Limited vCPUs with their current rates (the tracker's trailing estimates).
    pub fn limits(&self) -> Vec<LimitInfo> {
        let estimates = self.context.tracker.rate_estimates();
        let state = self.worker.lock();
        state
            .vcpus
            .iter()
            .enumerate()
            .filter_map(|(id, v)| {
                v.limit.as_ref().map(|l| LimitInfo {
                    vcpu: id as u32,
                    limit_mibps: l.mibps,
                    current_mibps: estimates[id].trailing_mibps,
                    algo: l.algo,
                })
            })
            .collect()
    }

    /// vCPU `id`'s penalty counters.
    pub fn penalty(&self, id: u32) -> PenaltyInfo {
        let control = &self.context.vcpus[id as usize];
        let now_ns = monotonic_ns();
        let total = control.penalty_ns(now_ns);
        let state = self.worker.lock();
        let window_start = state.vcpus[id as usize]
            .slept
            .front()
            .map_or(total, |&(_, slept_ns)| slept_ns);
        PenaltyInfo {
            ms_per_s: (total - window_start.min(total)) as f64 / 1e6,
            ms_total: total as f64 / 1e6,
        }
    }

    /// The throttle's state, if it is on.
    pub fn throttle(&self) -> Option<ThrottleInfo> {
        let estimates = self.context.tracker.rate_estimates();
        let state = self.worker.lock();
        state.throttle.as_ref().map(|t| ThrottleInfo {
            percent: t.state.percent,
            target_mibps: t.state.target_mibps,
            current_mibps: estimates.iter().map(|e| e.trailing_mibps).sum(),
        })
    }

    /// The report section.
    pub fn report(&self) -> LimitReport {
        let state = self.worker.lock();
        LimitReport {
            algo: self.default_algo,
            policy: state.policy.map(Policy::name),
            series: state.series.clone(),
        }
    }

    /// Stops the controller thread for good and lifts every penalty.
    pub fn shut_down(&self) {
        self.worker.stop();
        for control in &self.context.vcpus {
            control.penalty.clear();
        }
    }
}

fn check_rate(mibps: f64) -> Result<(), LimitError> {
    if (MIN_LIMIT_MIBPS..=MAX_LIMIT_MIBPS).contains(&mibps) {
        Ok(())
    } else {
        Err(LimitError::BadRate(mibps.to_string()))
    }
}

/// Seconds a strategy asked for as a duration of at most [`MAX_SLEEP`]; NaN and negative
/// numbers are no time at all. No number a strategy computes can panic the controller.
fn seconds_to_duration(seconds: f64) -> Duration {
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) => duration.min(MAX_SLEEP),
        Err(_) if seconds > 0.0 => MAX_SLEEP,
        Err(_) => Duration::ZERO,
    }
}

/// One round of the controller thread: PREPARE (a reap: exact counts up to now), then
/// CALCULATE and SET PENALTY.
fn round<'a>(
    context: &Context,
    shared: &'a Shared<State>,
    mut state: Guard<'a, State>,
) -> Guard<'a, State> {
    if state.policy.is_none() {
        let (policy, refused) = sched::try_fifo(CONTROLLER_PRIORITY);
        if let Some(e) = refused {
            warn!(
                "the dirty-limit controller runs at normal priority \
                 (SCHED_FIFO refused: {e}); its kicks may come late"
            );
        }
        state.policy = Some(policy);
    }
    drop(state);
    // A failing reap stops the VM through the reaper or the vCPU that hits it; here it only
    // means stale counts for one round.
    let _ = context.tracker.reap();
    let mut state = shared.lock();
    control_round(context, &mut state);
    state
}

/// CALCULATE and SET PENALTY for every vCPU, plus the throttle's period and the series.
fn control_round(context: &Context, state: &mut State) {
    let now = Instant::now();
    let now_ns = monotonic_ns();
    let State {
        vcpus,
        throttle,
        reference,
        ..
    } = state;
    let throttled = throttle.as_ref().map(|t| t.state);
    for (id, v) in vcpus.iter_mut().enumerate() {
        let control = &context.vcpus[id];
        let sample = Sample {
            at: now,
            harvested: context.tracker.vcpu(id as u32).snapshot().harvested,
            slept_ns: control.penalty_ns(now_ns),
        };
        let usage = v.last.map_or(Usage::default(), |last| {
            let elapsed = (now - last.at).as_secs_f64();
            let slept = (sample.slept_ns - last.slept_ns) as f64 / 1e9;
            Usage {
                elapsed,
                ran: (elapsed - slept).max(0.0),
                dirtied: (sample.harvested - last.harvested) as f64,
            }
        });
        v.last = Some(sample);
        v.slept.push_back((now, sample.slept_ns));
        while v
            .slept
            .front()
            .is_some_and(|&(at, _)| now - at > RATE_WINDOW)
        {
            v.slept.pop_front();
        }
        if let Some((kicked_ns, exits)) = v.kicked {
            if control.exits_taken() != exits {
                let seconds = control.last_exit_ns().saturating_sub(kicked_ns) as f64 / 1e9;
                v.latency += 0.2 * (seconds.min(MAX_LATENCY) - v.latency);
                v.kicked = None;
            }
        }
        let asleep_for = v.asleep_until.map_or(0.0, |until| {
            until.saturating_duration_since(now).as_secs_f64()
        });
        let decision = match (&mut v.limit, throttled) {
            (Some(limit), _) => match &mut limit.strategy {
                Strategy::Quota(q) => q.step(usage, asleep_for, v.latency),
                Strategy::Reference(r) => r.step(reference, usage, asleep_for),
            },
            (None, Some(t)) => {
                v.duty
                    .step(throttle::TIMESLICE, t.sleep_per_slice(), usage, asleep_for)
            }
            (None, None) => Decision::Run {
                recheck_in: MAX_RECHECK,
            },
        };
        match decision {
            Decision::Sleep(seconds) => {
                let sleep = seconds_to_duration(seconds);
                v.asleep_until = Some(now + sleep);
                // Strategies may re-time a sleep while it runs (`Decision::Resleep`).
                v.next_check = now + sleep.min(Duration::from_secs_f64(MAX_RECHECK));
                control.penalty.impose(now_ns + sleep.as_nanos() as u64);
                // Only a kick that finds the vCPU in the guest measures how long it takes to
                // leave it; one that finds it asleep would measure the sleep.
                v.kicked = control
                    .in_guest()
                    .then(|| (monotonic_ns(), control.exits_taken()));
                control.kick();
            }
            Decision::Resleep { left, recheck_in } => {
                let left = seconds_to_duration(left);
                if let Some(until) = v.asleep_until.filter(|&until| until != now + left) {
                    v.asleep_until = Some(now + left);
                    control.penalty.impose(now_ns + left.as_nanos() as u64);
                    if now + left < until {
                        // A later deadline needs no wakeup: the vCPU re-reads it when it
                        // wakes for the old one.
                        control.wake();
                    }
                }
                v.next_check =
                    now + seconds_to_duration(recheck_in).max(Duration::from_micros(100));
            }
            Decision::Run { recheck_in } => {
                v.next_check =
                    now + seconds_to_duration(recheck_in).max(Duration::from_micros(100));
            }
        }
    }
    if let Some(t) = throttle {
        let vm = Sample {
            at: now,
            harvested: context.tracker.harvested(),
            slept_ns: 0,
        };
        match t.period_start {
            Some(start) if (now - start.at).as_secs_f64() >= throttle::PERIOD => {
                let rate = pages_to_mibps(
                    vm.harvested - start.harvested,
                    (now - start.at).as_secs_f64(),
                );
                t.state.evaluate(rate);
                t.period_start = Some(vm);
            }
            None => t.period_start = Some(vm),
            Some(_) => {}
        }
    }
    if now >= state.next_series {
        record_series(context, state, now, now_ns);
        if state.series.len() > MAX_SERIES_POINTS {
            thin_out(&mut state.series);
            state.series_every *= 2;
        }
        state.next_series = now + state.series_every;
    }
}

/// Drops every other round of points (a round: the points recorded at one time).
fn thin_out(series: &mut Vec<SeriesPoint>) {
    let mut round = 0;
    let mut last_t = None;
    series.retain(|p| {
        if last_t.is_some_and(|t| t != p.t_s) {
            round += 1;
        }
        last_t = Some(p.t_s);
        round % 2 == 0
    });
}

fn record_series(context: &Context, state: &mut State, now: Instant, now_ns: u64) {
    let t_s = (now - context.started).as_secs_f64();
    let estimates = context.tracker.rate_estimates();
    let throttle_pct = state.throttle.as_ref().map(|t| t.state.percent);
    for (id, v) in state.vcpus.iter_mut().enumerate() {
        let slept = context.vcpus[id].penalty_ns(now_ns);
        let penalty_ms = (slept - v.series_slept_ns.min(slept)) as f64 / 1e6;
        v.series_slept_ns = slept;
        if v.limit.is_none() && throttle_pct.is_none() {
            continue;
        }
        state.series.push(SeriesPoint {
            t_s,
            vcpu: id as u32,
            rate_mibps: estimates[id].trailing_mibps,
            limit_mibps: v.limit.as_ref().map(|l| l.mibps),
            penalty_ms,
            throttle_pct,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_number_a_strategy_computes_panics_the_sleep() {
        assert_eq!(seconds_to_duration(0.25), Duration::from_millis(250));
        assert_eq!(seconds_to_duration(-1.0), Duration::ZERO);
        assert_eq!(seconds_to_duration(f64::NAN), Duration::ZERO);
        assert_eq!(seconds_to_duration(f64::NEG_INFINITY), Duration::ZERO);
        // 1e20 s would overflow a Duration (and panic `from_secs_f64`): the longest sleep.
        assert_eq!(seconds_to_duration(1e20), MAX_SLEEP);
        assert_eq!(seconds_to_duration(f64::INFINITY), MAX_SLEEP);
        assert_eq!(seconds_to_duration(3600.0), MAX_SLEEP);
    }

    #[test]
    fn the_series_stays_bounded_and_spans_the_run() {
        // 1024 limited vCPUs recorded every 250 ms for an hour, with the thinning the
        // controller does.
        let mut series = Vec::new();
        let mut every = SERIES_EVERY;
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(3600) {
            series.extend((0..1024).map(|vcpu| SeriesPoint {
                t_s: t.as_secs_f64(),
                vcpu,
                rate_mibps: 1.0,
                limit_mibps: Some(1.0),
                penalty_ms: 0.0,
                throttle_pct: None,
            }));
            if series.len() > MAX_SERIES_POINTS {
                thin_out(&mut series);
                every *= 2;
            }
            t += every;
        }
        assert!(series.len() <= MAX_SERIES_POINTS, "{} points", series.len());
        assert_eq!(series[0].t_s, 0.0);
        let last = series.last().unwrap().t_s;
        assert!(last > 3000.0, "the series ends at {last} s");
        // Whole rounds are kept: every vCPU at every time that is kept.
        assert_eq!(series.len() % 1024, 0);
        assert!(series.chunks(1024).all(|round| round
            .iter()
            .enumerate()
            .all(|(i, p)| p.vcpu == i as u32 && p.t_s == round[0].t_s)));
    }
}

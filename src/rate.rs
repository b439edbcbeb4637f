//! Dirty-rate measurement in the three reference modes.
//!
//! All modes count *distinct pages first dirtied in the window* (docs/reference.md#dirty-rate-measurement-calc-dirty-rate: "page
//! dirtying is a one-time event"), in MiB/s, and every result carries the ground truth for
//! the same window, computed from the guests' own counters.
//!
//! - **page-sampling** hashes sampled pages of guest RAM at the start and end of the window
//!   (XXH64, seed 1, as QEMU since 8.1) and scales the fraction that changed. It needs no
//!   dirty tracking and never stops a vCPU. QEMU draws its samples uniformly at random with
//!   repeats; dirtyvm draws one page at random from each of `n` equal strata of RAM, which
//!   cannot repeat a page and cannot leave a region unsampled, so an estimate's error is
//!   about one stratum per working-set boundary instead of binomial noise over the whole VM.
//! - **dirty-bitmap** and **dirty-ring** open a window in the tracker (after a flush, so no
//!   write from before it is counted), let the reaper work as usual, flush again and count the
//!   distinct pages harvested in between: per vCPU with rings, for the VM with the bitmap.
//!   Counting distinct pages, rather than ring entries, keeps the result independent of how
//!   often the reaper resets the rings (the reference's dirty-ring mode reads higher when
//!   resets are more frequent, pitfall 18).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::sync::{Rounds, Shared, Worker};
use crate::tracking::{DirtyLog, Tracker};
use crate::units::pages_to_mibps;
use crate::units::PAGE_SIZE;
use crate::vm::guest::{GuestStats, Layout};
use crate::vm::kvm::GuestMemory;
use crate::vm::vcpu::{kick_and_wait, VcpuControl};

/// Shortest measurement window, ms (QEMU's range).
pub const MIN_CALC_TIME_MS: u64 = 50;
/// Longest measurement window, ms.
pub const MAX_CALC_TIME_MS: u64 = 60_000;
/// Sampled pages per GiB of RAM, by default.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;
/// Fewest sampled pages per GiB.
pub const MIN_SAMPLE_PAGES: u64 = 128;
/// Most sampled pages per GiB.
pub const MAX_SAMPLE_PAGES: u64 = 16384;

/// How a measurement counts dirtied pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateMode {
    /// Hash sampled pages before and after.
    PageSampling,
    /// Count pages harvested from the dirty rings, per vCPU.
    DirtyRing,
    /// Count pages from the dirty bitmap.
    DirtyBitmap,
}

impl RateMode {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            RateMode::PageSampling => "page-sampling",
            RateMode::DirtyRing => "dirty-ring",
            RateMode::DirtyBitmap => "dirty-bitmap",
        }
    }
}

impl fmt::Display for RateMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RateMode {
    type Err = String;

    fn from_str(text: &str) -> Result<RateMode, String> {
        [
            RateMode::PageSampling,
            RateMode::DirtyRing,
            RateMode::DirtyBitmap,
        ]
        .into_iter()
        .find(|m| m.name() == text)
        .ok_or_else(|| {
            format!(
                "dirty-rate mode '{text}' is not one of page-sampling, dirty-ring, dirty-bitmap"
            )
        })
    }
}

/// A measurement request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRequest {
    /// How to count.
    pub mode: RateMode,
    /// Window length, ms, in [`MIN_CALC_TIME_MS`, `MAX_CALC_TIME_MS`].
    pub calc_time_ms: u64,
    /// Sampled pages per GiB (page-sampling only), in [`MIN_SAMPLE_PAGES`, `MAX_SAMPLE_PAGES`].
    pub sample_pages: u64,
}

/// Why a measurement cannot start. The texts are QEMU's, so QMP clients see the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateError {
    /// One is running.
    AlreadyMeasuring,
    /// `calc_time_ms` out of range.
    CalcTimeOutOfRange,
    /// Sample pages out of range.
    SamplePagesOutOfRange,
    /// The VM's tracking cannot serve the mode.
    ModeNotEnabled(RateMode),
    /// The host would not start the measuring thread.
    NoThread(String),
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateError::AlreadyMeasuring => f.write_str("the dirty rate is already being measured."),
            RateError::CalcTimeOutOfRange => write!(
                f,
                "Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]."
            ),
            RateError::SamplePagesOutOfRange => write!(
                f,
                "sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]."
            ),
            RateError::ModeNotEnabled(mode) => {
                write!(f, "mode {mode} is not enabled, use other method instead.")
            }
            RateError::NoThread(e) => write!(f, "cannot start the measuring thread: {e}"),
        }
    }
}

impl std::error::Error for RateError {}

impl RateRequest {
    /// Checks the request against the limits and the VM's dirty tracking.
    pub fn check(&self, log: DirtyLog) -> Result<(), RateError> {
        if !(MIN_CALC_TIME_MS..=MAX_CALC_TIME_MS).contains(&self.calc_time_ms) {
            return Err(RateError::CalcTimeOutOfRange);
        }
        if !(MIN_SAMPLE_PAGES..=MAX_SAMPLE_PAGES).contains(&self.sample_pages) {
            return Err(RateError::SamplePagesOutOfRange);
        }
        let served = match self.mode {
            RateMode::PageSampling => true,
            RateMode::DirtyRing => log == DirtyLog::Ring,
            RateMode::DirtyBitmap => log == DirtyLog::Bitmap,
        };
        if served {
            Ok(())
        } else {
            Err(RateError::ModeNotEnabled(self.mode))
        }
    }
}

/// A finished measurement, beside the ground truth of the same window.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// How it counted.
    pub mode: RateMode,
    /// Host wall-clock seconds at the start.
    pub start_time: i64,
    /// The window actually measured, ms.
    pub calc_time_ms: f64,
    /// Sampled pages per GiB (page-sampling), else 0.
    pub sample_pages: u64,
    /// The VM's dirty rate, MiB/s.
    pub rate_mibps: f64,
    /// Per-vCPU rates, MiB/s (dirty-ring only).
    pub vcpu_rates_mibps: Option<Vec<f64>>,
    /// Ground truth: distinct pages the guests wrote in the window, MiB/s.
    pub truth_mibps: f64,
    /// Ground truth per vCPU, MiB/s.
    pub vcpu_truth_mibps: Vec<f64>,
}

impl fmt::Display for Measurement {
    /// `dirty rate (MODE, MS ms): RATE MiB/s, truth TRUTH MiB/s, error E%`, then the per-vCPU
    /// rates beside their truths when the mode has them (vCPUs with both at 0 left out).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dirty rate ({}, {:.0} ms): {:.1} MiB/s, truth {:.1} MiB/s, error ",
            self.mode, self.calc_time_ms, self.rate_mibps, self.truth_mibps
        )?;
        if self.truth_mibps > 0.0 {
            write!(
                f,
                "{:+.1}%",
                (self.rate_mibps - self.truth_mibps) / self.truth_mibps * 100.0
            )?;
        } else {
            f.write_str("n/a")?;
        }
        if let Some(rates) = &self.vcpu_rates_mibps {
            let pairs = rates.iter().zip(&self.vcpu_truth_mibps).enumerate();
            let mut quiet = 0;
            for (id, (rate, truth)) in pairs {
                if *rate == 0.0 && *truth == 0.0 {
                    quiet += 1;
                } else {
                    write!(f, "; vCPU {id} {rate:.1} (truth {truth:.1})")?;
                }
            }
            if quiet > 0 {
                write!(f, "; {quiet} more vCPUs 0.0 (truth 0.0)")?;
            }
        }
        Ok(())
    }
}

/// Where a measurement is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateStatus {
    /// Nothing measured yet.
    Unstarted,
    /// A measurement is running.
    Measuring,
    /// The last measurement is done.
    Measured,
}

impl RateStatus {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            RateStatus::Unstarted => "unstarted",
            RateStatus::Measuring => "measuring",
            RateStatus::Measured => "measured",
        }
    }
}

/// The meter's state, as `query-dirty-rate` shows it.
#[derive(Debug, Clone)]
pub struct RateState {
    /// Status.
    pub status: RateStatus,
    /// The last request, if any.
    pub request: Option<RateRequest>,
    /// Host wall-clock seconds at the start of the current or last measurement.
    pub start_time: i64,
    /// The last finished measurement.
    pub last: Option<Measurement>,
}

/// What a measurement reads: guest RAM, the guests' counters, the tracker, the vCPUs.
#[derive(Debug, Clone)]
pub struct RateSources {
    /// Guest RAM.
    pub ram: GuestMemory,
    /// The system slot, where the guests' counters live.
    pub system: GuestMemory,
    /// The guest layout (working sets).
    pub layout: Layout,
    /// The dirty tracker.
    pub tracker: Arc<Tracker>,
    /// The vCPUs, kicked to flush hardware dirty buffers.
    pub vcpus: Vec<Arc<VcpuControl>>,
}

#[derive(Debug)]
struct MeterState {
    rate: RateState,
}

impl Rounds for MeterState {
    /// The thread lives for one measurement.
    fn active(&self) -> bool {
        self.rate.status == RateStatus::Measuring
    }

    fn next_round(&self) -> Option<Instant> {
        Some(Instant::now())
    }
}

/// Runs one measurement at a time on its own thread.
#[derive(Debug)]
pub struct DirtyRateMeter {
    sources: Arc<RateSources>,
    worker: Worker<MeterState>,
}

impl DirtyRateMeter {
    /// A meter over `sources`.
    pub fn new(sources: RateSources) -> DirtyRateMeter {
        let sources = Arc::new(sources);
        let state = MeterState {
            rate: RateState {
                status: RateStatus::Unstarted,
                request: None,
                start_time: 0,
                last: None,
            },
        };
        let measuring = sources.clone();
        DirtyRateMeter {
            sources,
            worker: Worker::new("dirtyrate", state, move |shared, state| {
                let request = state.rate.request.expect("a measurement has a request");
                drop(state);
                let measurement = measure(&measuring, shared, request);
                let mut state = shared.lock();
                state.rate.status = RateStatus::Measured;
                state.rate.last = measurement;
                shared.notify();
                state
            }),
        }
    }

    /// Starts a measurement; refuses while one runs or when the request is invalid.
    pub fn start(&self, request: RateRequest) -> Result<(), RateError> {
        let mut state = self.worker.lock();
        if state.rate.status == RateStatus::Measuring {
            return Err(RateError::AlreadyMeasuring);
        }
        request.check(self.sources.tracker.log())?;
        state.rate.status = RateStatus::Measuring;
        state.rate.request = Some(request);
        // A measurement that ends without a result must not show the previous one's.
        state.rate.last = None;
        state.rate.start_time = wall_clock_seconds();
        self.worker.wake(state).map_err(|e| {
            self.worker.lock().rate.status = RateStatus::Unstarted;
            RateError::NoThread(e.to_string())
        })
    }

    /// The current state.
    pub fn state(&self) -> RateState {
        self.worker.lock().rate.clone()
    }

    /// Waits up to `timeout` for the running measurement to end; returns the state.
    pub fn wait(&self, timeout: Duration) -> RateState {
        let (state, _) = self
            .worker
            .shared()
            .wait_while(self.worker.lock(), Some(timeout), |s| {
                s.rate.status == RateStatus::Measuring
            });
        state.rate.clone()
    }

    /// Stops a running measurement (its result is dropped) and joins its thread; the meter
    /// measures nothing more.
    pub fn shut_down(&self) {
        self.worker.stop();
    }
}

fn wall_clock_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Sleeps `window` unless the meter is shut down first; false when it is.
fn sleep_window(shared: &Shared<MeterState>, window: Duration) -> bool {
    let (guard, stopping) = shared.wait_while(shared.lock(), Some(window), |_| true);
    drop(guard);
    !stopping
}

fn measure(
    sources: &RateSources,
    shared: &Shared<MeterState>,
    request: RateRequest,
) -> Option<Measurement> {
    let window = Duration::from_millis(request.calc_time_ms);
    let start_time = wall_clock_seconds();
    let (dirty, truth, elapsed) = match request.mode {
        RateMode::PageSampling => {
            let pages = sources.ram.len() as u64 / PAGE_SIZE;
            let samples = stratified_sample(pages, request.sample_pages, seed());
            let before: Vec<u64> = samples
                .iter()
                .map(|&p| hash_page(&sources.ram, p))
                .collect();
            let stats0 = stats(sources);
            let t0 = Instant::now();
            if !sleep_window(shared, window) {
                return None;
            }
            let changed = samples
                .iter()
                .zip(&before)
                .filter(|&(&p, &h)| hash_page(&sources.ram, p) != h)
                .count() as u64;
            let elapsed = t0.elapsed();
            let truth = truth_pages(&sources.layout, &stats0, &stats(sources));
            // Scale the changed fraction of samples to all of RAM.
            let dirty_pages = changed as f64 * pages as f64 / samples.len().max(1) as f64;
            (Dirty::Vm(dirty_pages), truth, elapsed)
        }
        RateMode::DirtyRing | RateMode::DirtyBitmap => {
            // The window runs from the end of the reap that opens it to the start of the one
            // that closes it, and the truth is read at both ends, however long those reaps
            // take with many vCPUs.
            kick_and_wait(&sources.vcpus);
            let opened = sources.tracker.open_window().ok()?;
            let stats0 = stats(sources);
            let completed = sleep_window(shared, window.saturating_sub(opened.elapsed()));
            kick_and_wait(&sources.vcpus);
            let stats1 = stats(sources);
            let (counts, elapsed) = sources.tracker.close_window().ok()??;
            if !completed {
                return None;
            }
            let truth = truth_pages(&sources.layout, &stats0, &stats1);
            let dirty = match request.mode {
                RateMode::DirtyRing => Dirty::PerVcpu(counts),
                _ => Dirty::Vm(counts.iter().sum::<u64>() as f64),
            };
            (dirty, truth, elapsed)
        }
    };
    let secs = elapsed.as_secs_f64();
    let (rate_mibps, vcpu_rates_mibps) = match dirty {
        Dirty::Vm(pages) => (pages * PAGE_SIZE as f64 / f64::from(1 << 20) / secs, None),
        Dirty::PerVcpu(counts) => {
            let rates: Vec<f64> = counts.iter().map(|&c| pages_to_mibps(c, secs)).collect();
            (rates.iter().sum(), Some(rates))
        }
    };
    let vcpu_truth_mibps: Vec<f64> = truth.iter().map(|&t| pages_to_mibps(t, secs)).collect();
    Some(Measurement {
        mode: request.mode,
        start_time,
        calc_time_ms: secs * 1e3,
        sample_pages: match request.mode {
            RateMode::PageSampling => request.sample_pages,
            _ => 0,
        },
        rate_mibps,
        vcpu_rates_mibps,
        truth_mibps: vcpu_truth_mibps.iter().sum(),
        vcpu_truth_mibps,
    })
}

enum Dirty {
    Vm(f64),
    PerVcpu(Vec<u64>),
}

fn stats(sources: &RateSources) -> Vec<GuestStats> {
    (0..sources.layout.vcpus().len() as u32)
        .map(|id| GuestStats::read(&sources.system, id))
        .collect()
}

/// Ground truth per vCPU: distinct pages written between two counter readings. Both
/// writers visit every page of their working set once per pass (the random one in a fixed
/// permutation), so `n` consecutive writes touch `min(n, pages)` distinct pages.
fn truth_pages(layout: &Layout, before: &[GuestStats], after: &[GuestStats]) -> Vec<u64> {
    layout
        .vcpus()
        .iter()
        .zip(before.iter().zip(after))
        .map(|(plan, (b, a))| {
            let writes = a.pages_written - b.pages_written;
            writes.min(plan.workload.pages())
        })
        .collect()
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1
}

/// One random page from each of `n = pages × per_gib / 2^18` equal strata (at least one).
fn stratified_sample(pages: u64, per_gib: u64, seed: u64) -> Vec<u64> {
    const PAGES_PER_GIB: u64 = (1 << 30) / PAGE_SIZE;
    let n = (pages * per_gib / PAGES_PER_GIB).clamp(1, pages);
    let mut rng = seed;
    (0..n)
        .map(|i| {
            let start = i * pages / n;
            let end = (i + 1) * pages / n;
            // xorshift64: plenty for choosing pages.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            start + rng % (end - start)
        })
        .collect()
}

// The page hash is public only for the `sampling` bench.
#[cfg(feature = "testing")]
pub use hash::hash_page;
#[cfg(not(feature = "testing"))]
use hash::hash_page;

mod hash {
    use crate::digest::{page_hash_of, PAGE_WORDS};
    use crate::vm::kvm::GuestMemory;

    /// XXH64 (seed 1) of one guest page, read word by word while the guest may be writing it:
    /// what page-sampling mode computes for every sampled page, twice per measurement (public
    /// with the `testing` feature, for the `sampling` bench).
    ///
    /// # Panics
    /// If `page` is not a page of `ram`.
    pub fn hash_page(ram: &GuestMemory, page: u64) -> u64 {
        page_hash_of(&ram.words()[page as usize * PAGE_WORDS..][..PAGE_WORDS])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strata_cover_memory_without_repeats() {
        let pages = 65536; // 256 MiB
        let sample = stratified_sample(pages, 512, 42);
        assert_eq!(sample.len(), 128);
        for (i, &p) in sample.iter().enumerate() {
            assert!((i as u64 * 512..(i as u64 + 1) * 512).contains(&p));
        }
        assert_eq!(stratified_sample(10, 128, 1).len(), 1);
        assert_eq!(stratified_sample(1 << 18, 16384, 7).len(), 16384);
    }

    #[test]
    fn requests_are_checked_with_qemu_texts() {
        let ok = RateRequest {
            mode: RateMode::DirtyRing,
            calc_time_ms: 1000,
            sample_pages: DEFAULT_SAMPLE_PAGES,
        };
        assert_eq!(ok.check(DirtyLog::Ring), Ok(()));
        let e = ok.check(DirtyLog::Bitmap).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mode dirty-ring is not enabled, use other method instead."
        );
        let bitmap = RateRequest {
            mode: RateMode::DirtyBitmap,
            ..ok
        };
        assert!(bitmap.check(DirtyLog::Ring).is_err());
        assert_eq!(bitmap.check(DirtyLog::Bitmap), Ok(()));
        let short = RateRequest {
            calc_time_ms: 49,
            ..ok
        };
        assert_eq!(
            short.check(DirtyLog::Ring).unwrap_err().to_string(),
            "Calculation time is out of range [50ms, 60000ms]."
        );
        let few = RateRequest {
            sample_pages: 127,
            ..ok
        };
        assert_eq!(
            few.check(DirtyLog::Ring).unwrap_err().to_string(),
            "sample-pages is out of range[128, 16384]."
        );
        let sampling = RateRequest {
            mode: RateMode::PageSampling,
            ..ok
        };
        assert_eq!(sampling.check(DirtyLog::None), Ok(()));
        assert_eq!("dirty-bitmap".parse(), Ok(RateMode::DirtyBitmap));
        assert!("ring".parse::<RateMode>().unwrap_err().contains("'ring'"));
    }
}

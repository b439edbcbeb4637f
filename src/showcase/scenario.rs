//! Benchmark scenarios on real KVM, judged against the guests' own counters: dirty-rate
//! accuracy in every mode, and dirty-limit convergence with a reader beside the writer.
//! `benches/scenarios.rs` runs them in full and prints the tables; the demo runs a short
//! version.

use std::fmt;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::limit::LimitAlgo;
use crate::rate::{RateMode, RateRequest, RateStatus};
use crate::tracking::DirtyLog;
use crate::units::pages_to_mibps;
use crate::vm::guest::{GuestStats, Workload};
use crate::vmm::{Machine, VmConfig, VmmError};

/// How often convergence samples the writer's ground truth.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The window a ground-truth rate is averaged over.
const RATE_WINDOW: usize = 10; // samples: 1 s, the reference controller's period
/// "Within the limit" means within this fraction of it.
const BAND: f64 = 0.10;

/// Boots a VM and waits until every writer has finished one pass: the first pass pays for
/// the host's page faults and is not the workload's steady state.
pub fn boot_warm(config: &VmConfig) -> Result<Machine, VmmError> {
    let machine = Machine::boot(config)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let cold = |m: &Machine| {
        m.guest_stats()
            .iter()
            .zip(m.layout().vcpus())
            .any(|(s, plan)| {
                plan.workload.writes() && s.passes == 0 && s.pages_written < plan.workload.pages()
            })
    };
    while cold(&machine) && machine.stop_request().reason().is_none() && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    Ok(machine)
}

/// Ground-truth MiB/s per vCPU over `window`: (written, read).
pub fn truth_rates(machine: &Machine, window: Duration) -> Vec<(f64, f64)> {
    let before = machine.guest_stats();
    let start = Instant::now();
    sleep(window);
    rates_between(
        &before,
        &machine.guest_stats(),
        start.elapsed().as_secs_f64(),
    )
}

fn rates_between(before: &[GuestStats], after: &[GuestStats], secs: f64) -> Vec<(f64, f64)> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            (
                pages_to_mibps(a.pages_written - b.pages_written, secs),
                pages_to_mibps(a.pages_read - b.pages_read, secs),
            )
        })
        .collect()
}

/// One row of the accuracy table.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyRow {
    /// The writer's workload.
    pub workload: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// How the rate was measured.
    pub mode: RateMode,
    /// Mean ground truth over the measurements, MiB/s.
    pub truth_mibps: f64,
    /// Mean measured rate, MiB/s.
    pub measured_mibps: f64,
    /// Largest relative error of one measurement, %.
    pub worst_error_pct: f64,
    /// The writer's page rate while measuring over its rate when not, %.
    pub writer_speed_pct: f64,
}

/// Measures `writer` (vCPU 0, with an idle vCPU 1 beside it) in every mode, `repeats` windows
/// of `calc_time_ms` each, with 16384 samples per GiB for page-sampling.
pub fn accuracy(
    writer: &str,
    memory: u64,
    calc_time_ms: u64,
    repeats: usize,
) -> Result<Vec<AccuracyRow>, VmmError> {
    let workload: Workload = writer
        .parse()
        .map_err(|e: crate::vm::guest::SpecError| VmmError::BadConfig(e.to_string()))?;
    let mut rows = Vec::new();
    for (log, modes) in [
        (
            DirtyLog::Ring,
            [RateMode::DirtyRing, RateMode::PageSampling].as_slice(),
        ),
        (DirtyLog::Bitmap, [RateMode::DirtyBitmap].as_slice()),
    ] {
        let config = VmConfig::new(2, memory, vec![workload]).with_dirty_log(log);
        let machine = boot_warm(&config)?;
        let idle_speed = truth_rates(&machine, Duration::from_millis(calc_time_ms))[0].0;
        for &mode in modes {
            let request = RateRequest {
                mode,
                calc_time_ms,
                sample_pages: 16384,
            };
            let (mut truth, mut measured, mut worst, mut speed) = (0.0, 0.0, 0.0f64, 0.0);
            for _ in 0..repeats {
                let before = machine.guest_stats();
                let start = Instant::now();
                machine
                    .rate_meter()
                    .start(request)
                    .map_err(|e| VmmError::BadConfig(e.to_string()))?;
                let state = machine
                    .rate_meter()
                    .wait(Duration::from_millis(calc_time_ms) * 3 + Duration::from_secs(5));
                let written = rates_between(
                    &before,
                    &machine.guest_stats(),
                    start.elapsed().as_secs_f64(),
                )[0]
                .0;
                let Some(m) = state.last.filter(|_| state.status == RateStatus::Measured) else {
                    continue;
                };
                truth += m.truth_mibps / repeats as f64;
                measured += m.rate_mibps / repeats as f64;
                worst = worst.max(relative_error(m.rate_mibps, m.truth_mibps).abs());
                speed += written / repeats as f64;
            }
            rows.push(AccuracyRow {
                workload: writer.to_string(),
                memory_mib: memory >> 20,
                mode,
                truth_mibps: truth,
                measured_mibps: measured,
                worst_error_pct: worst * 100.0,
                writer_speed_pct: if idle_speed > 0.0 {
                    speed / idle_speed * 100.0
                } else {
                    0.0
                },
            });
        }
        machine.shutdown()?;
    }
    Ok(rows)
}

fn relative_error(measured: f64, truth: f64) -> f64 {
    if truth > 0.0 {
        (measured - truth) / truth
    } else {
        measured
    }
}

/// One row of the convergence table.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergenceRow {
    /// `quota`, `reference` or `auto-converge`.
    pub controller: String,
    /// The limit, MiB/s.
    pub limit_mibps: f64,
    /// The writer's rate before the limit, MiB/s.
    pub free_mibps: f64,
    /// Seconds from setting the limit until the writer's rate (1 s windows) stays within
    /// ±10 % of it; `None` if it never did.
    pub converge_s: Option<f64>,
    /// Mean signed error after convergence (or over the whole run if none), %.
    pub mean_error_pct: f64,
    /// Mean absolute error after convergence, %.
    pub mean_abs_error_pct: f64,
    /// The reader's throughput over its throughput before, %, once the controller holds the
    /// writer at or under the limit (+10 %); over the last 2 s if it never does.
    pub reader_pct: f64,
    /// Whether the controller ever held the writer at or under the limit (+10 %).
    pub held: bool,
    /// Ring-full exits during the scenario.
    pub ring_full_exits: u64,
    /// Ring overflows detected during the scenario.
    pub ring_overflows: u64,
    /// The auto-converge percentage reached.
    pub throttle_pct: Option<u8>,
}

/// Which controller a convergence scenario uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// A per-vCPU limit with this algorithm.
    Limit(LimitAlgo),
    /// Auto-converge with the limit as the VM's target.
    AutoConverge,
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Controller::Limit(algo) => algo.fmt(f),
            Controller::AutoConverge => f.write_str("auto-converge"),
        }
    }
}

/// The ground-truth time series of one convergence run, for plots.
#[derive(Debug, Clone, Serialize)]
pub struct TracePoint {
    /// Seconds since the limit was set.
    pub t_s: f64,
    /// Writer's dirty rate (ground truth, 1 s window), MiB/s.
    pub writer_mibps: f64,
    /// Reader's throughput (ground truth, 1 s window), MiB/s.
    pub reader_mibps: f64,
}

/// One unpaced writer (vCPU 0, `write:64M`) and one reader (vCPU 1, `read:64M`): measure
/// both free for `warmup`, then put `controller` on at `limit` MiB/s for `run`, sampling the
/// ground truth every 100 ms. The reader is limited too (a limit on every vCPU), and must
/// not be slowed by it.
pub fn convergence(
    controller: Controller,
    limit: f64,
    ring_entries: Option<u32>,
    warmup: Duration,
    run: Duration,
) -> Result<(ConvergenceRow, Vec<TracePoint>), VmmError> {
    let workloads = vec![
        Workload::Write {
            bytes: 64 << 20,
            mibps: None,
        },
        Workload::Read { bytes: 64 << 20 },
    ];
    let mut config = VmConfig::new(2, 192 << 20, workloads).with_dirty_log(DirtyLog::Ring);
    config.ring_entries = ring_entries;
    let machine = boot_warm(&config)?;
    let free = truth_rates(&machine, warmup);
    let ring_full_before = ring_full_exits(&machine);
    let overflows_before = machine.tracker().ring_overflows();
    let set = match controller {
        Controller::Limit(algo) => machine.limiter().set_limit(None, limit, Some(algo)),
        Controller::AutoConverge => machine.limiter().set_auto_converge(limit),
    };
    set.map_err(|e| VmmError::BadConfig(e.to_string()))?;
    let start = Instant::now();
    let mut samples = vec![(0.0, machine.guest_stats())];
    while start.elapsed() < run {
        sleep(SAMPLE_EVERY);
        samples.push((start.elapsed().as_secs_f64(), machine.guest_stats()));
    }
    let throttle_pct = machine.limiter().throttle().map(|t| t.percent);
    let row_counters = (
        ring_full_exits(&machine) - ring_full_before,
        machine.tracker().ring_overflows() - overflows_before,
    );
    machine.shutdown()?;

    let trace: Vec<TracePoint> = samples
        .windows(RATE_WINDOW + 1)
        .map(|w| {
            let (t0, s0) = &w[0];
            let (t1, s1) = &w[RATE_WINDOW];
            let r = rates_between(s0, s1, t1 - t0);
            TracePoint {
                t_s: *t1,
                writer_mibps: r[0].0,
                reader_mibps: r[1].1,
            }
        })
        .collect();
    let within = |p: &TracePoint| relative_error(p.writer_mibps, limit).abs() <= BAND;
    // The first point from which the writer stays within the band to the end.
    let settled = trace.iter().rposition(|p| !within(p)).map_or(0, |i| i + 1);
    let converge_s = (settled < trace.len()).then(|| {
        // The first window that fits ends here; it lies wholly after the limit from 1 s on.
        trace[settled].t_s
    });
    let after = if settled < trace.len() {
        &trace[settled..]
    } else {
        &trace[..]
    };
    let mean = |f: &dyn Fn(&TracePoint) -> f64| {
        after.iter().map(f).sum::<f64>() / after.len().max(1) as f64
    };
    let mean_error = mean(&|p| relative_error(p.writer_mibps, limit));
    let mean_abs_error = mean(&|p| relative_error(p.writer_mibps, limit).abs());
    // Reader throughput once the controller holds the writer at or under the limit (+10 %):
    // from the point after which the writer never exceeds it; the last 2 s if it always does.
    let held = trace
        .iter()
        .rposition(|p| p.writer_mibps > limit * (1.0 + BAND))
        .map_or(0, |i| i + 1);
    let tail = if held < trace.len() {
        &trace[held..]
    } else {
        &trace[trace.len().saturating_sub(20)..]
    };
    let reader_under = tail.iter().map(|p| p.reader_mibps).sum::<f64>() / tail.len().max(1) as f64;
    Ok((
        ConvergenceRow {
            controller: controller.to_string(),
            limit_mibps: limit,
            free_mibps: free[0].0,
            converge_s,
            mean_error_pct: mean_error * 100.0,
            mean_abs_error_pct: mean_abs_error * 100.0,
            reader_pct: if free[1].1 > 0.0 {
                reader_under / free[1].1 * 100.0
            } else {
                0.0
            },
            held: held < trace.len(),
            ring_full_exits: row_counters.0,
            ring_overflows: row_counters.1,
            throttle_pct,
        },
        trace,
    ))
}

fn ring_full_exits(machine: &Machine) -> u64 {
    (0..machine.vcpus().len() as u32)
        .map(|id| machine.tracker().vcpu(id).snapshot().ring_full_exits)
        .sum()
}

/// Prints the accuracy table.
pub fn print_accuracy(rows: &[AccuracyRow]) {
    say!(
        "{:<22} {:>7} {:<14} {:>11} {:>11} {:>10} {:>12}",
        "writer",
        "memory",
        "mode",
        "truth MiB/s",
        "meas. MiB/s",
        "worst err",
        "writer speed"
    );
    for r in rows {
        say!(
            "{:<22} {:>6}M {:<14} {:>11.1} {:>11.1} {:>9.2}% {:>11.1}%",
            r.workload,
            r.memory_mib,
            r.mode.name(),
            r.truth_mibps,
            r.measured_mibps,
            r.worst_error_pct,
            r.writer_speed_pct
        );
    }
}

/// Prints the convergence table.
pub fn print_convergence(rows: &[ConvergenceRow]) {
    say!(
        "{:<14} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>7}",
        "controller",
        "limit",
        "free MiB/s",
        "converge",
        "mean err",
        "mean |err|",
        "reader",
        "ring-full",
        "overflows"
    );
    for r in rows {
        let converge = r
            .converge_s
            .map_or("never".to_string(), |s| format!("{s:.1} s"));
        let throttle = r
            .throttle_pct
            .map_or(String::new(), |p| format!(" (throttle {p}%)"));
        let held = if r.held {
            ""
        } else {
            " (writer never held under the limit)"
        };
        say!(
            "{:<14} {:>6.0} {:>10.1} {:>10} {:>9.1}% {:>9.1}% {:>7.1}% {:>9} {:>7}{throttle}{held}",
            r.controller,
            r.limit_mibps,
            r.free_mibps,
            converge,
            r.mean_error_pct,
            r.mean_abs_error_pct,
            r.reader_pct,
            r.ring_full_exits,
            r.ring_overflows
        );
    }
}

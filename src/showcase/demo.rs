//! `dirtyvm demo`: the showcase. A writer and a reader vCPU; the writer's dirty rate measured
//! in every mode beside the ground truth; a dirty limit set and the writer converging to it
//! while the reader keeps its speed; auto-converge for comparison, and what it costs the
//! reader; the same guest live-migrated to a second dirtyvm process over a capped link, under
//! auto-converge and under the self-setting dirty limit; the tracker's and reaper's
//! statistics; a table and a picture.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::limit::LimitAlgo;
use crate::migration::Parameters;
use crate::rate::{Measurement, RateMode, RateRequest};
use crate::showcase::migration::{converge, Aid, ConvergenceCase, ConvergenceRow, Destination};
use crate::showcase::plot::{Chart, Panel, Phase, Series};
use crate::showcase::scenario::boot_warm;
use crate::tracking::{Cadence, DirtyLog, ReaperStats};
use crate::units::pages_to_mibps;
use crate::vm::guest::{GuestStats, Size, Workload};
use crate::vmm::{Machine, VmConfig, VmmError};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest memory.
    pub memory: u64,
    /// The writer's working set.
    pub writer: u64,
    /// The reader's working set.
    pub reader: u64,
    /// The dirty limit, MiB/s (also auto-converge's target).
    pub limit_mibps: f64,
    /// Seconds under the dirty limit, and under auto-converge.
    pub phase_secs: u64,
}

/// One sample of the demo's timeline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DemoPoint {
    /// Seconds since the writer warmed up.
    pub t_s: f64,
    /// Writer's dirty rate, ground truth, 1 s window, MiB/s.
    pub writer_mibps: f64,
    /// Writer's pages harvested from its ring, 1 s window, MiB/s.
    pub harvested_mibps: f64,
    /// Reader's throughput, ground truth, 1 s window, MiB/s.
    pub reader_mibps: f64,
    /// The limit in force, MiB/s.
    pub limit_mibps: Option<f64>,
    /// The auto-converge percentage in force.
    pub throttle_pct: Option<u8>,
}

/// What the demo found.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Measurements in each mode, with their ground truth.
    pub measurements: Vec<Measurement>,
    /// Writer and reader before any control, MiB/s.
    pub free: (f64, f64),
    /// Writer and reader over the second half of the dirty-limit phase, MiB/s.
    pub limited: (f64, f64),
    /// Writer and reader over the last 3 s of the auto-converge phase, MiB/s.
    pub throttled: (f64, f64),
    /// The auto-converge percentage reached.
    pub throttle_pct: u8,
    /// Seconds until the writer stayed within ±10 % of the limit.
    pub converge_s: Option<f64>,
    /// Reaper state at the end.
    pub reaper: Option<ReaperStats>,
    /// Ring-full exits, all vCPUs.
    pub ring_full_exits: u64,
    /// Ring overflows detected.
    pub ring_overflows: u64,
    /// Pages harvested in all.
    pub harvested_pages: u64,
    /// The migrations: under auto-converge, under the self-setting dirty limit.
    pub migrations: Vec<ConvergenceRow>,
    /// The timeline.
    pub timeline: Vec<DemoPoint>,
}

struct Recorder {
    start: Instant,
    samples: Vec<(f64, Vec<GuestStats>, u64)>,
    points: Vec<DemoPoint>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The demo's migration link: 128 MiB/s, a 1 GbE link.
const DEMO_BANDWIDTH: u64 = 128 << 20;
/// A demo migration is cancelled after this long.
const MIGRATION_BOUND: Duration = Duration::from_secs(25);
const WINDOW: usize = 10;

impl Recorder {
    fn sample(&mut self, machine: &Machine) {
        let t = self.start.elapsed().as_secs_f64();
        let harvested = machine.tracker().vcpu(0).snapshot().harvested;
        self.samples.push((t, machine.guest_stats(), harvested));
        let n = self.samples.len();
        if n <= WINDOW {
            return;
        }
        let (t0, s0, h0) = &self.samples[n - 1 - WINDOW];
        let (t1, s1, h1) = &self.samples[n - 1];
        let secs = t1 - t0;
        let limit = machine.limiter().limits().first().map(|l| l.limit_mibps);
        self.points.push(DemoPoint {
            t_s: *t1,
            writer_mibps: pages_to_mibps(s1[0].pages_written - s0[0].pages_written, secs),
            harvested_mibps: pages_to_mibps(h1 - h0, secs),
            reader_mibps: pages_to_mibps(s1[1].pages_read - s0[1].pages_read, secs),
            limit_mibps: limit,
            throttle_pct: machine.limiter().throttle().map(|t| t.percent),
        });
    }

    /// Samples for `duration`, printing a line a second.
    fn run(&mut self, machine: &Machine, duration: Duration, phase: &str) {
        let end = Instant::now() + duration;
        let mut next_line = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            sleep(SAMPLE_EVERY);
            self.sample(machine);
            if Instant::now() >= next_line {
                next_line += Duration::from_secs(1);
                if let Some(p) = self.points.last() {
                    let control = match (p.limit_mibps, p.throttle_pct) {
                        (Some(l), _) => format!("limit {l:.0} MiB/s"),
                        (None, Some(pct)) => format!("throttle {pct:>2}%"),
                        (None, None) => "no control".to_string(),
                    };
                    say!(
                        "  {:>5.1}s  {phase:<14} {control:<16} writer {:>7.1} MiB/s (harvested {:>7.1})   reader {:>7.1} MiB/s",
                        p.t_s, p.writer_mibps, p.harvested_mibps, p.reader_mibps
                    );
                }
            }
        }
    }

    /// Mean writer and reader rates of the points in `[from, to)` seconds.
    fn mean(&self, from: f64, to: f64) -> (f64, f64) {
        let points: Vec<_> = self
            .points
            .iter()
            .filter(|p| p.t_s >= from && p.t_s < to)
            .collect();
        let n = points.len().max(1) as f64;
        (
            points.iter().map(|p| p.writer_mibps).sum::<f64>() / n,
            points.iter().map(|p| p.reader_mibps).sum::<f64>() / n,
        )
    }
}

const MEASURE_MS: u64 = 1000;

fn start_measuring(machine: &Machine, mode: RateMode) -> bool {
    let request = RateRequest {
        mode,
        calc_time_ms: MEASURE_MS,
        sample_pages: 4096,
    };
    machine.rate_meter().start(request).is_ok()
}

fn measured(machine: &Machine) -> Option<Measurement> {
    machine.rate_meter().wait(Duration::from_secs(10)).last
}

/// Fails if a vCPU or a VMM thread of `machine` failed: the demo's numbers would be a dead
/// guest's.
fn still_running(machine: &Machine) -> Result<(), VmmError> {
    match machine.stop_request().reason() {
        Some(reason) => Err(VmmError::Io {
            what: "the demo's guest".into(),
            error: std::io::Error::other(reason.to_string()),
        }),
        None => Ok(()),
    }
}

/// Runs the demo, printing as it goes; returns what it found and its picture (SVG).
pub fn run(options: &DemoOptions) -> Result<(DemoSummary, String), VmmError> {
    let workloads = vec![
        Workload::Write {
            bytes: options.writer,
            mibps: None,
        },
        Workload::Read {
            bytes: options.reader,
        },
    ];
    let config = VmConfig::new(2, options.memory, workloads.clone()).with_dirty_log(DirtyLog::Ring);
    say!(
        "dirtyvm demo: vCPU 0 writes {}, vCPU 1 reads {}, in a {} guest with per-vCPU dirty rings",
        Size(options.writer),
        Size(options.reader),
        Size(options.memory)
    );
    let machine = boot_warm(&config)?;
    still_running(&machine)?;
    let mut rec = Recorder {
        start: Instant::now(),
        samples: Vec::new(),
        points: Vec::new(),
    };

    say!("\n1. Measuring the writer's dirty rate (1 s windows), beside the guest's own count:");
    let mut measurements = Vec::new();
    for mode in [RateMode::DirtyRing, RateMode::PageSampling] {
        if start_measuring(&machine, mode) {
            // Keep recording the timeline while the window runs.
            rec.run(&machine, Duration::from_millis(MEASURE_MS), "free");
            if let Some(m) = measured(&machine) {
                say!("  {m}");
                measurements.push(m);
            }
        }
    }
    rec.run(&machine, Duration::from_secs(1), "free");
    still_running(&machine)?;
    let free_until = rec.start.elapsed().as_secs_f64();
    let free = rec.mean(0.0, free_until);

    let phase = Duration::from_secs(options.phase_secs);
    say!(
        "\n2. Dirty limit of {:.0} MiB/s on every vCPU (dirtyvm's quota controller):",
        options.limit_mibps
    );
    machine
        .limiter()
        .set_limit(None, options.limit_mibps, Some(LimitAlgo::Quota))
        .map_err(|e| VmmError::BadConfig(e.to_string()))?;
    let limit_from = rec.start.elapsed().as_secs_f64();
    rec.run(&machine, phase, "dirty limit");
    still_running(&machine)?;
    let limit_until = rec.start.elapsed().as_secs_f64();
    let limited = rec.mean(limit_from + phase.as_secs_f64() / 2.0, limit_until);
    let in_phase: Vec<&DemoPoint> = rec
        .points
        .iter()
        .filter(|p| p.t_s >= limit_from && p.t_s < limit_until)
        .collect();
    let off_limit =
        |p: &&DemoPoint| (p.writer_mibps - options.limit_mibps).abs() > 0.1 * options.limit_mibps;
    let settled = in_phase.iter().rposition(off_limit).map_or(0, |i| i + 1);
    let converge_s = in_phase.get(settled).map(|p| p.t_s - limit_from);
    machine
        .limiter()
        .cancel(None)
        .map_err(|e| VmmError::BadConfig(e.to_string()))?;

    say!(
        "\n3. Auto-converge instead, raised 20, 30, ... % until the VM dirties under {:.0} MiB/s:",
        options.limit_mibps
    );
    machine
        .limiter()
        .set_auto_converge(options.limit_mibps)
        .map_err(|e| VmmError::BadConfig(e.to_string()))?;
    let throttle_from = rec.start.elapsed().as_secs_f64();
    // It climbs one step a second: from 20 to 99 % takes 9 s.
    rec.run(&machine, phase + Duration::from_secs(4), "auto-converge");
    still_running(&machine)?;
    let throttle_until = rec.start.elapsed().as_secs_f64();
    let throttled = rec.mean(throttle_until - 3.0, throttle_until);
    let throttle_pct = machine.limiter().throttle().map_or(0, |t| t.percent);

    let reaper = machine.reaper().map(|r| r.stats());
    machine.shutdown()?;
    let tracker = machine.tracker();
    let ring_full_exits = (0..2)
        .map(|id| tracker.vcpu(id).snapshot().ring_full_exits)
        .sum();

    say!("\n4. The same writer in a guest tracked by the dirty bitmap instead:");
    let bitmap_config =
        VmConfig::new(2, options.memory, workloads.clone()).with_dirty_log(DirtyLog::Bitmap);
    let bitmap = boot_warm(&bitmap_config)?;
    still_running(&bitmap)?;
    if start_measuring(&bitmap, RateMode::DirtyBitmap) {
        if let Some(m) = measured(&bitmap) {
            say!("  {m}");
            measurements.push(m);
        }
    }
    bitmap.shutdown()?;

    say!(
        "\n5. Live migration to a second dirtyvm process (dirtyvm run --incoming), over a \
         {} MiB/s link (max-bandwidth), downtime limit 300 ms:",
        DEMO_BANDWIDTH >> 20
    );
    let binary = std::env::current_exe()
        .map_err(|e| VmmError::BadConfig(format!("finding the dirtyvm binary: {e}")))?;
    let mut migrations = Vec::new();
    let mut phases = Vec::new();
    for aid in [Aid::AutoConverge, Aid::AutoLimit] {
        let case = ConvergenceCase {
            aid,
            writer: workloads[0].to_string(),
            reader: workloads[1].to_string(),
            memory: options.memory,
            dirty_log: DirtyLog::Ring,
            reaper: Cadence::Adaptive,
            params: Parameters {
                max_bandwidth: DEMO_BANDWIDTH,
                ..Parameters::default()
            },
            bound: MIGRATION_BOUND,
            destination: Destination::Process(binary.clone()),
        };
        let (row, samples) = converge(&case)?;
        say!("  {}", migration_line(&row));
        // The migration's samples continue the timeline, a second after the last point.
        let base = rec.points.last().map_or(0.0, |p| p.t_s) + 1.0;
        rec.points.extend(samples.iter().map(|s| DemoPoint {
            t_s: base + s.t_s,
            writer_mibps: s.writer_mibps,
            harvested_mibps: s.writer_mibps,
            reader_mibps: s.reader_mibps,
            limit_mibps: s.limit_mibps,
            throttle_pct: s.throttle_pct,
        }));
        phases.push(Phase {
            from: base,
            to: base + row.total_s,
            label: format!("migration, {}", row.aid),
            color: if aid == Aid::AutoConverge {
                "#f3d9c6"
            } else {
                "#cfe8cf"
            },
        });
        migrations.push(row);
    }

    let summary = DemoSummary {
        measurements,
        free,
        limited,
        throttled,
        throttle_pct,
        converge_s,
        reaper,
        ring_full_exits,
        ring_overflows: tracker.ring_overflows(),
        harvested_pages: tracker.harvested(),
        migrations,
        timeline: rec.points.clone(),
    };
    let phases = [
        vec![
            Phase {
                from: limit_from,
                to: limit_until,
                label: format!("dirty limit {:.0} MiB/s", options.limit_mibps),
                color: "#cfe8cf",
            },
            Phase {
                from: throttle_from,
                to: throttle_until,
                label: "auto-converge".into(),
                color: "#f3d9c6",
            },
        ],
        phases,
    ]
    .concat();
    let picture = chart(&summary, phases).to_svg();
    Ok((summary, picture))
}

fn chart(summary: &DemoSummary, phases: Vec<Phase>) -> Chart {
    let line = |name: &str, color, dashed, f: &dyn Fn(&DemoPoint) -> Option<f64>| Series {
        name: name.into(),
        color,
        dashed,
        points: summary.timeline.iter().map(|p| (p.t_s, f(p))).collect(),
    };
    Chart {
        title: "dirtyvm demo: per-vCPU dirty limit vs auto-converge".into(),
        x_label: "seconds".into(),
        panels: vec![
            Panel {
                y_label: "vCPU 0 dirty rate, MiB/s".into(),
                series: vec![
                    line("writer (guest count)", "#c0392b", false, &|p| {
                        Some(p.writer_mibps)
                    }),
                    line("writer (harvested)", "#e59866", true, &|p| {
                        Some(p.harvested_mibps)
                    }),
                    line("dirty limit", "#2c3e50", true, &|p| p.limit_mibps),
                ],
            },
            Panel {
                y_label: "vCPU 1 reads, MiB/s".into(),
                series: vec![line("reader", "#2471a3", false, &|p| Some(p.reader_mibps))],
            },
        ],
        phases,
    }
}

/// Prints the closing table.
pub fn print_summary(s: &DemoSummary, limit: f64) {
    let pct = |a: f64, b: f64| if b > 0.0 { a / b * 100.0 } else { 0.0 };
    say!("\nSummary                          writer MiB/s    reader MiB/s   reader vs free");
    say!(
        "  no control                      {:>12.1}    {:>12.1}          100.0%",
        s.free.0,
        s.free.1
    );
    say!(
        "  dirty limit {:>5.0} MiB/s         {:>12.1}    {:>12.1}   {:>13.1}%",
        limit,
        s.limited.0,
        s.limited.1,
        pct(s.limited.1, s.free.1)
    );
    say!(
        "  auto-converge at {:>2}%            {:>12.1}    {:>12.1}   {:>13.1}%",
        s.throttle_pct,
        s.throttled.0,
        s.throttled.1,
        pct(s.throttled.1, s.free.1)
    );
    match s.converge_s {
        Some(t) => {
            say!("  the writer stayed within ±10% of the limit from {t:.1} s after it was set")
        }
        None => say!("  the writer never stayed within ±10% of the limit"),
    }
    if let Some(r) = &s.reaper {
        say!(
            "  reaper: {} reaps, interval now {:.0} ms, {} ({} mode)",
            r.reaps,
            r.interval_ms,
            r.policy,
            r.mode
        );
    }
    say!(
        "  dirty pages harvested: {}, ring-full exits: {}, ring overflows detected: {}",
        s.harvested_pages,
        s.ring_full_exits,
        s.ring_overflows
    );
    for row in &s.migrations {
        say!("  migration: {}", migration_line(row));
    }
}

/// One migration of the demo, in a line.
fn migration_line(row: &ConvergenceRow) -> String {
    let outcome = if row.converged {
        format!("completed in {:.1} s", row.total_s)
    } else {
        format!("not converged in {:.0} s", row.total_s)
    };
    let held = match (row.max_throttle, row.min_limit_mibps) {
        (0, Some(limit)) => format!(", writer held to {limit:.1} MiB/s"),
        (0, None) => String::new(),
        (pct, _) => format!(", throttle up to {pct} %"),
    };
    format!(
        "{:<24} {outcome}{held}{}; writer kept {:.0} %, reader {:.0} % of their speed",
        row.aid,
        row.downtime_ms
            .map_or_else(String::new, |d| format!(", downtime {d:.0} ms")),
        row.writer_share * 100.0,
        row.reader_share * 100.0
    )
}

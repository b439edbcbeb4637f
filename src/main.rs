//! `dirtyvm`: the command-line launcher. Thin: parses, builds, prints.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use serde::Serialize;

use dirtyvm::demo::{self, DemoOptions};
use dirtyvm::guest::{self, GuestStats, Workload};
use dirtyvm::limit::LimitAlgo;
use dirtyvm::qmp::{MachineBackend, Server};
use dirtyvm::rate::{
    Measurement, RateMode, RateRequest, RateStatus, DEFAULT_SAMPLE_PAGES, MAX_CALC_TIME_MS,
    MIN_CALC_TIME_MS,
};
use dirtyvm::reaper::{Cadence, ReaperStats};
use dirtyvm::report::{pages_to_mibps, Report, VcpuReport};
use dirtyvm::tracking::DirtyLog;
use dirtyvm::vcpu::{Stop, StopReason};
use dirtyvm::vmm::{self, Machine, VmConfig, VmmError};
use dirtyvm::{sched, sys};

const ABOUT: &str = "A minimal KVM VMM that tracks, measures and limits how fast vCPUs dirty \
                     guest memory.";

const LONG_ABOUT: &str = "\
A minimal KVM VMM that tracks, measures and limits how fast vCPUs dirty guest memory.

Each vCPU runs a tiny built-in guest program (a writer, a reader, or idle) whose own counters are
the ground truth every measurement is judged against.

Without a command, runs the demo.

Exit codes: 0 success, 2 bad usage or input, 3 KVM unavailable or lacking a needed capability,
1 any other failure.";

#[derive(Debug, Parser)]
#[command(name = "dirtyvm", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = WORKLOAD_HELP)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a command: the demo's options.
    #[command(flatten)]
    demo: DemoArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The showcase: a writer and a reader vCPU; dirty rates in every mode beside the truth;
    /// a dirty limit, then auto-converge; a table and a picture (the default command).
    Demo(DemoArgs),
    /// Print this host's KVM facts and capabilities.
    Probe {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM with built-in workloads and report what they did.
    Run(RunArgs),
}

/// The workload grammar, shown by `dirtyvm --help` and `dirtyvm run --help`.
const WORKLOAD_HELP: &str = "\
Workload SPEC (the i-th --workload applies to vCPU i; vCPUs without one are idle):
  write:SIZE[@MIBPS]         write one byte per 4 KiB page, sequentially over SIZE,
                             optionally paced to MIBPS
  random-write:SIZE[@MIBPS]  the same in a pseudo-random page order (every page once per pass)
  read:SIZE                  read one word per page, sequentially over SIZE
  idle                       halt
SIZE is bytes with an optional binary K, M or G suffix, a multiple of 4K. Each vCPU works in its
own region of guest memory, so the working sets together must fit in --memory.

Example:
  dirtyvm run --vcpus 2 --memory 256M --workload write:64M --workload read:64M \\
      --duration 3 --report r.json";

#[derive(Debug, Args)]
struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_memory)]
    memory: u64,
    /// The writer's working set (vCPU 0, unpaced).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_memory)]
    writer: u64,
    /// The reader's working set (vCPU 1).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_memory)]
    reader: u64,
    /// The dirty limit, and auto-converge's target, MiB/s.
    #[arg(long, default_value_t = 64.0, value_name = "MIBPS", value_parser = parse_rate)]
    limit: f64,
    /// Seconds under the dirty limit (auto-converge gets 4 more to climb).
    #[arg(long, default_value_t = 8, value_name = "SECS", value_parser = clap::value_parser!(u64).range(3..=600))]
    phase_secs: u64,
    /// Where to write the picture (SVG).
    #[arg(long, default_value = "dirtyvm-demo.svg", value_name = "PATH")]
    plot: PathBuf,
    /// Also write the demo's findings and timeline as JSON here.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_long_help = WORKLOAD_HELP)]
struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    vcpus: u32,
    /// Guest memory: bytes with an optional K, M or G (binary) suffix.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_memory)]
    memory: u64,
    /// Workload of the next vCPU (repeatable): write:SIZE[@MIBPS], random-write:SIZE[@MIBPS],
    /// read:SIZE or idle.
    #[arg(long = "workload", value_name = "SPEC")]
    workloads: Vec<Workload>,
    /// Dirty tracking: per-vCPU dirty rings, the dirty bitmap, or none.
    #[arg(long, default_value = "ring", value_name = "ring|bitmap|none")]
    dirty_log: DirtyLog,
    /// Entries per vCPU dirty ring: a power of two from 1024 to the host's maximum
    /// (`dirtyvm probe` shows it). Default: the host's maximum (65536 on most hosts), which
    /// a full-speed writer takes longest to fill.
    #[arg(long, value_name = "N")]
    ring_entries: Option<u32>,
    /// Reaper cadence: `adaptive` (from ring fill and ring-full exits) or `fixed:MS`
    /// (`fixed:1000` is the reference design).
    #[arg(long, default_value = "adaptive", value_name = "adaptive|fixed:MS")]
    reaper: Cadence,
    /// Measure the dirty rate back to back through the run, each result printed beside the
    /// ground truth: MODE is page-sampling, dirty-ring or dirty-bitmap, MS the window
    /// (50 to 60000, default 1000).
    #[arg(long, value_name = "MODE[:MS]")]
    calc_dirty_rate: Option<RateSpec>,
    /// Sampled pages per GiB of guest memory for page-sampling (128 to 16384).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SAMPLE_PAGES)]
    sample_pages: u64,
    /// Limit every vCPU's dirty rate to MIBPS MiB/s from the start (with --throttle
    /// auto-converge: the VM's rate, by slowing every vCPU alike instead).
    #[arg(long, value_name = "MIBPS", value_parser = parse_rate)]
    dirty_limit: Option<f64>,
    /// Limit one vCPU's dirty rate (repeatable): vCPU ID to MIBPS MiB/s.
    #[arg(long, value_name = "ID=MIBPS", value_parser = parse_vcpu_limit)]
    vcpu_dirty_limit: Vec<(u32, f64)>,
    /// Dirty-limit algorithm: `quota` (dirtyvm's: a per-vCPU page quota enforced with
    /// kicks, independent of ring size) or `reference` (QEMU's, computed exactly).
    #[arg(long, default_value = "quota", value_name = "quota|reference")]
    limit_algo: LimitAlgo,
    /// With --dirty-limit: the classic whole-VM throttle instead of per-vCPU limits, raised
    /// 20, 30, ... 99 % until the VM's dirty rate is under the limit; slows every vCPU alike.
    #[arg(long, value_name = "auto-converge", value_parser = ["auto-converge"])]
    throttle: Option<String>,
    /// Stop after this many seconds (otherwise run until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Write a JSON report here at exit.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Serve QMP (QEMU's protocol: query-status, stop, cont, quit, calc-dirty-rate,
    /// set-vcpu-dirty-limit, ...) on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
}

/// `--calc-dirty-rate MODE[:MS]`.
#[derive(Debug, Clone, Copy)]
struct RateSpec {
    mode: RateMode,
    calc_time_ms: u64,
}

impl std::str::FromStr for RateSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<RateSpec, String> {
        let (mode, ms) = match text.split_once(':') {
            Some((mode, ms)) => (mode, Some(ms)),
            None => (text, None),
        };
        let calc_time_ms = match ms {
            None => 1000,
            Some(ms) => ms
                .parse()
                .ok()
                .filter(|ms| (MIN_CALC_TIME_MS..=MAX_CALC_TIME_MS).contains(ms))
                .ok_or_else(|| {
                    format!(
                        "window '{ms}' is not a number of milliseconds from {MIN_CALC_TIME_MS} \
                         to {MAX_CALC_TIME_MS}"
                    )
                })?,
        };
        Ok(RateSpec {
            mode: mode.parse()?,
            calc_time_ms,
        })
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a positive rate in MiB/s")),
    }
}

fn parse_vcpu_limit(text: &str) -> Result<(u32, f64), String> {
    let (id, rate) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not ID=MIBPS (for example 0=64)"))?;
    let id = id
        .parse()
        .map_err(|_| format!("vCPU id '{id}' in '{text}' is not a number"))?;
    Ok((id, parse_rate(rate)?))
}

fn parse_memory(text: &str) -> Result<u64, String> {
    guest::parse_size(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!("'{text}' is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo(cli.demo),
        Some(Command::Demo(args)) => demo(args),
        Some(Command::Probe { json }) => probe(json),
        Some(Command::Run(args)) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("dirtyvm: error: {message}");
            ExitCode::from(code)
        }
    }
}

/// A failed command: the message for stderr and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<VmmError> for Failure {
    fn from(e: VmmError) -> Failure {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

fn demo(args: DemoArgs) -> Result<(), Failure> {
    if args.writer + args.reader > args.memory {
        return Err(Failure {
            code: 2,
            message: format!(
                "--writer {} and --reader {} do not fit in --memory {}",
                guest::Size(args.writer),
                guest::Size(args.reader),
                guest::Size(args.memory)
            ),
        });
    }
    let options = DemoOptions {
        memory: args.memory,
        writer: args.writer,
        reader: args.reader,
        limit_mibps: args.limit,
        phase_secs: args.phase_secs,
        plot: args.plot.clone(),
    };
    let summary = demo::run(&options)?;
    demo::print_summary(&summary, args.limit);
    println!("\npicture written to {}", args.plot.display());
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&summary).expect("plain data serializes");
        std::fs::write(path, json + "\n").map_err(|e| Failure {
            code: 1,
            message: format!("writing the report to {}: {e}", path.display()),
        })?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<(), Failure> {
    // Block SIGINT and SIGTERM before any thread exists, so every thread inherits the mask
    // and only the waiter below receives them: a signal becomes an orderly stop.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| Failure {
        code: 1,
        message: format!("blocking SIGINT/SIGTERM: {e}"),
    })?;

    if args.ring_entries.is_some() && args.dirty_log != DirtyLog::Ring {
        return Err(Failure {
            code: 2,
            message: format!(
                "--ring-entries needs --dirty-log ring (the dirty log is {})",
                args.dirty_log.name()
            ),
        });
    }
    let rate = args
        .calc_dirty_rate
        .map(|spec| RateRequest {
            mode: spec.mode,
            calc_time_ms: spec.calc_time_ms,
            sample_pages: args.sample_pages,
        })
        .map(|request| {
            request
                .check(args.dirty_log)
                .map(|()| request)
                .map_err(|e| Failure {
                    code: 2,
                    message: format!(
                        "--calc-dirty-rate {}: {e} (page-sampling works with any --dirty-log; \
                     dirty-ring needs --dirty-log ring; dirty-bitmap needs --dirty-log bitmap)",
                        request.mode
                    ),
                })
        })
        .transpose()?;
    let config = VmConfig {
        vcpus: args.vcpus,
        memory: args.memory,
        workloads: args.workloads,
        dirty_log: args.dirty_log,
        ring_entries: args.ring_entries,
        reaper: args.reaper,
        limit_algo: args.limit_algo,
    };
    let usage = |message: String| Failure { code: 2, message };
    if args.throttle.is_some() && (args.dirty_limit.is_none() || !args.vcpu_dirty_limit.is_empty())
    {
        return Err(usage(
            "--throttle auto-converge needs --dirty-limit MIBPS (the VM rate to get under) \
             and no --vcpu-dirty-limit"
                .into(),
        ));
    }
    if let Some(&(id, _)) = args
        .vcpu_dirty_limit
        .iter()
        .find(|(id, _)| *id >= args.vcpus)
    {
        return Err(usage(format!(
            "--vcpu-dirty-limit {id}=...: there is no vCPU {id} (vCPUs are 0 to {})",
            args.vcpus.saturating_sub(1)
        )));
    }
    let limiting = args.dirty_limit.is_some() || !args.vcpu_dirty_limit.is_empty();
    if limiting && args.dirty_log == DirtyLog::None {
        return Err(usage(
            "a dirty limit needs dirty tracking: use --dirty-log ring (the default)".into(),
        ));
    }
    if limiting && args.throttle.is_none() && args.dirty_log != DirtyLog::Ring {
        return Err(usage(
            "per-vCPU dirty limits need --dirty-log ring (per-vCPU rings); the bitmap has no \
             per-vCPU split"
                .into(),
        ));
    }
    let machine = Arc::new(Machine::boot(&config)?);
    let limited = match (args.throttle.is_some(), args.dirty_limit) {
        (true, Some(target)) => machine.limiter().set_auto_converge(target),
        (false, all) => all
            .map(|mibps| machine.limiter().set_limit(None, mibps, None))
            .into_iter()
            .chain(
                args.vcpu_dirty_limit
                    .iter()
                    .map(|&(id, mibps)| machine.limiter().set_limit(Some(id), mibps, None)),
            )
            .collect(),
        (true, None) => Ok(()),
    };
    if let Err(e) = limited {
        let _ = machine.shutdown();
        return Err(usage(e.to_string()));
    }
    spawn_signal_waiter(signals, machine.stop().clone());
    let qmp = match &args.qmp {
        Some(path) => match Server::spawn(path, Arc::new(MachineBackend::new(machine.clone()))) {
            Ok(server) => Some(server),
            Err(e) => {
                let _ = machine.shutdown();
                return Err(Failure {
                    code: 1,
                    message: format!("cannot serve QMP at {}: {e}", path.display()),
                });
            }
        },
        None => None,
    };

    let tracking = match (config.dirty_log, machine.tracker().ring_entries()) {
        (DirtyLog::Ring, Some(entries)) => {
            format!("dirty rings of {entries} entries, {} reaper", config.reaper)
        }
        (DirtyLog::Bitmap, _) => format!("dirty bitmap, {} reaper", config.reaper),
        _ => "no dirty tracking".to_string(),
    };
    println!(
        "dirtyvm: {} vCPUs, {} guest memory, {tracking}; {}",
        config.vcpus,
        guest::Size(config.memory),
        match args.duration {
            Some(d) => format!("running for {:.1} s", d.as_secs_f64()),
            None => "running until Ctrl-C".to_string(),
        }
    );
    if let Some(path) = &args.qmp {
        println!("QMP listening on {}", path.display());
    }
    let (reason, measurements) = watch(&machine, args.duration, rate);
    if let Some(server) = qmp {
        if reason != StopReason::Quit {
            server.notify_shutdown();
        }
        server.stop();
    }
    let stats = machine.guest_stats();
    let elapsed = machine.started().elapsed().as_secs_f64();
    let reaper = machine.reaper().map(|r| r.stats());
    let shutdown = machine.shutdown();
    let mut report = build_report(&machine, &stats, elapsed, &reason, reaper);
    report.dirty_rate = measurements;

    print_summary(&report);
    if let Some(path) = &args.report {
        report.write(path).map_err(|e| Failure {
            code: 1,
            message: format!("writing the report to {}: {e}", path.display()),
        })?;
        println!("report written to {}", path.display());
    }
    shutdown?;
    match reason {
        StopReason::VcpuFailed { .. } | StopReason::Failed(_) => Err(Failure {
            code: 1,
            message: reason.to_string(),
        }),
        StopReason::Duration | StopReason::Signal(_) | StopReason::Quit => Ok(()),
    }
}

fn spawn_signal_waiter(signals: SigSet, stop: Arc<Stop>) {
    // Never joined: it waits in sigwait for the life of the process.
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                stop.request(StopReason::Signal(signal.as_str()));
            }
        });
    if let Err(e) = spawned {
        eprintln!("dirtyvm: warning: no signal handling thread ({e}); stop with SIGKILL");
    }
}

/// How often the launcher looks at the VM between progress lines.
const TICK: Duration = Duration::from_millis(100);
/// How often it prints a progress line per vCPU.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs until the VM stops: a progress line per vCPU each second, and back-to-back dirty-rate
/// measurements when asked. Returns why it stopped and the measurements.
fn watch(
    machine: &Machine,
    duration: Option<Duration>,
    rate: Option<RateRequest>,
) -> (StopReason, Vec<Measurement>) {
    let deadline = duration.map(|d| machine.started() + d);
    let mut progress = Progress::new(machine);
    let mut measurements = Vec::new();
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            let reason = machine.stop().reason().unwrap_or(StopReason::Duration);
            return (reason, measurements);
        }
        let wait = deadline.map_or(TICK, |d| (d - now).min(TICK));
        if let Some(reason) = machine.stop().wait_timeout(wait) {
            return (reason, measurements);
        }
        if let Some(request) = rate {
            let meter = machine.rate_meter();
            if measuring && meter.state().status == RateStatus::Measured {
                measuring = false;
                if let Some(m) = meter.state().last {
                    print_measurement(&m);
                    measurements.push(m);
                }
            }
            // Start another only if it can finish before the run ends.
            let room = deadline
                .is_none_or(|d| Instant::now() + Duration::from_millis(request.calc_time_ms) < d);
            if !measuring && room {
                match meter.start(request) {
                    Ok(()) => measuring = true,
                    Err(e) => eprintln!("dirtyvm: warning: dirty-rate measurement: {e}"),
                }
            }
        }
        progress.print_if_due(machine);
    }
}

/// The once-a-second progress lines.
struct Progress {
    last: Vec<GuestStats>,
    last_harvested: Vec<u64>,
    at: Instant,
}

impl Progress {
    fn new(machine: &Machine) -> Progress {
        println!(
            "{:>7}  {:>4}  {:<24} {:>14} {:>14} {:>15}",
            "time", "vcpu", "workload", "written MiB/s", "read MiB/s", "harvested MiB/s"
        );
        Progress {
            last: machine.guest_stats(),
            last_harvested: harvested(machine),
            at: Instant::now(),
        }
    }

    fn print_if_due(&mut self, machine: &Machine) {
        if self.at.elapsed() < PROGRESS_EVERY {
            return;
        }
        let stats = machine.guest_stats();
        let harvested = harvested(machine);
        let secs = self.at.elapsed().as_secs_f64();
        self.at = Instant::now();
        let t = machine.started().elapsed().as_secs_f64();
        for (i, plan) in machine.layout().vcpus().iter().enumerate() {
            let (now, before) = (&stats[i], &self.last[i]);
            println!(
                "{:>6.1}s  {:>4}  {:<24} {:>14.1} {:>14.1} {:>15.1}",
                t,
                plan.id,
                plan.workload.to_string(),
                pages_to_mibps(now.pages_written - before.pages_written, secs),
                pages_to_mibps(now.pages_read - before.pages_read, secs),
                pages_to_mibps(harvested[i] - self.last_harvested[i], secs),
            );
        }
        let _ = std::io::stdout().flush();
        self.last = stats;
        self.last_harvested = harvested;
    }
}

fn harvested(machine: &Machine) -> Vec<u64> {
    (0..machine.vcpus().len() as u32)
        .map(|id| machine.tracker().vcpu(id).harvested.load(Ordering::Relaxed))
        .collect()
}

fn print_measurement(m: &Measurement) {
    let error = if m.truth_mibps > 0.0 {
        format!(
            "{:+.1}%",
            (m.rate_mibps - m.truth_mibps) / m.truth_mibps * 100.0
        )
    } else {
        "n/a".to_string()
    };
    let mut line = format!(
        "  dirty rate ({}, {:.0} ms): {:.1} MiB/s, truth {:.1} MiB/s, error {error}",
        m.mode, m.calc_time_ms, m.rate_mibps, m.truth_mibps
    );
    if let Some(rates) = &m.vcpu_rates_mibps {
        for (id, (rate, truth)) in rates.iter().zip(&m.vcpu_truth_mibps).enumerate() {
            line += &format!("; vCPU {id} {rate:.1} (truth {truth:.1})");
        }
    }
    println!("{line}");
}

fn build_report(
    machine: &Machine,
    stats: &[GuestStats],
    elapsed: f64,
    reason: &StopReason,
    reaper: Option<ReaperStats>,
) -> Report {
    let tracker = machine.tracker();
    let vcpus = machine
        .layout()
        .vcpus()
        .iter()
        .zip(stats)
        .zip(machine.vcpus())
        .map(|((plan, s), control)| VcpuReport {
            id: plan.id,
            workload: plan.workload.to_string(),
            pages_written: s.pages_written,
            pages_read: s.pages_read,
            passes: s.passes,
            written_mibps: pages_to_mibps(s.pages_written, elapsed),
            read_mibps: pages_to_mibps(s.pages_read, elapsed),
            dirty_pages_harvested: tracker.vcpu(plan.id).harvested.load(Ordering::Relaxed),
            ring_full_exits: tracker
                .vcpu(plan.id)
                .ring_full_exits
                .load(Ordering::Relaxed),
            bad_entries: tracker.vcpu(plan.id).bad_entries.load(Ordering::Relaxed),
            lost_entries: tracker.vcpu(plan.id).lost_entries.load(Ordering::Relaxed),
            penalty_ms_total: machine.limiter().penalty(plan.id).ms_total,
            hlt_exits: control.exits.hlt.load(Ordering::Relaxed),
            kicks: control.exits.interrupted.load(Ordering::Relaxed),
        })
        .collect();
    Report {
        version: env!("CARGO_PKG_VERSION"),
        duration_s: elapsed,
        stop_reason: reason.to_string(),
        dirty_log: tracker.log().name(),
        ring_entries: tracker.ring_entries(),
        bitmap_manual_protect: (tracker.log() == DirtyLog::Bitmap)
            .then(|| tracker.manual_protect()),
        dirty_pages_harvested: tracker.harvested(),
        wedged_rings: tracker.wedged_rings(),
        reset_mismatches: tracker.reset_mismatches(),
        reaper,
        memory_bytes: machine.layout().memory(),
        tsc_khz: machine.tsc_khz(),
        vcpus,
        dirty_rate: Vec::new(),
        dirty_limit: Some(machine.limiter().report()).filter(|r| !r.series.is_empty()),
    }
}

fn print_summary(report: &Report) {
    println!(
        "\nstopped after {:.2} s ({})",
        report.duration_s, report.stop_reason
    );
    println!(
        "{:>4}  {:<24} {:>14} {:>14} {:>8} {:>14} {:>14}",
        "vcpu", "workload", "pages written", "pages read", "passes", "written MiB/s", "read MiB/s"
    );
    for v in &report.vcpus {
        println!(
            "{:>4}  {:<24} {:>14} {:>14} {:>8} {:>14.1} {:>14.1}",
            v.id,
            v.workload,
            v.pages_written,
            v.pages_read,
            v.passes,
            v.written_mibps,
            v.read_mibps
        );
    }
}

/// Host KVM facts, as `probe` prints them.
#[derive(Debug, Serialize)]
struct Probe {
    api_version: i32,
    nr_vcpus: i32,
    max_vcpus: u32,
    nr_memslots: i32,
    immediate_exit: bool,
    dirty_log_ring_max_bytes: i32,
    dirty_log_ring_acq_rel_max_bytes: i32,
    dirty_log_ring_max_entries: i32,
    dirty_log_ring_with_bitmap: bool,
    manual_dirty_log_protect2_flags: i32,
    sched_fifo: String,
    guest_instructions_per_second: f64,
}

fn probe(json: bool) -> Result<(), Failure> {
    let kvm = vmm::open_kvm()?;
    let ring = kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING);
    let ring_acq_rel = kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    let fifo = std::thread::spawn(|| match sched::set_current_thread_fifo(1) {
        Ok(_) => "permitted".to_string(),
        Err(e) => format!("refused ({e})"),
    })
    .join()
    .unwrap_or_else(|_| "unknown".into());
    let facts = Probe {
        api_version: sys::KVM_API_VERSION,
        nr_vcpus: kvm.check_extension(sys::KVM_CAP_NR_VCPUS),
        max_vcpus: vmm::max_vcpus(&kvm),
        nr_memslots: kvm.check_extension(sys::KVM_CAP_NR_MEMSLOTS),
        immediate_exit: kvm.check_extension(sys::KVM_CAP_IMMEDIATE_EXIT) > 0,
        dirty_log_ring_max_bytes: ring,
        dirty_log_ring_acq_rel_max_bytes: ring_acq_rel,
        dirty_log_ring_max_entries: ring.max(ring_acq_rel) / 16,
        dirty_log_ring_with_bitmap: kvm.check_extension(sys::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
            > 0,
        manual_dirty_log_protect2_flags: kvm
            .check_extension(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        sched_fifo: fifo,
        guest_instructions_per_second: vmm::measure_instruction_rate(&kvm, 1_000_000)?,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&facts).expect("plain data serializes")
        );
        return Ok(());
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!("KVM API version                  {}", facts.api_version);
    println!(
        "vCPUs per VM                     {} recommended, {} maximum",
        facts.nr_vcpus, facts.max_vcpus
    );
    println!("memory slots                     {}", facts.nr_memslots);
    println!(
        "immediate_exit                   {}",
        yes_no(facts.immediate_exit)
    );
    println!(
        "dirty ring (cap 192)             {}",
        ring_text(facts.dirty_log_ring_max_bytes)
    );
    println!(
        "dirty ring ACQ_REL (cap 223)     {}",
        ring_text(facts.dirty_log_ring_acq_rel_max_bytes)
    );
    println!(
        "dirty ring with bitmap (225)     {}",
        yes_no(facts.dirty_log_ring_with_bitmap)
    );
    println!(
        "manual dirty log protect2 (168)  {}",
        match facts.manual_dirty_log_protect2_flags {
            0 => "no".to_string(),
            f => format!(
                "flags {f:#x} (CLEAR_DIRTY_LOG{})",
                if f & 2 != 0 { ", INITIALLY_SET" } else { "" }
            ),
        }
    );
    println!("SCHED_FIFO                       {}", facts.sched_fifo);
    println!(
        "guest instruction rate           {:.2} M/s per vCPU",
        facts.guest_instructions_per_second / 1e6
    );
    Ok(())
}

fn ring_text(bytes: i32) -> String {
    if bytes <= 0 {
        "not supported".into()
    } else {
        format!("up to {} bytes = {} entries", bytes, bytes / 16)
    }
}

//! The command line: the arguments, their checks (everything a user can get wrong is refused
//! before a VM boots, with exit code 2 and a sentence naming the option and the value), and
//! the commands. `main.rs` only parses, dispatches and prints the error.

mod migration;
pub mod output;
mod plan;
mod probe;
pub mod report;
mod run;

pub use plan::RunPlan;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::limit::{LimitAlgo, MAX_LIMIT_MIBPS, MIN_LIMIT_MIBPS};
use crate::migration::{MigrationUri, UriError};
use crate::rate::{RateMode, MAX_CALC_TIME_MS, MIN_CALC_TIME_MS};
use crate::showcase::demo::{self, DemoOptions};
use crate::tracking::Cadence;
use crate::tracking::DirtyLog;
use crate::vm::guest::{self, Workload};
use crate::vmm::VmmError;
use output::{OutputError, OutputFile};

const ABOUT: &str = "A minimal KVM VMM that tracks, measures and limits how fast vCPUs dirty \
                     guest memory.";

const LONG_ABOUT: &str = "\
A minimal KVM VMM that tracks, measures and limits how fast vCPUs dirty guest memory.

Each vCPU runs a tiny built-in guest program (a writer, a reader, or idle) whose own counters are
the ground truth every measurement is judged against.

Without a command, runs the demo.

Exit codes: 0 success, 2 bad usage or input, 3 KVM unavailable or lacking a needed capability,
1 any other failure.";

/// The workload grammar, shown by `dirtyvm --help` and `dirtyvm run --help`.
const WORKLOAD_HELP: &str = "\
Workload SPEC (the i-th --workload applies to vCPU i; vCPUs without one are idle):
  write:SIZE[@MIBPS]         write one byte per 4 KiB page, sequentially over SIZE,
                             optionally paced to MIBPS (at least 0.01)
  random-write:SIZE[@MIBPS]  the same in a pseudo-random page order (every page once per pass)
  read:SIZE                  read one word per page, sequentially over SIZE
  idle                       halt
SIZE is bytes with an optional binary K, M or G suffix, a multiple of 4K. Each vCPU works in its
own region of guest memory, so the working sets together must fit in --memory, and the
writers' working sets in the host memory available to dirtyvm.

Dirty limits (--dirty-limit, --vcpu-dirty-limit) go from 1 to 1048576 MiB/s.

Example:
  dirtyvm run --vcpus 2 --memory 256M --workload write:64M --workload read:64M \\
      --duration 3 --report r.json";

/// `dirtyvm`'s arguments.
#[derive(Debug, Parser)]
#[command(name = "dirtyvm", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = WORKLOAD_HELP)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
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

#[derive(Debug, Args)]
struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_memory, allow_negative_numbers = true)]
    memory: u64,
    /// The writer's working set (vCPU 0, unpaced).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_working_set, allow_negative_numbers = true)]
    writer: u64,
    /// The reader's working set (vCPU 1).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_working_set, allow_negative_numbers = true)]
    reader: u64,
    /// The dirty limit, and auto-converge's target, MiB/s.
    #[arg(long, default_value_t = 64.0, value_name = "MIBPS", value_parser = parse_limit, allow_negative_numbers = true)]
    limit: f64,
    /// Seconds under the dirty limit (auto-converge gets 4 more to climb).
    #[arg(long, default_value_t = 6, value_name = "SECS", value_parser = clap::value_parser!(u64).range(3..=600), allow_negative_numbers = true)]
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
pub struct RunArgs {
    /// Number of vCPUs [default: 2].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    vcpus: Option<u32>,
    /// Guest memory: bytes with an optional K, M or G (binary) suffix [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory, allow_negative_numbers = true)]
    memory: Option<u64>,
    /// Workload of the next vCPU (repeatable): write:SIZE[@MIBPS], random-write:SIZE[@MIBPS],
    /// read:SIZE or idle.
    #[arg(long = "workload", value_name = "SPEC")]
    workloads: Vec<Workload>,
    /// Dirty tracking: per-vCPU dirty rings, the dirty bitmap, or none.
    #[arg(long, value_enum, default_value_t = DirtyLog::Ring)]
    dirty_log: DirtyLog,
    /// Entries per vCPU dirty ring: a power of two from 1024 to the host's maximum
    /// (`dirtyvm probe` shows it). Default: the host's maximum (65536 on most hosts), which
    /// a full-speed writer takes longest to fill.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    ring_entries: Option<u32>,
    /// Reaper cadence: `adaptive` (dirtyvm's: from the fastest rate any ring has filled at
    /// and ring-full exits), `levels` (Chongyun Wu's six run levels, 1 s down to 80 ms, from
    /// ring fill and ring-full exits) or `fixed:MS` (`fixed:1000` is QEMU's).
    #[arg(
        long,
        default_value = "adaptive",
        value_name = "adaptive|levels|fixed:MS"
    )]
    reaper: Cadence,
    /// Measure the dirty rate back to back through the run, each result printed beside the
    /// ground truth: MODE is page-sampling, dirty-ring or dirty-bitmap, MS the window
    /// (50 to 60000, default 1000; no longer than --duration).
    #[arg(long, value_name = "MODE[:MS]")]
    calc_dirty_rate: Option<RateSpec>,
    /// Sampled pages per GiB of guest memory, for --calc-dirty-rate page-sampling only (128 to
    /// 16384, default 512).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    sample_pages: Option<i64>,
    /// Limit every vCPU's dirty rate to MIBPS MiB/s (1 to 1048576) from the start (with
    /// --throttle auto-converge: the VM's rate, by slowing every vCPU alike instead).
    #[arg(long, value_name = "MIBPS", value_parser = parse_limit, allow_negative_numbers = true)]
    dirty_limit: Option<f64>,
    /// Limit one vCPU's dirty rate (repeatable, once per vCPU): vCPU ID to MIBPS MiB/s. It
    /// takes the place of --dirty-limit for that vCPU.
    #[arg(long, value_name = "ID=MIBPS", value_parser = parse_vcpu_limit, allow_negative_numbers = true)]
    vcpu_dirty_limit: Vec<(u32, f64)>,
    /// Dirty-limit algorithm: `quota` (dirtyvm's: a per-vCPU page quota enforced with
    /// kicks, independent of ring size) or `reference` (QEMU's, computed exactly).
    #[arg(long, value_enum, default_value_t = LimitAlgo::Quota)]
    limit_algo: LimitAlgo,
    /// With --dirty-limit: the classic whole-VM throttle instead of per-vCPU limits, raised
    /// 20, 30, ... 99 % until the VM's dirty rate is under the limit; slows every vCPU alike.
    #[arg(long, value_name = "auto-converge", value_parser = ["auto-converge"])]
    throttle: Option<String>,
    /// Stop after this many seconds (otherwise run until SIGINT, SIGTERM, SIGHUP or QMP
    /// `quit`).
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Write a JSON report here at exit: a new file, a regular file (replaced atomically), a
    /// character device or a FIFO (written through). Checked before the VM boots.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Serve QMP (QEMU's protocol: query-status, stop, cont, quit, calc-dirty-rate,
    /// set-vcpu-dirty-limit, migrate, query-migrate, ...) on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Receive the guest from another dirtyvm's `migrate` instead of booting one: listen on
    /// tcp:HOST:PORT or unix:PATH, or with `defer` wait for QMP `migrate-incoming`. The VM's
    /// shape (vCPUs, memory, workloads) comes from the source; --vcpus, --memory and
    /// --workload, if given, must agree with it. Tracking and limit options apply here.
    /// --duration counts from the guest's arrival.
    #[arg(long, value_name = "URI|defer")]
    incoming: Option<Incoming>,
}

/// `--incoming`: where the guest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Listen on this address.
    Uri(MigrationUri),
    /// Wait for QMP `migrate-incoming`.
    Defer,
}

impl std::str::FromStr for Incoming {
    type Err = String;

    fn from_str(text: &str) -> Result<Incoming, String> {
        if text == "defer" {
            return Ok(Incoming::Defer);
        }
        text.parse()
            .map(Incoming::Uri)
            .map_err(|e: UriError| format!("{e} (use tcp:HOST:PORT, unix:PATH or defer)"))
    }
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

fn parse_limit(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (MIN_LIMIT_MIBPS..=MAX_LIMIT_MIBPS).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{text}' is not a dirty limit from {MIN_LIMIT_MIBPS} to {MAX_LIMIT_MIBPS} MiB/s"
        )),
    }
}

fn parse_vcpu_limit(text: &str) -> Result<(u32, f64), String> {
    let (id, rate) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not ID=MIBPS (for example 0=64)"))?;
    let id = id
        .parse()
        .map_err(|_| format!("vCPU id '{id}' in '{text}' is not a number"))?;
    Ok((id, parse_limit(rate)?))
}

fn parse_memory(text: &str) -> Result<u64, String> {
    guest::parse_size(text).map_err(|e| e.to_string())
}

fn parse_working_set(text: &str) -> Result<u64, String> {
    guest::parse_working_set(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!(
            "'{text}' is not a number of seconds above 0 and at most 1e9"
        )),
    }
}

/// A failed command: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// 1 failure, 2 bad usage or input, 3 KVM unavailable or lacking.
    pub code: u8,
    /// What went wrong and what to do.
    pub message: String,
}

impl Failure {
    /// Bad usage or input: exit code 2.
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    /// Anything else: exit code 1.
    fn failed(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<VmmError> for Failure {
    fn from(e: VmmError) -> Failure {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl From<OutputError> for Failure {
    fn from(e: OutputError) -> Failure {
        Failure::usage(e.to_string())
    }
}

/// Runs the command `cli` names.
pub fn execute(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        None => demo(cli.demo),
        Some(Command::Demo(args)) => demo(args),
        Some(Command::Probe { json }) => probe::probe(json),
        Some(Command::Run(args)) => run::run(args),
    }
}

fn demo(args: DemoArgs) -> Result<(), Failure> {
    if args
        .writer
        .checked_add(args.reader)
        .is_none_or(|sum| sum > args.memory)
    {
        return Err(Failure::usage(format!(
            "--writer {} and --reader {} do not fit in --memory {}",
            guest::Size(args.writer),
            guest::Size(args.reader),
            guest::Size(args.memory)
        )));
    }
    let plot = OutputFile::check("--plot", &args.plot)?;
    let report = args
        .report
        .as_deref()
        .map(|path| OutputFile::check("--report", path))
        .transpose()?;
    let options = DemoOptions {
        memory: args.memory,
        writer: args.writer,
        reader: args.reader,
        limit_mibps: args.limit,
        phase_secs: args.phase_secs,
    };
    let (summary, picture) = demo::run(&options)?;
    demo::print_summary(&summary, args.limit);
    // The summary is printed first: a picture that cannot be written loses nothing else.
    plot.write(picture.as_bytes()).map_err(|e| {
        Failure::failed(format!(
            "writing the picture to {}: {e}",
            plot.path().display()
        ))
    })?;
    say!("\npicture written to {}", plot.path().display());
    if let Some(report) = report {
        let json = serde_json::to_vec_pretty(&summary).expect("plain data serializes");
        report
            .write(&[json, b"\n".to_vec()].concat())
            .map_err(|e| {
                Failure::failed(format!(
                    "writing the report to {}: {e}",
                    report.path().display()
                ))
            })?;
        say!("report written to {}", report.path().display());
    }
    Ok(())
}

//! `dirtyvm run`: the checked plan, then the run: progress lines, dirty-rate measurements,
//! QMP, the summary and the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use super::migration::{self as launcher_migration, MigrationProgress};
use super::plan::RunPlan;
use super::report::Report;
use super::{Failure, RunArgs};
use crate::migration::Migration;
use crate::qmp::{MachineBackend, Server};
use crate::rate::{Measurement, RateRequest, RateStatus};
use crate::tracking::DirtyLog;
use crate::units::pages_to_mibps;
use crate::vm::guest::{self, GuestStats, Workload};
use crate::vm::vcpu::{StopReason, StopRequest};
use crate::vmm::{Boot, Machine};

/// `dirtyvm run`.
pub fn run(args: RunArgs) -> Result<(), Failure> {
    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // only the waiter below receives them: a signal, or a closed terminal, is an orderly stop.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .map_err(|e| Failure::failed(format!("blocking SIGINT, SIGTERM and SIGHUP: {e}")))?;
    let plan = RunPlan::try_from(args)?;
    let stop = Arc::new(StopRequest::default());
    spawn_signal_waiter(signals, stop.clone());
    let migration = Arc::new(Migration::new());
    let backend = Arc::new(MachineBackend::new(
        migration.clone(),
        stop.clone(),
        plan.vm.dirty_log,
    ));
    let booted = match plan.incoming {
        Some(_) => None,
        None => {
            let boot = Boot {
                stop: stop.clone(),
                ..Boot::default()
            };
            let machine = Arc::new(Machine::boot_with(&plan.vm, boot)?);
            if let Err(e) = plan.control.apply(&machine) {
                let _ = machine.shutdown();
                return Err(Failure::usage(e));
            }
            backend.attach(machine.clone());
            Some(machine)
        }
    };
    let qmp = match &plan.qmp {
        Some(path) => match Server::spawn(path, backend.clone()) {
            Ok(server) => {
                say!("QMP listening on {}", path.display());
                Some(server)
            }
            Err(e) => {
                if let Some(machine) = &booted {
                    let _ = machine.shutdown();
                }
                return Err(Failure::failed(format!(
                    "cannot serve QMP at {}: {e}",
                    path.display()
                )));
            }
        },
        None => None,
    };

    let arrival = match (&booted, &plan.incoming) {
        (Some(machine), _) => Ok(Some(machine.clone())),
        (None, Some(incoming)) => {
            launcher_migration::receive_guest(&plan, incoming, &migration, &stop, &backend)
        }
        (None, None) => unreachable!("a run without --incoming boots its machine"),
    };
    let (machine, failure) = match arrival {
        Ok(machine) => (machine, None),
        Err(failure) => (None, Some(failure)),
    };
    let (reason, measurements) = match &machine {
        Some(machine) => {
            print_intro(&plan, machine);
            watch(machine, &migration, plan.duration, plan.rate)
        }
        // The guest never came: stopped while waiting, or the migration failed.
        None => (
            stop.reason().unwrap_or_else(|| {
                StopReason::Failed(
                    failure
                        .as_ref()
                        .map_or_else(String::new, |f| f.message.clone()),
                )
            }),
            Vec::new(),
        ),
    };
    if let Some(server) = qmp {
        if reason != StopReason::Quit {
            server.notify_shutdown();
        }
        server.shut_down();
    }
    // An outgoing migration still running is cancelled, and its guest resumed, before the
    // machine stops.
    migration.shut_down();
    // The vCPUs stop and the rings are flushed before any counter is read, so the guests'
    // counts and the harvested ones describe the same moment.
    let shutdown = machine.as_ref().map(|m| m.shutdown()).transpose();
    let report = Report::new(
        machine.as_deref(),
        &reason.to_string(),
        measurements,
        &migration.info(),
    );
    print_summary(&report);
    if let Some(out) = &plan.report {
        out.write(&report.to_json()).map_err(|e| {
            Failure::failed(format!(
                "writing the report to {}: {e}",
                out.path().display()
            ))
        })?;
        say!("report written to {}", out.path().display());
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    shutdown?;
    match reason {
        StopReason::VcpuFailed { .. } | StopReason::Failed(_) => {
            Err(Failure::failed(reason.to_string()))
        }
        StopReason::Duration | StopReason::Signal(_) | StopReason::Quit => Ok(()),
    }
}

/// The line that says what runs.
fn print_intro(plan: &RunPlan, machine: &Machine) {
    let layout = machine.layout();
    let tracking = match (plan.vm.dirty_log, machine.tracker().ring_entries()) {
        (DirtyLog::Ring, Some(entries)) => {
            format!(
                "dirty rings of {entries} entries, {} reaper",
                plan.vm.reaper
            )
        }
        (DirtyLog::Bitmap, _) => format!("dirty bitmap, {} reaper", plan.vm.reaper),
        _ => "no dirty tracking".to_string(),
    };
    say!(
        "dirtyvm: {} vCPUs, {} guest memory, {tracking}; {}",
        layout.vcpus().len(),
        guest::Size(layout.memory()),
        match plan.duration {
            Some(d) => format!("running for {:.1} s", d.as_secs_f64()),
            None => "running until Ctrl-C".to_string(),
        }
    );
}

fn spawn_signal_waiter(signals: SigSet, stop: Arc<StopRequest>) {
    // Never joined: it waits in sigwait for the life of the process.
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                stop.request(StopReason::Signal(signal.as_str()));
            }
        });
    if let Err(e) = spawned {
        warn!("no signal handling thread ({e}); stop with SIGKILL");
    }
}

/// How often the launcher looks at the VM between progress lines.
const TICK: Duration = Duration::from_millis(100);
/// How often it prints a progress line per vCPU.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs until the VM stops: a progress line per vCPU each second, one for a migration under
/// way, and back-to-back dirty-rate measurements when asked. Returns why it stopped and the
/// measurements.
fn watch(
    machine: &Machine,
    migration: &Migration,
    duration: Option<Duration>,
    rate: Option<RateRequest>,
) -> (StopReason, Vec<Measurement>) {
    let deadline = duration.map(|d| machine.started() + d);
    let mut progress = Progress::new(machine);
    let mut migration_progress = MigrationProgress::new(migration);
    let mut measurements = Vec::new();
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            let reason = machine
                .stop_request()
                .reason()
                .unwrap_or(StopReason::Duration);
            return (reason, measurements);
        }
        let wait = deadline.map_or(TICK, |d| (d - now).min(TICK));
        if let Some(reason) = machine.stop_request().wait_timeout(wait) {
            return (reason, measurements);
        }
        if let Some(request) = rate {
            let meter = machine.rate_meter();
            if measuring && meter.state().status == RateStatus::Measured {
                measuring = false;
                if let Some(m) = meter.state().last {
                    say!("  {m}");
                    measurements.push(m);
                }
            }
            // Start another only if it can finish before the run ends.
            let room = deadline
                .is_none_or(|d| Instant::now() + Duration::from_millis(request.calc_time_ms) < d);
            if !measuring && room {
                match meter.start(request) {
                    Ok(()) => measuring = true,
                    Err(e) => warn!("dirty-rate measurement: {e}"),
                }
            }
        }
        progress.print_if_due(machine);
        migration_progress.print_if_due(migration);
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
        say!(
            "{:>7}  {:>4}  {:<24} {:>14} {:>14} {:>15}",
            "time",
            "vcpu",
            "workload",
            "written MiB/s",
            "read MiB/s",
            "harvested MiB/s"
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
        let working = machine.layout().vcpus().iter().enumerate();
        for (i, plan) in working.filter(|(_, plan)| plan.workload != Workload::Idle) {
            let (now, before) = (&stats[i], &self.last[i]);
            say!(
                "{:>6.1}s  {:>4}  {:<24} {:>14.1} {:>14.1} {:>15.1}",
                t,
                plan.id,
                plan.workload.to_string(),
                pages_to_mibps(now.pages_written - before.pages_written, secs),
                pages_to_mibps(now.pages_read - before.pages_read, secs),
                pages_to_mibps(harvested[i] - self.last_harvested[i], secs),
            );
        }
        self.last = stats;
        self.last_harvested = harvested;
    }
}

fn harvested(machine: &Machine) -> Vec<u64> {
    (0..machine.vcpus().len() as u32)
        .map(|id| machine.tracker().vcpu(id).snapshot().harvested)
        .collect()
}

fn print_summary(report: &Report) {
    if let Some(migration) = &report.migration {
        launcher_migration::print_summary(migration);
    }
    let Some(report_guest) = &report.guest else {
        say!("\nstopped before a guest arrived ({})", report.stop_reason);
        return;
    };
    say!(
        "\nstopped after {:.2} s ({})",
        report_guest.duration_s,
        report.stop_reason
    );
    say!(
        "{:>4}  {:<24} {:>14} {:>14} {:>8} {:>14} {:>14}",
        "vcpu",
        "workload",
        "pages written",
        "pages read",
        "passes",
        "written MiB/s",
        "read MiB/s"
    );
    let (idle, working): (Vec<_>, Vec<_>) = report_guest
        .vcpus
        .iter()
        .partition(|v| v.workload == "idle");
    for v in working {
        say!(
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
    if !idle.is_empty() {
        say!("  and {} idle vCPUs", idle.len());
    }
}

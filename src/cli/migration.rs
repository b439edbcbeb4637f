//! The launcher's side of migrations: receiving a guest (`run --incoming`), and the progress
//! lines and summary of either side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plan::{IncomingPlan, RunPlan};
use super::report::MigrationReport;
use super::{Failure, Incoming};
use crate::migration::{self, Migration, MigrationInfo, MigrationStatus, Received, Role};
use crate::qmp::MachineBackend;
use crate::units::{mib, PAGE_SIZE};
use crate::vm::guest;
use crate::vm::vcpu::StopRequest;
use crate::vmm::{Boot, Machine, VmConfig};

/// How often the waiting launcher looks at the migration.
const TICK: Duration = Duration::from_millis(100);

/// Waits for the guest as `incoming` says, receives it, boots it from the state received and
/// tells the source. `None` when a stop came first. An error is the destination's failure
/// (the process then exits non-zero, as QEMU's does): the source was told why, and no guest
/// instruction ran.
pub fn receive_guest(
    plan: &RunPlan,
    incoming: &IncomingPlan,
    migration: &Migration,
    stop: &Arc<StopRequest>,
    backend: &MachineBackend,
) -> Result<Option<Arc<Machine>>, Failure> {
    let stopped = || stop.reason().is_some();
    match &incoming.from {
        Incoming::Uri(uri) => migration
            .listen(uri.clone())
            .map_err(|e| Failure::failed(e.to_string()))?,
        Incoming::Defer => {
            migration.defer_incoming();
            say!("waiting for QMP migrate-incoming (--incoming defer)");
        }
    }
    let received = std::thread::scope(|scope| {
        let receiver = std::thread::Builder::new()
            .name("incoming".into())
            .spawn_scoped(scope, || {
                migration::receive(migration, &incoming.expect, stopped)
            })
            .map_err(|e| Failure::failed(format!("cannot start the incoming thread: {e}")))?;
        let mut progress = MigrationProgress::new(migration);
        while !receiver.is_finished() {
            std::thread::sleep(TICK);
            if stopped() {
                migration.abort_incoming();
            }
            progress.print_if_due(migration);
        }
        receiver
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(Failure::failed)
    })?;
    let Some(received) = received else {
        return Ok(None);
    };
    boot_received(plan, received, migration, stop, backend).map(Some)
}

/// Boots the guest received (paused), puts the run's limits on it, starts it unless QMP
/// `stop` said otherwise, and answers the source.
fn boot_received(
    plan: &RunPlan,
    received: Received,
    migration: &Migration,
    stop: &Arc<StopRequest>,
    backend: &MachineBackend,
) -> Result<Arc<Machine>, Failure> {
    let Received {
        config,
        restore,
        answer,
    } = received;
    let refuse = |answer: migration::Answer, why: String| {
        answer.refuse(&why);
        Failure::failed(migration.incoming_failed(why))
    };
    if let Err(why) = plan.control.check_vcpus(config.vcpus()) {
        return Err(refuse(answer, why));
    }
    let vm = VmConfig {
        vcpus: config.vcpus(),
        memory: config.memory,
        workloads: config.workloads.clone(),
        ..plan.vm.clone()
    };
    let boot = Boot {
        restore: Some(restore),
        paused: true,
        stop: stop.clone(),
    };
    let machine = match Machine::boot_with(&vm, boot) {
        Ok(machine) => Arc::new(machine),
        Err(e) => return Err(refuse(answer, e.to_string())),
    };
    if let Err(why) = plan.control.apply(&machine) {
        let _ = machine.shutdown();
        return Err(refuse(answer, why));
    }
    backend.attach(machine.clone());
    let running = migration.autostart();
    if running {
        machine.resume();
    }
    if let Err(e) = answer.accept() {
        // The guest is whole here (its digest matched); only the source will not know.
        warn!("the guest arrived, but telling the source failed: {e}");
    }
    migration.incoming_completed(running);
    say!(
        "the guest arrived: {} vCPUs, {} guest memory{}",
        config.vcpus(),
        guest::Size(config.memory),
        if running {
            ", running"
        } else {
            ", paused (QMP stop before it arrived; cont starts it)"
        }
    );
    Ok(machine)
}

/// The once-a-second line of a migration under way, and one line when it ends.
pub struct MigrationProgress {
    at: Instant,
    /// What was last said about the status.
    status: MigrationStatus,
    listening_said: bool,
    transferred: u64,
}

impl MigrationProgress {
    /// From what `migration` shows now.
    pub fn new(migration: &Migration) -> MigrationProgress {
        let info = migration.info();
        MigrationProgress {
            at: Instant::now(),
            status: info.status,
            listening_said: false,
            transferred: info.ram.transferred,
        }
    }

    /// Prints a progress line if a second has passed, and a line on each change of status.
    pub fn print_if_due(&mut self, migration: &Migration) {
        let info = migration.info();
        if let (false, Some(address)) = (self.listening_said, &info.listening) {
            say!("waiting for the migration on {address}");
            self.listening_said = true;
        }
        if info.status != self.status {
            self.status = info.status;
            self.transferred = info.ram.transferred;
            self.at = Instant::now();
            announce(&info);
            return;
        }
        if info.status != MigrationStatus::Active || self.at.elapsed() < Duration::from_secs(1) {
            return;
        }
        let secs = self.at.elapsed().as_secs_f64();
        let sent = mib(info.ram.transferred.saturating_sub(self.transferred));
        self.at = Instant::now();
        self.transferred = info.ram.transferred;
        let pass = info
            .ram
            .dirty_sync_count
            .max(info.iterations.len() as u64 + 1);
        match info.role {
            Some(Role::Source) => say!(
                "  migration: pass {pass}, {:.1} MiB remaining, {:.1} MiB/s sent, dirty {:.1} \
                 MiB/s, expected downtime {} ms",
                mib(info.ram.remaining),
                sent / secs,
                mib(info.ram.dirty_pages_rate * PAGE_SIZE),
                info.expected_downtime_ms
            ),
            Some(Role::Destination) => say!(
                "  migration: receiving pass {pass}, {:.1} MiB received, {:.1} MiB/s",
                mib(info.ram.transferred),
                sent / secs
            ),
            None => {}
        }
    }
}

/// One line for a status reached.
fn announce(info: &MigrationInfo) {
    let side = match info.role {
        Some(Role::Source) => "migration to",
        Some(Role::Destination) => "migration from",
        None => return,
    };
    let peer = match (info.role, &info.uri) {
        (Some(Role::Source), Some(uri)) => uri.as_str(),
        _ => "the source",
    };
    match info.status {
        MigrationStatus::Setup if info.role == Some(Role::Source) => {
            say!("{side} {peer}: connecting")
        }
        MigrationStatus::Active => say!("{side} {peer}: active"),
        MigrationStatus::Completed => say!(
            "{side} {peer}: completed in {} ms, {:.1} MiB in {} passes{}",
            info.total_time_ms,
            mib(info.ram.transferred),
            info.iterations.len(),
            info.downtime_ms
                .map_or_else(String::new, |d| format!(", downtime {d} ms"))
        ),
        MigrationStatus::Cancelled => say!("{side} {peer}: cancelled; the guest runs on here"),
        MigrationStatus::Failed => say!(
            "{side} {peer}: failed: {}",
            info.error.as_deref().unwrap_or("no reason given")
        ),
        _ => {}
    }
}

/// The summary's migration lines.
pub fn print_summary(report: &MigrationReport) {
    say!(
        "\nmigration ({}, {}): {} ms, {} bytes, {} pages sent whole, {} zero pages, {} passes{}{}",
        match report.role {
            Role::Source => "source",
            Role::Destination => "destination",
        },
        report.status,
        report.total_time_ms,
        report.bytes_transferred,
        report.normal_pages,
        report.zero_pages,
        report.iterations.len(),
        report
            .downtime_ms
            .map_or_else(String::new, |d| format!(", downtime {d} ms")),
        report
            .memory_digest
            .as_ref()
            .map_or_else(String::new, |d| format!(", RAM digest {d}"))
    );
    if let Some(error) = &report.error {
        say!("  error: {error}");
    }
}

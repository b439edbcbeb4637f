//! Live migration: a running guest moved from one dirtyvm process to another, precopy, over
//! TCP or a Unix socket, driven with QEMU's QMP commands, and proven byte-exact.
//!
//! # The source ([`outgoing`](self))
//!
//! QEMU's precopy loop (docs/reference.md#live-migration-precopy): a first pass sends all of
//! guest RAM; then passes send the pages the tracker reports dirty (the rings or the bitmap,
//! through the dirty-page set that migration takes). The stream is rate-limited in 100 ms
//! windows to `max-bandwidth / 10` bytes each, and the bandwidth measured on the stream over
//! each window sets the threshold `bandwidth × downtime-limit`. When what remains of the pass
//! fits under it, the dirty log is synced once more; if that still fits, the switchover:
//! the vCPUs are paused outside `KVM_RUN`, the rings harvested, the last dirty pages sent
//! without a rate limit, then every vCPU's registers and TSC and the guests' counters, then
//! a digest of all of guest RAM, read from the paused guest itself (not from what was sent:
//! a page the tracker missed would make the two differ). The source waits for the
//! destination's verdict: `completed`, and it stays paused (`postmigrate`); or `failed`,
//! and its guest runs on. Cancelling or failing before the verdict resumes the guest.
//! No lock is held across a socket write: the dirty set is taken under the tracker's lock,
//! then pages are read straight from guest memory.
//!
//! When the guest dirties faster than the stream sends, the `auto-converge` or `dirty-limit`
//! capability slows it, on QEMU's trigger; `x-vcpu-dirty-limit-auto` lets the migration set
//! the limits itself, and `x-expected-completion-ms` forecasts the end (`converge`).
//!
//! # The destination ([`incoming`](self))
//!
//! `dirtyvm run --incoming URI` (or `defer`, then QMP `migrate-incoming`) listens, says hello,
//! and reads the stream into fresh guest memory, hashing each page as it arrives. The VM's
//! shape comes from the stream; options that contradict it are refused with both values
//! named. Only when the stream's end has come, the device state is there and the digest of
//! the RAM received equals the source's does it boot the VM from that state (registers, TSC,
//! counters) and answer; a truncated, corrupt or hostile stream, or a different digest, is
//! refused with what was wrong, and no guest instruction runs.
//!
//! # The stream ([`stream`])
//!
//! dirtyvm's own, versioned, with a magic number; its module docs give the layout.

mod converge;
mod incoming;
mod outgoing;
mod params;
pub mod stream;
mod uri;

pub use converge::AidView;
pub use incoming::{receive, Answer, Expect, Received};
pub use params::{
    Capabilities, ParameterError, Parameters, CAPABILITIES, DEFAULT_DOWNTIME_LIMIT_MS,
    DEFAULT_MAX_BANDWIDTH, MAX_DOWNTIME_LIMIT_MS,
};
pub use uri::{Connection, Listener, MigrationUri, UriError};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sync::{Guard, Rounds, Shared, Worker};
use crate::tracking::DirtyLog;
use crate::vmm::Machine;

/// QEMU's `MigrationStatus`, the states dirtyvm goes through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration yet.
    #[default]
    None,
    /// Connecting; on a destination, listening.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Sending (or receiving) the guest.
    Active,
    /// Done: the destination runs the guest.
    Completed,
    /// Failed; `error` says why.
    Failed,
}

impl MigrationStatus {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
        }
    }

    /// Whether a migration is under way (`migration_is_running()`).
    pub fn running(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling
        )
    }
}

/// Which end of a migration this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// It sends the guest.
    Source,
    /// It receives the guest.
    Destination,
}

/// QEMU's `MigrationStats` (`query-migrate`'s `ram`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RamStats {
    /// Bytes of the stream so far.
    pub transferred: u64,
    /// Bytes of dirty pages still to send.
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Zero pages sent as a flag (QEMU's `duplicate`).
    pub duplicate: u64,
    /// Pages sent whole.
    pub normal: u64,
    /// Bytes of those pages.
    pub normal_bytes: u64,
    /// Pages the guest dirtied per second, measured at the last sync of the dirty log.
    pub dirty_pages_rate: u64,
    /// Throughput of the last window, megabits per second.
    pub mbps: f64,
    /// Syncs of the dirty log (passes begun).
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while it was paused for the switchover.
    pub downtime_bytes: u64,
    /// Pages sent per second in the last window.
    pub pages_per_second: u64,
    /// Bytes per page of these statistics.
    pub page_size: u64,
}

/// One pass over the dirty pages.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Iteration {
    /// Its number: 1 is the first pass over all of RAM.
    pub pass: u64,
    /// Pages sent (received, on a destination) in it.
    pub pages_sent: u64,
    /// Dirty pages the sync that began it found (all of RAM for the first); the source's
    /// count (0 on a destination).
    pub dirty_pages_found: u64,
    /// Pages still to send when it began; the source's count (0 on a destination).
    pub remaining_pages: u64,
    /// How long it lasted, ms.
    pub duration_ms: f64,
}

/// One side's view of a migration: `query-migrate`, the progress lines, the report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationInfo {
    /// Which side this is, once a migration began.
    pub role: Option<Role>,
    /// The status.
    pub status: MigrationStatus,
    /// The peer's address.
    pub uri: Option<String>,
    /// The counters.
    pub ram: RamStats,
    /// Since the migration began, ms.
    pub total_time_ms: u64,
    /// How long connecting and the header took, ms.
    pub setup_time_ms: u64,
    /// The pause the switchover would take now, ms (while active).
    pub expected_downtime_ms: u64,
    /// The pause it took: source pause to the destination's answer that it runs, ms.
    pub downtime_ms: Option<u64>,
    /// The passes.
    pub iterations: Vec<Iteration>,
    /// The digest of guest RAM at the switchover (both sides, equal when it succeeded).
    pub memory_digest: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The source is in its switchover (`finish-migrate`).
    pub finishing: bool,
    /// Where a destination listens (with the port the system chose for port 0).
    pub listening: Option<MigrationUri>,
    /// When the source began its switchover (paused the guest): with the destination's
    /// resume on the same clock, the downtime.
    pub switchover_at: Option<Instant>,
    /// The convergence aid's figures (while active).
    pub aids: AidView,
    /// `x-expected-completion-ms`: the forecast time to completion (while active, when it
    /// converges).
    pub expected_completion_ms: Option<u64>,
}

/// What QMP reports as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationEvent {
    /// `MIGRATION {status}`.
    Status(MigrationStatus),
    /// `MIGRATION_PASS {pass}`.
    Pass(u64),
    /// `STOP`: the migration paused the guest (the source's switchover).
    Stop,
    /// `RESUME`: the migration started the guest (on the destination, or again on a source
    /// whose switchover failed).
    Resume,
}

/// Events kept for QMP at most; older ones are dropped when no client reads them.
const MAX_EVENTS: usize = 1024;

/// What a process's migration state holds.
struct State {
    params: Parameters,
    caps: Capabilities,
    info: MigrationInfo,
    /// When the current migration began.
    start: Option<Instant>,
    events: Vec<MigrationEvent>,
    /// A destination starts its guest running once it arrived (QEMU's autostart); `stop`
    /// and `cont` while waiting change it.
    autostart: bool,
    /// The outgoing migration for the worker to run.
    job: Option<Job>,
    incoming: IncomingRequest,
    /// A destination's listening socket, until `receive` takes it.
    listener: Option<Listener>,
    /// The migration's connection, either way: shut down to cancel one blocked in a read or
    /// a write.
    connection: Option<Connection>,
}

/// A destination's source of the URI to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IncomingRequest {
    /// This process is no destination.
    No,
    /// Waiting for QMP `migrate-incoming` (`--incoming defer`).
    Deferred,
    /// Listening, or about to: `migrate-incoming` may not be repeated.
    Started(MigrationUri),
}

struct Job {
    machine: Arc<Machine>,
    uri: MigrationUri,
}

impl Rounds for State {
    fn active(&self) -> bool {
        self.job.is_some()
    }

    fn next_round(&self) -> Option<Instant> {
        Some(Instant::now())
    }
}

impl State {
    /// Moves to `status`, telling QMP when the `events` capability is on.
    fn set_status(&mut self, status: MigrationStatus) {
        self.info.status = status;
        if self.caps.events {
            self.event(MigrationEvent::Status(status));
        }
    }

    /// Queues `event` for QMP.
    fn event(&mut self, event: MigrationEvent) {
        if self.events.len() == MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    /// Starts a new migration's view, as `role`, with `uri`.
    fn begin(&mut self, role: Role, uri: &MigrationUri) {
        self.info = MigrationInfo {
            role: Some(role),
            uri: Some(uri.to_string()),
            ..MigrationInfo::default()
        };
        self.start = Some(Instant::now());
        self.set_status(MigrationStatus::Setup);
    }

    /// A destination whose guest has not arrived.
    fn waiting_for_guest(&self) -> bool {
        self.incoming != IncomingRequest::No && self.info.status != MigrationStatus::Completed
    }

    fn elapsed_ms(&self) -> u64 {
        self.start.map_or(0, |s| s.elapsed().as_millis() as u64)
    }
}

/// Why `migrate` or `migrate-incoming` was refused: QEMU's texts where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateError(pub String);

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MigrateError {}

const IN_PROGRESS: &str = "There's a migration process in progress";
/// QEMU's answer to `migrate` on a destination whose guest has not arrived.
pub const WAITING_FOR_INCOMING: &str = "Guest is waiting for an incoming migration";

/// Where a migration stands, in brief (what the run state depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// Which side this process is, once a migration began.
    pub role: Option<Role>,
    /// The status.
    pub status: MigrationStatus,
    /// The source is in its switchover (`finish-migrate`).
    pub finishing: bool,
}

/// A process's migration state: parameters, capabilities, the migration under way or the
/// last one, as QMP, the launcher and the report see it. The outgoing migration runs on a
/// worker thread (`migration`); an incoming one on the caller's thread ([`receive`]).
pub struct Migration {
    worker: Worker<State>,
    cancel: Arc<AtomicBool>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration").finish_non_exhaustive()
    }
}

impl Default for Migration {
    fn default() -> Migration {
        Migration::new()
    }
}

impl Migration {
    /// No migration, QEMU's defaults.
    pub fn new() -> Migration {
        let cancel = Arc::new(AtomicBool::new(false));
        let state = State {
            params: Parameters::default(),
            caps: Capabilities::default(),
            info: MigrationInfo::default(),
            start: None,
            events: Vec::new(),
            autostart: true,
            job: None,
            incoming: IncomingRequest::No,
            listener: None,
            connection: None,
        };
        let thread_cancel = cancel.clone();
        Migration {
            worker: Worker::new("migration", state, move |shared, mut state| {
                let job = state.job.take().expect("a round has a job");
                drop(state);
                outgoing::run(shared, &job, &thread_cancel);
                shared.lock()
            }),
            cancel,
        }
    }

    /// The parameters.
    pub fn params(&self) -> Parameters {
        self.worker.lock().params
    }

    /// Changes parameters as `change` does, if the result passes QEMU's checks; allowed
    /// during a migration (it reads them as it goes).
    pub fn set_params(&self, change: impl FnOnce(&mut Parameters)) -> Result<(), ParameterError> {
        let mut state = self.worker.lock();
        let mut params = state.params;
        change(&mut params);
        params.check()?;
        state.params = params;
        Ok(())
    }

    /// The capabilities.
    pub fn caps(&self) -> Capabilities {
        self.worker.lock().caps
    }

    /// Sets capabilities (`(name, state)` pairs, names from [`CAPABILITIES`]); refused during
    /// a migration, or when the result fails QEMU's checks (`dirty_ring`: the VM tracks with
    /// per-vCPU rings).
    pub fn set_caps(&self, changes: &[(&str, bool)], dirty_ring: bool) -> Result<(), MigrateError> {
        let mut state = self.worker.lock();
        if state.info.status.running() && state.info.role == Some(Role::Source) {
            return Err(MigrateError(IN_PROGRESS.into()));
        }
        let mut caps = state.caps;
        for &(name, on) in changes {
            caps.set(name, on).map_err(|e| MigrateError(e.0))?;
        }
        caps.check(dirty_ring).map_err(|e| MigrateError(e.0))?;
        state.caps = caps;
        Ok(())
    }

    /// The current or last migration.
    pub fn info(&self) -> MigrationInfo {
        let state = self.worker.lock();
        let mut info = state.info.clone();
        if info.status.running() {
            info.total_time_ms = state.elapsed_ms();
        }
        info
    }

    /// Events since the last call, oldest first.
    pub fn take_events(&self) -> Vec<MigrationEvent> {
        std::mem::take(&mut self.worker.lock().events)
    }

    /// Waits up to `timeout` while a migration is under way; returns the view then.
    pub fn wait(&self, timeout: Duration) -> MigrationInfo {
        let (state, _) = self
            .worker
            .shared()
            .wait_while(self.worker.lock(), Some(timeout), |s| {
                s.info.status.running()
            });
        drop(state);
        self.info()
    }

    /// `migrate`: sends `machine`'s guest to `uri`, on the `migration` thread; returns at
    /// once. Refused, with QEMU's texts, while one runs, on a destination, for a URI of an
    /// unknown scheme, and after a completed migration left the guest paused; and without
    /// dirty tracking, which a migration needs.
    pub fn migrate(&self, machine: Arc<Machine>, uri: &str) -> Result<(), MigrateError> {
        let uri: MigrationUri = uri.parse().map_err(|e: UriError| MigrateError(e.0))?;
        let mut state = self.worker.lock();
        if state.info.status.running() {
            return Err(MigrateError(IN_PROGRESS.into()));
        }
        if state.waiting_for_guest() {
            return Err(MigrateError(WAITING_FOR_INCOMING.into()));
        }
        if state.info.role == Some(Role::Source)
            && state.info.status == MigrationStatus::Completed
            && !machine.running()
        {
            return Err(MigrateError(
                "Can't migrate the vm that was paused due to previous migration".into(),
            ));
        }
        if machine.tracker().log() == DirtyLog::None {
            return Err(MigrateError(
                "migration needs dirty tracking: start the VM with --dirty-log ring or bitmap"
                    .into(),
            ));
        }
        // Relaxed: the worker reads it after taking the job under the lock.
        self.cancel.store(false, Ordering::Relaxed);
        state.begin(Role::Source, &uri);
        state.job = Some(Job { machine, uri });
        self.worker
            .wake(state)
            .map_err(|e| MigrateError(format!("cannot start the migration thread: {e}")))
    }

    /// `migrate_cancel`: cancels the outgoing migration if one runs (its guest runs on);
    /// succeeds when none does.
    pub fn cancel(&self) {
        let mut state = self.worker.lock();
        if state.info.role == Some(Role::Source) && state.info.status.running() {
            // Relaxed: the migration thread polls it; the status change is under the lock.
            self.cancel.store(true, Ordering::Relaxed);
            state.set_status(MigrationStatus::Cancelling);
            // A thread blocked writing to a destination that stopped reading returns.
            if let Some(connection) = &state.connection {
                connection.shutdown();
            }
        }
    }

    /// Ends an incoming migration that is receiving (its reader returns with an error): the
    /// destination is stopping.
    pub fn abort_incoming(&self) {
        let state = self.worker.lock();
        if state.info.role == Some(Role::Destination) {
            if let Some(connection) = &state.connection {
                connection.shutdown();
            }
        }
    }

    /// This process is a destination that waits for `migrate-incoming` (`--incoming defer`).
    pub fn defer_incoming(&self) {
        self.worker.lock().incoming = IncomingRequest::Deferred;
    }

    /// This process is a destination listening on `uri` (`--incoming URI`) from now on.
    pub fn listen(&self, uri: MigrationUri) -> Result<(), MigrateError> {
        self.listen_locked(&mut self.worker.lock(), uri)
    }

    fn listen_locked(&self, state: &mut State, uri: MigrationUri) -> Result<(), MigrateError> {
        let listener = uri
            .listen()
            .map_err(|e| MigrateError(format!("Failed to listen on {uri}: {e}")))?;
        state.begin(Role::Destination, &uri);
        state.info.listening = Some(listener.address());
        state.incoming = IncomingRequest::Started(uri);
        state.listener = Some(listener);
        self.worker.shared().notify();
        Ok(())
    }

    /// `migrate-incoming`: a deferred destination listens on `uri`, before it answers (a
    /// client may connect the source at once). Refused when this process is no destination
    /// and when it listens already, with QEMU's texts; a refused or failed call may be
    /// repeated.
    pub fn migrate_incoming(&self, uri: &str) -> Result<(), MigrateError> {
        let mut state = self.worker.lock();
        match state.incoming {
            IncomingRequest::No => Err(MigrateError(
                "'-incoming' was not specified on the command line".into(),
            )),
            IncomingRequest::Started(_) => Err(MigrateError(
                "The incoming migration has already been started".into(),
            )),
            IncomingRequest::Deferred => {
                let uri: MigrationUri = uri.parse().map_err(|e: UriError| MigrateError(e.0))?;
                self.listen_locked(&mut state, uri)
            }
        }
    }

    /// Waits up to `timeout` for the listening socket of a destination, and takes it.
    fn take_listener(&self, timeout: Duration) -> Option<Listener> {
        let (mut state, _) =
            self.worker
                .shared()
                .wait_while(self.worker.lock(), Some(timeout), |s| s.listener.is_none());
        state.listener.take()
    }

    /// Whether an outgoing migration with the `dirty-limit` capability runs: then the
    /// limits are the migration's, and QMP refuses a user's (with the limiter in service).
    pub fn holds_dirty_limits(&self) -> bool {
        let state = self.worker.lock();
        state.caps.dirty_limit
            && state.info.role == Some(Role::Source)
            && state.info.status.running()
    }

    /// Where the migration stands.
    pub fn phase(&self) -> Phase {
        let state = self.worker.lock();
        Phase {
            role: state.info.role,
            status: state.info.status,
            finishing: state.info.finishing,
        }
    }

    /// Whether a destination starts its guest running once it arrived.
    pub fn autostart(&self) -> bool {
        self.worker.lock().autostart
    }

    /// Sets whether a destination starts its guest running (`stop` and `cont` while it
    /// waits, as QEMU's autostart).
    pub fn set_autostart(&self, autostart: bool) {
        self.worker.lock().autostart = autostart;
    }

    /// Runs `f` on the state: for the incoming side, which updates it as it receives.
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.worker.lock())
    }

    /// Cancels an outgoing migration and stops the thread for good.
    pub fn shut_down(&self) {
        self.cancel();
        self.worker.stop();
    }
}

/// The guest's configuration as the stream carries it.
fn stream_config(machine: &Machine) -> stream::StreamConfig {
    stream::StreamConfig {
        memory: machine.layout().memory(),
        tsc_khz: machine.tsc_khz(),
        workloads: machine
            .layout()
            .vcpus()
            .iter()
            .map(|plan| plan.workload)
            .collect(),
    }
}

// The worker's guard type, for the submodules.
type StateGuard<'a> = Guard<'a, State>;
type SharedState = Shared<State>;

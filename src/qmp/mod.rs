//! QMP, the QEMU Machine Protocol, over a Unix socket: existing QMP clients and scripts
//! written for QEMU's dirty-rate and dirty-limit commands drive dirtyvm unchanged.
//!
//! The layers, each usable without the one above:
//!
//! - `json.rs`: QEMU's JSON dialect as QEMU 7.2 reads it (`qobject/json-lexer.c`,
//!   `json-streamer.c`, `json-parser.c`): a byte-at-a-time lexer, a splitter that cuts the stream
//!   into top-level values by counting brackets, and a parser; malformed input gets QEMU's
//!   error texts at the points QEMU reports them, and the lexer resynchronizes the way QEMU's
//!   does. Output is written in QEMU's style (`": "` and `", "` separators, ASCII only).
//! - [`Session`] (`protocol.rs`): one client's protocol state, a pure function of the bytes fed
//!   to it and the [`Backend`]'s answers: greeting, capabilities negotiation, request checks
//!   (`qapi/qmp-dispatch.c`), `id` echo, events. Tests and the fuzz target drive it directly.
//! - `commands.rs`: the command table, QAPI-style argument checks (member order, types,
//!   unknown members, QEMU's texts) and the replies.
//! - [`Server`] (`server.rs`): the socket, one client at a time, on one thread.
//!
//! The VM is behind the [`Backend`] trait: the server never reaches into the VMM.
//!
//! # Where the replies differ from QEMU's
//!
//! - A message whose tokens exceed 1 MiB before it completes gets QEMU's "JSON token size
//!   limit exceeded" and the connection is closed (QEMU allows 64 MiB and carries on,
//!   reading the rest of the value as garbage).
//! - A negative `dirty-rate` is refused ("Parameter 'dirty-rate' expects uint64"); QEMU's
//!   uint64 visitor accepts it for backward compatibility and wraps it to a huge limit.
//! - `cpu-index` is checked before the backend is asked, so with no dirty ring a bad index
//!   gets "incorrect cpu index specified" where QEMU first reports the missing ring (set) or
//!   succeeds silently (cancel).
//! - `calc-time` in seconds that overflows when converted to milliseconds is out of range;
//!   QEMU's int64 multiplication wraps.
//! - `query-dirty-rate` always has `calc-time-unit` (QEMU ≥ 8.2; 7.2 had no such member).
//! - The greeting offers no capabilities (no `oob`); `{"enable": ["oob"]}` is refused with
//!   QEMU's text for a capability that is not offered.
//! - A number too large for a double (`1e999`) reads as `null`; QEMU keeps an infinity and
//!   writes it back as `inf`, which is not JSON.
//! - Keys inside a reply come out in sorted order (QEMU's follow its hash tables); where
//!   several members are wrong, the first in sorted order is the one reported.
//!
//! Migration (QEMU 8.2's commands; the stream is dirtyvm's own, so dirtyvm and QEMU do not
//! migrate to each other):
//!
//! - The source waits for the destination's word that the guest runs there before it says
//!   `completed` (QEMU without `return-path` completes when the stream is sent), and
//!   `downtime` runs from the source's pause to that word: the pause the guest really had,
//!   measured on one clock.
//! - The destination takes the VM's shape from the stream (QEMU needs the same command line on
//!   both sides); until the guest arrives, `query-cpus-fast` is `[]` and the commands that need
//!   a guest (`calc-dirty-rate`, `set-vcpu-dirty-limit`, the `x-` ones) answer "the guest has
//!   not arrived yet: this dirtyvm waits for an incoming migration".
//! - `migrate-set-parameters` takes the parameters dirtyvm implements (`max-bandwidth`,
//!   `avail-switchover-bandwidth`, `downtime-limit`, the `cpu-throttle-*` and
//!   `throttle-trigger-threshold`, `max-cpu-throttle`, `x-vcpu-dirty-limit-period`,
//!   `vcpu-dirty-limit`); the others (compression, multifd, TLS, announce, xbzrle) are
//!   "unexpected". `query-migrate-parameters` lists them all, at QEMU's defaults. Negative
//!   numbers are refused ("expects uint64") where QEMU wraps them.
//! - Capabilities other than `events`, `auto-converge` and `dirty-limit` can only be set off
//!   ("Capability 'X' is not supported by dirtyvm").
//! - `migrate` refuses `blk`/`inc` (no block devices), `resume` (no postcopy) and `channels`
//!   (QEMU 8.2's text when given with `uri`); `migrate-incoming` refuses `channels` alone.
//!   A VM without dirty tracking (`--dirty-log none`) cannot be migrated.
//! - `ram.total` is guest RAM exactly (QEMU adds its ROM and video RAM blocks);
//!   `ram.transferred` counts every byte of the stream, as 8.2 does.
//! - A listening destination's `socket-address` has `type`, `host` and `port` (a string, as
//!   QEMU's), without QEMU's `ipv4`/`ipv6` flags.
//! - dirtyvm's own: the parameter `x-vcpu-dirty-limit-auto` (a dirty-limit migration sets the
//!   limits itself) and `query-migrate`'s `x-expected-completion-ms` (the forecast time to
//!   completion, while active, when the migration converges).
//! - With the quota controller, `dirty-limit-throttle-time-per-round` is the most penalty
//!   time a limited vCPU served in the last second (the controller has no per-ring-full
//!   sleep), and `dirty-limit-ring-full-time` the time a ring takes to fill at the running
//!   vCPUs' mean rate now; with the reference algorithm both are QEMU's.
//! - `migrate_cancel` lifts the limits a dirty-limit migration set (QEMU's call to do so is
//!   refused by its own check while the migration runs); completion and failure leave them,
//!   as in QEMU. The self-set limits go however the migration ends.

mod args;
mod commands;
mod json;
mod migration;
mod protocol;
mod server;
mod vm;

#[cfg(any(test, feature = "testing"))]
pub mod mock;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::Serialize;

use crate::migration::Migration;
pub use crate::rate::{RateMode as DirtyRateMode, RateStatus as DirtyRateStatus};
pub use protocol::{Output, Session};
pub use server::Server;
pub use vm::MachineBackend;

/// The VM as QMP sees it. Implemented by the VMM; every method is called from the QMP server
/// thread, so none may block for long (a measurement runs in the background).
pub trait Backend: Send + Sync {
    /// The run state (`query-status`).
    fn run_state(&self) -> RunState;
    /// `stop`: pauses every vCPU; does nothing when already paused. On a destination still
    /// waiting for its guest, the guest will start paused.
    fn pause(&self);
    /// `cont`: resumes every vCPU; does nothing when already running. On a destination still
    /// waiting for its guest, the guest will start running. Refused during the switchover of
    /// an outgoing migration, with QEMU's text.
    fn resume(&self) -> Result<(), QmpError>;
    /// Requests a VM shutdown (`quit`); returns at once.
    fn quit(&self);
    /// One entry per vCPU, by index (`query-cpus-fast`).
    fn cpus(&self) -> Vec<CpuInfo>;
    /// Valid `cpu-index` values are `0..max_cpus`.
    fn max_cpus(&self) -> u32;
    /// Starts a measurement and returns at once. The arguments are already checked against
    /// QEMU's ranges; the backend refuses a mode it cannot measure with
    /// "mode %s is not enabled, use other method instead." (see [`DirtyRateMode::name`]) and
    /// a second measurement while one runs with "the dirty rate is already being measured."
    fn calc_dirty_rate(&self, request: CalcDirtyRate) -> Result<(), QmpError>;
    /// The state and result of the latest measurement.
    fn query_dirty_rate(&self) -> DirtyRateInfo;
    /// Limits one vCPU (`cpu_index` already in `0..max_cpus`) or, with `None`, every vCPU
    /// up to `max_cpus`, to `dirty_rate` MB/s. As in QEMU, a rate of 0 cancels the limit, and
    /// without a dirty ring the answer is "dirty page limit feature requires KVM with
    /// accelerator property 'dirty-ring-size' set'" (sic).
    fn set_vcpu_dirty_limit(&self, cpu_index: Option<u32>, dirty_rate: u64)
        -> Result<(), QmpError>;
    /// Lifts the limit of one vCPU or, with `None`, of all; succeeds when none is set.
    fn cancel_vcpu_dirty_limit(&self, cpu_index: Option<u32>) -> Result<(), QmpError>;
    /// The limited vCPUs only; empty when the limiter is not in service.
    fn query_vcpu_dirty_limit(&self) -> Vec<DirtyLimitInfo>;
    /// `x-query-vcpu-counters`: per vCPU, the guest's own count of pages written, dirty pages
    /// harvested, ring-full exits and the penalty served.
    fn x_counters(&self) -> serde_json::Value;
    /// `x-query-reaper`: the reaper's cadence and progress.
    fn x_reaper(&self) -> serde_json::Value;
    /// `x-set-auto-converge`: throttle every vCPU by `percent` (1..=99), or stop throttling
    /// with `None`.
    fn x_set_throttle(&self, percent: Option<u8>) -> Result<(), QmpError>;
    /// `x-query-auto-converge`: the throttle's state.
    fn x_query_throttle(&self) -> serde_json::Value;
    /// The process's migration state: parameters, capabilities, the migration under way or
    /// the last one, and its events.
    fn migration(&self) -> &Migration;
    /// `migrate`: starts sending the guest to `uri`; returns at once.
    fn migrate(&self, uri: &str) -> Result<(), QmpError>;
    /// Whether the VM tracks dirty pages with per-vCPU rings (what `dirty-limit` needs).
    fn dirty_ring(&self) -> bool;
}

/// QEMU's `RunState`, the ones dirtyvm goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Paused by `stop`.
    Paused,
    /// A destination waiting for its guest.
    InMigrate,
    /// A source paused for the switchover.
    FinishMigrate,
    /// A source whose guest moved away.
    PostMigrate,
}

impl RunState {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }
}

/// QEMU's error classes (qapi/error.json), by their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    #[serde(rename = "KVMMissingCap")]
    KvmMissingCap,
}

/// A command's failure: `{"error": {"class": ..., "desc": ...}}` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// The class of nearly every QEMU error.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

/// One vCPU in `query-cpus-fast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    pub cpu_index: u32,
    /// The host thread id (TID) of the vCPU thread.
    pub thread_id: i64,
}

/// A checked `calc-dirty-rate` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalcDirtyRate {
    /// The window, in [50, 60000].
    pub calc_time_ms: u64,
    /// Sampled pages per GiB, in [128, 16384]; 512 unless the client chose.
    pub sample_pages: u64,
    pub mode: DirtyRateMode,
}

/// The latest measurement, for `query-dirty-rate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRateInfo {
    pub status: DirtyRateStatus,
    /// MiB/s; reported only once measured.
    pub dirty_rate: Option<i64>,
    /// When the measurement started, host wall-clock seconds.
    pub start_time: i64,
    /// The actual window.
    pub calc_time_ms: u64,
    /// Reported as 0 once measured in a mode other than page-sampling, as QEMU does.
    pub sample_pages: u64,
    pub mode: DirtyRateMode,
    /// `(vCPU index, MiB/s)`; reported only once measured in dirty-ring mode.
    pub vcpu_dirty_rate: Option<Vec<(u32, i64)>>,
}

impl DirtyRateInfo {
    /// Before any measurement.
    pub fn unstarted() -> DirtyRateInfo {
        DirtyRateInfo {
            status: DirtyRateStatus::Unstarted,
            dirty_rate: None,
            start_time: 0,
            calc_time_ms: 0,
            sample_pages: 0,
            mode: DirtyRateMode::PageSampling,
            vcpu_dirty_rate: None,
        }
    }
}

/// One limited vCPU in `query-vcpu-dirty-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyLimitInfo {
    pub cpu_index: u32,
    /// MB/s.
    pub limit_rate: u64,
    /// MB/s, as last measured by the limiter.
    pub current_rate: u64,
}

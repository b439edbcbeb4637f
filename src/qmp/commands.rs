//! The commands: QEMU's names, QAPI's argument checks with QEMU's texts, and the replies.
//!
//! Arguments are checked the way QEMU's generated marshallers visit them
//! (`qapi/qobject-input-visitor.c`): members in schema order, each failing on the first
//! problem (missing, wrong type, unknown enum value), and only then members nobody asked
//! for. The commands' own range checks follow, in the order of QEMU's handlers.

use std::ops::RangeInclusive;

use serde_json::{json, Map, Value};

use super::args::{int, invalid_type, uint64, Args};
use super::migration;
use super::{Backend, CalcDirtyRate, DirtyRateMode, DirtyRateStatus, QmpError, RunState};
use crate::limit::throttle;
use crate::rate::{
    DEFAULT_SAMPLE_PAGES, MAX_CALC_TIME_MS, MAX_SAMPLE_PAGES, MIN_CALC_TIME_MS, MIN_SAMPLE_PAGES,
};

/// `MIN_CALC_TIME_MS` and `MAX_CALC_TIME_MS` (migration/dirtyrate.h).
const CALC_TIME_MS: RangeInclusive<i64> = MIN_CALC_TIME_MS as i64..=MAX_CALC_TIME_MS as i64;
/// `MIN_SAMPLE_PAGE_COUNT` and `MAX_SAMPLE_PAGE_COUNT`.
const SAMPLE_PAGES: RangeInclusive<i64> = MIN_SAMPLE_PAGES as i64..=MAX_SAMPLE_PAGES as i64;
/// `x-set-auto-converge`: QEMU's `CPU_THROTTLE_PCT_MAX` is 99; 0 turns the throttle off.
const THROTTLE_PERCENT: RangeInclusive<i64> = 0..=throttle::MAX_PCT as i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    QmpCapabilities,
    QueryStatus,
    Stop,
    Cont,
    Quit,
    QueryCpusFast,
    CalcDirtyRate,
    QueryDirtyRate,
    SetVcpuDirtyLimit,
    CancelVcpuDirtyLimit,
    QueryVcpuDirtyLimit,
    XQueryVcpuCounters,
    XQueryReaper,
    XSetAutoConverge,
    XQueryAutoConverge,
    Migrate,
    MigrateIncoming,
    MigrateCancel,
    QueryMigrate,
    MigrateSetParameters,
    QueryMigrateParameters,
    MigrateSetCapabilities,
    QueryMigrateCapabilities,
}

impl Command {
    const NAMES: [(&'static str, Command); 23] = [
        ("qmp_capabilities", Command::QmpCapabilities),
        ("query-status", Command::QueryStatus),
        ("stop", Command::Stop),
        ("cont", Command::Cont),
        ("quit", Command::Quit),
        ("query-cpus-fast", Command::QueryCpusFast),
        ("calc-dirty-rate", Command::CalcDirtyRate),
        ("query-dirty-rate", Command::QueryDirtyRate),
        ("set-vcpu-dirty-limit", Command::SetVcpuDirtyLimit),
        ("cancel-vcpu-dirty-limit", Command::CancelVcpuDirtyLimit),
        ("query-vcpu-dirty-limit", Command::QueryVcpuDirtyLimit),
        ("x-query-vcpu-counters", Command::XQueryVcpuCounters),
        ("x-query-reaper", Command::XQueryReaper),
        ("x-set-auto-converge", Command::XSetAutoConverge),
        ("x-query-auto-converge", Command::XQueryAutoConverge),
        ("migrate", Command::Migrate),
        ("migrate-incoming", Command::MigrateIncoming),
        ("migrate_cancel", Command::MigrateCancel),
        ("query-migrate", Command::QueryMigrate),
        ("migrate-set-parameters", Command::MigrateSetParameters),
        ("query-migrate-parameters", Command::QueryMigrateParameters),
        ("migrate-set-capabilities", Command::MigrateSetCapabilities),
        (
            "query-migrate-capabilities",
            Command::QueryMigrateCapabilities,
        ),
    ];

    pub(super) fn from_name(name: &str) -> Option<Command> {
        Command::NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, command)| command)
    }
}

/// What a command does besides its reply.
pub(super) struct Context<'a> {
    pub backend: &'a dyn Backend,
    /// Capabilities negotiation is complete.
    pub negotiated: bool,
    /// Events to send before the reply, in order.
    pub events: Vec<&'static str>,
    /// The VM is quitting: SHUTDOWN follows the reply, then the connection closes.
    pub quit: bool,
}

/// Runs a command whose request already passed the protocol checks.
pub(super) fn run(
    command: Command,
    arguments: Option<&Map<String, Value>>,
    ctx: &mut Context<'_>,
) -> Result<Value, QmpError> {
    let mut args = Args::new(arguments);
    let backend = ctx.backend;
    match command {
        Command::QmpCapabilities => {
            let enable = args.optional("enable", capabilities)?;
            args.finish()?;
            if ctx.negotiated {
                return Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            // The greeting offers none, so every requested capability is unavailable.
            let requested: Vec<&str> = enable
                .unwrap_or_default()
                .iter()
                .map(|capability| capability.qapi_name())
                .collect();
            if !requested.is_empty() {
                return Err(QmpError::generic(format!(
                    "Capability {} not available",
                    requested.join(", ")
                )));
            }
            ctx.negotiated = true;
            Ok(json!({}))
        }
        Command::QueryStatus => {
            args.finish()?;
            let state = backend.run_state();
            Ok(json!({
                "status": state.name(),
                "singlestep": false,
                "running": state == RunState::Running,
            }))
        }
        Command::Stop => {
            args.finish()?;
            // As QEMU's vm_stop(): STOP only when this request is what stopped the VM.
            let was_running = backend.run_state() == RunState::Running;
            backend.pause();
            if was_running {
                ctx.events.push("STOP");
            }
            Ok(json!({}))
        }
        Command::Cont => {
            args.finish()?;
            let before = backend.run_state();
            backend.resume()?;
            // A destination still waiting only notes that its guest is to start running.
            if before != RunState::Running && backend.run_state() == RunState::Running {
                ctx.events.push("RESUME");
            }
            Ok(json!({}))
        }
        Command::Quit => {
            args.finish()?;
            backend.quit();
            ctx.quit = true;
            Ok(json!({}))
        }
        Command::QueryCpusFast => {
            args.finish()?;
            // QEMU's x86 topology for `-smp N`: N sockets of one single-thread core.
            let cpus = backend
                .cpus()
                .iter()
                .map(|cpu| {
                    json!({
                        "cpu-index": cpu.cpu_index,
                        "thread-id": cpu.thread_id,
                        "props": {"core-id": 0, "thread-id": 0, "socket-id": cpu.cpu_index},
                        "qom-path": format!("/machine/unattached/device[{}]", cpu.cpu_index),
                        "target": "x86_64",
                    })
                })
                .collect();
            Ok(Value::Array(cpus))
        }
        Command::CalcDirtyRate => calc_dirty_rate(args, backend),
        Command::QueryDirtyRate => {
            let unit = args.optional("calc-time-unit", enumeration::<TimeUnit>)?;
            args.finish()?;
            Ok(dirty_rate_info(backend, unit.unwrap_or(TimeUnit::Second)))
        }
        Command::SetVcpuDirtyLimit => {
            let cpu_index = args.optional("cpu-index", int)?;
            let dirty_rate = args.required("dirty-rate", uint64)?;
            args.finish()?;
            backend.set_vcpu_dirty_limit(cpu(cpu_index, backend)?, dirty_rate)?;
            Ok(json!({}))
        }
        Command::CancelVcpuDirtyLimit => {
            let cpu_index = args.optional("cpu-index", int)?;
            args.finish()?;
            backend.cancel_vcpu_dirty_limit(cpu(cpu_index, backend)?)?;
            Ok(json!({}))
        }
        Command::QueryVcpuDirtyLimit => {
            args.finish()?;
            let limits = backend
                .query_vcpu_dirty_limit()
                .iter()
                .map(|limit| {
                    json!({
                        "cpu-index": limit.cpu_index,
                        "limit-rate": limit.limit_rate,
                        "current-rate": limit.current_rate,
                    })
                })
                .collect();
            Ok(Value::Array(limits))
        }
        Command::XQueryVcpuCounters => {
            args.finish()?;
            Ok(backend.x_counters())
        }
        Command::XQueryReaper => {
            args.finish()?;
            Ok(backend.x_reaper())
        }
        Command::XSetAutoConverge => {
            let percent = args.required("percent", int)?;
            args.finish()?;
            let percent = u8::try_from(percent)
                .ok()
                .filter(|percent| THROTTLE_PERCENT.contains(&i64::from(*percent)))
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Parameter 'percent' expects an integer in the range of {} to {}",
                        THROTTLE_PERCENT.start(),
                        THROTTLE_PERCENT.end()
                    ))
                })?;
            backend.x_set_throttle((percent > 0).then_some(percent))?;
            Ok(json!({}))
        }
        Command::XQueryAutoConverge => {
            args.finish()?;
            Ok(backend.x_query_throttle())
        }
        Command::Migrate => migration::migrate(args, backend),
        Command::MigrateIncoming => migration::migrate_incoming(args, backend),
        Command::MigrateCancel => {
            args.finish()?;
            backend.migration().cancel();
            Ok(json!({}))
        }
        Command::QueryMigrate => {
            args.finish()?;
            Ok(migration::info(&backend.migration().info()))
        }
        Command::MigrateSetParameters => migration::set_parameters(args, backend),
        Command::QueryMigrateParameters => {
            args.finish()?;
            Ok(migration::parameters(&backend.migration().params()))
        }
        Command::MigrateSetCapabilities => migration::set_capabilities(args, backend),
        Command::QueryMigrateCapabilities => {
            args.finish()?;
            Ok(migration::capabilities(&backend.migration().caps()))
        }
    }
}

/// `qmp_calc_dirty_rate()`, checks in QEMU's order.
fn calc_dirty_rate(mut args: Args<'_>, backend: &dyn Backend) -> Result<Value, QmpError> {
    let calc_time = args.required("calc-time", int)?;
    let unit = args.optional("calc-time-unit", enumeration::<TimeUnit>)?;
    let sample_pages = args.optional("sample-pages", int)?;
    let mode = args.optional("mode", enumeration::<DirtyRateMode>)?;
    args.finish()?;

    // QEMU refuses a second measurement before looking at the arguments; asking here keeps
    // that order whatever the backend checks first.
    if backend.query_dirty_rate().status == DirtyRateStatus::Measuring {
        return Err(QmpError::generic(
            "the dirty rate is already being measured.",
        ));
    }
    let calc_time_ms = unit
        .unwrap_or(TimeUnit::Second)
        .to_ms(calc_time)
        .filter(|ms| CALC_TIME_MS.contains(ms))
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Calculation time is out of range [{}ms, {}ms].",
                CALC_TIME_MS.start(),
                CALC_TIME_MS.end()
            ))
        })?;
    let mode = mode.unwrap_or(DirtyRateMode::PageSampling);
    let sample_pages = match sample_pages {
        None => DEFAULT_SAMPLE_PAGES,
        Some(_) if mode != DirtyRateMode::PageSampling => {
            return Err(QmpError::generic(
                "sample-pages is used only in page-sampling mode",
            ));
        }
        Some(pages) => u64::try_from(pages)
            .ok()
            .filter(|_| SAMPLE_PAGES.contains(&pages))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "sample-pages is out of range[{}, {}].",
                    SAMPLE_PAGES.start(),
                    SAMPLE_PAGES.end()
                ))
            })?,
    };
    backend.calc_dirty_rate(CalcDirtyRate {
        calc_time_ms,
        sample_pages,
        mode,
    })?;
    Ok(json!({}))
}

/// `query_dirty_rate_info()`: which members appear depends on the status and the mode.
fn dirty_rate_info(backend: &dyn Backend, unit: TimeUnit) -> Value {
    let info = backend.query_dirty_rate();
    let measured = info.status == DirtyRateStatus::Measured;
    let mut reply = Map::new();
    reply.insert("status".into(), info.status.name().into());
    if let Some(rate) = info.dirty_rate.filter(|_| measured) {
        reply.insert("dirty-rate".into(), rate.into());
    }
    reply.insert("start-time".into(), info.start_time.into());
    reply.insert(
        "calc-time".into(),
        unit.ms_to_unit(info.calc_time_ms).into(),
    );
    reply.insert("calc-time-unit".into(), unit.qapi_name().into());
    // QEMU reports 0 once a mode that samples no pages has measured.
    let sample_pages = if measured && info.mode != DirtyRateMode::PageSampling {
        0
    } else {
        info.sample_pages
    };
    reply.insert("sample-pages".into(), sample_pages.into());
    reply.insert("mode".into(), info.mode.name().into());
    let per_vcpu = measured && info.mode == DirtyRateMode::DirtyRing;
    if let Some(rates) = info.vcpu_dirty_rate.filter(|_| per_vcpu) {
        let rates = rates
            .iter()
            .map(|&(id, rate)| json!({"id": id, "dirty-rate": rate}))
            .collect();
        reply.insert("vcpu-dirty-rate".into(), Value::Array(rates));
    }
    Value::Object(reply)
}

/// `dirtylimit_vcpu_index_valid()`.
fn cpu(cpu_index: Option<i64>, backend: &dyn Backend) -> Result<Option<u32>, QmpError> {
    let Some(cpu_index) = cpu_index else {
        return Ok(None);
    };
    u32::try_from(cpu_index)
        .ok()
        .filter(|&index| index < backend.max_cpus())
        .map(Some)
        .ok_or_else(|| QmpError::generic("incorrect cpu index specified"))
}

/// A QAPI enum: its values and their wire names.
trait QapiEnum: Copy + 'static {
    const ALL: &'static [Self];
    fn qapi_name(self) -> &'static str;
}

impl QapiEnum for DirtyRateMode {
    const ALL: &'static [Self] = &[
        DirtyRateMode::PageSampling,
        DirtyRateMode::DirtyRing,
        DirtyRateMode::DirtyBitmap,
    ];

    fn qapi_name(self) -> &'static str {
        self.name()
    }
}

/// QAPI `TimeUnit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeUnit {
    Second,
    Millisecond,
}

impl TimeUnit {
    /// `None` on overflow.
    fn to_ms(self, time: i64) -> Option<i64> {
        match self {
            TimeUnit::Second => time.checked_mul(1000),
            TimeUnit::Millisecond => Some(time),
        }
    }

    /// Rounded down, as QEMU's integer division.
    fn ms_to_unit(self, ms: u64) -> u64 {
        match self {
            TimeUnit::Second => ms / 1000,
            TimeUnit::Millisecond => ms,
        }
    }
}

impl QapiEnum for TimeUnit {
    const ALL: &'static [Self] = &[TimeUnit::Second, TimeUnit::Millisecond];

    fn qapi_name(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Millisecond => "millisecond",
        }
    }
}

/// QAPI `QMPCapability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QmpCapability {
    Oob,
}

impl QapiEnum for QmpCapability {
    const ALL: &'static [Self] = &[QmpCapability::Oob];

    fn qapi_name(self) -> &'static str {
        match self {
            QmpCapability::Oob => "oob",
        }
    }
}

fn enumeration<E: QapiEnum>(value: &Value, name: &str) -> Result<E, QmpError> {
    let Value::String(given) = value else {
        return Err(invalid_type(name, "string"));
    };
    E::ALL
        .iter()
        .copied()
        .find(|known| known.qapi_name() == given)
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{name}' does not accept value '{given}'"
            ))
        })
}

/// `qmp_capabilities`' `enable`: a list of `QMPCapability`.
fn capabilities(value: &Value, name: &str) -> Result<Vec<QmpCapability>, QmpError> {
    let Value::Array(elements) = value else {
        return Err(invalid_type(name, "array"));
    };
    elements
        .iter()
        .enumerate()
        .map(|(index, element)| match element {
            // QEMU names list elements "null" in this one message.
            Value::String(_) => enumeration(element, "null"),
            _ => Err(invalid_type(&format!("{name}[{index}]"), "string")),
        })
        .collect()
}

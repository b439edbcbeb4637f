//! What `dirtyvm run` was asked to do, checked before anything boots: the VM, the guest
//! to receive instead, the dirty control, the measurements, the files and sockets.

use std::path::PathBuf;
use std::time::Duration;

use super::output::OutputFile;
use super::{Failure, Incoming, RunArgs};
use crate::migration::{Expect, MigrationUri};
use crate::rate::{
    RateMode, RateRequest, DEFAULT_SAMPLE_PAGES, MAX_SAMPLE_PAGES, MIN_SAMPLE_PAGES,
};
use crate::socket_file;
use crate::tracking::DirtyLog;
use crate::vmm::{Machine, VmConfig};

/// `--vcpus` unless given.
const DEFAULT_VCPUS: u32 = 2;
/// `--memory` unless given.
const DEFAULT_MEMORY: u64 = 256 << 20;

/// What `run` was asked to do, checked: everything here can be attempted.
#[derive(Debug)]
pub struct RunPlan {
    /// The VM (with `incoming`, its shape comes from the source at arrival).
    pub vm: VmConfig,
    /// Receive the guest instead of booting one.
    pub incoming: Option<IncomingPlan>,
    /// How long to run; until a signal or `quit` when `None`.
    pub duration: Option<Duration>,
    /// Back-to-back dirty-rate measurements.
    pub rate: Option<RateRequest>,
    /// Dirty control from the start.
    pub control: Control,
    /// Where the report goes.
    pub report: Option<OutputFile>,
    /// Where QMP listens.
    pub qmp: Option<PathBuf>,
}

/// Where an incoming guest comes from, and what it must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingPlan {
    /// The address, or QMP's `migrate-incoming`.
    pub from: Incoming,
    /// The options the stream must agree with.
    pub expect: Expect,
}

/// Dirty control from the start of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// None.
    None,
    /// Per-vCPU limits, MiB/s: every vCPU (`None`), then single vCPUs.
    Limits(Vec<(Option<u32>, f64)>),
    /// Auto-converge to get the VM under this many MiB/s.
    AutoConverge(f64),
}

impl TryFrom<RunArgs> for RunPlan {
    type Error = Failure;

    fn try_from(args: RunArgs) -> Result<RunPlan, Failure> {
        if args.ring_entries.is_some() && args.dirty_log != DirtyLog::Ring {
            return Err(Failure::usage(format!(
                "--ring-entries needs --dirty-log ring (the dirty log is {})",
                args.dirty_log.name()
            )));
        }
        let rate = match args.calc_dirty_rate {
            None if args.sample_pages.is_some() => {
                return Err(Failure::usage(
                    "--sample-pages is used only with --calc-dirty-rate page-sampling",
                ))
            }
            None => None,
            Some(spec) => {
                let sample_pages = match args.sample_pages {
                    None => DEFAULT_SAMPLE_PAGES,
                    Some(_) if spec.mode != RateMode::PageSampling => {
                        return Err(Failure::usage(format!(
                            "--sample-pages is used only in page-sampling mode, not {}",
                            spec.mode
                        )))
                    }
                    Some(n) => u64::try_from(n)
                        .ok()
                        .filter(|n| (MIN_SAMPLE_PAGES..=MAX_SAMPLE_PAGES).contains(n))
                        .ok_or_else(|| {
                            Failure::usage(format!(
                                "--sample-pages {n} is out of range [{MIN_SAMPLE_PAGES}, \
                                 {MAX_SAMPLE_PAGES}]"
                            ))
                        })?,
                };
                let request = RateRequest {
                    mode: spec.mode,
                    calc_time_ms: spec.calc_time_ms,
                    sample_pages,
                };
                request.check(args.dirty_log).map_err(|e| {
                    Failure::usage(format!(
                        "--calc-dirty-rate {}: {e} (page-sampling works with any --dirty-log; \
                         dirty-ring needs --dirty-log ring; dirty-bitmap needs --dirty-log \
                         bitmap)",
                        request.mode
                    ))
                })?;
                if let Some(duration) = args.duration {
                    if Duration::from_millis(request.calc_time_ms) > duration {
                        return Err(Failure::usage(format!(
                            "--calc-dirty-rate {}:{}: a {} ms window does not fit in \
                             --duration {} s; shorten the window or run longer",
                            request.mode,
                            request.calc_time_ms,
                            request.calc_time_ms,
                            duration.as_secs_f64()
                        )));
                    }
                }
                Some(request)
            }
        };
        // A destination learns its vCPU count from the source; limits are checked then.
        let known_vcpus = match args.incoming {
            Some(_) => args.vcpus,
            None => Some(args.vcpus.unwrap_or(DEFAULT_VCPUS)),
        };
        let control = control(&args, known_vcpus)?;
        if args.incoming == Some(Incoming::Defer) && args.qmp.is_none() {
            return Err(Failure::usage(
                "--incoming defer waits for QMP migrate-incoming: give --qmp PATH too",
            ));
        }
        let incoming = args
            .incoming
            .clone()
            .map(|from| {
                if let Incoming::Uri(MigrationUri::Unix(path)) = &from {
                    socket_file::check_path(path).map_err(|e| {
                        Failure::usage(format!("--incoming unix:{}: {e}", path.display()))
                    })?;
                }
                Ok::<_, Failure>(IncomingPlan {
                    from,
                    expect: Expect {
                        vcpus: args.vcpus,
                        memory: args.memory,
                        workloads: (!args.workloads.is_empty()).then(|| args.workloads.clone()),
                    },
                })
            })
            .transpose()?;
        let report = args
            .report
            .as_deref()
            .map(|path| OutputFile::check("--report", path))
            .transpose()?;
        if let Some(path) = &args.qmp {
            socket_file::check_path(path)
                .map_err(|e| Failure::usage(format!("--qmp {}: {e}", path.display())))?;
        }
        Ok(RunPlan {
            incoming,
            vm: VmConfig {
                vcpus: args.vcpus.unwrap_or(DEFAULT_VCPUS),
                memory: args.memory.unwrap_or(DEFAULT_MEMORY),
                workloads: args.workloads,
                dirty_log: args.dirty_log,
                ring_entries: args.ring_entries,
                reaper: args.reaper,
                limit_algo: args.limit_algo,
            },
            duration: args.duration,
            rate,
            control,
            report,
            qmp: args.qmp,
        })
    }
}

/// The limits or throttle `args` ask for, checked against each other and the VM (when its
/// vCPU count is known).
fn control(args: &RunArgs, vcpus: Option<u32>) -> Result<Control, Failure> {
    let mut seen = Vec::new();
    for &(id, _) in &args.vcpu_dirty_limit {
        if seen.contains(&id) {
            return Err(Failure::usage(format!(
                "--vcpu-dirty-limit {id}=... is given twice; give each vCPU one limit"
            )));
        }
        seen.push(id);
    }
    let control = match (args.throttle.is_some(), args.dirty_limit) {
        (true, Some(target)) if args.vcpu_dirty_limit.is_empty() => Control::AutoConverge(target),
        (true, _) => {
            return Err(Failure::usage(
                "--throttle auto-converge needs --dirty-limit MIBPS (the VM rate to get under) \
                 and no --vcpu-dirty-limit",
            ))
        }
        (false, None) if args.vcpu_dirty_limit.is_empty() => Control::None,
        (false, all) => Control::Limits(
            all.map(|mibps| (None, mibps))
                .into_iter()
                .chain(args.vcpu_dirty_limit.iter().map(|&(id, m)| (Some(id), m)))
                .collect(),
        ),
    };
    match (&control, args.dirty_log) {
        (Control::None, _) => {}
        (_, DirtyLog::None) => {
            return Err(Failure::usage(
                "a dirty limit needs dirty tracking: use --dirty-log ring (the default)",
            ))
        }
        (Control::Limits(_), DirtyLog::Bitmap) => {
            return Err(Failure::usage(
                "per-vCPU dirty limits need --dirty-log ring (per-vCPU rings); the bitmap has \
                 no per-vCPU split",
            ))
        }
        _ => {}
    }
    if let Some(vcpus) = vcpus {
        control.check_vcpus(vcpus).map_err(Failure::usage)?;
    }
    Ok(control)
}

impl Control {
    /// Whether every vCPU a limit names exists in a VM of `vcpus`.
    pub fn check_vcpus(&self, vcpus: u32) -> Result<(), String> {
        let Control::Limits(limits) = self else {
            return Ok(());
        };
        match limits
            .iter()
            .find_map(|&(id, _)| id.filter(|&id| id >= vcpus))
        {
            Some(id) => Err(format!(
                "--vcpu-dirty-limit {id}=...: there is no vCPU {id} (vCPUs are 0 to {})",
                vcpus.saturating_sub(1)
            )),
            None => Ok(()),
        }
    }

    /// Puts the limits or the throttle on `machine`.
    pub fn apply(&self, machine: &Machine) -> Result<(), String> {
        let limiter = machine.limiter();
        match self {
            Control::None => Ok(()),
            Control::AutoConverge(target) => limiter.set_auto_converge(*target),
            Control::Limits(limits) => limits
                .iter()
                .try_for_each(|&(id, mibps)| limiter.set_limit(id, mibps, None)),
        }
        .map_err(|e| e.to_string())
    }
}

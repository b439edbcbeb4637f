//! The VMM core: brings up a VM with the built-in guest, runs one thread per vCPU, and reads
//! the guest's ground-truth counters.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dirtyvm_sys as sys;

use crate::limit::{DirtyLimiter, LimitAlgo};
use crate::rate::{DirtyRateMeter, RateSources};
use crate::sync::lock;
use crate::tracking::{Cadence, Reaper};
use crate::tracking::{DirtyLog, Tracker, MIN_RING_ENTRIES};
use crate::vm::guest::{self, GuestStats, Layout, LayoutError, Workload};
use crate::vm::kvm::{self, GuestMemory, Kvm, Vcpu, VcpuState, Vm};
use crate::vm::vcpu::{StopRequest, VcpuControl, VcpuThread};

/// What to boot.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Workload of vCPU i; vCPUs beyond the list are idle.
    pub workloads: Vec<Workload>,
    /// Dirty tracking mechanism.
    pub dirty_log: DirtyLog,
    /// Entries per vCPU ring in ring mode; `None` for the host's largest ring.
    pub ring_entries: Option<u32>,
    /// Reaper cadence (with tracking).
    pub reaper: Cadence,
    /// Algorithm of dirty limits that name none.
    pub limit_algo: LimitAlgo,
}

impl VmConfig {
    /// A VM without dirty tracking.
    pub fn new(vcpus: u32, memory: u64, workloads: Vec<Workload>) -> VmConfig {
        VmConfig {
            vcpus,
            memory,
            workloads,
            dirty_log: DirtyLog::None,
            ring_entries: None,
            reaper: Cadence::Adaptive,
            limit_algo: LimitAlgo::Quota,
        }
    }

    /// The same VM with dirty tracking `log`.
    pub fn with_dirty_log(self, dirty_log: DirtyLog) -> VmConfig {
        VmConfig { dirty_log, ..self }
    }
}

/// Why a VM could not be built or run. [`VmmError::exit_code`] maps it to the CLI's codes.
#[derive(Debug)]
pub enum VmmError {
    /// `/dev/kvm` cannot be opened or is unusable.
    KvmUnavailable(io::Error),
    /// The host's KVM lacks something dirtyvm needs.
    MissingCapability(String),
    /// The configuration cannot work (bad size, too many vCPUs, ...).
    BadConfig(String),
    /// A KVM or host call failed while setting up or running.
    Io { what: String, error: io::Error },
}

impl VmmError {
    /// Exit code: 2 bad input, 3 KVM unavailable or lacking, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmmError::BadConfig(_) => 2,
            VmmError::KvmUnavailable(_) | VmmError::MissingCapability(_) => 3,
            VmmError::Io { .. } => 1,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmmError {
        let what = what.into();
        move |error| VmmError::Io { what, error }
    }
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmError::KvmUnavailable(e) => write!(
                f,
                "cannot use /dev/kvm: {e}; dirtyvm needs Linux with KVM and read-write access \
                 to /dev/kvm (load kvm_intel or kvm_amd, or run as a user in the kvm group)"
            ),
            VmmError::MissingCapability(what) => write!(f, "this host's KVM {what}"),
            VmmError::BadConfig(what) => f.write_str(what),
            VmmError::Io { what, error } => write!(f, "{what} failed: {error}"),
        }
    }
}

impl std::error::Error for VmmError {}

impl From<LayoutError> for VmmError {
    fn from(e: LayoutError) -> VmmError {
        VmmError::BadConfig(e.to_string())
    }
}

/// Memory this process can still fill, bytes: `MemAvailable`, or less under a cgroup limit
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`, of the process's cgroup and its ancestors);
/// `None` when the host does not say.
pub fn memory_available() -> Option<u64> {
    let read = |path: &Path| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
    let meminfo = fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let kib = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
        Some(
            kib.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?
                * 1024,
        )
    });
    let mut available = meminfo;
    let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (root, limit, usage) = match controllers {
            "" => ("/sys/fs/cgroup", "memory.max", "memory.current"),
            c if c.split(',').any(|c| c == "memory") => (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            _ => continue,
        };
        // The cgroup and each ancestor up to the root of the mount the process sees.
        let mut dir = Some(Path::new(path.trim_start_matches('/')));
        while let Some(relative) = dir {
            let at = Path::new(root).join(relative);
            if let (Some(limit), Some(usage)) = (read(&at.join(limit)), read(&at.join(usage))) {
                let left = limit.saturating_sub(usage);
                available = Some(available.map_or(left, |a| a.min(left)));
            }
            dir = relative.parent();
        }
    }
    available
}

/// Refuses working sets the host cannot back: the pages writers dirty must become host
/// memory, and a guest that outgrows it is killed by the kernel with no message and no
/// report. Readers and unused guest memory cost nothing (they map the host's zero page).
fn check_host_memory(layout: &Layout) -> Result<(), VmmError> {
    let dirtied: u64 = layout
        .vcpus()
        .iter()
        .filter(|plan| plan.workload.writes())
        .map(|plan| plan.workload.working_set())
        .sum();
    match memory_available() {
        Some(available) if dirtied > available => Err(VmmError::BadConfig(format!(
            "the writers' working sets need {} of host memory but only {} is available to \
             dirtyvm (MemAvailable, or the cgroup's memory limit); shrink the writers",
            guest::Size(dirtied),
            guest::Size(available)
        ))),
        _ => Ok(()),
    }
}

/// Opens `/dev/kvm`, mapping failure to [`VmmError::KvmUnavailable`].
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::open().map_err(VmmError::KvmUnavailable)
}

/// The most vCPUs the host's KVM accepts in one VM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    // api.rst: without KVM_CAP_MAX_VCPUS use KVM_CAP_NR_VCPUS, and without that assume 4.
    [sys::KVM_CAP_MAX_VCPUS, sys::KVM_CAP_NR_VCPUS]
        .into_iter()
        .map(|cap| kvm.check_extension(cap))
        .find(|&n| n > 0)
        .map_or(4, |n| n as u32)
}

/// Checks `entries` (default: the largest) against the host's ring capability; returns the
/// capability to enable and the ring size.
fn ring_capability(vm: &Vm, entries: Option<u32>) -> Result<(u32, u32), VmmError> {
    let Some((cap, max)) = vm.dirty_ring_capability() else {
        return Err(VmmError::MissingCapability(
            "has no dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING); \
             use --dirty-log bitmap"
                .into(),
        ));
    };
    let entries = entries.unwrap_or(max);
    let allowed = format!("allowed: powers of two from {MIN_RING_ENTRIES} to {max}");
    let problem = if !entries.is_power_of_two() {
        "is not a power of two"
    } else if entries < MIN_RING_ENTRIES {
        "is below the smallest ring every x86 host accepts"
    } else if entries > max {
        "is above this host's largest ring"
    } else {
        return Ok((cap, entries));
    };
    Err(VmmError::BadConfig(format!(
        "--ring-entries {entries} {problem} ({allowed})"
    )))
}

/// Creates a VM with the system slot laid out for `layout` and guest RAM logged as `log`
/// says; returns it with the ring size in ring mode. Ring mode enables the rings here, before
/// any vCPU exists, as the kernel requires. [`Machine::boot`] uses it; so do benches that
/// time the kernel's ioctls alone.
pub fn create_vm(
    kvm: &Kvm,
    layout: &Layout,
    log: DirtyLog,
    ring_entries: Option<u32>,
    ram: Option<GuestMemory>,
) -> Result<(Vm, Option<u32>), VmmError> {
    for (cap, name) in [
        (sys::KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
        (sys::KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        (sys::KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ"),
    ] {
        if kvm.check_extension(cap) <= 0 {
            return Err(VmmError::MissingCapability(format!("lacks {name}")));
        }
    }
    let mut vm = kvm.create_vm().map_err(VmmError::io("KVM_CREATE_VM"))?;
    let mut ring = None;
    match log {
        DirtyLog::None => {}
        DirtyLog::Ring => {
            let (cap, entries) = ring_capability(&vm, ring_entries)?;
            vm.enable_dirty_ring(cap, entries)
                .map_err(VmmError::io(format!(
                    "enabling {entries}-entry dirty rings"
                )))?;
            ring = Some(entries);
        }
        DirtyLog::Bitmap => {
            // Without PROTECT2, KVM_GET_DIRTY_LOG alone reads and re-arms.
            if vm.check_extension(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0 {
                vm.enable_manual_dirty_log_protect()
                    .map_err(VmmError::io("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
            }
        }
    }
    vm.set_tss_addr(guest::TSS_ADDR)
        .map_err(VmmError::io("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_addr(guest::IDENTITY_MAP_ADDR)
        .map_err(VmmError::io("KVM_SET_IDENTITY_MAP_ADDR"))?;
    let system = vm
        .add_memory_slot(
            guest::SYSTEM_SLOT,
            0,
            guest::SYSTEM_SIZE as usize,
            sys::MemoryRegionFlags::empty(),
        )
        .map_err(VmmError::io("mapping the system memory slot"))?;
    layout.write_system(&system.memory);
    let ram_flags = match log {
        DirtyLog::None => sys::MemoryRegionFlags::empty(),
        DirtyLog::Ring | DirtyLog::Bitmap => sys::MemoryRegionFlags::LOG_DIRTY_PAGES,
    };
    let ram = match ram {
        Some(ram) => ram,
        None => GuestMemory::new(layout.memory() as usize).map_err(VmmError::io(format!(
            "mapping {} of guest memory",
            guest::Size(layout.memory())
        )))?,
    };
    vm.add_memory_slot_backed_by(guest::RAM_SLOT, guest::RAM_BASE, ram, ram_flags)
        .map_err(VmmError::io("registering guest memory with KVM"))?;
    Ok((vm, ring))
}

/// Creates vCPU `id` in flat long mode with `regs` (given the guest TSC frequency in kHz);
/// returns it with that frequency.
pub fn create_vcpu(
    vm: &Vm,
    layout: &Layout,
    cpuid: &sys::CpuidBuf<{ kvm::CPUID_ENTRIES }>,
    id: u32,
    regs: impl FnOnce(u32) -> sys::kvm_regs,
) -> Result<(Vcpu, u32), VmmError> {
    let what = |call: &str| format!("{call} on vCPU {id}");
    let vcpu = vm
        .create_vcpu(id)
        .map_err(VmmError::io(what("KVM_CREATE_VCPU")))?;
    let registers = vcpu.registers();
    registers
        .set_cpuid(cpuid)
        .map_err(VmmError::io(what("KVM_SET_CPUID2")))?;
    let sregs = registers
        .sregs()
        .map_err(VmmError::io(what("KVM_GET_SREGS")))?;
    registers
        .set_sregs(&layout.sregs(sregs))
        .map_err(VmmError::io(what("KVM_SET_SREGS")))?;
    let tsc_khz = registers
        .tsc_khz()
        .map_err(VmmError::io(what("KVM_GET_TSC_KHZ")))?;
    registers
        .set_regs(&regs(tsc_khz))
        .map_err(VmmError::io(what("KVM_SET_REGS")))?;
    Ok((vcpu, tsc_khz))
}

/// A guest state to boot from instead of a fresh one: what an incoming migration received.
#[derive(Debug)]
pub struct Restore {
    /// Guest RAM, filled.
    pub ram: GuestMemory,
    /// Each vCPU's registers and TSC, by id.
    pub vcpus: Vec<VcpuState>,
    /// Each vCPU's ground-truth counters, by id: they continue from these.
    pub stats: Vec<GuestStats>,
    /// The guest TSC frequency the state was saved at (the pacing in the registers counts in
    /// it): set on every vCPU when this host's differs.
    pub tsc_khz: u32,
}

/// How [`Machine::boot_with`] starts a machine.
#[derive(Debug, Default)]
pub struct Boot {
    /// Start from this state instead of the layout's fresh one.
    pub restore: Option<Restore>,
    /// The vCPUs wait, paused, until [`Machine::resume`].
    pub paused: bool,
    /// The stop request the machine answers to (shared with whoever waited for the machine
    /// to exist).
    pub stop: Arc<StopRequest>,
}

/// Puts a saved state back on a fresh vCPU, at the TSC frequency it was saved at.
fn restore_vcpu(vcpu: &Vcpu, state: &VcpuState, tsc_khz: u32) -> Result<(), VmmError> {
    let id = vcpu.id();
    let registers = vcpu.registers();
    let here = registers
        .tsc_khz()
        .map_err(VmmError::io(format!("KVM_GET_TSC_KHZ on vCPU {id}")))?;
    if here != tsc_khz {
        registers
            .set_tsc_khz(tsc_khz)
            .map_err(|error| VmmError::Io {
                what: format!(
                    "the guest's TSC ran at {tsc_khz} kHz, this host's runs at {here} kHz, and \
                 KVM_SET_TSC_KHZ on vCPU {id}"
                ),
                error,
            })?;
    }
    registers
        .restore(state)
        .map_err(VmmError::io(format!("restoring vCPU {id}'s registers")))
}

/// A running VM: the KVM objects, the guest layout and the vCPU threads.
#[derive(Debug)]
pub struct Machine {
    controls: Vec<Arc<VcpuControl>>,
    threads: Mutex<Vec<VcpuThread>>,
    reaper: Option<Reaper>,
    meter: DirtyRateMeter,
    limiter: DirtyLimiter,
    tracker: Arc<Tracker>,
    vm: Arc<Vm>,
    layout: Layout,
    stop: Arc<StopRequest>,
    started: Instant,
    /// When `shutdown` stopped the vCPUs.
    stopped: Mutex<Option<Instant>>,
    tsc_khz: u32,
    /// The guests' counters at boot: zero, or what a migration brought.
    initial_stats: Vec<GuestStats>,
}

impl Machine {
    /// Boots `config` and starts every vCPU.
    pub fn boot(config: &VmConfig) -> Result<Machine, VmmError> {
        Machine::boot_with(config, Boot::default())
    }

    /// Boots `config` as `boot` says: from a fresh guest or from a restored one, running or
    /// paused, with a new stop request or a given one.
    pub fn boot_with(config: &VmConfig, boot: Boot) -> Result<Machine, VmmError> {
        let layout = Layout::new(config.vcpus, config.memory, &config.workloads)?;
        let Boot {
            restore,
            paused,
            stop,
        } = boot;
        if let Some(restore) = &restore {
            if restore.vcpus.len() != config.vcpus as usize
                || restore.stats.len() != config.vcpus as usize
                || restore.ram.len() as u64 != config.memory
            {
                return Err(VmmError::BadConfig(format!(
                    "a restored state of {} vCPUs and {} does not fit {} vCPUs and {}",
                    restore.vcpus.len(),
                    guest::Size(restore.ram.len() as u64),
                    config.vcpus,
                    guest::Size(config.memory)
                )));
            }
        }
        check_host_memory(&layout)?;
        let kvm = open_kvm()?;
        let max = max_vcpus(&kvm);
        if config.vcpus > max {
            return Err(VmmError::BadConfig(format!(
                "--vcpus {} is above this host's KVM limit of {max} vCPUs per VM",
                config.vcpus
            )));
        }
        let ram = restore.as_ref().map(|r| r.ram.clone());
        let (vm, ring_entries) =
            create_vm(&kvm, &layout, config.dirty_log, config.ring_entries, ram)?;
        let cpuid = kvm
            .supported_cpuid()
            .map_err(VmmError::io("KVM_GET_SUPPORTED_CPUID"))?;
        kvm::install_kick_handler()
            .map_err(|e| VmmError::io("installing the vCPU kick handler")(e.into()))?;
        let (vcpus, mut tsc_khz): (Vec<_>, Vec<_>) = (0..config.vcpus)
            .map(|id| create_vcpu(&vm, &layout, &cpuid, id, |khz| layout.regs(id, khz)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let initial_stats = match &restore {
            Some(restore) => restore.stats.clone(),
            None => vec![GuestStats::default(); config.vcpus as usize],
        };
        if let Some(restore) = &restore {
            let system = &vm.slot(guest::SYSTEM_SLOT).expect("system slot").memory;
            for (vcpu, (state, stats)) in vcpus.iter().zip(restore.vcpus.iter().zip(&restore.stats))
            {
                restore_vcpu(vcpu, state, restore.tsc_khz)?;
                stats.write(system, vcpu.id());
            }
            tsc_khz.fill(restore.tsc_khz);
        }
        let rings = match ring_entries {
            Some(entries) => vcpus
                .iter()
                .map(|v| {
                    v.map_dirty_ring(entries).map_err(VmmError::io(format!(
                        "mapping vCPU {}'s dirty ring",
                        v.id()
                    )))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let vm = Arc::new(vm);
        let tracker = Arc::new(Tracker::new(
            vm.clone(),
            config.dirty_log,
            rings,
            vcpus.len(),
        ));
        let started = Instant::now();
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            match VcpuThread::spawn(vcpu, tracker.clone(), stop.clone(), paused) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    threads.into_iter().for_each(VcpuThread::stop_and_join);
                    return Err(VmmError::io("spawning a vCPU thread")(e));
                }
            }
        }
        let reaper = match config.dirty_log {
            DirtyLog::None => None,
            DirtyLog::Ring | DirtyLog::Bitmap => {
                let controls = threads.iter().map(|t| t.control().clone()).collect();
                match Reaper::spawn(tracker.clone(), controls, config.reaper, stop.clone()) {
                    Ok(reaper) => Some(reaper),
                    Err(e) => {
                        threads.into_iter().for_each(VcpuThread::stop_and_join);
                        return Err(VmmError::io("spawning the reaper thread")(e));
                    }
                }
            }
        };
        let controls: Vec<_> = threads.iter().map(|t| t.control().clone()).collect();
        let memory = |id| vm.slot(id).expect("slot exists").memory.clone();
        let meter = DirtyRateMeter::new(RateSources {
            ram: memory(guest::RAM_SLOT),
            system: memory(guest::SYSTEM_SLOT),
            layout: layout.clone(),
            tracker: tracker.clone(),
            vcpus: controls.clone(),
        });
        let limiter = DirtyLimiter::new(
            tracker.clone(),
            controls.clone(),
            config.limit_algo,
            started,
        );
        Ok(Machine {
            controls,
            threads: Mutex::new(threads),
            reaper,
            meter,
            limiter,
            tracker,
            vm,
            layout,
            stop,
            started,
            stopped: Mutex::new(None),
            tsc_khz: tsc_khz[0],
            initial_stats,
        })
    }

    /// The guest layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The VM-wide stop request, shared with the vCPU threads.
    pub fn stop_request(&self) -> &Arc<StopRequest> {
        &self.stop
    }

    /// When the vCPUs were started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// How long the vCPUs ran: from boot until [`Machine::shutdown`] stopped them, or until
    /// now.
    pub fn ran_for(&self) -> std::time::Duration {
        let stopped = *lock(&self.stopped);
        stopped.unwrap_or_else(Instant::now) - self.started
    }

    /// The guest TSC frequency in kHz (what paced workloads count against).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The vCPUs' control blocks (kick, stop, exit counters), by id.
    pub fn vcpus(&self) -> &[Arc<VcpuControl>] {
        &self.controls
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestMemory {
        &self
            .vm
            .slot(guest::RAM_SLOT)
            .expect("RAM slot exists")
            .memory
    }

    /// Ground-truth counters of every vCPU, by id.
    pub fn guest_stats(&self) -> Vec<GuestStats> {
        let system = &self
            .vm
            .slot(guest::SYSTEM_SLOT)
            .expect("system slot exists")
            .memory;
        (0..self.layout.vcpus().len() as u32)
            .map(|id| GuestStats::read(system, id))
            .collect()
    }

    /// Every vCPU's counters at boot, by id: zero, or where a migrated guest had got to.
    pub fn initial_stats(&self) -> &[GuestStats] {
        &self.initial_stats
    }

    /// The dirty tracker.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// The reaper, when the VM tracks dirty pages.
    pub fn reaper(&self) -> Option<&Reaper> {
        self.reaper.as_ref()
    }

    /// The dirty limiter and auto-converge throttle.
    pub fn limiter(&self) -> &DirtyLimiter {
        &self.limiter
    }

    /// The dirty-rate meter.
    pub fn rate_meter(&self) -> &DirtyRateMeter {
        &self.meter
    }

    /// Pauses every vCPU (QMP `stop`) and waits until none is inside `KVM_RUN`; false if one
    /// still was after a second (a kick went unanswered).
    pub fn pause(&self) -> bool {
        for vcpu in &self.controls {
            vcpu.set_paused(true);
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        while self.controls.iter().any(|v| v.in_guest()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        true
    }

    /// Resumes every vCPU (QMP `cont`).
    pub fn resume(&self) {
        for vcpu in &self.controls {
            vcpu.set_paused(false);
        }
    }

    /// Whether the vCPUs run (not paused).
    pub fn running(&self) -> bool {
        !self.controls.iter().any(|v| v.paused())
    }

    /// Stops every vCPU thread and joins it, reaps what they left in the rings, then stops
    /// the reaper. Counters stay readable afterwards. Idempotent.
    pub fn shutdown(&self) -> Result<(), VmmError> {
        self.meter.shut_down();
        self.limiter.shut_down();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in &threads {
            thread.control().request_stop();
        }
        threads.into_iter().for_each(VcpuThread::stop_and_join);
        lock(&self.stopped).get_or_insert_with(Instant::now);
        let last_reap = self.tracker.reap().map(drop);
        if let Some(reaper) = &self.reaper {
            reaper.shut_down();
        }
        last_reap.map_err(VmmError::io("the final harvest"))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Best effort: a Machine dropped without shutdown (an error path, a failed test)
        // still stops and joins its threads.
        let _ = self.shutdown();
    }
}

/// Runs [`guest::programs::COUNTDOWN`] on one vCPU and returns guest instructions per second.
pub fn measure_instruction_rate(kvm: &Kvm, iterations: u64) -> Result<f64, VmmError> {
    let layout = Layout::new(1, 2 << 20, &[])?;
    let (vm, _) = create_vm(kvm, &layout, DirtyLog::None, None, None)?;
    let cpuid = kvm
        .supported_cpuid()
        .map_err(VmmError::io("KVM_GET_SUPPORTED_CPUID"))?;
    let (mut vcpu, _) = create_vcpu(&vm, &layout, &cpuid, 0, |_| {
        guest::countdown_regs(iterations)
    })?;
    let start = Instant::now();
    loop {
        match vcpu.run().map_err(VmmError::io("KVM_RUN"))? {
            kvm::VcpuExit::Hlt => break,
            kvm::VcpuExit::Interrupted => continue,
            other => {
                return Err(VmmError::Io {
                    what: "the countdown guest".into(),
                    error: io::Error::other(format!("unexpected exit {other:?}")),
                })
            }
        }
    }
    // Two instructions per iteration (dec, jnz).
    Ok(2.0 * iterations as f64 / start.elapsed().as_secs_f64())
}

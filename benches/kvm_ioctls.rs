//! What the kernel's dirty-logging ioctls cost, on this host's KVM.
//!
//! Measures:
//!
//! - `dirty_log/get_clear/{all_dirty,none_dirty}`: one `KVM_GET_DIRTY_LOG` followed by one
//!   `KVM_CLEAR_DIRTY_LOG` over a whole 1 GiB dirty-logged slot (262144 pages), with manual
//!   protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, as dirtyvm's bitmap mode uses it): the
//!   GET only copies the bitmap out, the CLEAR re-arms (write-protects) every page named in
//!   it. Criterion's time is per GiB, its throughput pages/s. `all_dirty`: a guest writer (`write:1G`) has written
//!   every page of the slot since the previous CLEAR, so every bit is set and every page is
//!   mapped writable: the CLEAR write-protects 262144 pages. `none_dirty`: nothing was
//!   written since the previous CLEAR: the fixed cost of scanning the slot's bitmap twice
//!   (dirtyvm's tracker skips the CLEAR when the GET finds nothing; here it is timed anyway,
//!   to show what it would cost). The split between GET and CLEAR is printed at the end.
//! - `reset_dirty_rings/{sequential,random}/{1024,16384}`: `KVM_RESET_DIRTY_RINGS` after a
//!   guest writer (`write:256M` or `random-write:256M`) has pushed about that many entries
//!   into its 65536-entry ring (16384 is a quarter ring, what the adaptive reaper aims to
//!   harvest per reap; 1024 a fast cadence) and they were harvested (marked RESET) untimed.
//!   Criterion's time is per 1000 entries reset (each sample's total reset time scaled by
//!   1000 / entries reset; throughput is entries/s). The kernel re-protects the pages in
//!   runs of up to 64 neighbouring pages, so a sequential writer's entries are the cheap
//!   case and a random writer's the expensive one; the entries per call and the time per
//!   call are printed at the end.
//!
//! How: the bench builds its VMs with the VMM's own bring-up (`vmm::create_vm`,
//! `vmm::create_vcpu`, one `VcpuThread`) rather than a whole `Machine`, because the ioctls
//! must be timed alone: no reaper, and the vCPU is paused out of `KVM_RUN` before each timed call
//! (so it neither contends for the kernel's MMU lock nor dirties pages during it), and
//! harvesting, counting and publishing, which `Tracker::reap` does around the same ioctls,
//! stay outside the timed region. Setting up each timed call (letting the guest dirty the
//! pages) is untimed, so a sample takes far longer than its reported time.
//!
//! Why: these are the kernel costs under every reap: the bitmap's GET + CLEAR grows with
//! guest memory whatever the dirty rate, the ring's reset grows with the dirty rate whatever
//! the memory size. Together with the `harvest` and `dirty_set` benches they say what one
//! reap costs, and so how often the reaper can afford to run on a 2-core host. Needs
//! `/dev/kvm`: skipped with a message without it.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirtyvm::ring::{Harvester, SlotBounds, SlotStore};
use dirtyvm::tracking::{DirtyLog, Tracker};
use dirtyvm::vm::guest::{self, GuestStats, Layout};
use dirtyvm::vm::kvm::{self, DirtyRingMap, GuestMemory, Kvm, Vm};
use dirtyvm::vm::vcpu::{StopRequest, VcpuControl, VcpuThread};
use dirtyvm::vmm;

const GIB: u64 = 1 << 30;
const PAGE_SIZE: u64 = dirtyvm::units::PAGE_SIZE;
/// The largest ring this host allows (docs/host.md); smaller if the host's is.
const RING_ENTRIES: u32 = 65536;
/// Entries per timed reset.
const RESET_BATCHES: [u64; 2] = [1024, 16384];
/// A guest that makes no progress for this long has stopped: fail rather than hang.
const STALL: Duration = Duration::from_secs(10);

/// How the bench VM's guest RAM is dirty-logged.
#[derive(Clone, Copy)]
enum Logging {
    /// Dirty bitmap with manual protect.
    Bitmap,
    /// Per-vCPU rings of this many entries.
    Ring(u32),
}

/// A one-vCPU VM with the built-in guest running `workload` over `memory` bytes of
/// dirty-logged RAM, driven directly through the kvm layer.
struct BenchVm {
    vcpu: Option<VcpuThread>,
    ring: Option<DirtyRingMap>,
    harvester: Harvester,
    bounds: SlotBounds,
    system: GuestMemory,
    vm: Arc<Vm>,
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        // The vCPU thread stops before the ring and the VM go away.
        if let Some(vcpu) = self.vcpu.take() {
            vcpu.stop_and_join();
        }
    }
}

impl BenchVm {
    fn boot(kvm: &Kvm, memory: u64, workload: &str, logging: Logging) -> Result<BenchVm, String> {
        let workload = workload.parse().map_err(|e| format!("{e}"))?;
        let layout = Layout::new(1, memory, &[workload]).map_err(|e| e.to_string())?;
        let (log, entries) = match logging {
            Logging::Bitmap => (DirtyLog::Bitmap, None),
            Logging::Ring(entries) => (DirtyLog::Ring, Some(entries)),
        };
        let (vm, ring_entries) =
            vmm::create_vm(kvm, &layout, log, entries, None).map_err(|e| e.to_string())?;
        if log == DirtyLog::Bitmap && !vm.manual_dirty_log_protect() {
            return Err("this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2".into());
        }
        let system = vm
            .slot(guest::SYSTEM_SLOT)
            .expect("system slot")
            .memory
            .clone();
        kvm::install_kick_handler().map_err(|e| format!("installing the kick handler: {e}"))?;
        let cpuid = kvm
            .supported_cpuid()
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        let (vcpu, _) = vmm::create_vcpu(&vm, &layout, &cpuid, 0, |khz| layout.regs(0, khz))
            .map_err(|e| e.to_string())?;
        let ring = ring_entries
            .map(|entries| vcpu.map_dirty_ring(entries))
            .transpose()
            .map_err(|e| format!("mapping the dirty ring: {e}"))?;
        let vm = Arc::new(vm);
        // No tracking behind the vCPU: the bench harvests and resets by hand, and a writer
        // this short never fills a 65536-entry ring.
        let tracker = Arc::new(Tracker::new(vm.clone(), DirtyLog::None, Vec::new(), 1));
        let vcpu = VcpuThread::spawn(vcpu, tracker, Arc::new(StopRequest::default()), false)
            .map_err(|e| format!("spawning the vCPU thread: {e}"))?;
        let bench = BenchVm {
            vcpu: Some(vcpu),
            ring,
            harvester: Harvester::new(),
            bounds: SlotBounds::new([(guest::RAM_SLOT, memory / PAGE_SIZE)]),
            system,
            vm,
        };
        bench.pause();
        Ok(bench)
    }

    fn control(&self) -> &VcpuControl {
        self.vcpu.as_ref().expect("running").control()
    }

    /// Pauses the vCPU and returns once it is outside `KVM_RUN`.
    fn pause(&self) {
        let control = self.control();
        control.set_paused(true);
        let start = Instant::now();
        while control.in_guest() {
            assert!(
                start.elapsed() < STALL,
                "the bench vCPU did not leave KVM_RUN"
            );
            thread::yield_now();
        }
    }

    fn pages_written(&self) -> u64 {
        GuestStats::read(&self.system, 0).pages_written
    }

    /// Runs the guest until it has written at least `pages` more pages, then parks it.
    /// Spins (with yields) rather than sleeps, so that small counts are not overshot much.
    fn run_for(&self, pages: u64) {
        let start = self.pages_written();
        self.control().set_paused(false);
        let (mut last, mut progress) = (start, Instant::now());
        loop {
            let now = self.pages_written();
            if now - start >= pages {
                break;
            }
            if now != last {
                (last, progress) = (now, Instant::now());
            } else if progress.elapsed() > STALL {
                panic!("the bench guest made no progress for {STALL:?}");
            }
            thread::yield_now();
        }
        self.pause();
    }

    /// Lets the guest dirty `pages` pages, harvests them (untimed), then times
    /// `KVM_RESET_DIRTY_RINGS` with the vCPU parked; returns the entries reset and the time.
    fn dirty_harvest_reset(&mut self, pages: u64) -> (u32, Duration) {
        self.run_for(pages);
        let harvested = self.harvest();
        let start = Instant::now();
        let reset = self.vm.reset_dirty_rings().expect("KVM_RESET_DIRTY_RINGS");
        let elapsed = start.elapsed();
        assert_eq!(reset, harvested, "the reset counts what was harvested");
        (reset, elapsed)
    }

    /// Harvests the ring (marks every dirtied entry RESET); returns the entries harvested.
    fn harvest(&mut self) -> u32 {
        let ring = self.ring.as_ref().expect("a ring VM");
        let mut harvested = 0;
        loop {
            let h = self.harvester.harvest(ring, &self.bounds, |_, _| {});
            assert_eq!(
                h.bad_entries, 0,
                "the kernel pushed entries outside guest RAM"
            );
            harvested += h.collected;
            if h.collected < ring.entries() {
                return harvested;
            }
        }
    }
}

/// Totals of one variant, for the summary.
#[derive(Default)]
struct Totals {
    calls: u64,
    entries: u64,
    /// Time in the first (or only) ioctl of the call.
    first_ioctl: Duration,
    /// Time in the second ioctl of the call.
    second_ioctl: Duration,
}

fn dirty_log(c: &mut Criterion, kvm: &Kvm) {
    let mut group = c.benchmark_group("dirty_log");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(GIB / PAGE_SIZE));
    let vm = match BenchVm::boot(kvm, GIB, "write:1G", Logging::Bitmap) {
        Ok(vm) => vm,
        Err(e) => {
            println!("dirty_log: skipped: {e}");
            return;
        }
    };
    let pages = GIB / PAGE_SIZE;
    let mut bitmap = vec![0u64; (pages / 64) as usize];
    let get_clear = |bitmap: &mut Vec<u64>, totals: &mut Totals| -> Duration {
        let start = Instant::now();
        vm.vm
            .get_dirty_log(guest::RAM_SLOT, bitmap)
            .expect("KVM_GET_DIRTY_LOG");
        let got = start.elapsed();
        vm.vm
            .clear_dirty_log(guest::RAM_SLOT, 0, pages as u32, bitmap)
            .expect("KVM_CLEAR_DIRTY_LOG");
        let both = start.elapsed();
        totals.calls += 1;
        totals.entries += bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
        totals.first_ioctl += got;
        totals.second_ioctl += both - got;
        both
    };
    // One untimed pass faults the whole slot in (host memory, 4 KiB mappings).
    vm.run_for(pages);
    get_clear(&mut bitmap, &mut Totals::default());

    let mut all = Totals::default();
    group.bench_function(BenchmarkId::new("get_clear", "all_dirty"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                vm.run_for(pages);
                let before = all.entries;
                timed += get_clear(&mut bitmap, &mut all);
                assert_eq!(all.entries - before, pages, "every page is dirty");
            }
            timed
        })
    });
    let mut none = Totals::default();
    group.bench_function(BenchmarkId::new("get_clear", "none_dirty"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                timed += get_clear(&mut bitmap, &mut none);
            }
            assert_eq!(none.entries, 0, "nothing was written");
            timed
        })
    });
    group.finish();
    drop(vm);

    println!("\ndirty_log: mean per call over a 1 GiB slot (262144 pages)");
    println!(
        "{:<12} {:>7} {:>16} {:>18} {:>13}",
        "variant", "calls", "GET_DIRTY_LOG", "CLEAR_DIRTY_LOG", "dirty pages"
    );
    for (name, t) in [("all_dirty", &all), ("none_dirty", &none)] {
        let calls = t.calls.max(1);
        println!(
            "{:<12} {:>7} {:>13.1} µs {:>15.1} µs {:>13}",
            name,
            t.calls,
            t.first_ioctl.as_secs_f64() * 1e6 / calls as f64,
            t.second_ioctl.as_secs_f64() * 1e6 / calls as f64,
            t.entries / calls
        );
    }
    println!();
}

fn reset_dirty_rings(c: &mut Criterion, kvm: &Kvm) {
    let mut group = c.benchmark_group("reset_dirty_rings");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1000));
    let mut summary = Vec::new();
    for (order, workload) in [
        ("sequential", "write:256M"),
        ("random", "random-write:256M"),
    ] {
        let mut vm = match BenchVm::boot(kvm, 256 << 20, workload, Logging::Ring(RING_ENTRIES)) {
            Ok(vm) => vm,
            Err(e) => {
                println!("reset_dirty_rings/{order}: skipped: {e}");
                continue;
            }
        };
        // At most a quarter ring per reset: the kernel's soft limit stays far away even if
        // a pause comes late.
        let quarter = u64::from(vm.ring.as_ref().map_or(0, |r| r.entries()) / 4);
        // Untimed: two passes over the working set fault host memory in.
        let working_set = (256 << 20) / PAGE_SIZE;
        for _ in 0..2 * working_set / quarter {
            vm.dirty_harvest_reset(quarter);
        }
        for batch in RESET_BATCHES {
            let batch = batch.min(quarter);
            let mut totals = Totals::default();
            group.bench_function(BenchmarkId::new(order, batch), |b| {
                b.iter_custom(|iters| {
                    let want = iters * 1000;
                    let (mut reset, mut timed) = (0u64, Duration::ZERO);
                    while reset < want {
                        let (n, t) = vm.dirty_harvest_reset(batch);
                        reset += u64::from(n);
                        timed += t;
                        totals.calls += 1;
                        totals.entries += u64::from(n);
                        totals.first_ioctl += t;
                    }
                    timed.mul_f64(want as f64 / reset as f64)
                })
            });
            summary.push((order, batch, totals));
        }
    }
    group.finish();

    println!("\nreset_dirty_rings: per KVM_RESET_DIRTY_RINGS call, vCPU parked");
    println!(
        "{:<12} {:>7} {:>7} {:>17} {:>12} {:>16}",
        "writer", "batch", "calls", "entries per call", "µs per call", "µs per 1000"
    );
    for (order, batch, t) in &summary {
        let calls = t.calls.max(1) as f64;
        let us = t.first_ioctl.as_secs_f64() * 1e6;
        println!(
            "{:<12} {:>7} {:>7} {:>17.0} {:>12.1} {:>16.1}",
            order,
            batch,
            t.calls,
            t.entries as f64 / calls,
            us / calls,
            us * 1000.0 / t.entries.max(1) as f64
        );
    }
    println!();
}

fn kvm_ioctls(c: &mut Criterion) {
    let kvm = match Kvm::open() {
        Ok(kvm) => kvm,
        Err(e) => {
            println!("dirty_log, reset_dirty_rings: skipped: /dev/kvm cannot be opened ({e})");
            return;
        }
    };
    dirty_log(c, &kvm);
    reset_dirty_rings(c, &kvm);
}

criterion_group!(benches, kvm_ioctls);
criterion_main!(benches);

//! The built-in guest: flat 64-bit long mode set up directly by the host (no BIOS, no guest
//! OS), one tiny workload program per vCPU, and a stats block per vCPU that the guest's own
//! code updates: the ground truth every measurement is judged against.
//!
//! Guest-physical memory map:
//!
//! | GPA | what | slot |
//! | --- | --- | --- |
//! | `0x500` | GDT: null, 64-bit code, data | system (0), not dirty-logged |
//! | `0x1000` | PML4, then PDPT at `0x2000`, page directories from `0x3000` | system |
//! | `0x80000` | the workload programs, 256 bytes apart | system |
//! | `0x90000` | stats blocks, 64 bytes per vCPU | system |
//! | `4 GiB` | guest RAM (`--memory`), one working set per vCPU, in vCPU order | RAM (1), logged |
//!
//! Everything is identity-mapped with 2 MiB pages (GVA = GPA). The stats live in the system
//! slot, which is never dirty-logged, so reading or updating them never pollutes tracking and
//! the host reads them with no exits.

pub mod programs;
mod workload;

pub use workload::{parse_size, parse_working_set, Size, SpecError, Workload, MIN_PACE_MIBPS};

use std::fmt;
use std::sync::atomic::Ordering;

use dirtyvm_sys as sys;

use crate::units::PAGE_SIZE;
use crate::vm::kvm::GuestMemory;

/// Slot id of the system slot (page tables, GDT, code, stats).
pub const SYSTEM_SLOT: u16 = 0;
/// Size of the system slot.
pub const SYSTEM_SIZE: u64 = 1 << 20;
/// Slot id of guest RAM.
pub const RAM_SLOT: u16 = 1;
/// Guest-physical address of guest RAM: above the 32-bit hole, where nothing else lives.
pub const RAM_BASE: u64 = 4 << 30;
/// Largest `--memory` the page tables cover.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Three pages below 4 GiB for the TSS Intel's KVM needs (QEMU's choice of address).
pub const TSS_ADDR: u64 = 0xfffb_d000;
/// One page below the TSS for the EPT identity map.
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const CODE_ADDR: u64 = 0x8_0000;
const CODE_STRIDE: u64 = 0x100;
const STATS_ADDR: u64 = 0x9_0000;
const STATS_STRIDE: u64 = 64;
/// Most vCPUs the stats area holds.
pub const MAX_VCPUS: u32 = 1024;

const GIB: u64 = 1 << 30;
const HUGE_PAGE: u64 = 2 << 20;
/// Page-table entry bits: present, writable, and (in a page directory) 2 MiB page.
const PTE_PRESENT_WRITABLE: u64 = 0b11;
const PDE_HUGE: u64 = 1 << 7;

/// The programs in the order they are laid out in the code area.
const PROGRAMS: [&[u8]; 7] = [
    programs::WRITE,
    programs::WRITE_PACED,
    programs::RANDOM_WRITE,
    programs::RANDOM_WRITE_PACED,
    programs::READ,
    programs::IDLE,
    programs::COUNTDOWN,
];
const COUNTDOWN_PROGRAM: u64 = 6;

/// A paced writer catches up on at most this much lateness (10 ms): a vCPU that was paused
/// or penalized does not burst afterwards.
const MAX_LATENESS_DIVISOR: u64 = 100;

// The system slot's areas do not overlap, whatever the memory size and vCPU count.
const _: () = {
    assert!(PD_ADDR + (1 + MAX_MEMORY / GIB) * PAGE_SIZE <= CODE_ADDR);
    let mut i = 0;
    while i < PROGRAMS.len() {
        assert!(PROGRAMS[i].len() as u64 <= CODE_STRIDE);
        i += 1;
    }
    assert!(CODE_ADDR + PROGRAMS.len() as u64 * CODE_STRIDE <= STATS_ADDR);
    assert!(STATS_ADDR + MAX_VCPUS as u64 * STATS_STRIDE <= SYSTEM_SIZE);
};

/// Why a VM's guest layout is impossible. Messages name the bad value and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// No vCPUs.
    NoVcpus,
    /// More vCPUs than the stats area holds.
    TooManyVcpus { vcpus: u32 },
    /// More workloads than vCPUs.
    TooManyWorkloads { workloads: usize, vcpus: u32 },
    /// `--memory` zero, not whole pages, or above [`MAX_MEMORY`].
    BadMemory { memory: u64 },
    /// The working sets together exceed guest memory; `needed` is `None` when their sum
    /// does not even fit in 64 bits.
    DoesNotFit {
        sizes: Vec<u64>,
        needed: Option<u64>,
        memory: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LayoutError::NoVcpus => write!(f, "--vcpus must be at least 1"),
            LayoutError::TooManyVcpus { vcpus } => {
                write!(
                    f,
                    "--vcpus {vcpus} is more than dirtyvm supports ({MAX_VCPUS})"
                )
            }
            LayoutError::TooManyWorkloads { workloads, vcpus } => write!(
                f,
                "{workloads} workloads given for {vcpus} vCPUs; give at most one --workload per \
                 vCPU or raise --vcpus"
            ),
            LayoutError::BadMemory { memory } => write!(
                f,
                "--memory {} must be a positive multiple of 4K and at most {}",
                Size(memory),
                Size(MAX_MEMORY)
            ),
            LayoutError::DoesNotFit {
                ref sizes,
                needed,
                memory,
            } => {
                let sizes: Vec<String> = sizes.iter().map(|&s| Size(s).to_string()).collect();
                let needed = needed.map_or("more than 16 EiB".into(), |n| Size(n).to_string());
                write!(
                    f,
                    "the working sets ({}) need {needed} but --memory is {}; shrink the \
                     workloads or raise --memory",
                    sizes.join(" + "),
                    Size(memory)
                )
            }
        }
    }
}

impl std::error::Error for LayoutError {}

/// One vCPU's part of the guest: its workload and where its working set starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VcpuPlan {
    /// vCPU id.
    pub id: u32,
    /// What it runs.
    pub workload: Workload,
    /// Offset of its working set inside guest RAM (the RAM slot).
    pub ram_offset: u64,
}

impl VcpuPlan {
    /// Guest-physical address of the working set.
    pub fn gpa(&self) -> u64 {
        RAM_BASE + self.ram_offset
    }

    /// Seed of this vCPU's random page order (below the LCG modulus).
    pub fn lcg_seed(&self) -> u64 {
        (0x9e37_79b9 * u64::from(self.id + 1)) & self.lcg_mask()
    }

    /// The random writer's modulus minus one: next power of two of the page count, minus one.
    pub fn lcg_mask(&self) -> u64 {
        self.workload.pages().max(1).next_power_of_two() - 1
    }
}

/// The guest's layout: guest RAM size and one plan per vCPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    memory: u64,
    vcpus: Vec<VcpuPlan>,
}

impl Layout {
    /// Places each vCPU's working set in guest RAM; vCPUs without a workload are idle.
    pub fn new(vcpus: u32, memory: u64, workloads: &[Workload]) -> Result<Layout, LayoutError> {
        if vcpus == 0 {
            return Err(LayoutError::NoVcpus);
        }
        if vcpus > MAX_VCPUS {
            return Err(LayoutError::TooManyVcpus { vcpus });
        }
        if workloads.len() > vcpus as usize {
            return Err(LayoutError::TooManyWorkloads {
                workloads: workloads.len(),
                vcpus,
            });
        }
        if memory == 0 || !memory.is_multiple_of(PAGE_SIZE) || memory > MAX_MEMORY {
            return Err(LayoutError::BadMemory { memory });
        }
        let sizes: Vec<u64> = workloads.iter().map(Workload::working_set).collect();
        let needed = sizes
            .iter()
            .try_fold(0u64, |sum, &size| sum.checked_add(size));
        if needed.is_none_or(|needed| needed > memory) {
            return Err(LayoutError::DoesNotFit {
                sizes,
                needed,
                memory,
            });
        }
        let mut ram_offset = 0;
        let plans = (0..vcpus)
            .map(|id| {
                let workload = workloads
                    .get(id as usize)
                    .copied()
                    .unwrap_or(Workload::Idle);
                let plan = VcpuPlan {
                    id,
                    workload,
                    ram_offset,
                };
                ram_offset += workload.working_set();
                plan
            })
            .collect();
        Ok(Layout {
            memory,
            vcpus: plans,
        })
    }

    /// Guest RAM size in bytes.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// The per-vCPU plans, by vCPU id.
    pub fn vcpus(&self) -> &[VcpuPlan] {
        &self.vcpus
    }

    /// Writes page tables, GDT and programs into the (fresh) system slot.
    pub fn write_system(&self, system: &GuestMemory) {
        system.write_u64(PML4_ADDR as usize, PDPT_ADDR | PTE_PRESENT_WRITABLE);
        // PD 0 maps the first GiB (system slot); PDs 1.. map guest RAM from 4 GiB.
        let ram_gibs = self.memory.div_ceil(GIB);
        let gibs = std::iter::once(0).chain((0..ram_gibs).map(|g| RAM_BASE / GIB + g));
        for (pd_index, gib) in gibs.enumerate() {
            let pd = PD_ADDR + pd_index as u64 * PAGE_SIZE;
            system.write_u64((PDPT_ADDR + gib * 8) as usize, pd | PTE_PRESENT_WRITABLE);
            for entry in 0..512 {
                let frame = gib * GIB + entry * HUGE_PAGE;
                system.write_u64(
                    (pd + entry * 8) as usize,
                    frame | PTE_PRESENT_WRITABLE | PDE_HUGE,
                );
            }
        }
        for (i, descriptor) in [0, GDT_CODE64, GDT_DATA].into_iter().enumerate() {
            system.write_u64(GDT_ADDR as usize + i * 8, descriptor);
        }
        for (i, code) in PROGRAMS.iter().enumerate() {
            system.write((CODE_ADDR + i as u64 * CODE_STRIDE) as usize, code);
        }
    }

    /// Special registers for flat 64-bit long mode, starting from the vCPU's reset state.
    pub fn sregs(&self, mut sregs: sys::kvm_sregs) -> sys::kvm_sregs {
        let code = sys::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 8,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = sys::kvm_segment {
            selector: 16,
            type_: 0x3, // read/write, accessed
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        sregs
    }

    /// General registers that start vCPU `id`'s program (contract in [`programs`]).
    pub fn regs(&self, id: u32, tsc_khz: u32) -> sys::kvm_regs {
        let plan = &self.vcpus[id as usize];
        let tsc_hz = u64::from(tsc_khz) * 1000;
        let ticks_per_page = |mibps: f64| {
            ((tsc_hz as f64 * PAGE_SIZE as f64 / (mibps * (1 << 20) as f64)) as u64).max(1)
        };
        let (program, ticks) = match plan.workload {
            Workload::Write { mibps: None, .. } => (0, 0),
            Workload::Write { mibps: Some(r), .. } => (1, ticks_per_page(r)),
            Workload::RandomWrite { mibps: None, .. } => (2, 0),
            Workload::RandomWrite { mibps: Some(r), .. } => (3, ticks_per_page(r)),
            Workload::Read { .. } => (4, 0),
            Workload::Idle => (5, 0),
        };
        sys::kvm_regs {
            rip: CODE_ADDR + program * CODE_STRIDE,
            rflags: 0x2, // bit 1 is reserved and always set; interrupts off
            rdi: plan.gpa(),
            rsi: plan.gpa() + plan.workload.working_set(),
            rcx: plan.workload.pages(),
            r8: stats_addr(id),
            r9: ticks,
            r11: plan.lcg_seed(),
            r12: plan.lcg_mask(),
            r13: tsc_hz / MAX_LATENESS_DIVISOR,
            ..Default::default()
        }
    }
}

/// Registers that run [`programs::COUNTDOWN`] for `iterations` loops, then halt.
pub fn countdown_regs(iterations: u64) -> sys::kvm_regs {
    sys::kvm_regs {
        rip: CODE_ADDR + COUNTDOWN_PROGRAM * CODE_STRIDE,
        rflags: 0x2,
        rcx: iterations,
        ..Default::default()
    }
}

const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn stats_addr(id: u32) -> u64 {
    STATS_ADDR + u64::from(id) * STATS_STRIDE
}

/// A vCPU's progress counters, as its guest program counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Pages written (one per page visit of a writer).
    pub pages_written: u64,
    /// Pages read (one per page visit of a reader).
    pub pages_read: u64,
    /// Completed passes over the working set.
    pub passes: u64,
}

impl GuestStats {
    /// Reads vCPU `id`'s counters from the system slot, without stopping the guest.
    pub fn read(system: &GuestMemory, id: u32) -> GuestStats {
        let words = system.words();
        let base = (stats_addr(id) / 8) as usize;
        // Relaxed: plain counters; no other memory is published through them.
        let load = |i: usize| words[base + i].load(Ordering::Relaxed);
        GuestStats {
            pages_written: load(0),
            pages_read: load(1),
            passes: load(2),
        }
    }

    /// Writes vCPU `id`'s counters into the system slot, before the vCPU runs (a migrated
    /// guest's counters continue from the source's).
    pub fn write(&self, system: &GuestMemory, id: u32) {
        let words = system.words();
        let base = (stats_addr(id) / 8) as usize;
        for (i, value) in [self.pages_written, self.pages_read, self.passes]
            .into_iter()
            .enumerate()
        {
            // Relaxed: the vCPU thread that reads them is started after this, which orders it.
            words[base + i].store(value, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(spec: &str) -> Workload {
        spec.parse().unwrap()
    }

    #[test]
    fn working_sets_are_placed_back_to_back_and_missing_ones_idle() {
        let layout = Layout::new(3, 256 << 20, &[w("write:64M"), w("read:32M")]).unwrap();
        let offsets: Vec<_> = layout.vcpus().iter().map(|p| p.ram_offset).collect();
        assert_eq!(offsets, [0, 64 << 20, 96 << 20]);
        assert_eq!(layout.vcpus()[2].workload, Workload::Idle);
    }

    #[test]
    fn impossible_layouts_are_refused_with_the_numbers() {
        assert_eq!(Layout::new(0, 1 << 20, &[]), Err(LayoutError::NoVcpus));
        let e = Layout::new(1, 1 << 20, &[w("idle"), w("idle")]).unwrap_err();
        assert!(
            e.to_string().contains("2 workloads given for 1 vCPUs"),
            "{e}"
        );
        let e = Layout::new(2, 64 << 20, &[w("write:64M"), w("read:4K")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("(64M + 4K) need 65540K but --memory is 64M"),
            "{e}"
        );
        // Sizes whose sum wraps around 64 bits do not fit either.
        let huge = w("write:8589934592G");
        let e = Layout::new(2, 64 << 20, &[huge, huge]).unwrap_err();
        assert!(
            e.to_string()
                .contains("(8589934592G + 8589934592G) need more than 16 EiB"),
            "{e}"
        );
        let e = Layout::new(1, 128 << 30, &[]).unwrap_err();
        assert!(e.to_string().contains("--memory 128G"), "{e}");
        assert!(Layout::new(MAX_VCPUS + 1, 1 << 20, &[]).is_err());
    }

    #[test]
    fn lcg_covers_every_page_once_per_period() {
        // The random writer's page order, replayed on the host: a full-period LCG restricted
        // to the working set is a permutation of its pages.
        let layout = Layout::new(1, 64 << 20, &[w("random-write:1000K")]).unwrap();
        let plan = layout.vcpus()[0];
        let pages = plan.workload.pages();
        let (mask, seed) = (plan.lcg_mask(), plan.lcg_seed());
        assert_eq!(mask, 255);
        let mut x = seed;
        let mut seen = vec![false; pages as usize];
        for _ in 0..=mask {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345) & mask;
            if x < pages {
                assert!(!seen[x as usize], "page {x} written twice in one period");
                seen[x as usize] = true;
            }
        }
        assert_eq!(x, seed);
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn page_tables_identity_map_system_and_ram() {
        let layout = Layout::new(1, 3 << 30, &[]).unwrap();
        let system = GuestMemory::new(SYSTEM_SIZE as usize).unwrap();
        layout.write_system(&system);
        let word = |gpa: u64| system.words()[(gpa / 8) as usize].load(Ordering::Relaxed);
        assert_eq!(word(PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(word(PDPT_ADDR), PD_ADDR | 3);
        // RAM at 4 GiB: PDPT entries 4, 5, 6 point at PDs 1, 2, 3.
        for g in 0..3 {
            assert_eq!(
                word(PDPT_ADDR + (4 + g) * 8),
                (PD_ADDR + (1 + g) * PAGE_SIZE) | 3
            );
        }
        assert_eq!(word(PDPT_ADDR + 7 * 8), 0);
        // Last 2 MiB page of RAM maps to itself.
        let last_pd = PD_ADDR + 3 * PAGE_SIZE;
        assert_eq!(
            word(last_pd + 511 * 8),
            (RAM_BASE + 3 * GIB - HUGE_PAGE) | 0x83
        );
    }
}

//! Safe layer over `/dev/kvm`: the system, VM and vCPU file descriptors, guest memory slots,
//! the `kvm_run` mapping and the thread kick.
//!
//! # Safety
//!
//! This is the only module that issues ioctls or maps kernel memory, so it is one of the few
//! places allowed to use `unsafe`. Its contract:
//!
//! - every ioctl is issued on a file descriptor this module owns (`OwnedFd`), with an argument
//!   whose type and size match the request number (`dirtyvm_sys` asserts the layouts);
//! - memory handed to the kernel (guest memory slots) is owned by the [`Vm`] and outlives the
//!   VM file descriptor: fields drop in declaration order, fds first;
//! - memory the kernel or the guest writes concurrently (guest memory, `kvm_run`) is only ever
//!   accessed through atomics or raw pointers, never through `&`/`&mut` to plain integers;
//! - values the kernel writes are untrusted: they are range-checked before use as an index.

#[cfg(not(loom))]
mod dirty_ring;
mod memory;
mod run;

#[cfg(not(loom))]
pub use dirty_ring::DirtyRingMap;
pub use memory::GuestMemory;
pub use run::{install_kick_handler, ImmediateExit, VcpuExit, KICK_SIGNAL};

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use dirtyvm_sys as sys;
use memmap2::{MmapOptions, MmapRaw};

use crate::sync::lock;
use crate::units::PAGE_SIZE;

/// `ioctl` with no argument or an integer argument passed by value.
///
/// # Safety
/// `request` must be a request that takes no argument or an integer by value.
unsafe fn ioctl_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the caller guarantees the request takes its argument by value; no memory is
    // shared with the kernel.
    let ret = unsafe { libc::ioctl(fd, request as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl` with a pointer to `T`, which the kernel may read and (for `_IOR`/`_IOWR`) write.
///
/// # Safety
/// `request` must take a pointer to a `T` of exactly this layout.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<i32> {
    // SAFETY: the caller guarantees the request's argument is a `T`; `arg` is valid for reads
    // and writes of a `T` for the duration of the call.
    let ret = unsafe { libc::ioctl(fd, request as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The KVM subsystem: an open `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    fd: OwnedFd,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version is the stable 12.
    pub fn open() -> io::Result<Kvm> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")?;
        let kvm = Kvm { fd: file.into() };
        // SAFETY: KVM_GET_API_VERSION takes no argument.
        let version = unsafe { ioctl_val(kvm.fd.as_raw_fd(), sys::KVM_GET_API_VERSION, 0)? };
        if version != sys::KVM_API_VERSION {
            return Err(io::Error::other(format!(
                "/dev/kvm reports API version {version}, expected {}",
                sys::KVM_API_VERSION
            )));
        }
        Ok(kvm)
    }

    /// `KVM_CHECK_EXTENSION` on the system fd: 0 when the capability is absent, otherwise a
    /// capability-specific value.
    pub fn check_extension(&self, cap: u32) -> i32 {
        // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value.
        unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_CHECK_EXTENSION, cap.into()) }.unwrap_or(0)
    }

    /// Size of the per-vCPU `kvm_run` mapping.
    pub fn vcpu_mmap_size(&self) -> io::Result<usize> {
        // SAFETY: KVM_GET_VCPU_MMAP_SIZE takes no argument.
        let size = unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_GET_VCPU_MMAP_SIZE, 0)? };
        Ok(size as usize)
    }

    /// The CPUID entries KVM can virtualize on this host.
    pub fn supported_cpuid(&self) -> io::Result<Box<sys::CpuidBuf<CPUID_ENTRIES>>> {
        let mut buf = Box::new(sys::CpuidBuf::<CPUID_ENTRIES>::default());
        buf.header.nent = CPUID_ENTRIES as u32;
        // SAFETY: the request takes a kvm_cpuid2 header followed by `nent` entries, which
        // `CpuidBuf` lays out contiguously; the kernel writes at most `nent` entries.
        unsafe {
            ioctl_ptr(
                self.fd.as_raw_fd(),
                sys::KVM_GET_SUPPORTED_CPUID,
                &mut *buf as *mut sys::CpuidBuf<CPUID_ENTRIES>,
            )?
        };
        Ok(buf)
    }

    /// Creates a VM (`KVM_CREATE_VM`, machine type 0).
    pub fn create_vm(&self) -> io::Result<Vm> {
        let vcpu_mmap_size = self.vcpu_mmap_size()?;
        // SAFETY: KVM_CREATE_VM takes the machine type by value.
        let fd = unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_CREATE_VM, 0)? };
        Ok(Vm {
            // SAFETY: KVM_CREATE_VM returned a new fd that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            vcpu_mmap_size,
            slots: Vec::new(),
            keepalive: Default::default(),
            manual_protect: false,
        })
    }
}

/// How many CPUID entries to ask the kernel for; ample for any x86 host today.
pub const CPUID_ENTRIES: usize = 256;

/// A guest memory slot: a host mapping registered with KVM at a guest-physical address.
#[derive(Debug)]
pub struct MemorySlot {
    /// Slot id in address space 0.
    pub id: u16,
    /// Guest-physical address of the first byte.
    pub guest_phys_addr: u64,
    /// The host memory backing the slot.
    pub memory: GuestMemory,
    flags: sys::MemoryRegionFlags,
}

impl MemorySlot {
    /// Number of 4 KiB pages in the slot.
    pub fn pages(&self) -> u64 {
        self.memory.len() as u64 / PAGE_SIZE
    }

    /// Whether the kernel logs writes to this slot.
    pub fn logs_dirty_pages(&self) -> bool {
        self.flags.contains(sys::MemoryRegionFlags::LOG_DIRTY_PAGES)
    }
}

/// A virtual machine. Owns its memory slots, which outlive the VM fd.
#[derive(Debug)]
pub struct Vm {
    // Declared first so it drops (and the kernel lets go of guest memory) before `slots`.
    fd: OwnedFd,
    vcpu_mmap_size: usize,
    slots: Vec<MemorySlot>,
    /// Every guest memory mapping ever registered, shared with each vCPU: the kernel VM lives
    /// as long as any vCPU fd, so the memory it writes must too.
    keepalive: Arc<Mutex<Vec<GuestMemory>>>,
    /// Whether `KVM_CLEAR_DIRTY_LOG` re-arms logged pages (manual protect is enabled).
    manual_protect: bool,
}

impl Vm {
    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn check_extension(&self, cap: u32) -> i32 {
        // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value.
        unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_CHECK_EXTENSION, cap.into()) }.unwrap_or(0)
    }

    /// `KVM_ENABLE_CAP` on the VM fd.
    pub fn enable_cap(&self, cap: u32, args: [u64; 4]) -> io::Result<()> {
        let mut enable = sys::kvm_enable_cap {
            cap,
            args,
            ..Default::default()
        };
        // SAFETY: KVM_ENABLE_CAP takes a kvm_enable_cap, which `enable` is.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), sys::KVM_ENABLE_CAP, &mut enable)? };
        Ok(())
    }

    /// The dirty-ring capability this VM offers and its largest ring in entries:
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` when offered (it promises the acquire/release
    /// protocol dirtyvm follows anyway), else `KVM_CAP_DIRTY_LOG_RING`; `None` without either.
    pub fn dirty_ring_capability(&self) -> Option<(u32, u32)> {
        [
            sys::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            sys::KVM_CAP_DIRTY_LOG_RING,
        ]
        .into_iter()
        .map(|cap| (cap, self.check_extension(cap)))
        .find(|&(_, bytes)| bytes > 0)
        .map(|(cap, bytes)| {
            (
                cap,
                bytes as u32 / std::mem::size_of::<sys::kvm_dirty_gfn>() as u32,
            )
        })
    }

    /// Enables per-vCPU dirty rings of `entries` entries with `cap` (see
    /// [`Vm::dirty_ring_capability`]). Must precede every `KVM_CREATE_VCPU`.
    pub fn enable_dirty_ring(&self, cap: u32, entries: u32) -> io::Result<()> {
        let bytes = u64::from(entries) * std::mem::size_of::<sys::kvm_dirty_gfn>() as u64;
        self.enable_cap(cap, [bytes, 0, 0, 0])
    }

    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (without `INITIALLY_SET`): from now on
    /// `KVM_GET_DIRTY_LOG` only copies and `KVM_CLEAR_DIRTY_LOG` re-arms. Never with rings.
    pub fn enable_manual_dirty_log_protect(&mut self) -> io::Result<()> {
        let flags = sys::ManualDirtyLogProtect::MANUAL_PROTECT_ENABLE.bits();
        self.enable_cap(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [flags, 0, 0, 0])?;
        self.manual_protect = true;
        Ok(())
    }

    /// Whether manual dirty-log protect is enabled.
    pub fn manual_dirty_log_protect(&self) -> bool {
        self.manual_protect
    }

    /// `KVM_SET_TSS_ADDR`: three pages below 4 GiB the guest never uses (Intel needs it).
    pub fn set_tss_addr(&self, gpa: u64) -> io::Result<()> {
        // SAFETY: KVM_SET_TSS_ADDR takes the address by value.
        unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_SET_TSS_ADDR, gpa as _)? };
        Ok(())
    }

    /// `KVM_SET_IDENTITY_MAP_ADDR`: one page below 4 GiB for the EPT identity map.
    pub fn set_identity_map_addr(&self, gpa: u64) -> io::Result<()> {
        let mut addr = gpa;
        // SAFETY: KVM_SET_IDENTITY_MAP_ADDR takes a pointer to a u64.
        unsafe {
            ioctl_ptr(
                self.fd.as_raw_fd(),
                sys::KVM_SET_IDENTITY_MAP_ADDR,
                &mut addr,
            )?
        };
        Ok(())
    }

    /// Maps `size` bytes of fresh anonymous memory (reserved lazily: only touched pages cost
    /// host memory) and registers it as slot `id` at `guest_phys_addr`.
    pub fn add_memory_slot(
        &mut self,
        id: u16,
        guest_phys_addr: u64,
        size: usize,
        flags: sys::MemoryRegionFlags,
    ) -> io::Result<&MemorySlot> {
        self.add_memory_slot_backed_by(id, guest_phys_addr, GuestMemory::new(size)?, flags)
    }

    /// Registers `memory` (filled already, e.g. by an incoming migration) as slot `id` at
    /// `guest_phys_addr`.
    pub fn add_memory_slot_backed_by(
        &mut self,
        id: u16,
        guest_phys_addr: u64,
        memory: GuestMemory,
        flags: sys::MemoryRegionFlags,
    ) -> io::Result<&MemorySlot> {
        let slot = MemorySlot {
            id,
            guest_phys_addr,
            memory,
            flags,
        };
        self.set_user_memory_region(&slot)?;
        lock(&self.keepalive).push(slot.memory.clone());
        self.slots.push(slot);
        Ok(self.slots.last().expect("just pushed"))
    }

    /// Turns dirty logging of slot `id` on or off (same slot, same size, new flags).
    pub fn set_dirty_logging(&mut self, id: u16, on: bool) -> io::Result<()> {
        let index = self.slot_index(id)?;
        let mut flags = self.slots[index].flags;
        flags.set(sys::MemoryRegionFlags::LOG_DIRTY_PAGES, on);
        let previous = std::mem::replace(&mut self.slots[index].flags, flags);
        if let Err(e) = self.set_user_memory_region(&self.slots[index]) {
            self.slots[index].flags = previous;
            return Err(e);
        }
        Ok(())
    }

    fn set_user_memory_region(&self, slot: &MemorySlot) -> io::Result<()> {
        let mut region = sys::kvm_userspace_memory_region {
            slot: slot.id.into(),
            flags: slot.flags.bits(),
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.memory.len() as u64,
            userspace_addr: slot.memory.host_addr() as u64,
        };
        // SAFETY: the request takes a kvm_userspace_memory_region. The memory it names is
        // owned by `self.slots` (or is about to be), which outlives the VM fd.
        unsafe {
            ioctl_ptr(
                self.fd.as_raw_fd(),
                sys::KVM_SET_USER_MEMORY_REGION,
                &mut region,
            )?
        };
        Ok(())
    }

    fn slot_index(&self, id: u16) -> io::Result<usize> {
        self.slots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no memory slot {id}")))
    }

    /// The memory slots, in the order they were added.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Slot `id`, if it exists.
    pub fn slot(&self, id: u16) -> Option<&MemorySlot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// Creates vCPU `id` (also its APIC id) and maps its `kvm_run` area.
    pub fn create_vcpu(&self, id: u32) -> io::Result<Vcpu> {
        // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value.
        let fd = unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_CREATE_VCPU, id.into())? };
        // SAFETY: KVM_CREATE_VCPU returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let run = MmapOptions::new()
            .len(self.vcpu_mmap_size)
            .map_raw(fd.as_raw_fd())?;
        if run.len() < std::mem::size_of::<sys::kvm_run>() {
            return Err(io::Error::other(
                "kvm_run mapping is smaller than struct kvm_run",
            ));
        }
        Ok(Vcpu {
            registers: VcpuRegisters {
                fd: Arc::new(fd),
                _guest_memory: self.keepalive.clone(),
            },
            id,
            run: Arc::new(run),
        })
    }

    /// `KVM_GET_DIRTY_LOG` for slot `id` into `bitmap` (one bit per page, whole u64 words).
    pub fn get_dirty_log(&self, id: u16, bitmap: &mut [u64]) -> io::Result<()> {
        let pages = self.slots[self.slot_index(id)?].pages();
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dirty bitmap shorter than the slot",
            ));
        }
        let mut log = sys::kvm_dirty_log {
            slot: id.into(),
            padding1: 0,
            dirty_bitmap: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: the request takes a kvm_dirty_log whose pointer must be valid for
        // ALIGN(pages, 64) / 8 bytes of writes: `bitmap` has at least that many words.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), sys::KVM_GET_DIRTY_LOG, &mut log)? };
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: re-arms tracking of the pages set in `bitmap`, which covers
    /// `num_pages` pages from `first_page` (64-aligned, docs/kernel.md#dirty-bitmap).
    pub fn clear_dirty_log(
        &self,
        id: u16,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> io::Result<()> {
        if (bitmap.len() as u64) < u64::from(num_pages).div_ceil(64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "clear bitmap shorter than num_pages",
            ));
        }
        let mut clear = sys::kvm_clear_dirty_log {
            slot: id.into(),
            num_pages,
            first_page,
            dirty_bitmap: bitmap.as_ptr() as u64,
        };
        // SAFETY: the request takes a kvm_clear_dirty_log whose pointer must be valid for
        // reads of num_pages bits, rounded up to whole words: `bitmap` has that many.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), sys::KVM_CLEAR_DIRTY_LOG, &mut clear)? };
        Ok(())
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects every harvested entry of every vCPU ring and
    /// returns how many entries it reset.
    pub fn reset_dirty_rings(&self) -> io::Result<u32> {
        loop {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
            match unsafe { ioctl_val(self.fd.as_raw_fd(), sys::KVM_RESET_DIRTY_RINGS, 0) } {
                Ok(n) => return Ok(n as u32),
                // Since 2025 the walk stops on a pending signal; what it reset stays reset.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A vCPU: its fd and its `kvm_run` mapping. Run it from one thread; its registers are also
/// reachable through [`Vcpu::registers`] from other threads while it is outside `KVM_RUN`.
#[derive(Debug)]
pub struct Vcpu {
    registers: VcpuRegisters,
    id: u32,
    run: Arc<MmapRaw>,
}

/// A vCPU's state as a migration moves it: its general and special registers and the guest
/// TSC (the built-in guest's paced writers keep their pace against it).
#[derive(Debug, Clone, Copy)]
pub struct VcpuState {
    /// `KVM_GET_REGS`.
    pub regs: sys::kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: sys::kvm_sregs,
    /// `MSR_IA32_TSC`.
    pub tsc: u64,
}

/// The register side of a vCPU's fd, shared by the vCPU thread and whoever saves or restores
/// the vCPU's state while it is outside `KVM_RUN` (a register ioctl on a running vCPU waits
/// for `KVM_RUN` to return: the kernel takes the vCPU's lock for both). Holds the VM's guest
/// memory alive, as the fd does.
#[derive(Debug, Clone)]
pub struct VcpuRegisters {
    fd: Arc<OwnedFd>,
    _guest_memory: Arc<Mutex<Vec<GuestMemory>>>,
}

impl VcpuRegisters {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `KVM_GET_REGS`.
    pub fn regs(&self) -> io::Result<sys::kvm_regs> {
        let mut regs = sys::kvm_regs::default();
        // SAFETY: the request writes a kvm_regs.
        unsafe { ioctl_ptr(self.fd(), sys::KVM_GET_REGS, &mut regs)? };
        Ok(regs)
    }

    /// `KVM_SET_REGS`.
    pub fn set_regs(&self, regs: &sys::kvm_regs) -> io::Result<()> {
        let mut regs = *regs;
        // SAFETY: the request reads a kvm_regs.
        unsafe { ioctl_ptr(self.fd(), sys::KVM_SET_REGS, &mut regs)? };
        Ok(())
    }

    /// `KVM_GET_SREGS`.
    pub fn sregs(&self) -> io::Result<sys::kvm_sregs> {
        let mut sregs = sys::kvm_sregs::default();
        // SAFETY: the request writes a kvm_sregs.
        unsafe { ioctl_ptr(self.fd(), sys::KVM_GET_SREGS, &mut sregs)? };
        Ok(sregs)
    }

    /// `KVM_SET_SREGS`.
    pub fn set_sregs(&self, sregs: &sys::kvm_sregs) -> io::Result<()> {
        let mut sregs = *sregs;
        // SAFETY: the request reads a kvm_sregs.
        unsafe { ioctl_ptr(self.fd(), sys::KVM_SET_SREGS, &mut sregs)? };
        Ok(())
    }

    /// The guest TSC (`KVM_GET_MSRS` of `MSR_IA32_TSC`).
    pub fn tsc(&self) -> io::Result<u64> {
        let mut msrs = sys::MsrBuf::new([sys::MSR_IA32_TSC]);
        // SAFETY: the request takes a kvm_msrs header followed by `nmsrs` entries, which
        // MsrBuf lays out contiguously; the kernel writes at most `nmsrs` entries' data.
        let read = unsafe {
            ioctl_ptr(
                self.fd(),
                sys::KVM_GET_MSRS,
                &mut msrs as *mut sys::MsrBuf<1>,
            )?
        };
        if read != 1 {
            return Err(io::Error::other("KVM_GET_MSRS did not read MSR_IA32_TSC"));
        }
        Ok(msrs.entries[0].data)
    }

    /// Sets the guest TSC (`KVM_SET_MSRS` of `MSR_IA32_TSC`).
    pub fn set_tsc(&self, tsc: u64) -> io::Result<()> {
        let mut msrs = sys::MsrBuf::new([sys::MSR_IA32_TSC]);
        msrs.entries[0].data = tsc;
        // SAFETY: as in `tsc`; the kernel only reads the buffer.
        let written = unsafe {
            ioctl_ptr(
                self.fd(),
                sys::KVM_SET_MSRS,
                &mut msrs as *mut sys::MsrBuf<1>,
            )?
        };
        if written != 1 {
            return Err(io::Error::other("KVM_SET_MSRS did not set MSR_IA32_TSC"));
        }
        Ok(())
    }

    /// The state a migration moves.
    pub fn save(&self) -> io::Result<VcpuState> {
        Ok(VcpuState {
            regs: self.regs()?,
            sregs: self.sregs()?,
            tsc: self.tsc()?,
        })
    }

    /// Puts back a state saved by [`VcpuRegisters::save`].
    pub fn restore(&self, state: &VcpuState) -> io::Result<()> {
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        self.set_tsc(state.tsc)
    }

    /// `KVM_SET_CPUID2` with the first `nent` entries of `cpuid`.
    pub fn set_cpuid(&self, cpuid: &sys::CpuidBuf<CPUID_ENTRIES>) -> io::Result<()> {
        let mut cpuid = Box::new(*cpuid);
        cpuid.header.nent = cpuid.header.nent.min(CPUID_ENTRIES as u32);
        // SAFETY: the request reads a kvm_cpuid2 header followed by `nent` entries, and
        // `nent` is at most the number of entries in the buffer.
        unsafe {
            ioctl_ptr(
                self.fd(),
                sys::KVM_SET_CPUID2,
                &mut *cpuid as *mut sys::CpuidBuf<CPUID_ENTRIES>,
            )?
        };
        Ok(())
    }

    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> io::Result<u32> {
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the frequency.
        let khz = unsafe { ioctl_val(self.fd(), sys::KVM_GET_TSC_KHZ, 0)? };
        Ok(khz as u32)
    }

    /// Sets the guest's TSC frequency in kHz (`KVM_SET_TSC_KHZ`, `KVM_CAP_TSC_CONTROL`).
    pub fn set_tsc_khz(&self, khz: u32) -> io::Result<()> {
        // SAFETY: KVM_SET_TSC_KHZ takes the frequency by value.
        unsafe { ioctl_val(self.fd(), sys::KVM_SET_TSC_KHZ, khz.into())? };
        Ok(())
    }
}

impl Vcpu {
    /// The vCPU id (= APIC id).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its registers, shareable with other threads.
    pub fn registers(&self) -> &VcpuRegisters {
        &self.registers
    }

    /// Maps this vCPU's dirty ring of `entries` entries (the VM's ring size).
    #[cfg(not(loom))]
    pub fn map_dirty_ring(&self, entries: u32) -> io::Result<DirtyRingMap> {
        DirtyRingMap::map(&*self.registers.fd, entries)
    }

    /// A handle that makes this vCPU's next (or current, with a signal) `KVM_RUN` return.
    pub fn immediate_exit(&self) -> ImmediateExit {
        ImmediateExit::new(self.run.clone())
    }

    /// Enters the guest until the next exit. `KVM_RUN` interrupted by a signal or by
    /// `immediate_exit` is [`VcpuExit::Interrupted`], not an error.
    pub fn run(&mut self) -> io::Result<VcpuExit> {
        // SAFETY: KVM_RUN takes no argument; the kernel writes the exit into the kvm_run
        // mapping this Vcpu owns.
        match unsafe { ioctl_val(self.registers.fd(), sys::KVM_RUN, 0) } {
            Ok(_) => Ok(run::decode_exit(&self.run)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(VcpuExit::Interrupted),
            Err(e) => Err(e),
        }
    }
}

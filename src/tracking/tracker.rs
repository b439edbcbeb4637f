//! Dirty tracking for one VM: per-vCPU dirty rings or the dirty bitmap, harvested into
//! per-vCPU counters and the guest RAM's [`DirtyPageSet`].
//!
//! Every harvest-and-reset (and every bitmap get-and-clear) runs under one lock, so the
//! count `KVM_RESET_DIRTY_RINGS` returns can be checked against what was harvested, and
//! pages are published to the dirty-page set only after the reset re-protected them
//! (docs/kernel.md#reset-before-reading-page-contents).
//!
//! # Overflowed rings
//!
//! A kernel whose ring-full exit comes late (docs/host.md#late-ring-full-exits-overflows-and-wedged-rings) pushes past a full ring and
//! overwrites entries: pages are lost, and the ring can wedge (every `KVM_RUN` exits
//! ring-full, the reset returns 0). Two signs give an overflow away: the first is checked on
//! every harvest; the second on every harvest that hands pages or counts to a consumer and
//! on every harvest of a ring whose vCPU took a ring-full exit (an overflow comes with one)
//! until a scan finds the ring clean:
//!
//! - a harvest that collects a whole lap of the ring: the ring reached its hard limit,
//!   which a well-behaved kernel never lets happen (reserved entries absorb late pushes);
//! - a *gap*: the harvest stopped at an entry that is not dirty, yet a later entry is. The
//!   kernel publishes entries in order, so the entries in the gap were pushed and then lost.
//!
//! On either, the dirty-page set is marked incomplete (its next take is every page), the
//! overflow is counted (`ring_overflows` in the report) and reported on stderr, and the ring
//! is recovered: the lost entries in the gap are marked harvested so the kernel's reset walk
//! can pass them, and harvesting goes on behind them. A ring-full exit that still yields
//! nothing (no gap to close) is recovered by marking lost the entries the kernel must have
//! pushed (it exits only above its soft limit); if the reset still returns 0 the ring cannot
//! be recovered and the vCPU stops with an error naming it.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dirtyvm_sys as sys;

use super::dirty_set::{DirtyPageSet, DirtyPages};
use super::estimate::{RateEstimate, RateEstimator};
use crate::ring::{self, Harvester, SlotBounds, SlotStore};
use crate::sync::lock;
use crate::vm::guest;
use crate::vm::kvm::{DirtyRingMap, Vm};
use crate::vm::vcpu::RingFullHandler;

/// The dirty tracking mechanism of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirtyLog {
    /// No tracking.
    None,
    /// Per-vCPU dirty rings.
    Ring,
    /// The per-slot dirty bitmap.
    Bitmap,
}

impl DirtyLog {
    /// The name the CLI and the report use.
    pub fn name(self) -> &'static str {
        match self {
            DirtyLog::None => "none",
            DirtyLog::Ring => "ring",
            DirtyLog::Bitmap => "bitmap",
        }
    }
}

/// Entries the kernel keeps back from the soft limit at most: 64 reserved plus a 512-entry
/// PML buffer on Intel. A vCPU exits ring-full only with at least `entries - this` used.
const MAX_RESERVED_ENTRIES: u32 = sys::KVM_DIRTY_RING_RSVD_ENTRIES + 512;

/// Smallest ring every x86 host accepts (Intel with PML reserves 576 entries, and the
/// ring must be a power of two larger than that).
pub const MIN_RING_ENTRIES: u32 = 1024;

/// Consecutive ring-full exits of one vCPU that harvest nothing before the ring counts as
/// wedged. One can be benign: the reaper may have reaped between the exit and the handler.
const EMPTY_RING_FULL_LIMIT: u32 = 3;

/// Per-vCPU tracking counters, readable without the tracker lock.
#[derive(Debug, Default)]
pub struct VcpuDirtyStats {
    /// Entries harvested from this vCPU's ring that named a tracked page.
    pub harvested: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits.
    pub ring_full_exits: AtomicU64,
    /// Entries dropped because they named no tracked page.
    pub bad_entries: AtomicU64,
    /// Entries found lost in an overflowed ring.
    pub lost_entries: AtomicU64,
    /// Overflows detected on this vCPU's ring.
    pub overflows: AtomicU64,
}

/// A reading of [`VcpuDirtyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuDirtyCounts {
    /// Entries harvested from this vCPU's ring that named a tracked page.
    pub harvested: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits.
    pub ring_full_exits: u64,
    /// Entries dropped because they named no tracked page.
    pub bad_entries: u64,
    /// Entries found lost in an overflowed ring.
    pub lost_entries: u64,
    /// Overflows detected on this vCPU's ring.
    pub overflows: u64,
}

impl VcpuDirtyCounts {
    /// Ring entries this vCPU's kernel pushed that were harvested or found lost, whoever
    /// harvested them: what its dirtying filled its ring with.
    pub fn entries_produced(&self) -> u64 {
        self.harvested + self.bad_entries + self.lost_entries
    }
}

impl VcpuDirtyStats {
    /// The counters now. Each is exact; taken while rings are harvested, they may be a few
    /// entries apart.
    pub fn snapshot(&self) -> VcpuDirtyCounts {
        // Relaxed: counters, no data published with them.
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VcpuDirtyCounts {
            harvested: load(&self.harvested),
            ring_full_exits: load(&self.ring_full_exits),
            bad_entries: load(&self.bad_entries),
            lost_entries: load(&self.lost_entries),
            overflows: load(&self.overflows),
        }
    }
}

/// Whether a reap scans every ring for a gap of lost entries, which takes a look at each
/// entry of each ring, and whether before or after the harvest that marks the reap's moment:
/// a window opens after its scan and closes before it, so that however long the scans of
/// many rings take, they fall outside the window.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Only suspect rings (see the module docs).
    No,
    /// Every ring, then a quick harvest of all.
    BeforeHarvest,
    /// A quick harvest of all, then every ring.
    AfterHarvest,
}

/// A ring that overflowed and could not be brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WedgedRing {
    /// The vCPU whose ring is wedged.
    pub vcpu: u32,
}

impl fmt::Display for WedgedRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vCPU {}'s dirty ring is wedged (ring-full exits harvest nothing and \
             KVM_RESET_DIRTY_RINGS resets nothing) and could not be recovered; the kernel \
             overflowed it. Use larger rings (--ring-entries) or a faster reaper",
            self.vcpu
        )
    }
}

impl std::error::Error for WedgedRing {}

struct RingState {
    map: DirtyRingMap,
    harvester: Harvester,
    /// Ring-full exits in a row that harvested nothing.
    empty_ring_full: u32,
    /// The vCPU took a ring-full exit since the last clean gap scan, so its ring may have
    /// overflowed: every harvest scans it for a gap until one finds none.
    suspect: bool,
}

/// Distinct pages dirtied since a measurement window opened: one set per vCPU (rings) or one
/// for the VM (bitmap), each with its count. Lives under the tracker lock, like every harvest.
/// The sets are sparse, so a window costs what is dirtied in it, not vCPUs × RAM.
struct Window {
    sets: Vec<SparsePages>,
    /// When the reap that opened it ended.
    opened: Instant,
}

impl Window {
    fn new(sets: usize) -> Window {
        Window {
            sets: (0..sets).map(|_| SparsePages::default()).collect(),
            opened: Instant::now(),
        }
    }

    fn mark(&mut self, set: usize, page: u64) {
        self.sets[set].mark(page);
    }

    fn mark_bitmap(&mut self, bitmap: &[u64]) {
        for (word, &bits) in bitmap.iter().enumerate() {
            if bits != 0 {
                self.sets[0].mark_word(word as u64, bits);
            }
        }
    }

    fn distinct(&self) -> Vec<u64> {
        self.sets.iter().map(|s| s.distinct).collect()
    }
}

/// Words of one chunk of a [`SparsePages`]: 512 words, 32768 pages, 128 MiB of RAM.
const CHUNK_WORDS: usize = 512;

/// A set of page numbers in chunks of bitmap allocated as pages are added, sorted by chunk
/// index: a vCPU that dirties nothing costs nothing, a writer over 256 MiB costs 8 KiB.
#[derive(Default)]
struct SparsePages {
    chunks: Vec<(u64, Box<[u64; CHUNK_WORDS]>)>,
    /// The chunk the last page went to: writers move through memory in runs.
    last: usize,
    distinct: u64,
}

impl SparsePages {
    fn mark(&mut self, page: u64) {
        self.mark_word(page / 64, 1 << (page % 64));
    }

    /// Adds the pages set in `bits`, bitmap word `word` (pages `64 × word` on).
    fn mark_word(&mut self, word: u64, bits: u64) {
        let chunk = word / CHUNK_WORDS as u64;
        if self
            .chunks
            .get(self.last)
            .is_none_or(|(index, _)| *index != chunk)
        {
            self.last = match self
                .chunks
                .binary_search_by_key(&chunk, |(index, _)| *index)
            {
                Ok(found) => found,
                Err(at) => {
                    self.chunks.insert(at, (chunk, Box::new([0; CHUNK_WORDS])));
                    at
                }
            };
        }
        let slot = &mut self.chunks[self.last].1[word as usize % CHUNK_WORDS];
        self.distinct += u64::from((bits & !*slot).count_ones());
        *slot |= bits;
    }
}

struct State {
    rings: Vec<RingState>,
    bounds: SlotBounds,
    window: Option<Window>,
    /// Pages harvested in this pass, published after the reset.
    harvested: Vec<u64>,
    /// Bitmap mode: the slot bitmap from `KVM_GET_DIRTY_LOG`.
    bitmap: Vec<u64>,
}

/// The VM's dirty tracking.
pub struct Tracker {
    vm: Arc<Vm>,
    log: DirtyLog,
    /// Entries per ring, in ring mode.
    ring_entries: Option<u32>,
    /// Whether `KVM_CLEAR_DIRTY_LOG` is in use (bitmap mode with manual protect).
    manual_protect: bool,
    state: Mutex<State>,
    ram: DirtyPageSet,
    vcpus: Box<[VcpuDirtyStats]>,
    /// Pages harvested by bitmap syncs (no per-vCPU split).
    bitmap_harvested: AtomicU64,
    /// Resets whose count differed from what was harvested.
    reset_mismatches: AtomicU64,
    /// Ring overflows detected, all vCPUs (each recovered, or counted in `wedged_rings`).
    ring_overflows: AtomicU64,
    /// Rings that overflowed and could not be recovered (their vCPU stopped).
    wedged_rings: AtomicU64,
    /// Per-vCPU rates from the harvested counts, updated on every reap.
    estimator: Mutex<RateEstimator>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Tracking for `vm` with `log`; `rings` holds each vCPU's mapped ring in ring mode.
    pub fn new(vm: Arc<Vm>, log: DirtyLog, rings: Vec<DirtyRingMap>, vcpus: usize) -> Tracker {
        let ram_pages = vm.slot(guest::RAM_SLOT).map_or(0, |s| s.pages());
        let bounds = SlotBounds::new(
            vm.slots()
                .iter()
                .filter(|s| s.logs_dirty_pages())
                .map(|s| (s.id, s.pages())),
        );
        let manual_protect = vm.manual_dirty_log_protect();
        Tracker {
            vm,
            log,
            ring_entries: rings.first().map(SlotStore::entries),
            manual_protect,
            state: Mutex::new(State {
                rings: rings
                    .into_iter()
                    .map(|map| RingState {
                        map,
                        harvester: Harvester::new(),
                        empty_ring_full: 0,
                        suspect: false,
                    })
                    .collect(),
                bounds,
                window: None,
                harvested: Vec::new(),
                bitmap: vec![0; ram_pages.div_ceil(64) as usize],
            }),
            ram: DirtyPageSet::new(ram_pages),
            vcpus: (0..vcpus).map(|_| VcpuDirtyStats::default()).collect(),
            bitmap_harvested: AtomicU64::new(0),
            reset_mismatches: AtomicU64::new(0),
            ring_overflows: AtomicU64::new(0),
            wedged_rings: AtomicU64::new(0),
            estimator: Mutex::new(RateEstimator::new(vcpus)),
        }
    }

    /// The tracking mechanism.
    pub fn log(&self) -> DirtyLog {
        self.log
    }

    /// Entries per vCPU ring, in ring mode.
    pub fn ring_entries(&self) -> Option<u32> {
        self.ring_entries
    }

    /// Whether bitmap mode re-arms pages with `KVM_CLEAR_DIRTY_LOG`.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// vCPU `id`'s counters.
    pub fn vcpu(&self, id: u32) -> &VcpuDirtyStats {
        &self.vcpus[id as usize]
    }

    /// Pages harvested in all: ring entries of every vCPU, or bitmap pages.
    pub fn harvested(&self) -> u64 {
        self.bitmap_harvested.load(Ordering::Relaxed)
            + self
                .vcpus
                .iter()
                .map(|v| v.harvested.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Overflowed rings detected so far.
    pub fn ring_overflows(&self) -> u64 {
        self.ring_overflows.load(Ordering::Relaxed)
    }

    /// Rings that overflowed and could not be recovered: their vCPU stopped with an error.
    pub fn wedged_rings(&self) -> u64 {
        self.wedged_rings.load(Ordering::Relaxed)
    }

    /// The continuous per-vCPU rate estimates (ring mode; zero otherwise).
    pub fn rate_estimates(&self) -> Vec<RateEstimate> {
        lock(&self.estimator).estimates().to_vec()
    }

    /// Resets whose count differed from what had been harvested.
    pub fn reset_mismatches(&self) -> u64 {
        self.reset_mismatches.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Harvests every ring (or syncs the bitmap) and resets, publishing the dirtied pages.
    pub fn reap(&self) -> io::Result<()> {
        self.reap_locked(&mut self.lock(), Scan::No)
    }

    /// Reaps, scanning every ring for a gap of lost entries as `scan` says (otherwise only
    /// rings whose vCPU took a ring-full exit, which an overflow comes with). Whatever hands
    /// pages or counts to a consumer scans, so a loss is always known before it is handed out.
    fn reap_locked(&self, state: &mut State, scan: Scan) -> io::Result<()> {
        match self.log {
            DirtyLog::None => Ok(()),
            DirtyLog::Bitmap => self.sync_bitmap(state),
            DirtyLog::Ring => {
                let passes: &[bool] = match scan {
                    Scan::No => &[false],
                    Scan::BeforeHarvest => &[true, false],
                    Scan::AfterHarvest => &[false, true],
                };
                let mut collected = 0u32;
                for &scan_gaps in passes {
                    for id in 0..state.rings.len() {
                        collected += self.harvest_ring(state, id, scan_gaps);
                    }
                }
                self.reset_and_publish(state, collected)?;
                lock(&self.estimator).update(
                    Instant::now(),
                    self.vcpus
                        .iter()
                        .map(|v| v.harvested.load(Ordering::Relaxed)),
                );
                Ok(())
            }
        }
    }

    /// Handles vCPU `id`'s `KVM_EXIT_DIRTY_RING_FULL`: reaps every ring (so that no vCPU
    /// is left to fill up), then makes sure this one has room before the vCPU re-enters.
    pub fn ring_full(&self, id: u32) -> Result<(), RingFullError> {
        self.vcpus[id as usize]
            .ring_full_exits
            .fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.rings[id as usize].suspect = true;
        let own_before = state.rings[id as usize].harvester.cursor();
        let mut collected = 0;
        for ring in 0..state.rings.len() {
            collected += self.harvest_ring(&mut state, ring, false);
        }
        self.reset_and_publish(&mut state, collected)?;
        let own = &mut state.rings[id as usize];
        if own.harvester.cursor() != own_before {
            own.empty_ring_full = 0;
            return Ok(());
        }
        own.empty_ring_full += 1;
        if own.empty_ring_full < EMPTY_RING_FULL_LIMIT {
            return Ok(());
        }
        // The vCPU is outside KVM_RUN and its ring is over the soft limit, yet nothing is
        // dirty at the cursor and there is no gap: the entries the kernel counts were lost.
        // They are at least `entries - MAX_RESERVED_ENTRIES` from the cursor on.
        let entries = own.map.entries();
        let lost = own
            .harvester
            .skip_lost(&own.map, entries.saturating_sub(MAX_RESERVED_ENTRIES));
        self.overflowed(id, lost, "ring-full exits harvested nothing");
        let reset = self.reset_and_publish(&mut state, lost)?;
        if reset == 0 {
            self.wedged_rings.fetch_add(1, Ordering::Relaxed);
            return Err(RingFullError::Wedged(WedgedRing { vcpu: id }));
        }
        state.rings[id as usize].empty_ring_full = 0;
        Ok(())
    }

    /// Opens a measurement window: reaps (what was dirtied before is not counted), then
    /// counts distinct pages dirtied from now on, per vCPU with rings, for the VM with the
    /// bitmap. Kick the vCPUs first on hosts with hardware dirty buffers (PML). Returns when
    /// the window opened.
    pub fn open_window(&self) -> io::Result<Instant> {
        let mut state = self.lock();
        self.reap_locked(&mut state, Scan::BeforeHarvest)?;
        let sets = match self.log {
            DirtyLog::Ring => self.vcpus.len(),
            DirtyLog::Bitmap | DirtyLog::None => 1,
        };
        let window = Window::new(sets);
        let opened = window.opened;
        state.window = Some(window);
        Ok(opened)
    }

    /// Closes the window opened by [`Tracker::open_window`] after a last reap; returns the
    /// distinct pages dirtied in it, per vCPU with rings (one count with the bitmap), and
    /// how long it was open (from the end of the opening reap to the start of the closing
    /// one), or `None` if no window was open.
    pub fn close_window(&self) -> io::Result<Option<(Vec<u64>, Duration)>> {
        let mut state = self.lock();
        let closed = Instant::now();
        let reaped = self.reap_locked(&mut state, Scan::AfterHarvest);
        let window = state.window.take();
        reaped?;
        Ok(window.map(|w| (w.distinct(), closed - w.opened)))
    }

    /// Reaps, then takes the pages dirtied since the last take.
    pub fn take_dirty(&self) -> io::Result<DirtyPages> {
        let mut state = self.lock();
        self.reap_locked(&mut state, Scan::AfterHarvest)?;
        Ok(self.ram.take())
    }

    /// Harvests ring `id` into `state.harvested`, scanning for a gap when asked or when the
    /// ring is suspect; returns how many entries it marked harvested (what the next reset
    /// should count for this ring).
    fn harvest_ring(&self, state: &mut State, id: usize, scan_gaps: bool) -> u32 {
        let State {
            rings,
            bounds,
            harvested,
            window,
            ..
        } = state;
        let ring = &mut rings[id];
        let entries = ring.map.entries();
        let mut marked = 0;
        let mut valid = 0u64;
        loop {
            let h = ring.harvester.harvest(&ring.map, bounds, |_, page| {
                harvested.push(page);
                // Counting only: a window never reads page contents, so it need not
                // wait for the reset like the dirty-page set does.
                if let Some(window) = window.as_mut() {
                    window.mark(id, page);
                }
            });
            marked += h.collected;
            valid += u64::from(h.collected - h.bad_entries);
            let stats = &self.vcpus[id];
            stats
                .bad_entries
                .fetch_add(h.bad_entries.into(), Ordering::Relaxed);
            if h.collected == entries {
                ring.suspect = true;
                self.overflowed(id as u32, 0, "a whole lap of the ring was dirty");
            }
            if !(scan_gaps || ring.suspect) {
                break;
            }
            // A gap: lost entries at the cursor with dirty ones behind them.
            match ring::first_dirty_after(&ring.map, ring.harvester.cursor()) {
                Some(distance) if distance > 0 => {
                    let lost = ring.harvester.skip_lost(&ring.map, distance);
                    marked += lost;
                    self.overflowed(id as u32, lost, "entries were lost before dirty ones");
                }
                Some(_) => break,
                None => {
                    ring.suspect = false;
                    break;
                }
            }
        }
        self.vcpus[id].harvested.fetch_add(valid, Ordering::Relaxed);
        marked
    }

    fn overflowed(&self, vcpu: u32, lost: u32, sign: &str) {
        let stats = &self.vcpus[vcpu as usize];
        stats.lost_entries.fetch_add(lost.into(), Ordering::Relaxed);
        self.ring_overflows.fetch_add(1, Ordering::Relaxed);
        self.ram.mark_incomplete();
        // The first overflow of each ring is worth a line; the rest are counted (report).
        if stats.overflows.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "vCPU {vcpu}'s dirty ring overflowed ({sign}; {lost} entries \
                 lost): treating all of guest memory as dirty and recovering the ring; later \
                 overflows are counted in the report (ring_overflows). Larger rings \
                 (--ring-entries) or a faster reaper avoid this"
            );
        }
    }

    /// `KVM_RESET_DIRTY_RINGS`, the count check, then publishing what was harvested.
    fn reset_and_publish(&self, state: &mut State, collected: u32) -> io::Result<u32> {
        let reset = if collected > 0 {
            self.vm.reset_dirty_rings()?
        } else {
            0
        };
        if reset != collected {
            self.reset_mismatches.fetch_add(1, Ordering::Relaxed);
        }
        for page in state.harvested.drain(..) {
            self.ram.mark(page);
        }
        Ok(reset)
    }

    fn sync_bitmap(&self, state: &mut State) -> io::Result<()> {
        let pages = self.ram.pages();
        self.vm.get_dirty_log(guest::RAM_SLOT, &mut state.bitmap)?;
        if self.manual_protect {
            // Re-arm exactly the pages this GET reported, in chunks the kernel accepts
            // (64-page aligned; whole slot here), before publishing them.
            if state.bitmap.iter().any(|&w| w != 0) {
                self.vm
                    .clear_dirty_log(guest::RAM_SLOT, 0, pages as u32, &state.bitmap)?;
            }
        }
        let dirty: u64 = state.bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        self.bitmap_harvested.fetch_add(dirty, Ordering::Relaxed);
        self.ram.mark_bitmap(&state.bitmap);
        if let Some(window) = state.window.as_mut() {
            window.mark_bitmap(&state.bitmap);
        }
        Ok(())
    }
}

impl RingFullHandler for Tracker {
    fn ring_full(&self, id: u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(Tracker::ring_full(self, id)?)
    }
}

/// Why a ring-full exit could not be handled.
#[derive(Debug)]
pub enum RingFullError {
    /// `KVM_RESET_DIRTY_RINGS` failed.
    Reset(io::Error),
    /// The ring is wedged for good.
    Wedged(WedgedRing),
}

impl From<io::Error> for RingFullError {
    fn from(e: io::Error) -> RingFullError {
        RingFullError::Reset(e)
    }
}

impl fmt::Display for RingFullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingFullError::Reset(e) => write!(f, "KVM_RESET_DIRTY_RINGS failed: {e}"),
            RingFullError::Wedged(w) => w.fmt(f),
        }
    }
}

impl std::error::Error for RingFullError {}

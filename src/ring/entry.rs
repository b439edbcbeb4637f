//! Decoding ring entries and checking them against the VM's memory slots.

use std::fmt;

/// A ring entry's payload as the kernel wrote it, not yet checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirtyEntry {
    /// Raw `slot` field: `(as_id << 16) | slot_id`.
    pub slot: u32,
    /// Page index inside the memory slot.
    pub offset: u64,
}

impl DirtyEntry {
    /// The address space id (`slot >> 16`); 0 on x86 outside SMM.
    pub const fn as_id(self) -> u16 {
        (self.slot >> 16) as u16
    }

    /// The memory slot id within its address space (`slot & 0xffff`).
    pub const fn slot_id(self) -> u16 {
        (self.slot & 0xffff) as u16
    }
}

/// Why a ring entry was dropped instead of recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEntry {
    /// The entry names an address space other than 0 (only SMM uses 1, and
    /// this VMM logs none).
    WrongAddressSpace {
        /// The entry's address space id.
        as_id: u16,
    },
    /// No memory slot with this id is being tracked: deleted, never created,
    /// or garbage.
    UnknownSlot {
        /// The entry's slot id.
        slot_id: u16,
    },
    /// The page index is past the end of the slot (a resized slot, or garbage).
    OffsetOutOfRange {
        /// The entry's slot id.
        slot_id: u16,
        /// The entry's page index.
        offset: u64,
        /// The number of pages in the slot.
        pages: u64,
    },
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BadEntry::WrongAddressSpace { as_id } => write!(
                f,
                "dirty ring entry names address space {as_id}, only address space 0 is tracked"
            ),
            BadEntry::UnknownSlot { slot_id } => write!(
                f,
                "dirty ring entry names memory slot {slot_id}, which is not a tracked slot"
            ),
            BadEntry::OffsetOutOfRange {
                slot_id,
                offset,
                pages,
            } => write!(
                f,
                "dirty ring entry names page {offset} of memory slot {slot_id}, \
                 which has only {pages} pages"
            ),
        }
    }
}

impl std::error::Error for BadEntry {}

/// The memory slots of address space 0 that ring entries may name, with their
/// sizes in pages: the check that keeps kernel-written values from indexing
/// anything unchecked.
///
/// Rebuild it whenever the VM's memory slots change; entries harvested after a
/// slot was deleted or shrunk are then dropped as bad.
#[derive(Debug, Clone, Default)]
pub struct SlotBounds {
    /// Pages per slot, indexed by slot id; 0 means "no such slot" (KVM deletes
    /// a slot whose size is set to 0, so a real slot is never empty).
    pages: Box<[u64]>,
}

impl SlotBounds {
    /// Bounds for the given `(slot_id, pages)` memory slots of address space 0.
    /// A slot with 0 pages counts as absent; a repeated slot id takes the last
    /// size given, as re-setting a KVM memory region does.
    pub fn new(slots: impl IntoIterator<Item = (u16, u64)>) -> Self {
        let mut pages = Vec::new();
        for (slot_id, size) in slots {
            let i = usize::from(slot_id);
            if pages.len() <= i {
                pages.resize(i + 1, 0);
            }
            pages[i] = size;
        }
        Self {
            pages: pages.into_boxed_slice(),
        }
    }

    /// The number of pages of slot `slot_id`, if it is tracked.
    pub fn pages(&self, slot_id: u16) -> Option<u64> {
        match self.pages.get(usize::from(slot_id)) {
            Some(&0) | None => None,
            Some(&pages) => Some(pages),
        }
    }

    /// Checks a harvested entry: `Ok((slot_id, page))` when it names a page
    /// inside a tracked slot of address space 0.
    #[inline]
    pub fn check(&self, entry: DirtyEntry) -> Result<(u16, u64), BadEntry> {
        let pages = self.pages_of(entry)?;
        if entry.offset >= pages {
            return Err(BadEntry::OffsetOutOfRange {
                slot_id: entry.slot_id(),
                offset: entry.offset,
                pages,
            });
        }
        Ok((entry.slot_id(), entry.offset))
    }

    /// The size of the slot `entry` names, if it is a tracked slot of address
    /// space 0; the offset is not checked.
    #[inline]
    pub(super) fn pages_of(&self, entry: DirtyEntry) -> Result<u64, BadEntry> {
        if entry.as_id() != 0 {
            return Err(BadEntry::WrongAddressSpace {
                as_id: entry.as_id(),
            });
        }
        self.pages(entry.slot_id()).ok_or(BadEntry::UnknownSlot {
            slot_id: entry.slot_id(),
        })
    }
}

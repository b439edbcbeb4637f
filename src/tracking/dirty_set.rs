//! The merged dirty-page set: what ring harvests and bitmap syncs found, until a consumer
//! (a migration pass) takes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The pages of one memory slot dirtied since a consumer last took the set: one bit per
/// page, fed by ring harvests or bitmap syncs, taken by a consumer (a migration pass).
///
/// When the tracker may have lost pages (an overflowed ring) the set is marked
/// *incomplete* and every take reports every page until the loss is behind it: a dirty
/// set that may have lost pages never passes as complete.
#[derive(Debug)]
pub struct DirtyPageSet {
    words: Box<[AtomicU64]>,
    pages: u64,
    incomplete: AtomicBool,
}

/// What [`DirtyPageSet::take`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// One bit per page, bit `p % 64` of word `p / 64` for page `p`.
    pub bitmap: Vec<u64>,
    /// False when pages may have been lost: then `bitmap` has every page set.
    pub complete: bool,
}

impl DirtyPages {
    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        self.bitmap
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The pages in the set, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    i as u64 * 64 + u64::from(bit)
                })
            })
        })
    }
}

impl DirtyPageSet {
    /// An empty set for a slot of `pages` pages.
    pub fn new(pages: u64) -> DirtyPageSet {
        DirtyPageSet {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            incomplete: AtomicBool::new(false),
        }
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds `page` (which the caller has bounds-checked against the slot).
    // Relaxed everywhere below: the bits are the only data, and read-modify-writes of one
    // word are totally ordered, so a take sees every mark that precedes it in that order.
    pub fn mark(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Adds every page set in `bitmap` (a slot-wide bitmap as `KVM_GET_DIRTY_LOG` returns
    /// it); bits past the end of the slot are ignored.
    pub fn mark_bitmap(&self, bitmap: &[u64]) {
        for (word, &bits) in self.words.iter().zip(bitmap) {
            if bits != 0 {
                word.fetch_or(bits, Ordering::Relaxed);
            }
        }
        self.clear_tail();
    }

    /// Records that pages may have been lost: until the next take, the set is every page.
    pub fn mark_incomplete(&self) {
        // Release: pairs with the Acquire swap in `take`, which then sees the flag no later
        // than any mark made after it.
        self.incomplete.store(true, Ordering::Release);
    }

    /// Takes the set, leaving it empty.
    pub fn take(&self) -> DirtyPages {
        // Acquire: pairs with the Release store in `mark_incomplete`.
        let complete = !self.incomplete.swap(false, Ordering::Acquire);
        let mut bitmap: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect();
        if !complete {
            bitmap.fill(u64::MAX);
            if let Some(last) = bitmap.last_mut() {
                *last &= tail_mask(self.pages);
            }
        }
        DirtyPages { bitmap, complete }
    }

    fn clear_tail(&self) {
        if let Some(last) = self.words.last() {
            last.fetch_and(tail_mask(self.pages), Ordering::Relaxed);
        }
    }
}

/// The bits of the last bitmap word that are real pages.
fn tail_mask(pages: u64) -> u64 {
    match pages % 64 {
        0 => u64::MAX,
        r => (1 << r) - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_marked_pages_once() {
        let set = DirtyPageSet::new(130);
        for p in [0, 63, 64, 129] {
            set.mark(p);
        }
        set.mark(63);
        let taken = set.take();
        assert!(taken.complete);
        assert_eq!(taken.pages().collect::<Vec<_>>(), [0, 63, 64, 129]);
        assert_eq!(taken.count(), 4);
        assert!(taken.contains(129) && !taken.contains(128) && !taken.contains(9999));
        assert_eq!(set.take().count(), 0);
    }

    #[test]
    fn bitmaps_merge_without_pages_past_the_slot() {
        let set = DirtyPageSet::new(70);
        set.mark(1);
        set.mark_bitmap(&[0b100, u64::MAX]);
        assert_eq!(
            set.take().pages().collect::<Vec<_>>(),
            [1, 2, 64, 65, 66, 67, 68, 69]
        );
    }

    #[test]
    fn incomplete_set_reports_every_page_once() {
        let set = DirtyPageSet::new(100);
        set.mark(5);
        set.mark_incomplete();
        let taken = set.take();
        assert!(!taken.complete);
        assert_eq!(taken.count(), 100);
        let next = set.take();
        assert!(next.complete);
        assert_eq!(next.count(), 0);
    }
}

//! Dirty-page logging that stays exact under pagetrack.
//!
//! When a VM is created with [`crate::VmConfig::with_dirty_log`], every KVM memslot fragment
//! carries `KVM_MEM_LOG_DIRTY_PAGES`, and each guest RAM region has a [`DirtyBits`]: pages
//! written since the VMM last read the region's log. It collects three sources:
//! - KVM's own log of a fragment, harvested (`KVM_GET_DIRTY_LOG`) when the VMM reads the log
//!   and, before a re-cut deletes a fragment, so that a split or merge loses nothing;
//! - stores pagetrack applies in userspace (trapped guest stores to tracked frames, the ones
//!   it completes itself, and device writes through [`crate::TrackedMemory`]), which KVM never
//!   sees.
//!
//! Each region's log has two consumers that share every harvest: the VMM's
//! ([`DirtyBits::take`], behind [`crate::Vm::take_dirty_log`]) and the checkpoint's
//! ([`DirtyBits::take_since_checkpoint`], `checkpoint.rs`). A page written is set in both, and
//! each consumer clears only its own bits, so neither takes pages from the other.

use std::sync::atomic::{AtomicU64, Ordering};

const PAGE: u64 = 4096;

/// One bit per 4 KiB page of a guest RAM region: written since the last [`DirtyBits::take`].
#[derive(Debug)]
pub(crate) struct DirtyBits {
    gpa: u64,
    pages: u64,
    words: Vec<AtomicU64>,
    /// The same pages for the checkpoint (`checkpoint.rs`): written since the last
    /// [`DirtyBits::take_since_checkpoint`].
    since_checkpoint: Vec<AtomicU64>,
}

impl DirtyBits {
    /// A clean log for the region `[gpa, gpa + size)` (page-aligned).
    pub(crate) fn new(gpa: u64, size: u64) -> DirtyBits {
        let pages = size / PAGE;
        let words = usize::try_from(pages.div_ceil(64)).expect("a mapped region's bitmap fits");
        DirtyBits {
            gpa,
            pages,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            since_checkpoint: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// True if some byte of `[gpa, gpa + len)` lies in the region.
    pub(crate) fn overlaps(&self, gpa: u64, len: u64) -> bool {
        len > 0 && gpa < self.gpa + self.pages * PAGE && self.gpa < gpa.saturating_add(len)
    }

    fn set(&self, page: u64) {
        self.set_for(page, true);
    }

    /// Sets `page` in the VMM's log, and in the checkpoint's if `since_checkpoint`.
    fn set_for(&self, page: u64, since_checkpoint: bool) {
        let w = usize::try_from(page / 64).expect("page inside the region");
        // Relaxed: `take` swaps whole words, and a bit set after that swap is simply seen by
        // the next `take`; the write it records happened before the set on this thread.
        self.words[w].fetch_or(1 << (page % 64), Ordering::Relaxed);
        if since_checkpoint {
            // Relaxed: as above, with `take_since_checkpoint`.
            self.since_checkpoint[w].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// The checkpoint's log so far (bit i = page i of the region), leaving it clean; the
    /// VMM's log ([`DirtyBits::take`]) keeps its bits.
    pub(crate) fn take_since_checkpoint(&self) -> Vec<u64> {
        // AcqRel: as in `take`.
        self.since_checkpoint
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Marks the pages of `[gpa, gpa + len)` that lie in the region.
    #[cfg(test)]
    pub(crate) fn mark(&self, gpa: u64, len: u64) {
        self.mark_for(gpa, len, true);
    }

    /// Marks the pages of `[gpa, gpa + len)` that lie in the region, in the VMM's log, and
    /// in the checkpoint's if `since_checkpoint`.
    pub(crate) fn mark_for(&self, gpa: u64, len: u64, since_checkpoint: bool) {
        if !self.overlaps(gpa, len) {
            return;
        }
        let first = gpa.max(self.gpa);
        let last = (gpa + len - 1).min(self.gpa + self.pages * PAGE - 1);
        for page in (first - self.gpa) / PAGE..=(last - self.gpa) / PAGE {
            self.set_for(page, since_checkpoint);
        }
    }

    /// Merges a KVM dirty bitmap of a memslot that starts at `slot_gpa` (bit i = its page i).
    pub(crate) fn merge(&self, slot_gpa: u64, bitmap: &[u64]) {
        let base = (slot_gpa - self.gpa) / PAGE;
        for page in set_bits(bitmap).map(|b| base + b) {
            if page < self.pages {
                self.set(page);
            }
        }
    }

    /// The log so far (bit i = page i of the region), leaving it clean.
    pub(crate) fn take(&self) -> Vec<u64> {
        // AcqRel: each word is read and cleared at once, so no bit is lost or counted twice.
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

/// The indices of the set bits of a bitmap (bit i of word w is `64 w + i`), ascending.
pub(crate) fn set_bits(bits: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                w as u64 * 64 + b
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_spanning_two_pages_sets_both_and_take_clears() {
        let d = DirtyBits::new(0x10_0000, 16 * PAGE);
        d.mark(0x10_0ffc, 8);
        assert_eq!(d.take(), vec![0b11]);
        assert_eq!(d.take(), vec![0]);
    }

    #[test]
    fn each_consumer_takes_only_its_own_bits() {
        let d = DirtyBits::new(0, 128 * PAGE);
        d.mark(3 * PAGE, 1);
        d.merge(64 * PAGE, &[0b1]);
        assert_eq!(d.take_since_checkpoint(), vec![0b1000, 0b1]);
        assert_eq!(d.take_since_checkpoint(), vec![0, 0]);
        // The VMM's log still has both pages.
        assert_eq!(d.take(), vec![0b1000, 0b1]);
        d.mark(PAGE, 1);
        assert_eq!(d.take(), vec![0b10, 0]);
        assert_eq!(d.take_since_checkpoint(), vec![0b10, 0]);
    }

    #[test]
    fn mark_for_the_vmm_only_leaves_the_checkpoints_log_alone() {
        let d = DirtyBits::new(0, 64 * PAGE);
        d.mark_for(5 * PAGE, 8, false);
        assert_eq!(d.take_since_checkpoint(), vec![0]);
        assert_eq!(d.take(), vec![1 << 5]);
    }

    #[test]
    fn mark_outside_region_changes_nothing() {
        let d = DirtyBits::new(0x10_0000, 4 * PAGE);
        d.mark(0x0f_f000, 0x1000);
        d.mark(0x10_4000, 8);
        d.mark(0x10_0000, 0);
        assert_eq!(d.take(), vec![0]);
    }

    #[test]
    fn mark_straddling_the_region_start_sets_only_inside_pages() {
        let d = DirtyBits::new(0x10_0000, 4 * PAGE);
        d.mark(0x0f_fff8, 16);
        assert_eq!(d.take(), vec![0b1]);
    }

    #[test]
    fn merge_of_a_fragment_bitmap_lands_at_its_offset() {
        let d = DirtyBits::new(0, 200 * PAGE);
        // A fragment starting at page 100: its pages 0 and 63 are pages 100 and 163.
        d.merge(100 * PAGE, &[1 | (1 << 63)]);
        let got = d.take();
        assert_eq!(got[1], 1 << 36);
        assert_eq!(got[2], 1 << 35);
        assert_eq!(got[0] | got[3], 0);
    }

    #[test]
    fn merge_ignores_bits_past_the_region_end() {
        let d = DirtyBits::new(0, 2 * PAGE);
        d.merge(PAGE, &[0b111]); // pages 1, 2, 3: only page 1 is in the region
        assert_eq!(d.take(), vec![0b10]);
    }
}

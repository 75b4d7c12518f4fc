//! The dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`, [`crate::VmConfig::with_dirty_ring`]):
//! one ring of `kvm_dirty_gfn` entries per vCPU, which KVM fills as guest stores first dirty
//! a page of a logging memslot since its last reset. On x86 the ring replaces the memslots'
//! bitmaps (`KVM_GET/CLEAR_DIRTY_LOG` fail), so every harvest pagetrack makes (the VMM's
//! [`crate::Vm::take_dirty_log`], a re-cut deleting a fragment, a relaxed sync, a checkpoint)
//! comes here: [`DirtyRings::take`] harvests every vCPU's ring (entries marked harvested),
//! then `KVM_RESET_DIRTY_RINGS` write-protects their pages again, and only then are the
//! entries returned, for the fragment table to dispatch by memslot id (`slots.rs`). The
//! caller reads memory (diffs, copies) after that: a store after the reset is logged anew.
//!
//! A vCPU whose ring fills past KVM's soft limit exits with `KVM_EXIT_DIRTY_RING_FULL` and
//! cannot enter again until its ring is reset: its thread calls [`DirtyRings::collect`]
//! (`handler.rs`), which harvests and resets as `take` does but keeps the entries queued for
//! the next `take` (without the fragment table's lock, which a pause may hold).
//!
//! An entry in vCPU n's ring says vCPU n dirtied the page first since its last reset (the
//! write-protect fault logs the page in the ring of the vCPU that took it; later stores in
//! the same epoch do not fault): the first-writer hint of coalesced events.

use std::sync::Mutex;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::sys::DirtyRingMap;

/// One harvested ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RingEntry {
    /// `as_id << 16 | memslot id`.
    pub(crate) slot: u32,
    /// Page index inside the memslot.
    pub(crate) offset: u64,
    /// The vCPU whose ring held it.
    pub(crate) vcpu: u32,
}

/// Counters of the dirty ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingStats {
    /// Entries harvested from the rings.
    pub entries: u64,
    /// `KVM_RESET_DIRTY_RINGS` calls.
    pub resets: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub full_exits: u64,
    /// Entries naming a memslot pagetrack does not own (the VMM's own memslots of a VM
    /// brought with [`crate::Vm::from_vm_fd`]), kept for [`crate::Vm::take_vmm_ring_dirty`].
    pub foreign_entries: u64,
    /// Entries ring-full exits harvested that no harvest took yet (duplicates dropped once
    /// they pile up).
    pub queued: u64,
}

#[derive(Debug, Default)]
struct Inner {
    rings: Vec<(u32, DirtyRingMap)>,
    /// Entries harvested and reset by a ring-full exit, not yet taken.
    queue: Vec<RingEntry>,
    /// The queue's length after its last compaction.
    compacted: usize,
    stats: RingStats,
}

/// Every vCPU's dirty ring of a VM.
#[derive(Debug)]
pub(crate) struct DirtyRings {
    bytes: u32,
    acq_rel: bool,
    inner: Mutex<Inner>,
}

impl DirtyRings {
    pub(crate) fn new(bytes: u32, acq_rel: bool) -> DirtyRings {
        DirtyRings {
            bytes,
            acq_rel,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ring size in entries.
    pub(crate) fn entries(&self) -> u32 {
        self.bytes / 16
    }

    /// True if the VM enabled `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
    pub(crate) fn acq_rel(&self) -> bool {
        self.acq_rel
    }

    /// Maps vCPU `index`'s ring (`fd` was just created, before its first `KVM_RUN`).
    pub(crate) fn add_vcpu(&self, index: u32, fd: &VcpuFd) -> Result<()> {
        let ring = DirtyRingMap::map(fd, self.bytes).map_err(Error::kvm("mmap dirty ring"))?;
        self.lock().rings.push((index, ring));
        Ok(())
    }

    /// Harvests every ring into `inner.queue`, then resets them. On a failed reset the
    /// entries stay queued (harvested, not yet re-protected: the next reset covers them,
    /// and nobody reads them before a reset succeeded).
    fn harvest_and_reset(inner: &mut Inner, vm: &VmFd) -> Result<()> {
        let Inner {
            rings,
            queue,
            stats,
            ..
        } = inner;
        let mut n = 0u64;
        for (vcpu, ring) in rings.iter_mut() {
            let vcpu = *vcpu;
            n += u64::from(ring.harvest(|slot, offset| {
                queue.push(RingEntry { slot, offset, vcpu });
            }));
        }
        stats.entries += n;
        crate::sys::reset_dirty_rings(vm).map_err(Error::kvm("KVM_RESET_DIRTY_RINGS"))?;
        stats.resets += 1;
        Ok(())
    }

    /// The ring-full exit of a vCPU: harvests and resets every ring, keeping the entries
    /// for the next [`DirtyRings::take`].
    pub(crate) fn collect_full(&self, vm: &VmFd) -> Result<()> {
        let mut inner = self.lock();
        inner.stats.full_exits += 1;
        DirtyRings::harvest_and_reset(&mut inner, vm)?;
        // A guest that re-dirties the same pages and never lets the VMM take them would
        // grow the queue without bound: duplicates go once it doubled (the consumers take
        // sets, and a frame's first writer depends only on which rings logged it), so it
        // stays within (pages logged) x (vCPUs) entries.
        let len = inner.queue.len();
        if len > (2 * inner.compacted).max(4096) {
            inner.compacted = compact(&mut inner.queue);
        }
        Ok(())
    }

    /// Every entry since the last take (those ring-full exits collected first, then every
    /// ring's, in ring order), after `KVM_RESET_DIRTY_RINGS` re-protected their pages.
    pub(crate) fn take(&self, vm: &VmFd) -> Result<Vec<RingEntry>> {
        let mut inner = self.lock();
        DirtyRings::harvest_and_reset(&mut inner, vm)?;
        inner.compacted = 0;
        Ok(std::mem::take(&mut inner.queue))
    }

    pub(crate) fn count_foreign(&self, n: u64) {
        self.lock().stats.foreign_entries += n;
    }

    pub(crate) fn stats(&self) -> RingStats {
        let inner = self.lock();
        RingStats {
            queued: inner.queue.len() as u64,
            ..inner.stats
        }
    }
}

/// Sorts `queue` and drops repeated entries (same slot, page and vCPU); returns its length.
fn compact(queue: &mut Vec<RingEntry>) -> usize {
    queue.sort_unstable();
    queue.dedup();
    queue.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_each_page_once_per_vcpu() {
        let e = |slot, offset, vcpu| RingEntry { slot, offset, vcpu };
        let mut q = vec![e(1, 5, 0), e(1, 5, 0), e(1, 5, 1), e(0, 9, 0), e(1, 5, 0)];
        assert_eq!(compact(&mut q), 3);
        assert_eq!(q, vec![e(0, 9, 0), e(1, 5, 0), e(1, 5, 1)]);
    }
}
